"""What ``make demo`` sets up on top of the lab: a demo target, agents connected to it, a
block storage domain on its third LUN holding one small ISO (a text file inside), the lab's
hosts registered in the lab's engine (through its REST API) and ``up`` there, and the demo VM
``demo`` — an engine VM, made through the same REST API: the tiny guest with the first LUN as
a direct LUN disk, started on host 1 (host 2 if host 1 cannot see the LUN). Idempotent: run it
again and it finds what is there.

The engine does not manage CD-ROMs yet (the ``VM.create`` it sends has no CD-ROM device, see
``virtyard.engine.hosts.vm_spec``), so the demo VM has none for now; the ISO domain stays on
the agents for ``VM.changeCD`` on VMs made on an agent directly (README, "The demo")."""

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

import httpx

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
DEMO_VM = "demo"
DEMO_DISK = "demo-lun1"
DEMO_VM_MEMORY = 256 << 20
# VM statuses on the way to ``up`` (a start or a migration under way): wait, do not start.
ON_THE_WAY = ("wait_for_launch", "powering_up", "migrating", "reboot_in_progress")


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


def _request(api: httpx.Client, method: str, path: str, what: str,
             **kwargs: Any) -> dict[str, Any]:
    """One REST call that must succeed (2xx); its JSON answer (``{}`` when it has none)."""
    answer = api.request(method, path, **kwargs)
    if not answer.is_success:
        raise LabError(f"the engine refused to {what}: {answer.status_code} "
                       f"{answer.text[:300]}")
    body: dict[str, Any] = answer.json() if answer.content else {}
    return body


def demo_vm(lab: Lab, target: TargetInfo, hosts: list[str], *,
            timeout: float = 120.0) -> str:
    """The engine VM ``demo``, up; its id. Made through the REST API when missing: LUN 1 of
    the demo target as a LUN disk, the VM (the lab's tiny guest booted from its kernel and
    initrd, placement ``hosts`` in order), the disk attached (virtio-scsi, active), started.
    A ``demo`` that runs is left as it is; one that is down gets its disk and is started."""
    image = lab.guest_image
    with lab.engine.api(timeout=timeout) as api:
        found = _request(api, "GET", "/vms", "list VMs",
                         params={"search": f"name={DEMO_VM}"}).get("vm", [])
        vm = found[0] if found else None
        if vm is None or vm["status"] == "down":
            disk = _request(api, "POST", "/disks", "add the demo LUN as a disk", json={
                "alias": DEMO_DISK, "lun_storage": {"type": "iscsi", "logical_units": {
                    "logical_unit": [{"id": target.wwid(1), "address": target.address,
                                      "port": target.port, "target": target.iqn}]}}})
            if vm is None:
                vm = _request(api, "POST", "/vms", "add the demo VM", json={
                    "name": DEMO_VM, "memory": DEMO_VM_MEMORY,
                    "cluster": {"name": "Default"}, "template": {"name": "Blank"},
                    "os": {"kernel": str(image.kernel), "initrd": str(image.initrd),
                           "cmdline": DEFAULT_CMDLINE},
                    "placement_policy": {"hosts": {"host": [{"id": h} for h in hosts]}}})
            vm_id = str(vm["id"])
            attached = _request(api, "GET", f"/vms/{vm_id}/diskattachments",
                                "list the demo VM's disks").get("disk_attachment", [])
            if not any(a["id"] == disk["id"] for a in attached):
                _request(api, "POST", f"/vms/{vm_id}/diskattachments",
                         "attach the demo disk", json={
                             "disk": {"id": disk["id"]}, "interface": "virtio_scsi",
                             "active": True})
            elif not next(a for a in attached if a["id"] == disk["id"]).get("active"):
                _request(api, "PUT", f"/vms/{vm_id}/diskattachments/{disk['id']}",
                         "activate the demo disk", json={"active": True})
            _request(api, "POST", f"/vms/{vm_id}/start", "start the demo VM", json={})
        vm_id = str(vm["id"])
        deadline = time.monotonic() + timeout
        while True:
            vm = _request(api, "GET", f"/vms/{vm_id}", "show the demo VM")
            if vm["status"] == "up":
                return vm_id
            if vm["status"] not in ON_THE_WAY or time.monotonic() > deadline:
                raise LabError(f"the demo VM is {vm['status']}, not up: "
                               f"{vm.get('status_detail') or ''}".rstrip(": "))
            time.sleep(0.5)


def set_up(lab: Lab) -> dict[str, str]:
    """Target, connections, the hosts in the engine, the demo VM; returns the ``demo.env``
    additions."""
    target = next((t for t in lab.storage.targets() if t.iqn.endswith(f":{DEMO_TARGET}")), None)
    if target is None:
        target = lab.storage.create_target(DEMO_TARGET, DEMO_LUN_SIZES)
    connection = {"id": DEMO_CONNECTION, "connection": target.address, "port": target.port,
                  "iqn": target.iqn}
    for index in range(len(lab.agents)):
        with lab.agent_client(index) as client:
            if not any(d["pathlist"][0]["iqn"] == target.iqn for d in client.call(
                    "Host.getDeviceList", {"checkStatus": False, "refresh": False})):
                client.call("StoragePool.connectStorageServer",
                            {"domainType": 3, "connectionParams": [connection]})
    iso = _iso_domain(lab, target)
    hosts = register_hosts(lab)
    vm_id = demo_vm(lab, target, [hosts[a.name] for a in lab.agents])
    image = lab.guest_image
    return {"VIRTYARD_DEMO_VM": vm_id, "VIRTYARD_DEMO_TARGET": target.iqn,
            "VIRTYARD_DEMO_ISO": json.dumps(iso),
            "VIRTYARD_GUEST_KERNEL": str(image.kernel),
            "VIRTYARD_GUEST_INITRD": str(image.initrd),
            "VIRTYARD_GUEST_CMDLINE": DEFAULT_CMDLINE}
