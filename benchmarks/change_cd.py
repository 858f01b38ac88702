"""VM.changeCD end to end vs the bare libvirt media change it performs.

Run by hand on a lab machine::

    .venv/bin/python benchmarks/change_cd.py            # 20 rounds
    .venv/bin/python benchmarks/change_cd.py --rounds 50

Its own one-host lab (ports from 23400, state in /tmp), a block storage domain with two small
ISOs and a tiny guest with a SCSI CD-ROM. Measured, alternating round by round:

* ``VM.changeCD`` switching between the two ISOs: metadata mark, prepare of the new volume,
  eject + insert through libvirt, metadata apply, release of the old volume, answer — through
  the mutual-TLS JSON-RPC client.
* bare: the same eject + insert with ``updateDeviceFlags`` straight to libvirtd, plus the
  volume activation it needs (``Image.prepare`` through the agent; on this machine volumes
  are exposed as iSCSI slices, so activation is bookkeeping).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import libvirt
from benchlab import bench_lab, vm_params

from virtyard.lab import qga

PORT_BASE = 23400
POOL = str(uuid.uuid4())


def make_iso(text: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "src").mkdir()
        (Path(tmp) / "src" / "hello.txt").write_text(text)
        out = Path(tmp) / "x.iso"
        subprocess.run(["genisoimage", "-quiet", "-o", str(out), "-r", str(Path(tmp) / "src")],
                       check=True)
        return out.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with bench_lab(PORT_BASE) as lab:
        target = lab.storage.create_target("cd", [64 << 20])
        client = lab.agent_client(0)
        client.call("StoragePool.connectStorageServer", {"domainType": 3, "connectionParams": [
            {"id": "cd", "connection": target.address, "port": target.port, "iqn": target.iqn}]})
        domain_id = str(uuid.uuid4())
        client.call("StorageDomain.create", {"domainID": domain_id,
                                             "guid": target.wwid(1)})
        pdivs: list[dict[str, str]] = []
        for name in ("a", "b"):
            data = make_iso(name)
            pdiv = {"poolID": POOL, "domainID": domain_id, "imageID": str(uuid.uuid4()),
                    "volumeID": str(uuid.uuid4())}
            client.call("Volume.create", {**pdiv, "size": len(data)})
            client.call("Volume.write", {**pdiv, "offset": 0,
                                         "data": base64.b64encode(data).decode()})
            client.call("Volume.verify", {**pdiv, "size": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest()})
            pdivs.append(pdiv)
        params = vm_params(lab, "cd", [{"type": "disk", "device": "cdrom", "iface": "scsi",
                                        "index": 2}])
        client.call("VM.create", {"vmParams": params})
        vm_id = params["vmId"]
        dom = libvirt.open(lab.hosts[0].uri).lookupByUUIDString(vm_id)
        qga.wait_ready(dom)

        def change(pdiv: dict[str, str]) -> Any:
            return client.call("VM.changeCD", {"vmID": vm_id, "driveSpec": {
                "drive_spec": pdiv, "iface": "scsi", "index": 2}})

        change(pdivs[0])
        # The bare media XMLs: exactly what the agent gave libvirt for each ISO (live XML).
        xml_of: dict[str, str] = {}
        for pdiv in (pdivs[1], pdivs[0]):
            change(pdiv)
            live = dom.XMLDesc(0)
            start = live.index("<disk type='network' device='cdrom'")
            xml_of[pdiv["volumeID"]] = live[start:live.index("</disk>", start) + 7]
        empty = xml_of[pdivs[0]["volumeID"]]
        empty = empty[:empty.index("<source")] + empty[empty.index("</source>") + 9:]
        empty = empty.replace("type='network'", "type='file'", 1)
        ours, bare = [], []
        current = 0  # drive holds pdivs[0]
        for _ in range(args.rounds):
            nxt = 1 - current
            start_t = time.perf_counter()
            change(pdivs[nxt])
            ours.append(time.perf_counter() - start_t)
            current = nxt
            nxt = 1 - current
            start_t = time.perf_counter()
            client.call("Image.prepare", {**pdivs[nxt], "user": "bench:bare", "iso": True})
            dom.updateDeviceFlags(empty, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            dom.updateDeviceFlags(xml_of[pdivs[nxt]["volumeID"]], libvirt.VIR_DOMAIN_AFFECT_LIVE)
            bare.append(time.perf_counter() - start_t)
            client.call("Image.teardown", {**pdivs[nxt], "user": "bench:bare"})
            change(pdivs[current])  # back to a state the agent knows (untimed)
        o, b = statistics.median(ours), statistics.median(bare)
        print(f"VM.changeCD (end to end)              median {o * 1000:6.1f} ms")
        print(f"bare eject+insert + Image.prepare     median {b * 1000:6.1f} ms")
        print(f"ratio {o / b:.2f}x (goal <= 2x)")
        client.call("VM.destroy", {"vmID": vm_id})
        client.close()


if __name__ == "__main__":
    main()
