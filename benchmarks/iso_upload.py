"""ISO upload throughput: through the engine's image transfer vs straight to a LUN with libiscsi.

Run by hand on a lab machine (the packages `make test` installs)::

    .venv/bin/python benchmarks/iso_upload.py                 # a 256 MiB ISO, 3 rounds
    .venv/bin/python benchmarks/iso_upload.py --size-mib 512 --rounds 5

It brings up its own one-host lab with its engine (ports from 21660, state in /tmp), adds the
host and a block storage domain on a lab LUN through the REST API, makes an ISO of random
(incompressible) data with genisoimage, and takes everything down at the end. Measured,
alternating round by round so both cases see the same machine:

* upload: what ``upload_disk.py`` does once the disk exists — ``POST imagetransfers``, the
  bytes with ``ovirt_imageio.client.upload()`` (4 writers, its default) to the transfer URL,
  ``finalize``, until ``finished_success``. The engine spools the bytes, sends them to the
  host agent (``Volume.write``, 8 MiB each) and, at finalize, has the agent read the volume
  back and compare its SHA-256 (``Volume.verify``). Reported whole, and the data phase alone.
* libiscsi: the same file written to another LUN of the same target by ``qemu-img convert``
  with QEMU's libiscsi driver (``iscsi://``), flushed at the end: the user-space initiator's
  own write path, no engine, no agent.

Goal: upload throughput ≥ 0.5x libiscsi's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from benchlab import bench_lab
from ovirt_imageio import client

from virtyard.lab.demo import register_hosts

PORT_BASE = 21660
MiB = 1 << 20


def ok(answer: httpx.Response) -> dict[str, Any]:
    if not answer.is_success:
        raise RuntimeError(f"{answer.request.method} {answer.request.url}: "
                           f"{answer.status_code} {answer.text[:300]}")
    body: dict[str, Any] = answer.json() if answer.content else {}
    return body


def wait(api: httpx.Client, path: str, key: str, values: tuple[str, ...],
         timeout: float = 600.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = ok(api.get(path))
        if found.get(key) in values:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: {key} is still {found.get(key)}")
        time.sleep(0.05)


def make_iso(folder: Path, size: int) -> Path:
    src = folder / "src"
    src.mkdir()
    with (src / "random.bin").open("wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    out = folder / "bench.iso"
    subprocess.run(["genisoimage", "-quiet", "-o", str(out), "-V", "BENCH", "-r", str(src)],
                   check=True)
    return out


def add_domain(api: httpx.Client, host: str, target: Any) -> str:
    domain = ok(api.post("/storagedomains", json={
        "name": "bench-isos", "type": "data", "host": {"id": host},
        "storage": {"type": "iscsi", "volume_group": {"logical_units": {"logical_unit": [
            {"id": target.wwid(1), "address": target.address, "port": target.port,
             "target": target.iqn}]}}}}))
    dcs = ok(api.get("/datacenters", params={"search": "name=Default"}))["data_center"]
    ok(api.post(f"/datacenters/{dcs[0]['id']}/storagedomains", json={"id": domain["id"]}))
    return str(domain["id"])


def upload(api: httpx.Client, iso: Path, domain: str, ca_file: str) -> tuple[float, float]:
    """(data phase, whole) seconds of one upload into a new disk (removed afterwards)."""
    size = iso.stat().st_size
    disk = ok(api.post("/disks", json={
        "name": f"bench-{uuid.uuid4().hex[:6]}", "content_type": "iso", "format": "raw",
        "provisioned_size": size, "storage_domains": {"storage_domain": [{"id": domain}]}}))
    wait(api, f"/disks/{disk['id']}", "status", ("ok",))
    started = time.perf_counter()
    transfer = ok(api.post("/imagetransfers", json={"disk": {"id": disk["id"]},
                                                    "direction": "upload"}))
    data_start = time.perf_counter()
    client.upload(str(iso), transfer["transfer_url"], ca_file)
    data = time.perf_counter() - data_start
    ok(api.post(f"/imagetransfers/{transfer['id']}/finalize", json={}))
    done = wait(api, f"/imagetransfers/{transfer['id']}", "phase",
                ("finished_success", "finished_failure", "finished_cleanup"))
    whole = time.perf_counter() - started
    if done["phase"] != "finished_success":
        raise RuntimeError(f"upload failed: {done}")
    ok(api.delete(f"/disks/{disk['id']}"))
    return data, whole


def libiscsi_write(iso: Path, target: Any) -> float:
    url = f"iscsi://{target.address}:{target.port}/{target.iqn}/2"
    started = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(iso), url],
                   check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="random data in the ISO")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vy-bench-iso-") as tmp, \
            bench_lab(PORT_BASE) as lab:
        iso = make_iso(Path(tmp), args.size_mib * MiB)
        size = iso.stat().st_size
        host = register_hosts(lab)["host1"]
        target = lab.storage.create_target("isos", [2 * size + 64 * MiB, size + 16 * MiB])
        ca_file = str(lab.engine.ca_file)
        with lab.engine.api(timeout=600) as api:
            domain = add_domain(api, host, target)
            upload(api, iso, domain, ca_file)  # warm-up, untimed
            libiscsi_write(iso, target)
            data: list[float] = []
            whole: list[float] = []
            direct: list[float] = []
            for _ in range(args.rounds):
                d, w = upload(api, iso, domain, ca_file)
                data.append(d)
                whole.append(w)
                direct.append(libiscsi_write(iso, target))

        def rate(seconds: list[float]) -> float:
            return size / MiB / statistics.median(seconds)

        print(f"ISO of {size / MiB:.0f} MiB, {args.rounds} rounds, medians")
        print(f"libiscsi (qemu-img convert → iscsi://)   {rate(direct):7.1f} MiB/s")
        print(f"image transfer, data phase (client.upload) {rate(data):7.1f} MiB/s")
        print(f"image transfer, whole (transfer → finished_success, verify included) "
              f"{rate(whole):7.1f} MiB/s")
        ratio = rate(whole) / rate(direct)
        print(f"ratio whole/libiscsi {ratio:.2f}x (goal ≥ 0.5x: "
              f"{'met' if ratio >= 0.5 else 'missed'}); data phase "
              f"{rate(data) / rate(direct):.2f}x")


if __name__ == "__main__":
    main()
