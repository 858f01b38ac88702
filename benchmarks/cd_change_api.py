"""Changing a running VM's CD through the engine's REST API vs the host agent's own
``VM.changeCD`` of the same VM and ISOs.

Run by hand on a lab machine (the packages `make test` installs)::

    .venv/bin/python benchmarks/cd_change_api.py              # 20 rounds of each
    .venv/bin/python benchmarks/cd_change_api.py --rounds 40

Its own one-host lab with its engine (ports from 24400, state in /tmp), always taken down.
Everything a user would do goes through the engine's REST API (JSON over HTTPS, one keep-alive
client with a bearer token): the host registered, a block storage domain made on a free LUN
and attached, two small ISOs uploaded as ISO disks (``POST disks`` + an image transfer, the
bytes sent with ``ovirt_imageio.client``), a tiny guest started with an empty CD-ROM.
Measured, alternating round by round so both cases see the same machine:

* engine: ``PUT vms/{id}/cdroms/{cd}?current=true`` with the other ISO until it answers (the
  checks, the proof that the host reaches the domain's LUN, ``VM.changeCD``, the row written);
* agent: ``VM.changeCD`` of the same drive with the same PDIVs straight through the agent's
  mutual-TLS JSON-RPC client. Goal: engine ≤ 2x agent.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from benchlab import bench_lab

from virtyard.lab.demo import register_hosts
from virtyard.lab.guest_image import DEFAULT_CMDLINE

PORT_BASE = 24400
MiB = 1 << 20
CDROM = "00000000-0000-0000-0000-000000000000"


def ok(answer: httpx.Response) -> Any:
    if not answer.is_success:
        raise RuntimeError(f"{answer.request.method} {answer.request.url}: "
                           f"{answer.status_code} {answer.text[:300]}")
    return answer.json() if answer.content else {}


def wait(api: httpx.Client, path: str, field: str, value: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while ok(api.get(path)).get(field) != value:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: {field} is not {value} after {timeout} s")
        time.sleep(0.2)


def make_iso(tmp: Path, text: str) -> Path:
    (tmp / text).mkdir()
    (tmp / text / "hello.txt").write_text(text)
    out = tmp / f"{text}.iso"
    subprocess.run(["genisoimage", "-quiet", "-o", str(out), "-r", str(tmp / text)],
                   check=True)
    return out


def upload_iso(api: httpx.Client, ca_file: str, domain_id: str, path: Path) -> str:
    """An ISO disk through the engine's upload, as oVirt's clients do it; its id."""
    from ovirt_imageio import client  # noqa: PLC0415  (a dev dependency)

    size = path.stat().st_size
    disk = ok(api.post("/disks", json={
        "name": path.stem, "content_type": "iso", "format": "raw",
        "provisioned_size": size, "storage_domains": {"storage_domain": [{"id": domain_id}]}}))
    wait(api, f"/disks/{disk['id']}", "status", "ok")
    transfer = ok(api.post("/imagetransfers", json={"disk": {"id": disk["id"]},
                                                    "direction": "upload"}))
    wait(api, f"/imagetransfers/{transfer['id']}", "phase", "transferring")
    transfer = ok(api.get(f"/imagetransfers/{transfer['id']}"))
    client.upload(str(path), transfer["transfer_url"], ca_file)
    ok(api.post(f"/imagetransfers/{transfer['id']}/finalize", json={}))
    wait(api, f"/disks/{disk['id']}", "status", "ok")
    return str(disk["id"])


def ms(values: list[float]) -> str:
    q = statistics.quantiles(values, n=20) if len(values) > 1 else values * 19
    return (f"median {statistics.median(values) * 1000:6.1f} ms, p95 {q[18] * 1000:6.1f} ms "
            f"({len(values)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with bench_lab(PORT_BASE) as lab, tempfile.TemporaryDirectory() as tmp:
        host_id = register_hosts(lab)["host1"]
        target = lab.storage.create_target("cdapi", [64 * MiB])
        agent = lab.agent_client(0)
        ca_file = str(lab.engine.ca_file)
        with lab.engine.api(timeout=120) as api:
            domain = ok(api.post("/storagedomains", json={
                "name": "bench-isos", "type": "data", "host": {"id": host_id},
                "storage": {"type": "iscsi", "volume_group": {"logical_units": {
                    "logical_unit": [{"id": target.wwid(1), "address": target.address,
                                      "port": target.port, "target": target.iqn}]}}}}))
            dc = ok(api.get("/datacenters", params={"search": "name=Default"}))
            dc_id = dc["data_center"][0]["id"]
            ok(api.post(f"/datacenters/{dc_id}/storagedomains", json={"id": domain["id"]}))
            isos = [upload_iso(api, ca_file, domain["id"], make_iso(Path(tmp), name))
                    for name in ("alpha", "bravo")]
            image = lab.guest_image
            vm = ok(api.post("/vms", json={
                "name": "bench-cd", "memory": 192 * MiB, "cluster": {"name": "Default"},
                "template": {"name": "Blank"},
                "os": {"kernel": str(image.kernel), "initrd": str(image.initrd),
                       "cmdline": DEFAULT_CMDLINE}}))
            ok(api.post(f"/vms/{vm['id']}/start", json={}))
            cd_path = f"/vms/{vm['id']}/cdroms/{CDROM}"

            def engine_change(iso: str) -> float:
                start = time.perf_counter()
                ok(api.put(cd_path, params={"current": "true"}, json={"file": {"id": iso}}))
                return time.perf_counter() - start

            # The PDIVs and the drive exactly as the engine sent them (what the agent reports).
            pdivs: dict[str, dict[str, str]] = {}
            drive: dict[str, Any] = {}
            for iso in isos:
                engine_change(iso)
                [listed] = agent.call("Host.getVMFullList", {"vmList": [vm["id"]]})
                [cd] = [d for d in listed["devices"] if d.get("device") == "cdrom"]
                pdivs[iso] = cd["PDIV"]
                drive = {"iface": cd["iface"], "index": cd["index"]}

            def agent_change(iso: str) -> float:
                start = time.perf_counter()
                agent.call("VM.changeCD", {"vmID": vm["id"], "driveSpec": {
                    "drive_spec": pdivs[iso], **drive}})
                return time.perf_counter() - start

            engine_times: list[float] = []
            agent_times: list[float] = []
            current = 1  # the drive holds isos[1]
            for round_ in range(args.rounds + 1):  # round 0 warms up, untimed
                e = engine_change(isos[1 - current])
                a = agent_change(isos[current])  # back (the engine sees it as monitoring does)
                if round_:
                    engine_times.append(e)
                    agent_times.append(a)
            ok(api.post(f"/vms/{vm['id']}/stop", json={}))
        agent.close()
    ratio = statistics.median(engine_times) / statistics.median(agent_times)
    print(f"engine PUT cdroms?current=true  {ms(engine_times)}")
    print(f"agent VM.changeCD               {ms(agent_times)}")
    print(f"  ratio {ratio:.2f}x (goal <= 2x) {'met' if ratio <= 2 else 'MISSED'}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
