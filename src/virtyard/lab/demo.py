"""What ``make demo`` sets up on top of the lab, all but the target through the engine's REST
API: a demo target, agents connected to it, the lab's hosts registered in the lab's engine and
``up`` there, a block storage domain on the target's third LUN (attached, active) holding one
small ISO disk (a text file inside, uploaded through an image transfer), and the demo VM
``demo``: the tiny guest with the first LUN as a direct LUN disk and an empty CD-ROM drive,
started on host 1 (host 2 if host 1 cannot see the LUN). Idempotent: run it again and it finds
what is there."""

from __future__ import annotations

import ssl
import subprocess
import tempfile
import time
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
DEMO_DOMAIN = "demo-isos"
DEMO_ISO = "demo.iso"
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


def iso_domain(lab: Lab, target: TargetInfo, host_id: str, *,
               timeout: float = 120.0) -> tuple[str, str]:
    """The engine's block storage domain ``demo-isos`` on the demo target's third LUN,
    attached and active, holding the ISO disk ``demo.iso`` uploaded as oVirt's clients upload
    (``POST disks``, an image transfer, the bytes to its URL, finalize); their ids. Made when
    missing."""
    with lab.engine.api(timeout=timeout) as api:
        found = _request(api, "GET", "/storagedomains", "list storage domains",
                         params={"search": f"name={DEMO_DOMAIN}"}).get("storage_domain", [])
        domain = found[0] if found else _request(
            api, "POST", "/storagedomains", "add the demo storage domain", json={
                "name": DEMO_DOMAIN, "type": "data", "host": {"id": host_id},
                "storage": {"type": "iscsi", "volume_group": {"logical_units": {
                    "logical_unit": [{"id": target.wwid(3), "address": target.address,
                                      "port": target.port, "target": target.iqn}]}}}})
        if domain["status"] == "unattached":
            dc = _request(api, "GET", "/datacenters", "list data centers",
                          params={"search": "name=Default"})["data_center"][0]
            domain = _request(api, "POST", f"/datacenters/{dc['id']}/storagedomains",
                              "attach the demo storage domain", json={"id": domain["id"]})
        disks = _request(api, "GET", "/disks", "list disks",
                         params={"search": f"alias={DEMO_ISO}"}).get("disk", [])
        ready = [d for d in disks if d.get("status") == "ok"]
        iso_id = str(ready[0]["id"]) if ready else _upload(api, lab, str(domain["id"]),
                                                           _demo_iso(), timeout)
        return str(domain["id"]), iso_id


def _upload(api: httpx.Client, lab: Lab, domain_id: str, data: bytes, timeout: float) -> str:
    disk = _request(api, "POST", "/disks", "add the demo ISO disk", json={
        "name": DEMO_ISO, "content_type": "iso", "format": "raw", "provisioned_size": len(data),
        "storage_domains": {"storage_domain": [{"id": domain_id}]}})
    _wait(api, f"/disks/{disk['id']}", lambda d: d.get("status") != "locked", timeout)
    transfer = _request(api, "POST", "/imagetransfers", "start the ISO upload",
                        json={"disk": {"id": disk["id"]}, "direction": "upload"})
    tls = ssl.create_default_context(cafile=str(lab.engine.ca_file))
    with httpx.Client(verify=tls, timeout=timeout) as http:
        answer = http.put(transfer["transfer_url"], content=data, headers={
            "Content-Range": f"bytes 0-{len(data) - 1}/*",
            "Content-Type": "application/octet-stream"})
        if answer.status_code != 200:
            raise LabError(f"the ISO upload was refused: {answer.status_code} "
                           f"{answer.text[:300]}")
    _request(api, "POST", f"/imagetransfers/{transfer['id']}/finalize", "finalize the upload",
             json={})
    done = _wait(api, f"/imagetransfers/{transfer['id']}",
                 lambda t: str(t.get("phase", "")).startswith("finished")
                 or t.get("phase") == "cancelled", timeout)
    if done.get("phase") != "finished_success":
        raise LabError(f"the ISO upload ended {done.get('phase')}: {done.get('description')}")
    return str(disk["id"])


def _wait(api: httpx.Client, path: str, done: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = _request(api, "GET", path, f"read {path}")
        if done(found):
            return found
        if time.monotonic() > deadline:
            raise LabError(f"{path} did not get there in {timeout:g} s: {found}")
        time.sleep(0.3)


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
            # Through host 1, logged in to the target: the disk gets the LUN's size, vendor,
            # product and serial as the host reads them (without them if it cannot log in:
            # the VM may still run on host 2).
            portal = {"address": target.address, "port": target.port, "target": target.iqn}
            storage: dict[str, Any] = {
                "type": "iscsi",
                "logical_units": {"logical_unit": [{"id": target.wwid(1), **portal}]}}
            if api.post(f"/hosts/{hosts[0]}/iscsilogin", json={"iscsi": portal}).is_success:
                storage["host"] = {"id": hosts[0]}
            disk = _request(api, "POST", "/disks", "add the demo LUN as a disk",
                            json={"alias": DEMO_DISK, "lun_storage": storage})
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
    hosts = register_hosts(lab)
    domain_id, iso_id = iso_domain(lab, target, hosts[lab.agents[0].name])
    vm_id = demo_vm(lab, target, [hosts[a.name] for a in lab.agents])
    image = lab.guest_image
    return {"VIRTYARD_DEMO_VM": vm_id, "VIRTYARD_DEMO_TARGET": target.iqn,
            "VIRTYARD_DEMO_ISO": iso_id, "VIRTYARD_DEMO_DOMAIN": domain_id,
            "VIRTYARD_GUEST_KERNEL": str(image.kernel),
            "VIRTYARD_GUEST_INITRD": str(image.initrd),
            "VIRTYARD_GUEST_CMDLINE": DEFAULT_CMDLINE}
