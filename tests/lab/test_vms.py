"""VMs through the host agent on the real lab: LUN disks on virtio, virtio-scsi and as SCSI
passthrough, hot-plug and unplug, live migration, agent restarts, and every bad input."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from virtyard.host.client import HostCallError, HostClient
from virtyard.lab import qga
from virtyard.lab.guest_image import DEFAULT_CMDLINE
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab
from virtyard.lab.process import wait_until

pytestmark = pytest.mark.lab

MiB = 1 << 20
OFFSET = 5 * MiB


@pytest.fixture
def clients(lab: Lab) -> Iterator[list[HostClient]]:
    made = [lab.agent_client(i) for i in range(len(lab.agents))]
    yield made
    for client in made:
        client.close()


@pytest.fixture
def make_vm(lab: Lab, clients: list[HostClient]) -> Iterator[Callable[..., dict[str, Any]]]:
    """Factory: VM.create of a tiny guest with ``devices`` on host ``host``; destroyed after
    (wherever it ended up)."""
    made: list[str] = []

    def make(devices: list[dict[str, Any]], *, host: int = 0) -> dict[str, Any]:
        vm_id = str(uuid.uuid4())
        made.append(vm_id)
        image = lab.guest_image
        result: dict[str, Any] = clients[host].call("VM.create", {"vmParams": {
            "vmId": vm_id, "vmName": f"t-{vm_id[:8]}", "memSize": 256,
            "kernel": str(image.kernel), "initrd": str(image.initrd),
            "kernelArgs": DEFAULT_CMDLINE,
            "consoleLog": str(lab.console_dir / f"{vm_id}.log"),
            "devices": devices}})
        return result

    yield make
    for vm_id in made:
        for client in clients:
            with contextlib.suppress(HostCallError):
                client.call("VM.destroy", {"vmID": vm_id})


def devices_of(vm: dict[str, Any]) -> dict[str, Any]:
    """A VM's disks without what the guest-names service fills in on its own time."""
    return {d["name"]: {k: v for k, v in d.items() if k != "guestName"} for d in vm["devices"]}


def guest(lab: Lab, vm_id: str, host: int = 0) -> libvirt.virDomain:
    dom = libvirt.open(lab.hosts[host].uri).lookupByUUIDString(vm_id)
    qga.wait_ready(dom)
    return dom


def wait_path(dom: libvirt.virDomain, path: str, *, present: bool = True,
              timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (qga.run(dom, f"test -b {path}").exitcode == 0) != present:
        assert time.monotonic() < deadline, f"{path} {'missing' if present else 'still there'}"
        time.sleep(0.1)


def write_pattern(dom: libvirt.virDomain, path: str, pattern: bytes) -> None:
    qga.check_output(dom, f"printf '{pattern.decode()}' | dd of={path} bs=512 "
                          f"seek={OFFSET // 512} conv=notrunc 2>/dev/null && sync")


def read_pattern(dom: libvirt.virDomain, path: str, length: int) -> bytes:
    out = qga.check_output(dom, f"echo 3 > /proc/sys/vm/drop_caches; dd if={path} bs=512 "
                                f"skip={OFFSET // 512} count=1 2>/dev/null | od -An -tx1 -v")
    return bytes.fromhex("".join(out.split()))[:length]


def backing_bytes(target: TargetInfo, lun: int, length: int) -> bytes:
    with target.lun(lun).backing.open("rb") as f:
        f.seek(OFFSET)
        return f.read(length)


def disk_dict(guid: str, iface: str, index: int, *, device: str = "disk",
              serial: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"type": "disk", "device": device, "iface": iface, "index": index,
                         "GUID": guid, "format": "raw"}
    if serial is not None:
        d["serial"] = serial
    return d


def test_lun_disks_on_every_bus_reach_the_lun(
        lab: Lab, make_target: Callable[..., TargetInfo],
        connect_target: Callable[..., Any], make_vm: Callable[..., dict[str, Any]]) -> None:
    target = make_target([32 * MiB, 32 * MiB, 32 * MiB])
    connect_target(target)
    vm = make_vm([
        disk_dict(target.wwid(1), "virtio", 0, serial="vyvirtio1"),
        disk_dict(target.wwid(2), "scsi", 0, serial="vyscsi2"),
        disk_dict(target.wwid(3), "scsi", 1, device="lun"),
    ])
    assert vm["status"] == "Up"
    assert {d["GUID"] for d in vm["devices"]} == {target.wwid(n) for n in (1, 2, 3)}
    dom = guest(lab, vm["vmId"])
    paths = {1: "/dev/disk/by-id/virtio-vyvirtio1",
             2: "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_vyscsi2",
             3: f"/dev/disk/by-id/scsi-{target.wwid(3)}"}
    for lun, path in paths.items():
        wait_path(dom, path)
        pattern = f"VY-{lun}-{uuid.uuid4().hex[:12]}".encode()
        write_pattern(dom, path, pattern)
        assert backing_bytes(target, lun, len(pattern)) == pattern


def test_hotplug_and_unplug_change_the_guest_and_the_hash(
        lab: Lab, clients: list[HostClient], make_target: Callable[..., TargetInfo],
        connect_target: Callable[..., Any], make_vm: Callable[..., dict[str, Any]]) -> None:
    target = make_target([32 * MiB, 32 * MiB])
    connect_target(target)
    vm = make_vm([disk_dict(target.wwid(1), "scsi", 0, serial="first")])
    vm_id = vm["vmId"]
    dom = guest(lab, vm_id)
    [before] = clients[0].call("VM.getStats", {"vmID": vm_id})

    plugged = clients[0].call("VM.hotplugDisk", {"vmID": vm_id, "drive": disk_dict(
        target.wwid(2), "scsi", 1, serial="second")})
    assert target.wwid(2) in {d["GUID"] for d in plugged["devices"]}
    wait_path(dom, "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_second")
    [after_plug] = clients[0].call("VM.getStats", {"vmID": vm_id})
    assert after_plug["hash"] != before["hash"]
    # (The guest names service may move it again meanwhile: the guest named the new disk.)
    all_stats = {s["vmId"]: s for s in clients[0].call("Host.getAllVmStats", {})}
    assert all_stats[vm_id]["hash"] != before["hash"]

    log = lab.agents[0].log_path
    log_start = log.stat().st_size
    unplugged = clients[0].call("VM.hotunplugDisk", {"vmID": vm_id,
                                                     "drive": {"GUID": target.wwid(2)}})
    assert target.wwid(2) not in {d["GUID"] for d in unplugged["devices"]}
    # libvirt's device-removed event reached the agent (what an unplug sleeps on).
    def since_unplug() -> str:
        with log.open("rb") as f:
            f.seek(log_start)
            return f.read().decode(errors="replace")
    assert wait_until(lambda: f"VM {vm_id}: libvirt removed device " in since_unplug(),
                      timeout=30), since_unplug()
    wait_path(dom, "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_second", present=False)
    [after_unplug] = clients[0].call("VM.getStats", {"vmID": vm_id})
    assert after_unplug["hash"] not in (before["hash"], after_plug["hash"])

    # Plug the same LUN back at the same place: the hash changes again.
    clients[0].call("VM.hotplugDisk", {"vmID": vm_id, "drive": disk_dict(
        target.wwid(2), "scsi", 1, serial="second")})
    [replugged] = clients[0].call("VM.getStats", {"vmID": vm_id})
    assert replugged["hash"] not in (before["hash"], after_plug["hash"], after_unplug["hash"])


def test_full_list_carries_the_contract_fields(
        clients: list[HostClient], make_target: Callable[..., TargetInfo],
        connect_target: Callable[..., Any], make_vm: Callable[..., dict[str, Any]]) -> None:
    target = make_target([16 * MiB])
    connect_target(target)
    vm = make_vm([disk_dict(target.wwid(1), "virtio", 0, serial="s1")])
    [full] = clients[0].call("Host.getVMFullList", {"vmList": [vm["vmId"]]})
    [disk] = full["devices"]
    for key in ("type", "device", "GUID", "iface", "index", "serial", "guestName"):
        assert key in disk
    assert (disk["iface"], disk["index"], disk["serial"]) == ("virtio", 0, "s1")
    assert disk["address"]  # libvirt's address, kept so it stays stable
    xml = clients[0].call("Host.dumpxmls", {"vmList": [vm["vmId"]]})[vm["vmId"]]
    assert vm["vmId"] in xml and "https://virtyard.org/vm/1" in xml


def test_live_migration_keeps_the_disks(
        lab: Lab, clients: list[HostClient], make_target: Callable[..., TargetInfo],
        connect_target: Callable[..., Any], make_vm: Callable[..., dict[str, Any]]) -> None:
    target = make_target([32 * MiB, 32 * MiB])
    connect_target(target, host=0)
    connect_target(target, host=1)
    vm = make_vm([disk_dict(target.wwid(1), "scsi", 0, serial="mig1"),
                  disk_dict(target.wwid(2), "scsi", 1, device="lun")])
    vm_id = vm["vmId"]
    dom = guest(lab, vm_id)
    path = "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_mig1"
    wait_path(dom, path)
    pattern = f"MIG-{uuid.uuid4().hex[:12]}".encode()
    write_pattern(dom, path, pattern)
    [source_full] = clients[0].call("Host.getVMFullList", {"vmList": [vm_id]})

    job = clients[0].call("VM.migrate", {"vmID": vm_id,
                                         "params": {"dst": lab.agents[1].address}})
    assert job["status"] == "running"
    deadline = time.monotonic() + 120
    while (state := clients[0].call("VM.migrateStatus", {"vmID": vm_id}))["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert state["status"] == "done", state

    assert vm_id not in {s["vmId"] for s in clients[0].call("Host.getAllVmStats", {})}
    [moved] = clients[1].call("Host.getVMFullList", {"vmList": [vm_id]})
    assert moved["status"] == "Up"
    addresses = {d["name"]: d["address"] for d in source_full["devices"]}
    assert {d["name"]: d["address"] for d in moved["devices"]} == addresses
    assert {d["GUID"] for d in moved["devices"]} == {target.wwid(1), target.wwid(2)}
    assert read_pattern(guest(lab, vm_id, host=1), path, len(pattern)) == pattern


def test_destination_that_does_not_see_a_lun_refuses(
        lab: Lab, clients: list[HostClient], make_target: Callable[..., TargetInfo],
        connect_target: Callable[..., Any], make_vm: Callable[..., dict[str, Any]]) -> None:
    target = make_target([16 * MiB])
    connect_target(target, host=0)  # host 2 is not connected to this target
    vm = make_vm([disk_dict(target.wwid(1), "virtio", 0)])
    with pytest.raises(HostCallError) as info:
        clients[0].call("VM.migrate", {"vmID": vm["vmId"],
                                       "params": {"dst": lab.agents[1].address}})
    assert info.value.code == 12
    assert target.wwid(1) in info.value.message
    [stats] = clients[0].call("VM.getStats", {"vmID": vm["vmId"]})
    assert stats["status"] == "Up"


def test_agent_restart_keeps_running_vms(
        lab: Lab, clients: list[HostClient], make_target: Callable[..., TargetInfo],
        connect_target: Callable[..., Any], make_vm: Callable[..., dict[str, Any]]) -> None:
    target = make_target([16 * MiB])
    connect_target(target)
    vm = make_vm([disk_dict(target.wwid(1), "virtio", 0, serial="keep")])
    guest(lab, vm["vmId"])
    deadline = time.monotonic() + 15
    while not all(d["guestName"] for d in clients[0].call(
            "Host.getVMFullList", {"vmList": [vm["vmId"]]})[0]["devices"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    [before] = clients[0].call("Host.getVMFullList", {"vmList": [vm["vmId"]]})
    agent = lab.agents[0]
    pid = agent.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    agent.stop()
    agent.start()
    with lab.agent_client(0) as fresh:
        [after] = fresh.call("Host.getVMFullList", {"vmList": [vm["vmId"]]})
    assert after == before
    qga.wait_ready(libvirt.open(lab.hosts[0].uri).lookupByUUIDString(vm["vmId"]))


def test_bad_input_is_refused_and_changes_nothing(
        lab: Lab, clients: list[HostClient], make_target: Callable[..., TargetInfo],
        connect_target: Callable[..., Any], make_vm: Callable[..., dict[str, Any]]) -> None:
    target = make_target([16 * MiB, 16 * MiB])
    connect_target(target)
    running_before = {s["vmId"] for s in clients[0].call("Host.getAllVmStats", {})}

    def refused(devices: list[dict[str, Any]]) -> HostCallError:
        with pytest.raises(HostCallError) as info:
            make_vm(devices)
        return info.value

    unknown = refused([disk_dict("36001405" + "0" * 24, "virtio", 0)])
    assert unknown.code == 9 and "not visible" in unknown.message
    duplicate = refused([disk_dict(target.wwid(1), "scsi", 0),
                         disk_dict(target.wwid(2), "scsi", 0)])
    assert duplicate.code == -32602 and "devices[1].index" in duplicate.message
    wrong_iface = refused([disk_dict(target.wwid(1), "virtio", 0, device="lun")])
    assert wrong_iface.code == -32602 and "iface" in wrong_iface.message
    not_raw = refused([{**disk_dict(target.wwid(1), "scsi", 0, device="lun"),
                        "format": "cow"}])
    assert not_raw.code == -32602 and "format" in not_raw.message
    assert {s["vmId"] for s in clients[0].call("Host.getAllVmStats", {})} == running_before

    missing = str(uuid.uuid4())
    with pytest.raises(HostCallError) as info:
        clients[0].call("VM.hotplugDisk", {"vmID": missing,
                                           "drive": disk_dict(target.wwid(1), "scsi", 0)})
    assert info.value.code == 1

    vm = make_vm([disk_dict(target.wwid(1), "scsi", 0)])
    [full_before] = clients[0].call("Host.getVMFullList", {"vmList": [vm["vmId"]]})
    with pytest.raises(HostCallError) as info:
        clients[0].call("VM.hotunplugDisk", {"vmID": vm["vmId"],
                                             "drive": {"GUID": target.wwid(2)}})
    assert info.value.code == 46
    with pytest.raises(HostCallError) as info:
        clients[0].call("VM.hotplugDisk", {"vmID": vm["vmId"], "drive": disk_dict(
            "36001405" + "1" * 24, "scsi", 1)})
    assert info.value.code == 45
    with pytest.raises(HostCallError) as info:
        clients[0].call("VM.hotplugDisk", {"vmID": vm["vmId"],
                                           "drive": disk_dict(target.wwid(2), "scsi", 0)})
    assert info.value.code == -32602
    [full_after] = clients[0].call("Host.getVMFullList", {"vmList": [vm["vmId"]]})
    assert devices_of(full_after) == devices_of(full_before)


def test_graceful_shutdown(lab: Lab, clients: list[HostClient],
                           make_vm: Callable[..., dict[str, Any]]) -> None:
    vm = make_vm([])
    guest(lab, vm["vmId"])
    result = clients[0].call("VM.shutdown", {"vmID": vm["vmId"], "timeout": 30})
    assert result["status"] == "Down"
    with pytest.raises(HostCallError) as info:
        clients[0].call("VM.getStats", {"vmID": vm["vmId"]})
    assert info.value.code == 1
