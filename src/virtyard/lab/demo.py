"""What ``make demo`` sets up on top of the lab: a demo target, agents connected to it, and a
demo VM (the tiny guest) with one LUN as a direct LUN disk. Idempotent: run it again and it
finds what is there."""

from __future__ import annotations

import uuid
from typing import Any

from virtyard.host.client import HostCallError
from virtyard.lab.guest_image import DEFAULT_CMDLINE
from virtyard.lab.lab import Lab

DEMO_TARGET = "demo"
DEMO_CONNECTION = "demo"
DEMO_LUN_SIZES = [1 << 30, 1 << 30, 512 << 20]


def demo_wwid(tid: int, lun: int) -> str:
    """tgt's NAA 6 WWID of (tid, lun), as udev and our device list name it."""
    return f"360000000000000000e000000{tid:04x}{lun:04x}"


def set_up(lab: Lab) -> dict[str, str]:
    """Target, connections and the demo VM; returns the ``demo.env`` additions."""
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
    with lab.agent_client(0) as client:
        running = {s["vmId"] for s in client.call("Host.getAllVmStats", {})}
        if vm_id not in running:
            image = lab.guest_image
            params: dict[str, Any] = {
                "vmId": vm_id, "vmName": "demo", "memSize": 256,
                "kernel": str(image.kernel), "initrd": str(image.initrd),
                "kernelArgs": DEFAULT_CMDLINE,
                "consoleLog": str(lab.console_dir / "demo.log"),
                "devices": [{"type": "disk", "device": "disk", "iface": "scsi", "index": 0,
                             "GUID": demo_wwid(target.tid, 1), "format": "raw",
                             "serial": "demo-lun1", "diskId": "demo-lun1"}]}
            try:
                client.call("VM.create", {"vmParams": params})
            except HostCallError as exc:
                if exc.code != 4:  # already exists (e.g. on another host after a migration)
                    raise
    return {"VIRTYARD_DEMO_VM": vm_id, "VIRTYARD_DEMO_TARGET": target.iqn}
