"""Direct LUN through the engine, VM side, end to end with the official SDK on the real lab:
a LUN disk attached to a VM; run with the preferred host's storage path broken → it runs on
the other host; the guest writes to the LUN and the bytes land in the LUN's backing file;
hot-unplug and hot-plug; a migration to a host that cannot see the LUN is refused, then works
once it can; stop releases every connection on both hosts; detach, remove."""

from __future__ import annotations

import concurrent.futures
import json
import uuid
from collections.abc import Callable
from typing import Any

import ovirtsdk4 as sdk4
import pytest
from engine_helpers import add_tiny_vm, domain_on, engine_connections, wait_guest_path
from ovirtsdk4 import types

from virtyard.lab import qga
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab

pytestmark = pytest.mark.lab

MiB = 1 << 20
OFFSET = 5 * MiB



def test_lun_vm_lifecycle(engine: Any, sdk: sdk4.Connection, lab: Lab, *,
                          two_hosts: list[types.Host], make_target: Any,
                          engine_vms: list[str],
                          restricted: Callable[[TargetInfo, list[int] | None], None]) -> None:
    system = sdk.system_service()
    host1, host2 = two_hosts
    target = make_target([64 * MiB, 32 * MiB])
    disk = system.disks_service().add(types.Disk(alias=f"data-{uuid.uuid4().hex[:6]}",
                                                 lun_storage=types.HostStorage(
        type=types.StorageType.ISCSI, logical_units=[types.LogicalUnit(
            id=target.wwid(1), address=target.address, port=target.port,
            target=target.iqn)])))
    vm = add_tiny_vm(sdk, lab, "flow", [host1, host2])
    engine_vms.append(vm.id)
    vm_service = system.vms_service().vm_service(vm.id)
    attachments = vm_service.disk_attachments_service()
    attachments.add(types.DiskAttachment(disk=types.Disk(id=disk.id), active=True,
                                         interface=types.DiskInterface.VIRTIO_SCSI))
    with engine.database().connect() as conn:
        ours = {row[0] for row in conn.exec_driver_sql(
            "SELECT id FROM storage_server_connections")}

    # The preferred host cannot reach the target: the VM runs on the other one.
    restricted(target, [1])
    vm_service.start()
    running = vm_service.get()
    assert running.status == types.VmStatus.UP and running.host.id == host2.id
    assert not engine_connections(lab, 0, ours)  # the failed host kept nothing
    assert engine_connections(lab, 1, ours)

    dom = domain_on(lab, 1, vm.id)
    assert dom is not None
    qga.wait_ready(dom)
    device = f"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{disk.id[:20]}"
    wait_guest_path(dom, device)
    pattern = "VY-" + uuid.uuid4().hex
    qga.check_output(dom, f"printf '{pattern}' | dd of={device} bs=512 seek={OFFSET // 512} "
                          "conv=notrunc 2>/dev/null && sync")
    with target.lun(1).backing.open("rb") as backing:
        backing.seek(OFFSET)
        assert backing.read(len(pattern)).decode() == pattern

    # Hot-unplug, then hot-plug again.
    attachment = attachments.attachment_service(disk.id)
    attachment.update(types.DiskAttachment(active=False))
    assert attachment.get().active is False
    wait_guest_path(dom, device, present=False)
    assert not engine_connections(lab, 1, ours)  # nothing plugged needs it any more
    attachment.update(types.DiskAttachment(active=True))
    assert attachment.get().active is True
    wait_guest_path(dom, device)
    attachment.update(types.DiskAttachment(active=True))  # as oVirt: no change, no error

    # Host 1 still cannot see the LUN: a migration there is refused, the VM stays.
    with pytest.raises(sdk4.Error) as err:
        vm_service.migrate(host=types.Host(id=host1.id))
    assert err.value.code == 409 and target.wwid(1) in str(err.value)
    assert vm_service.get().host.id == host2.id
    assert not engine_connections(lab, 0, ours)
    with pytest.raises(sdk4.Error) as err:
        vm_service.migrate(host=types.Host(id=host2.id))
    assert err.value.code == 409  # same host

    restricted(target, None)
    vm_service.migrate(host=types.Host(id=host1.id))
    moved = vm_service.get()
    assert moved.status == types.VmStatus.UP and moved.host.id == host1.id
    assert engine_connections(lab, 0, ours) and not engine_connections(lab, 1, ours)
    dom = domain_on(lab, 0, vm.id)
    assert dom is not None
    out = qga.check_output(dom, f"dd if={device} bs=512 skip={OFFSET // 512} count=1 "
                                "2>/dev/null | head -c 35")
    assert out.startswith(pattern)

    vm_service.stop()
    assert vm_service.get().status == types.VmStatus.DOWN
    assert not engine_connections(lab, 0, ours) and not engine_connections(lab, 1, ours)
    assert domain_on(lab, 0, vm.id) is None and domain_on(lab, 1, vm.id) is None

    attachment.remove()
    assert not attachments.list()
    system.disks_service().disk_service(disk.id).remove()
    vm_service.remove()
    codes = [e.code for e in system.events_service().list(max=40)]
    for code in (153, 2004, 2002, 62, 33, 2018):
        assert code in codes, (code, codes)


def test_non_shareable_disk_on_twenty_vms_at_once(engine: Any, sdk: sdk4.Connection,
                                                  make_target: Any) -> None:
    system = sdk.system_service()
    target = make_target([16 * MiB])
    disk = system.disks_service().add(types.Disk(lun_storage=types.HostStorage(
        type=types.StorageType.ISCSI, logical_units=[types.LogicalUnit(
            id=target.wwid(1), address=target.address, port=target.port,
            target=target.iqn)])))
    vms = [system.vms_service().add(types.Vm(name=f"race-{uuid.uuid4().hex[:8]}",
                                             cluster=types.Cluster(name="Default"),
                                             template=types.Template(name="Blank")))
           for _ in range(20)]
    token = engine.admin_token()
    body = json.dumps({"disk": {"id": disk.id}, "interface": "virtio_scsi"}).encode()

    def attach(vm: types.Vm) -> int:
        return int(engine.request("POST", f"/vms/{vm.id}/diskattachments", token=token,
                                  flavor="json", body=body).status_code)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(attach, vms))
    assert sorted(codes) == [201] + [409] * 19, codes
    for vm in vms:
        system.vms_service().vm_service(vm.id).remove()
    with pytest.raises(sdk4.NotFoundError):  # it went with the VM it was attached to
        system.disks_service().disk_service(disk.id).get()
