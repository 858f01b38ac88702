"""Monitoring end to end on the lab, through the SDK: the guest's name for every attached
disk (hot-plugged, passthrough too) appears on its attachment and is that LUN; it clears on
unplug and comes back on a quick replug; a VM whose QEMU dies is down with an event; a host
whose agent stops is non-responsive and its VM unknown, then both come back."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import ovirtsdk4 as sdk4
import pytest
from engine_helpers import add_tiny_vm, domain_on, wait_guest_path
from ovirtsdk4 import types

from virtyard.lab import qga
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab

pytestmark = pytest.mark.lab

MiB = 1 << 20
OFFSET = 7 * MiB
NAME_WAIT = 15.0  # the safety-net poll of the lab engine is 5 s; pushes are sooner


def wait_for(probe: Callable[[], Any], done: Callable[[Any], bool], what: str,
             timeout: float = NAME_WAIT) -> Any:
    deadline = time.monotonic() + timeout
    value = probe()
    while not done(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {value!r} after {timeout} s")
        time.sleep(0.1)
        value = probe()
    return value


def lun(target: TargetInfo, number: int, **disk: Any) -> types.Disk:
    return types.Disk(lun_storage=types.HostStorage(
        type=types.StorageType.ISCSI, logical_units=[types.LogicalUnit(
            id=target.wwid(number), address=target.address, port=target.port,
            target=target.iqn)]), **disk)


def test_guest_names_and_vm_death(engine: Any, sdk: sdk4.Connection, lab: Lab, *,
                                  two_hosts: list[types.Host], make_target: Any,
                                  engine_vms: list[str]) -> None:
    system = sdk.system_service()
    target = make_target([32 * MiB, 32 * MiB, 32 * MiB])
    vm = add_tiny_vm(sdk, lab, "mon", [two_hosts[0]])
    engine_vms.append(vm.id)
    vm_service = system.vms_service().vm_service(vm.id)
    attachments = vm_service.disk_attachments_service()
    vm_service.start()
    dom = domain_on(lab, 0, vm.id)
    assert dom is not None
    qga.wait_ready(dom)

    # Hot-plug a LUN: its guest name appears on the attachment, and it is that LUN.
    disk = system.disks_service().add(lun(target, 1))
    attachments.add(types.DiskAttachment(disk=types.Disk(id=disk.id), active=True,
                                         interface=types.DiskInterface.VIRTIO_SCSI))
    attachment = attachments.attachment_service(disk.id)
    started = time.monotonic()
    name = wait_for(lambda: attachment.get().logical_name, bool, "logical name")
    named_after = time.monotonic() - started
    assert name.startswith("/dev/sd"), name
    pattern = "MON-" + uuid.uuid4().hex
    qga.check_output(dom, f"printf '{pattern}' | dd of={name} bs=512 seek={OFFSET // 512} "
                          "conv=notrunc 2>/dev/null && sync")
    with target.lun(1).backing.open("rb") as backing:
        backing.seek(OFFSET)
        assert backing.read(len(pattern)).decode() == pattern

    # Unplug: the name goes. Replug at once: it comes back (vdsm#396 loses it).
    attachment.update(types.DiskAttachment(active=False))
    assert attachment.get().logical_name is None
    attachment.update(types.DiskAttachment(active=True))
    assert wait_for(lambda: attachment.get().logical_name, bool, "name after replug") == name

    # A passthrough LUN is named too (oVirt gives it none).
    passthrough = system.disks_service().add(lun(target, 2, sgio=types.ScsiGenericIO.FILTERED))
    attachments.add(types.DiskAttachment(disk=types.Disk(id=passthrough.id), active=True,
                                         interface=types.DiskInterface.VIRTIO_SCSI))
    pt_name = wait_for(lambda: attachments.attachment_service(passthrough.id).get()
                       .logical_name, bool, "passthrough logical name")
    assert pt_name.startswith("/dev/sd") and pt_name != name
    link = f"/dev/disk/by-id/scsi-{target.wwid(2)}"  # the array's identity: that very LUN
    wait_guest_path(dom, link)  # udev makes the link a moment after the device
    assert qga.check_output(dom, f"readlink -f {link}").strip() == pt_name

    # QEMU dies behind everyone's back: the VM is down in the API, with an event.
    last_event = int(system.events_service().list(max=1)[0].id)
    dom.destroy()
    wait_for(lambda: vm_service.get().status, lambda s: s == types.VmStatus.DOWN,
             "VM status after QEMU died")
    events = system.events_service().list(from_=last_event, search=f"vm.id={vm.id}")
    assert any(e.code == 119 for e in events), [(e.code, e.description) for e in events]
    print(f"guest name visible {named_after:.2f} s after the hot-plug call returned")


def test_host_agent_stops_and_comes_back(engine: Any, sdk: sdk4.Connection, lab: Lab, *,
                                         two_hosts: list[types.Host],
                                         wait_host: Callable[..., types.Host],
                                         engine_vms: list[str]) -> None:
    system = sdk.system_service()
    vm = add_tiny_vm(sdk, lab, "part", [two_hosts[1]])
    engine_vms.append(vm.id)
    vm_service = system.vms_service().vm_service(vm.id)
    vm_service.start()
    agent = lab.agents[1]
    agent.stop()
    try:
        wait_host(two_hosts[1].id, types.HostStatus.NON_RESPONSIVE, timeout=30)
        assert vm_service.get().status == types.VmStatus.UNKNOWN  # never "down"
        dom = domain_on(lab, 1, vm.id)
        assert dom is not None and dom.isActive()  # it still runs: that is the point
    finally:
        agent.start()
    wait_host(two_hosts[1].id, types.HostStatus.UP, timeout=30)
    wait_for(lambda: vm_service.get().status, lambda s: s == types.VmStatus.UP,
             "VM status after the agent returned")
