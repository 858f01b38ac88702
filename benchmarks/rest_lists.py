"""REST lists at scale: 2,000 VMs with 10,000 LUN disks, read by 50 concurrent SDK-like clients.

Run by hand (no lab needed; PostgreSQL server packages for the PostgreSQL half)::

    .venv/bin/python benchmarks/rest_lists.py                        # SQLite, then PostgreSQL
    .venv/bin/python benchmarks/rest_lists.py --db sqlite --vms 500 --clients 10
    .venv/bin/python benchmarks/rest_lists.py --heavy-rounds 1       # fewer follow requests

For each database it seeds ``--vms`` VMs with ``--disks`` LUN disks each (attached, plugged,
one iSCSI connection per 100 VMs) by bulk inserts through the models, starts the real engine
process (``virtyard-engine run``, HTTPS on 127.0.0.1:18600; a throwaway PostgreSQL on 18601),
logs in, and runs each case in turn with ``--clients`` threads, each an HTTP/1.1 keep-alive
``httpx.Client`` sending what the SDK sends (``Accept: application/xml``, ``Version: 4``,
``Authorization: Bearer``), as fast as answers come (closed loop). It prints p50/p99 latency,
throughput and the engine's CPU time per request (from /proc), and removes everything after.

Cases: ``GET /vms/{id}/diskattachments`` of random VMs; ``GET /disks?search=name=<random
alias>``; ``GET /vms`` (all); ``GET /vms?follow=disk_attachments.disk`` (all, ~25 MB of XML);
the last also with one client alone. Goals: p99 <= 50 ms for one VM's attachments, <= 2 s for
the follow over 2,000 VMs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import insert

from virtyard.engine.db.database import Database
from virtyard.engine.db.models import (
    DEFAULT_CLUSTER_ID,
    BaseDisk,
    DiskVmElement,
    Lun,
    LunConnection,
    StorageServerConnection,
    Vm,
    VmDevice,
    VmDynamic,
)
from virtyard.lab.agents import LabPki
from virtyard.lab.engine import SSO_TOKEN_PATH, EngineProcess
from virtyard.lab.postgres import PostgresServer

ENGINE_PORT = 18600
POSTGRES_PORT = 18601
SDK_HEADERS = {"Accept": "application/xml", "Content-Type": "application/xml", "Version": "4",
               "User-Agent": "PythonSDK/4.6.3"}
VMS_PER_CONNECTION = 100


def seed(db: Database, vms: int, disks: int) -> tuple[list[str], list[str]]:
    """Bulk-insert the VMs, their LUN disks and attachments; return VM ids and disk aliases."""
    rows: dict[Any, list[dict[str, Any]]] = {m: [] for m in (
        StorageServerConnection, Vm, VmDynamic, BaseDisk, Lun, LunConnection, DiskVmElement,
        VmDevice)}
    aliases = []
    for c in range(0, vms, VMS_PER_CONNECTION):
        rows[StorageServerConnection].append({
            "id": f"c{c:07d}-0000-0000-0000-000000000000", "connection": "192.0.2.10",
            "port": 3260, "iqn": f"iqn.2003-01.org.example:bench{c}", "portal": "1",
            "user_name": "chap", "password": "secret"})
    for i in range(vms):
        vm_id = f"{i:08d}-0000-4000-8000-000000000000"
        rows[Vm].append({"id": vm_id, "name": f"vm{i:05d}", "cluster_id": DEFAULT_CLUSTER_ID,
                         "memory_bytes": 2 << 30, "cpu_cores": 2})
        rows[VmDynamic].append({"vm_id": vm_id, "status": "down"})
        conn = f"c{i // VMS_PER_CONNECTION * VMS_PER_CONNECTION:07d}-0000-0000-0000-000000000000"
        for j in range(disks):
            disk_id = f"{i:08d}-{j:04d}-4000-8000-000000000000"
            wwid = f"360014050{i:08d}{j:04d}"
            alias = f"vm{i:05d}_lun{j}"
            aliases.append(alias)
            rows[BaseDisk].append({"id": disk_id, "alias": alias, "storage_type": "lun"})
            rows[Lun].append({"lun_id": wwid, "disk_id": disk_id, "device_size": 1 << 30,
                              "serial": f"SBENCH{i}{j}", "vendor_id": "LIO-ORG",
                              "product_id": "bench", "lun_mapping": j + 1})
            rows[LunConnection].append({"lun_id": wwid, "connection_id": conn})
            rows[DiskVmElement].append({"disk_id": disk_id, "vm_id": vm_id, "is_boot": j == 0,
                                        "exclusive_disk_id": disk_id})
            rows[VmDevice].append({"device_id": disk_id, "vm_id": vm_id, "type": "disk",
                                   "device": "lun", "is_plugged": True,
                                   "logical_name": f"/dev/sd{chr(98 + j)}"})
    with db.transaction() as tx:
        for model, values in rows.items():
            for start in range(0, len(values), 5000):
                tx.execute(insert(model), values[start:start + 5000])
    return [r["id"] for r in rows[Vm]], aliases


def engine_cpu(pid: int) -> float:
    """Seconds of CPU the engine process has used (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_memory_mib(engine: EngineProcess) -> int:
    """The engine process's peak resident memory (VmHWM)."""
    for line in Path(f"/proc/{engine.pid()}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


@dataclass
class Result:
    case: str
    clients: int
    latencies: list[float]
    seconds: float
    cpu: float
    failed: int = 0

    def row(self) -> str:
        lat = sorted(self.latencies)
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        rate = len(lat) / self.seconds
        return (f"| {self.case} | {self.clients} | {len(lat)} | {self.failed} | "
                f"{p50 * 1000:,.1f} ms | {p99 * 1000:,.1f} ms | {rate:,.1f}/s | "
                f"{self.cpu / len(lat) * 1000:,.1f} ms |")


@dataclass
class Case:
    name: str
    clients: int
    per_client: int
    path: Callable[[random.Random], str]


def run_case(engine: EngineProcess, token: str, case: Case) -> Result:
    """``clients`` threads, each ``per_client`` requests back to back; latencies of all."""
    clients, per_client, path = case.clients, case.per_client, case.path
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    errors: list[str] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        headers = {**SDK_HEADERS, "Authorization": f"Bearer {token}"}
        with httpx.Client(verify=str(engine.ca_file), headers=headers, timeout=600) as http:
            try:
                http.get(engine.url).raise_for_status()  # the connection is up
            finally:
                start.wait()
            mine = []
            for _ in range(per_client):
                began = time.perf_counter()
                try:
                    answer = http.get(engine.url + path(rng))
                except httpx.HTTPError as exc:  # counted, and the table says how many
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                mine.append(time.perf_counter() - began)
                if answer.status_code != 200:
                    with lock:
                        errors.append(f"{answer.status_code} {answer.text[:200]}")
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    pid = engine.pid()
    assert pid is not None
    start.wait()
    cpu0, t0 = engine_cpu(pid), time.perf_counter()
    for t in threads:
        t.join()
    seconds, cpu = time.perf_counter() - t0, engine_cpu(pid) - cpu0
    if errors:
        print(f"{case.name}: {len(errors)} failed, e.g. {errors[0][:300]}")
    return Result(case.name, clients, latencies, seconds, cpu, len(errors))


@contextmanager
def database(kind: str, root: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{root / 'engine.db'}"
        return
    with PostgresServer(POSTGRES_PORT) as server:
        yield server.url


def bench(kind: str, args: argparse.Namespace) -> list[Result]:
    root = Path(tempfile.mkdtemp(prefix=f"vy-rest-{kind}-", dir="/tmp"))
    with database(kind, root) as url:
        db = Database(url)
        db.migrate()
        began = time.perf_counter()
        vm_ids, aliases = seed(db, args.vms, args.disks)
        db.dispose()
        print(f"{kind}: seeded {len(vm_ids)} VMs, {len(aliases)} LUN disks in "
              f"{time.perf_counter() - began:.1f} s")
        engine = EngineProcess(root / "engine", ENGINE_PORT, LabPki(root / "pki"),
                               database_url=url, heartbeat_interval=60)
        engine.start()
        try:
            token = httpx.post(f"https://127.0.0.1:{ENGINE_PORT}{SSO_TOKEN_PATH}",
                               verify=str(engine.ca_file), data={
                                   "grant_type": "password", "scope": "ovirt-app-api",
                                   "username": "admin@internal",
                                   "password": engine.password}).json()["access_token"]
            check = httpx.get(engine.url + "/vms?follow=disk_attachments.disk",
                              verify=str(engine.ca_file), timeout=600,
                              headers={**SDK_HEADERS, "Authorization": f"Bearer {token}"})
            count = check.content.count(b"<disk_attachment ")
            assert count == len(aliases), count
            print(f"{kind}: follow answer {len(check.content) / 1e6:.1f} MB, {count} attachments")
            follow = "/vms?follow=disk_attachments.disk"
            cases = [
                Case("GET /vms/{id}/diskattachments (random VM)", 1, args.rounds * 5,
                     lambda r: f"/vms/{r.choice(vm_ids)}/diskattachments"),
                Case("GET /vms/{id}/diskattachments (random VM)", args.clients, args.rounds,
                     lambda r: f"/vms/{r.choice(vm_ids)}/diskattachments"),
                Case("GET /disks?search=name=<random alias>", args.clients, args.rounds,
                     lambda r: f"/disks?search=name%3D{r.choice(aliases)}"),
                Case(f"GET /vms ({len(vm_ids):,} VMs)", args.clients, args.heavy_rounds * 2,
                     lambda r: "/vms"),
                Case(f"GET {follow} ({len(aliases):,} disks)", 1, args.heavy_rounds * 3,
                     lambda r: follow),
                Case(f"GET {follow} ({len(aliases):,} disks)", args.clients,
                     args.heavy_rounds, lambda r: follow),
            ]
            results = []
            for case in cases:
                result = run_case(engine, token, case)
                print(result.row(), flush=True)
                results.append(result)
            print(f"{kind}: engine peak memory {peak_memory_mib(engine):,} MiB")
            return results
        finally:
            engine.stop()
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--vms", type=int, default=2000)
    parser.add_argument("--disks", type=int, default=5, help="LUN disks per VM")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=40,
                        help="requests per client for the light cases")
    parser.add_argument("--heavy-rounds", type=int, default=2,
                        help="requests per client for the whole-list cases")
    args = parser.parse_args()
    kinds = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    header = ("| case | clients | answered | failed | p50 | p99 | throughput | "
              "engine CPU/request |\n|---|---|---|---|---|---|---|---|")
    tables = {}
    for kind in kinds:
        print(header)
        tables[kind] = bench(kind, args)
    print(f"\n{datetime.date.today()}, load average {os.getloadavg()[0]:.2f}")
    for kind, results in tables.items():
        print(f"\n{kind}\n{header}")
        for result in results:
            print(result.row())


if __name__ == "__main__":
    main()
