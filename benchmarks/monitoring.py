"""Engine monitoring at scale (issue 11): the real engine against ``virtyard-hostsim``.

Run by hand (no lab needed; about 6.5 minutes with the defaults on 2 vCPUs)::

    .venv/bin/python benchmarks/monitoring.py                        # all runs, plot in docs/
    .venv/bin/python benchmarks/monitoring.py --runs quiet,naive --window 30
    .venv/bin/python benchmarks/monitoring.py --runs sweep --sweep 1000,5000,20000 --plot /tmp/s.png
    .venv/bin/python benchmarks/monitoring.py --hosts 50 --vms-per-host 40 --runs changes

It starts ``virtyard-hostsim`` (``--hosts`` x ``--vms-per-host``, one LUN disk each, a spare LUN
per VM; HTTPS from 127.0.0.1:``--port-base``+100) and ``virtyard-engine run`` (SQLite, HTTPS on
``--port-base``, heartbeat 3 s, a ``--cycle`` s poll, pushes on, a ``monitoring report`` log line
per cycle). The database is seeded with the simulated VMs (their disks attached, the spare one
unplugged), the hosts are added through the REST API and the engine finds the VMs running on
them. Then, each over ``--window`` seconds (engine CPU from /proc, the engine's report lines for
cycle wall and calls):

- ``quiet``: nothing changes. Goals: engine CPU <= 30 % of one core, zero full device reads
  (``Host.getVMFullList``), cycle wall <= 1 s.
- ``changes``: ``--change-rate`` of the VMs per cycle get a device change, spread over the
  cycle: the benchmark hot-plugs the VM's spare disk on its simulated host (``VM.hotplugDisk``,
  the guest names it at once) or unplugs it again. Delay from the call to the new state in the
  database (every change) and in ``GET vms/{id}/diskattachments/{disk}`` (every 10th). Goal:
  all within one cycle, with pushes <= 1 s.
- ``nopush`` (not in the defaults): the same changes with pushes off, the poll alone.
- ``naive``: the engine restarted with ``[monitoring] naive = true`` (every VM's full device
  list every cycle). Goal: engine CPU naive / ours >= 10.
- ``baseline``: the engine restarted with the poll and pushes off (heartbeat and REST only):
  what the engine costs without its monitoring.
- ``sweep``: for each total in ``--sweep`` (100 hosts), and 500 hosts x 40 VMs, a fresh
  simulator, database and engine, ``--sweep-window`` seconds quiet: cycle wall and engine CPU
  against VM count, drawn into ``--plot``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from virtyard.host.client import ClientTls, HostClient
from virtyard.lab import ports
from virtyard.lab.agents import LabPki
from virtyard.lab.engine import EngineProcess

PORT_BASE = 18640  # engine; the simulated hosts from PORT_BASE + 100 (below 32768)
SPARE_NS = uuid.UUID("0b5e7f63-3c8e-4a9b-8d51-6a1e9c2f4b10")
REPORT_RE = re.compile(r"monitoring report: (.*)$")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- the simulator ---------------------------------------------------------------------------------

@dataclass
class SimVm:
    vm_id: str
    name: str
    host: str  # the simulated host's name
    hash: str
    disks: list[dict[str, Any]]  # the full list's disk dicts (GUID, diskId, guestName)
    spare_guid: str
    spare_id: str
    spare_plugged: bool = False


@dataclass
class Simulated:
    proc: subprocess.Popen[bytes]
    hosts: list[dict[str, Any]]  # the hosts file: name, address, hostUUID, …
    vms: list[SimVm]
    tls: ClientTls

    def pid(self) -> int:
        return self.proc.pid


@contextlib.contextmanager
def simulator(root: Path, pki: LabPki, hosts: int, vms: int, base_port: int) -> Iterator[Simulated]:
    """``virtyard-hostsim`` with the engine's CA; its VMs read back over JSON-RPC."""
    pki.ensure()
    hosts_file = root / "hosts.json"
    hosts_file.unlink(missing_ok=True)
    for port in range(base_port, base_port + hosts):
        ports.ensure_free(port, "a simulated host")
    log = (root / "hostsim.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtyard.hostsim.cli", "--hosts", str(hosts),
         "--vms-per-host", str(vms), "--luns-per-host", str(vms), "--disks-per-vm", "1",
         "--guest-name-delay", "0", "--base-port", str(base_port), "--pki", str(pki.root),
         "--hosts-file", str(hosts_file), "--seed", "11", "--log-level", "WARNING"],
        stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not (hosts_file.exists() and ports.port_is_listening(base_port + hosts - 1)):
            if proc.poll() is not None:
                raise RuntimeError(f"virtyard-hostsim exited (see {root / 'hostsim.log'})")
            if time.monotonic() > deadline:
                raise RuntimeError("virtyard-hostsim did not start")
            time.sleep(0.1)
        listed = json.loads(hosts_file.read_text())
        tls = ClientTls(pki.client.cert, pki.client.key, pki.ca.cert)
        yield Simulated(proc, listed, read_vms(listed, tls), tls)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def read_vms(hosts: list[dict[str, Any]], tls: ClientTls) -> list[SimVm]:
    """Every simulated VM with its disks and hash, and a free LUN of its host as its spare."""
    out = []
    for host in hosts:
        with HostClient(host["address"], tls) as client:
            stats = {s["vmId"]: s["hash"] for s in client.call("Host.getAllVmStats")}
            free = sorted(d["GUID"] for d in client.call("Host.getDeviceList",
                                                         {"checkStatus": False})
                          if d["status"] == "free")
            full = sorted(client.call("Host.getVMFullList"), key=lambda v: v["vmName"])
        for vm, spare in zip(full, free, strict=False):
            out.append(SimVm(vm["vmId"], vm["vmName"], host["name"], stats[vm["vmId"]],
                             [d for d in vm["devices"] if d.get("diskId")], spare,
                             str(uuid.uuid5(SPARE_NS, spare))))
    return out


# -- the database and the engine --------------------------------------------------------------

def seed(url: str, vms: list[SimVm], *, hashes: bool) -> None:
    """The simulated VMs as the engine's own (down, no host yet): their disks attached and
    plugged with the guest's names, the spare disk attached and unplugged. ``hashes``: their
    device hashes stored too (the engine starts as if it had read them before)."""
    db = Database(url)
    db.migrate()
    rows: dict[Any, list[dict[str, Any]]] = {m: [] for m in (
        StorageServerConnection, Vm, VmDynamic, BaseDisk, Lun, LunConnection, DiskVmElement,
        VmDevice)}
    connection = "c0000000-0000-4000-8000-000000000000"
    rows[StorageServerConnection].append({
        "id": connection, "connection": "127.0.0.1", "port": 3260,
        "iqn": "iqn.2026-11.org.virtyard.hostsim:san", "portal": "1"})

    def disk(vm: SimVm, disk_id: str, guid: str, name: str, *, plugged: bool,
             boot: bool) -> None:
        rows[BaseDisk].append({"id": disk_id, "alias": f"{vm.name}-{guid[-6:]}",
                               "storage_type": "lun"})
        rows[Lun].append({"lun_id": guid, "disk_id": disk_id, "device_size": 10 << 30,
                          "vendor_id": "VIRTYARD", "product_id": "HOSTSIM LUN"})
        rows[LunConnection].append({"lun_id": guid, "connection_id": connection})
        rows[DiskVmElement].append({"disk_id": disk_id, "vm_id": vm.vm_id, "is_boot": boot,
                                    "exclusive_disk_id": disk_id})
        rows[VmDevice].append({"device_id": disk_id, "vm_id": vm.vm_id, "type": "disk",
                               "device": "disk", "is_plugged": plugged, "logical_name": name})

    for vm in vms:
        rows[Vm].append({"id": vm.vm_id, "name": vm.name, "cluster_id": DEFAULT_CLUSTER_ID})
        rows[VmDynamic].append({"vm_id": vm.vm_id, "status": "down",
                                "devices_hash": vm.hash if hashes else ""})
        for n, d in enumerate(vm.disks):
            disk(vm, d["diskId"], d["GUID"], d.get("guestName") or "", plugged=True,
                 boot=n == 0)
        disk(vm, vm.spare_id, vm.spare_guid, "", plugged=False, boot=False)
    with db.transaction() as tx:
        for model, values in rows.items():
            for start in range(0, len(values), 5000):
                tx.execute(insert(model), values[start:start + 5000])
    db.dispose()


class BenchEngine(EngineProcess):
    """The lab's engine process with more ``[monitoring]`` settings."""

    monitoring = ""

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text()
        self.config_path.write_text(text.replace("[monitoring]\n",
                                                 "[monitoring]\n" + self.monitoring, 1))


@dataclass
class Report:
    """What the engine's monitoring did over a window (sums of its per-cycle report lines)."""

    walls: list[float] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, line: str) -> None:
        values = dict(kv.split("=", 1) for kv in line.split())
        self.walls.append(float(values.pop("wall_max")))
        values.pop("wall_mean")
        values.pop("seconds")
        for key, value in values.items():
            self.counts[key] = self.counts.get(key, 0) + int(value)


class EngineWatch:
    """Reads the engine's report lines as they come."""

    def __init__(self, engine: EngineProcess) -> None:
        self.path = engine.log_path
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def lines(self) -> list[str]:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [m.group(1) for raw in data[:end].decode(errors="replace").splitlines()
                if (m := REPORT_RE.search(raw))]

    def wait_cycles(self, count: int, timeout: float) -> Report:
        report = Report()
        deadline = time.monotonic() + timeout
        while len(report.walls) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {count} monitoring cycles within {timeout:.0f} s "
                                   f"(see {self.path})")
            time.sleep(0.2)
            for line in self.lines():
                report.add(line)
        return report


@dataclass
class Setup:
    root: Path
    pki: LabPki
    engine: BenchEngine
    sim: Simulated
    url: str
    host_ids: dict[str, str] = field(default_factory=dict)  # simulated name -> engine id

    @property
    def db_path(self) -> str:
        return self.url.removeprefix("sqlite:///")

    def count_up(self) -> int:
        with contextlib.closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)) as c:
            return int(c.execute("SELECT count(*) FROM vm_dynamic WHERE status = 'up'")
                       .fetchone()[0])


def monitoring_config(cycle: float, *, naive: bool = False, push: bool = True,
                      poll: bool = True) -> tuple[float, str]:
    """(poll_interval, the other [monitoring] settings)."""
    lines = "report_interval = 0.001\n"
    if naive:
        lines += "naive = true\n"
    if not push:
        lines += "push = false\n"
    return (cycle if poll else 3600.0), lines


@contextlib.contextmanager
def setup(args: argparse.Namespace, hosts: int, vms: int, *, hashes: bool) -> Iterator[Setup]:
    """A simulator, a seeded database and an engine watching every simulated host."""
    root = Path(tempfile.mkdtemp(prefix="vy-monbench-", dir="/tmp"))
    pki = LabPki(root / "pki")
    try:
        with simulator(root, pki, hosts, vms, args.port_base + 100) as sim:
            url = f"sqlite:///{root / 'engine.db'}"
            began = time.perf_counter()
            seed(url, sim.vms, hashes=hashes)
            print(f"  {hosts} hosts x {vms} VMs: seeded in {time.perf_counter() - began:.1f} s",
                  flush=True)
            engine = BenchEngine(root / "engine", args.port_base, pki, database_url=url,
                                 heartbeat_interval=args.heartbeat)
            engine.poll_interval, engine.monitoring = monitoring_config(args.cycle)
            engine.start()
            try:
                s = Setup(root, pki, engine, sim, url)
                add_hosts(s)
                wait_all_up(s, len(sim.vms))
                yield s
            finally:
                engine.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def add_hosts(s: Setup) -> None:
    """Every simulated host through ``POST /hosts``; then wait for all to be up."""
    began = time.perf_counter()
    watch = EngineWatch(s.engine)
    with s.engine.api() as api:
        for host in s.sim.hosts:
            address, port = host["address"].rsplit(":", 1)
            answer = api.post("/hosts", json={"name": host["name"], "address": address,
                                              "port": int(port)})
            answer.raise_for_status()
            s.host_ids[host["name"]] = answer.json()["id"]
        deadline = time.monotonic() + 120
        while True:
            statuses = [h["status"] for h in api.get("/hosts").json().get("host", [])]
            if statuses.count("up") == len(s.sim.hosts):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"hosts not up: {sorted(set(statuses))}")
            time.sleep(0.5)
    watch.lines()
    print(f"  {len(s.sim.hosts)} hosts added and up in {time.perf_counter() - began:.1f} s",
          flush=True)


def wait_all_up(s: Setup, total: int, timeout: float = 300) -> None:
    began = time.perf_counter()
    watch = EngineWatch(s.engine)
    watch.offset = 0
    deadline = time.monotonic() + timeout
    while s.count_up() < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {s.count_up()} of {total} VMs up")
        time.sleep(0.5)
    first = Report()
    for line in watch.lines():
        first.add(line)
    print(f"  all {total} VMs up in the engine {time.perf_counter() - began:.1f} s after the "
          f"hosts; first cycles: wall max {max(first.walls or [0]):.2f} s, "
          f"{first.counts.get('full_list_vms', 0)} VMs' full lists", flush=True)


def restart(s: Setup, args: argparse.Namespace, **how: bool) -> None:
    """The engine again with other monitoring settings; after its start-up work (every
    host's capabilities and connections again)."""
    s.engine.stop()
    s.engine.poll_interval, s.engine.monitoring = monitoring_config(args.cycle, **how)
    s.engine.start()
    time.sleep(args.settle)


# -- measuring ---------------------------------------------------------------------------------

@dataclass
class Window:
    seconds: float
    cpu: float  # engine CPU seconds
    sim_cpu: float
    report: Report

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu / self.seconds

    @property
    def cycles(self) -> int:
        return len(self.report.walls)

    @property
    def cpu_per_cycle(self) -> float:
        return self.cpu / max(1, self.cycles)

    def line(self, name: str) -> str:
        walls = self.report.walls or [0.0]
        c = self.report.counts
        return (f"| {name} | {self.cpu_percent:.1f} % | {self.cpu_per_cycle * 1000:.0f} ms | "
                f"{self.cycles} | {statistics.median(walls):.3f} / {max(walls):.3f} s | "
                f"{c.get('full_list_calls', 0)} ({c.get('full_list_vms', 0)} VMs) | "
                f"{c.get('pushes', 0)} | {100 * self.sim_cpu / self.seconds:.0f} % |")


HEADER = ("| run | engine CPU (of one core) | engine CPU per cycle | cycles | cycle wall p50 / max "
          "| full lists (VMs) | pushes | simulator CPU |\n|---|---|---|---|---|---|---|---|")


def measure(s: Setup, seconds: float, *, cycles: bool = True) -> Window:
    """Engine CPU and its report lines from the end of a cycle to the end of the first cycle
    at least ``seconds`` later (at least two cycles); ``cycles=False``: just ``seconds``."""
    watch = EngineWatch(s.engine)
    pid = s.engine.pid()
    assert pid is not None
    if cycles:
        watch.wait_cycles(1, timeout=120)
    cpu0, sim0, t0 = cpu_seconds(pid), cpu_seconds(s.sim.pid()), time.monotonic()
    report = Report()
    while True:
        time.sleep(0.1)
        for line in watch.lines():
            report.add(line)
        now = time.monotonic()
        if not cycles and now - t0 >= seconds:
            break
        if cycles and now - t0 >= seconds and len(report.walls) >= 2:
            break
        if now - t0 > seconds + 300:
            raise RuntimeError("no monitoring cycles")
    return Window(now - t0, cpu_seconds(pid) - cpu0, cpu_seconds(s.sim.pid()) - sim0, report)


@dataclass
class Change:
    vm: SimVm
    plugged: bool  # the state it goes to
    sent: float
    rest: bool  # also watched through the REST API
    in_db: float | None = None
    in_rest: float | None = None


def run_changes(s: Setup, args: argparse.Namespace, seconds: float) -> tuple[Window,
                                                                             list[Change]]:
    """``change_rate`` of the VMs per cycle hot-plug or unplug their spare disk on the
    simulated host; each change is watched in the database and every 10th in the REST API."""
    per_cycle = max(1, round(args.change_rate * len(s.sim.vms)))
    gap = args.cycle / per_cycle
    changes: list[Change] = []
    lock = threading.Lock()
    stop = threading.Event()  # no more changes
    driven = threading.Event()  # the last change was made
    clients: dict[str, HostClient] = {}
    addresses = {h["name"]: h["address"] for h in s.sim.hosts}
    rng = random.Random(5)

    def drive() -> None:
        due = time.monotonic()
        n = 0
        while not stop.is_set():
            with lock:
                busy = {c.vm.vm_id for c in changes if c.in_db is None}
            vm = rng.choice(s.sim.vms)
            if vm.vm_id in busy:
                continue
            client = clients.get(vm.host)
            if client is None:
                client = clients[vm.host] = HostClient(addresses[vm.host], s.sim.tls)
            sent = time.monotonic()
            if vm.spare_plugged:
                client.call("VM.hotunplugDisk", {"vmID": vm.vm_id,
                                                 "drive": {"GUID": vm.spare_guid}})
            else:
                client.call("VM.hotplugDisk", {"vmID": vm.vm_id, "drive": {
                    "type": "disk", "device": "disk", "iface": "scsi", "index": 1,
                    "GUID": vm.spare_guid, "diskId": vm.spare_id, "serial": "spare"}})
            vm.spare_plugged = not vm.spare_plugged
            change = Change(vm, vm.spare_plugged, sent, rest=n % 10 == 0)
            with lock:
                changes.append(change)
            if change.rest:
                follower = threading.Thread(target=watch_rest, args=(change,), daemon=True)
                followers.append(follower)
                follower.start()
            n += 1
            due += gap
            stop.wait(max(0.0, due - time.monotonic()))
        driven.set()

    def watch_db() -> None:
        db = sqlite3.connect(f"file:{s.db_path}?mode=ro", uri=True)
        while not driven.is_set() or any(c.in_db is None for c in changes):
            with lock:
                pending = {c.vm.spare_id: c for c in changes if c.in_db is None}
            if pending:
                marks = ",".join("?" * len(pending))
                now = time.monotonic()
                for device_id, plugged, name in db.execute(
                        f"SELECT device_id, is_plugged, logical_name FROM vm_device "
                        f"WHERE device_id IN ({marks})", list(pending)):
                    c = pending[device_id]
                    if bool(plugged) == c.plugged and bool(name) == c.plugged:
                        c.in_db = now
            if time.monotonic() > end + 3 * args.cycle:
                break
            time.sleep(0.02)
        db.close()

    def watch_rest(c: Change) -> None:
        path = f"/vms/{c.vm.vm_id}/diskattachments/{c.vm.spare_id}"
        while time.monotonic() < end + 3 * args.cycle:
            got = api.get(path).json()
            if bool(got.get("logical_name")) == c.plugged \
                    and got.get("active", False) == c.plugged:
                c.in_rest = time.monotonic()
                return
            time.sleep(0.05)

    followers: list[threading.Thread] = []
    stack = contextlib.ExitStack()
    api = stack.enter_context(s.engine.api())
    watch = EngineWatch(s.engine)
    watch.wait_cycles(1, timeout=60)
    pid = s.engine.pid()
    assert pid is not None
    end = time.monotonic() + seconds
    threads = [threading.Thread(target=f, daemon=True) for f in (drive, watch_db)]
    cpu0, sim0, t0 = cpu_seconds(pid), cpu_seconds(s.sim.pid()), time.monotonic()
    watch.lines()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    report = Report()
    for line in watch.lines():
        report.add(line)
    window = Window(time.monotonic() - t0, cpu_seconds(pid) - cpu0,
                    cpu_seconds(s.sim.pid()) - sim0, report)
    for t in threads + followers:
        t.join()
    for client in clients.values():
        client.close()
    stack.close()
    return window, changes


def delays(changes: list[Change], cycle: float) -> str:
    seen = [c.in_db - c.sent for c in changes if c.in_db is not None]
    rest = [c.in_rest - c.sent for c in changes if c.in_rest is not None]
    out = []
    for name, values, of in (("database", seen, len(changes)),
                             ("REST", rest, sum(c.rest for c in changes))):
        if not values:
            out.append(f"| {name} | {of} | 0 | - | - | - | - | - |")
            continue
        within = sum(v <= 1.0 for v in values)
        in_cycle = sum(v <= cycle for v in values)
        out.append(f"| {name} | {of} | {len(values)} | {statistics.median(values) * 1000:.0f} ms"
                   f" | {percentile(values, 0.9) * 1000:.0f} ms | "
                   f"{percentile(values, 0.99) * 1000:.0f} ms | {max(values) * 1000:.0f} ms | "
                   f"{within} / {in_cycle} |")
    return ("| seen in | changes | seen | p50 | p90 | p99 | max | <= 1 s / <= one cycle |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(out))


# -- the runs ----------------------------------------------------------------------------------

def main_runs(args: argparse.Namespace, runs: set[str]) -> None:
    total = args.hosts * args.vms_per_host
    print(f"\n## {args.hosts} hosts x {args.vms_per_host} VMs = {total:,} VMs, "
          f"{args.cycle:g} s cycle", flush=True)
    results: dict[str, Window] = {}
    with setup(args, args.hosts, args.vms_per_host, hashes=False) as s:
        if "quiet" in runs:
            results["quiet"] = measure(s, args.window)
            print(HEADER + "\n" + results["quiet"].line("quiet (ours)"), flush=True)
        if "changes" in runs:
            window, changes = run_changes(s, args, args.window)
            results["changes"] = window
            print(window.line(f"{args.change_rate:.1%} of VMs change per cycle"))
            print(delays(changes, args.cycle), flush=True)
        if "nopush" in runs:
            restart(s, args, push=False)
            window, changes = run_changes(s, args, args.window)
            results["nopush"] = window
            print(window.line("the same, pushes off (poll only)"))
            print(delays(changes, args.cycle), flush=True)
        if "naive" in runs:
            restart(s, args, naive=True)
            results["naive"] = measure(s, args.window)
            print(results["naive"].line("naive (every full list every cycle)"), flush=True)
        if "baseline" in runs:
            restart(s, args, poll=False, push=False)
            results["baseline"] = measure(s, args.window, cycles=False)
            print(results["baseline"].line("baseline: no poll, no pushes (heartbeat only)"),
                  flush=True)
    print(f"\n{HEADER}")
    names = {"quiet": "quiet (ours)", "changes": "changes", "nopush": "changes, no pushes",
             "naive": "naive", "baseline": "baseline (heartbeat only)"}
    for key, window in results.items():
        print(window.line(names[key]))
    if "quiet" in results and "naive" in results:
        ours, naive = results["quiet"], results["naive"]
        print(f"naive / ours: engine CPU {naive.cpu_percent / ours.cpu_percent:.1f}x, "
              f"CPU per cycle {naive.cpu_per_cycle / ours.cpu_per_cycle:.1f}x")
    if "baseline" in results:
        base = results["baseline"].cpu / results["baseline"].seconds
        own = {k: (w.cpu / w.seconds - base) * w.seconds / max(1, w.cycles)
               for k, w in results.items() if k != "baseline"}
        print("the monitoring's own CPU per cycle (engine minus baseline): " + ", ".join(
            f"{names[k]} {v * 1000:.0f} ms" for k, v in own.items()))
        if own.get("quiet", 0) > 0 and "naive" in own:
            print(f"naive / ours, the monitoring's own CPU per cycle: "
                  f"{own['naive'] / own['quiet']:.1f}x")


def sweep(args: argparse.Namespace) -> None:
    sizes = [(100, max(1, n // 100)) for n in args.sweep]
    if args.sweep_wide:
        sizes.append((500, 40))
    print(f"\n## sweep ({args.cycle:g} s cycle, {args.sweep_window:g} s windows)\n"
          f"| hosts x VMs | VMs | engine CPU | CPU per cycle | cycles | cycle wall p50 / max "
          f"| full lists | simulator CPU |\n|---|---|---|---|---|---|---|---|", flush=True)
    points = []
    for hosts, vms in sizes:
        with setup(args, hosts, vms, hashes=True) as s:
            w = measure(s, args.sweep_window)
        walls = w.report.walls or [0.0]
        points.append((hosts, vms, w))
        print(f"| {hosts} x {vms} | {hosts * vms:,} | {w.cpu_percent:.1f} % | "
              f"{w.cpu_per_cycle * 1000:.0f} ms | {w.cycles} | {statistics.median(walls):.3f} / "
              f"{max(walls):.3f} s | {w.report.counts.get('full_list_calls', 0)} | "
              f"{100 * w.sim_cpu / w.seconds:.0f} % |", flush=True)
    if args.plot is not None:
        plot(points, args)


def plot(points: list[tuple[int, int, Window]], args: argparse.Namespace) -> None:
    import matplotlib  # noqa: PLC0415  (only the sweep draws)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (wall_ax, per_ax, cpu_ax) = plt.subplots(1, 3, figsize=(14, 4))
    for hosts, marker in ((100, "o-"), (500, "s")):
        mine = [(h * v, w) for h, v, w in points if h == hosts]
        if not mine:
            continue
        xs = [n for n, _ in mine]
        label = f"{hosts} hosts"
        wall_ax.plot(xs, [statistics.median(w.report.walls or [0]) for _, w in mine], marker,
                     label=f"{label}, p50")
        wall_ax.plot(xs, [max(w.report.walls or [0]) for _, w in mine], marker, alpha=0.4,
                     label=f"{label}, max")
        per_ax.plot(xs, [w.cpu_per_cycle for _, w in mine], marker, label=label)
        cpu_ax.plot(xs, [w.cpu_percent for _, w in mine], marker, label=label)
    wall_ax.axhline(1.0, color="grey", linestyle=":", label="goal at 10k VMs")
    per_ax.axhline(args.cycle, color="red", linestyle="--", label="the cycle (one core full)")
    cpu_ax.axhline(30.0, color="grey", linestyle=":", label="goal at 10k VMs")
    wall_ax.set(xlabel="VMs", ylabel="cycle wall (s)", title="Monitoring cycle wall")
    per_ax.set(xlabel="VMs", ylabel="engine CPU per cycle (s)",
               title="Engine CPU per cycle")
    cpu_ax.set(xlabel="VMs", ylabel="engine CPU (% of one core)",
               title=f"Engine CPU ({args.cycle:g} s poll interval)")
    for ax in (wall_ax, per_ax, cpu_ax):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"benchmarks/monitoring.py, nothing changing, {datetime.date.today()}",
                 fontsize=9)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=90)
    print(f"plot: {args.plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="quiet,changes,naive,baseline,sweep",
                        help="comma-separated: quiet, changes, nopush, naive, baseline, sweep")
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--vms-per-host", type=int, default=100)
    parser.add_argument("--cycle", type=float, default=3.0, help="the poll interval (s)")
    parser.add_argument("--heartbeat", type=float, default=3.0,
                        help="the heartbeat interval (s; the engine's default)")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds after an engine restart before measuring")
    parser.add_argument("--window", type=float, default=24.0, help="seconds per run")
    parser.add_argument("--change-rate", type=float, default=0.01,
                        help="fraction of the VMs changing per cycle")
    parser.add_argument("--sweep", type=lambda t: [int(x) for x in t.split(",") if x],
                        default=[1000, 2000, 5000, 10000, 20000],
                        help="VM totals on 100 hosts")
    parser.add_argument("--no-sweep-wide", dest="sweep_wide", action="store_false",
                        help="leave out 500 hosts x 40 VMs")
    parser.add_argument("--sweep-window", type=float, default=12.0)
    parser.add_argument("--plot", type=Path, default=Path("docs/monitoring-sweep.png"))
    parser.add_argument("--port-base", type=int, default=PORT_BASE,
                        help="the engine's port; simulated hosts from +100 (default %(default)s)")
    args = parser.parse_args()
    runs = set(args.runs.split(","))
    began = time.monotonic()
    if runs - {"sweep"}:
        main_runs(args, runs)
    if "sweep" in runs:
        sweep(args)
    print(f"\n{datetime.date.today()}, {time.monotonic() - began:.0f} s, load average "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
