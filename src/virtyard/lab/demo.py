"""What ``make demo`` sets up on top of the lab: a demo target, agents connected to it, a
block storage domain on its third LUN holding one small ISO (a text file inside), a demo VM
(the tiny guest) with the first LUN as a direct LUN disk and an empty CD-ROM, and the lab's
hosts registered in the lab's engine (through its REST API) and ``up`` there. Idempotent: run
it again and it finds what is there."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from virtyard.host.client import HostCallError
from virtyard.lab import ports
from virtyard.lab.errors import LabError
from virtyard.lab.guest_image import DEFAULT_CMDLINE
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab

DEMO_TARGET = "demo"
DEMO_CONNECTION = "demo"
DEMO_LUN_SIZES = [1 << 30, 1 << 30, 512 << 20]
DEMO_POOL = "00000000-0000-4000-8000-00000000d0d0"
DEMO_README = "Hello from Virtyard: this CD lives on an LVM volume on a SAN LUN.\n"


def _demo_iso() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        (src / "README.txt").write_text(DEMO_README)
        out = Path(tmp) / "demo.iso"
        subprocess.run(["genisoimage", "-quiet", "-V", "VYDEMO", "-r", "-o", str(out),
                        str(src)], check=True)
        return out.read_bytes()


def _iso_domain(lab: Lab, target: TargetInfo) -> dict[str, str]:
    """A block storage domain on LUN 3 with the demo ISO; its PDIV."""
    ids = {name: str(uuid.uuid5(uuid.NAMESPACE_URL, f"virtyard-demo-{name}:{lab.state_dir}"))
           for name in ("domain", "image", "volume")}
    pdiv = {"poolID": DEMO_POOL, "domainID": ids["domain"], "imageID": ids["image"],
            "volumeID": ids["volume"]}
    with lab.agent_client(0) as client:
        domains = {d["domainID"] for d in client.call("StorageDomain.list", {})}
        if ids["domain"] not in domains:
            client.call("StorageDomain.create", {"domainID": ids["domain"],
                                                 "guid": target.wwid(3), "name": "demo-isos"})
        volumes = {v["volumeID"]: v for v in client.call("Volume.list",
                                                         {"domainID": ids["domain"]})}
        if volumes.get(ids["volume"], {}).get("state") != "READY":
            data = _demo_iso()
            if ids["volume"] not in volumes:
                client.call("Volume.create", {**pdiv, "size": len(data), "type": "ISO"})
            client.call("Volume.write", {**pdiv, "offset": 0,
                                         "data": base64.b64encode(data).decode()})
            client.call("Volume.verify", {**pdiv, "size": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest()})
    return pdiv


def register_hosts(lab: Lab, *, timeout: float = 60.0) -> dict[str, str]:
    """Every lab host in the lab's engine (``POST /hosts`` unless a host of that name is
    there: then it is left as it is); returns once each is ``up`` (or in maintenance, where
    someone put it): name -> engine host id."""
    with lab.engine.api() as api:
        def hosts() -> dict[str, dict[str, Any]]:
            answer = api.get("/hosts")
            answer.raise_for_status()
            return {h["name"]: h for h in answer.json().get("host", [])}

        known = hosts()
        for agent in lab.agents:
            if agent.name not in known:
                answer = api.post("/hosts", json={"name": agent.name, "address": ports.LOOPBACK,
                                                  "port": agent.port})
                if answer.status_code != 201:
                    raise LabError(f"the engine did not add {agent.name}: "
                                   f"{answer.status_code} {answer.text[:300]}")
        deadline = time.monotonic() + timeout
        while True:
            known = hosts()
            waiting = {a.name: known[a.name] for a in lab.agents
                       if known[a.name]["status"] not in ("up", "maintenance")}
            if not waiting:
                return {a.name: str(known[a.name]["id"]) for a in lab.agents}
            if time.monotonic() > deadline:
                raise LabError(f"engine hosts not up after {timeout:g} s: " + "; ".join(
                    f"{name} {h['status']} {h.get('status_detail', '')}".strip()
                    for name, h in waiting.items()))
            time.sleep(0.5)


def set_up(lab: Lab) -> dict[str, str]:
    """Target, connections, the demo VM, the hosts in the engine; returns the ``demo.env``
    additions."""
    target = next((t for t in lab.storage.targets() if t.iqn.endswith(f":{DEMO_TARGET}")), None)
    if target is None:
        target = lab.storage.create_target(DEMO_TARGET, DEMO_LUN_SIZES)
    connection = {"id": DEMO_CONNECTION, "connection": target.address, "port": target.port,
                  "iqn": target.iqn}
    vm_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"virtyard-demo-vm:{lab.state_dir}"))
    for index in range(len(lab.agents)):
        with lab.agent_client(index) as client:
            if not any(d["pathlist"][0]["iqn"] == target.iqn for d in client.call(
                    "Host.getDeviceList", {"checkStatus": False, "refresh": False})):
                client.call("StoragePool.connectStorageServer",
                            {"domainType": 3, "connectionParams": [connection]})
    iso = _iso_domain(lab, target)
    running: set[str] = set()
    for index in range(len(lab.agents)):  # it may have been migrated to another host
        with lab.agent_client(index) as client:
            running |= {s["vmId"] for s in client.call("Host.getAllVmStats", {})}
    with lab.agent_client(0) as client:
        if vm_id not in running:
            image = lab.guest_image
            params: dict[str, Any] = {
                "vmId": vm_id, "vmName": "demo", "memSize": 256,
                "kernel": str(image.kernel), "initrd": str(image.initrd),
                "kernelArgs": DEFAULT_CMDLINE,
                "consoleLog": str(lab.console_dir / "demo.log"),
                "devices": [{"type": "disk", "device": "disk", "iface": "scsi", "index": 0,
                             "GUID": target.wwid(1), "format": "raw",
                             "serial": "demo-lun1", "diskId": "demo-lun1"},
                            {"type": "disk", "device": "cdrom", "iface": "scsi", "index": 2}]}
            try:
                client.call("VM.create", {"vmParams": params})
            except HostCallError as exc:
                if exc.code != 4:  # already exists (e.g. on another host after a migration)
                    raise
    register_hosts(lab)
    return {"VIRTYARD_DEMO_VM": vm_id, "VIRTYARD_DEMO_TARGET": target.iqn,
            "VIRTYARD_DEMO_ISO": json.dumps(iso)}
