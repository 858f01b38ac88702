"""Hot-plugging a LUN through the engine when the VM's host already reaches its target (it
holds the connection for the VM's first disk): the engine skips proving the host sees the LUN
and goes straight to ``VM.hotplugDisk``. When the host lost that connection behind the
engine's back, the real agent refuses the invisible LUN; the engine then connects, proves and
plugs again — the user sees the same success a first plug would give."""

from __future__ import annotations

import uuid
from typing import Any

import ovirtsdk4 as sdk4
import pytest
from engine_helpers import add_tiny_vm, domain_on, engine_connections
from ovirtsdk4 import types

from virtyard.lab import qga
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab

pytestmark = pytest.mark.lab

MiB = 1 << 20


def lun_disk(sdk: sdk4.Connection, target: TargetInfo, lun: int) -> types.Disk:
    return sdk.system_service().disks_service().add(types.Disk(
        alias=f"hp-{uuid.uuid4().hex[:6]}", lun_storage=types.HostStorage(
            type=types.StorageType.ISCSI, logical_units=[types.LogicalUnit(
                id=target.wwid(lun), address=target.address, port=target.port,
                target=target.iqn)])))


def in_guest(lab: Lab, vm_id: str, disk_id: str) -> bool:
    with lab.agent_client(0) as agent:
        [vm] = agent.call("Host.getVMFullList", {"vmList": [vm_id]})
    return any(d.get("diskId") == disk_id for d in vm["devices"])


def test_plug_on_a_reached_target_and_after_the_host_lost_it(
        engine: Any, sdk: sdk4.Connection, lab: Lab, *, add_lab_host: Any, wait_host: Any,
        make_target: Any, engine_vms: list[str], no_tracebacks: None) -> None:
    host = wait_host(add_lab_host(0).id, types.HostStatus.UP)
    target = make_target([32 * MiB, 16 * MiB])
    first, second = lun_disk(sdk, target, 1), lun_disk(sdk, target, 2)
    system = sdk.system_service()
    vm = add_tiny_vm(sdk, lab, "hp", [host])
    engine_vms.append(vm.id)
    vm_service = system.vms_service().vm_service(vm.id)
    attachments = vm_service.disk_attachments_service()
    for disk, active in ((first, True), (second, False)):
        attachments.add(types.DiskAttachment(disk=types.Disk(id=disk.id), active=active,
                                             interface=types.DiskInterface.VIRTIO_SCSI))
    vm_service.start()
    assert vm_service.get().status == types.VmStatus.UP
    dom = domain_on(lab, 0, vm.id)
    assert dom is not None
    qga.wait_ready(dom)
    db = engine.database()
    try:
        with db.connect() as conn:
            ours = {row[0] for row in conn.exec_driver_sql(
                "SELECT id FROM storage_server_connections")}
    finally:
        db.dispose()
    [connection] = engine_connections(lab, 0, ours)  # the first disk's, held for the VM

    attachment = attachments.attachment_service(second.id)
    attachment.update(types.DiskAttachment(active=True))  # no proof: the host reaches it
    assert attachment.get().active is True and in_guest(lab, vm.id, second.id)
    attachment.update(types.DiskAttachment(active=False))
    assert attachment.get().active is False and not in_guest(lab, vm.id, second.id)
    assert engine_connections(lab, 0, ours) == {connection}  # the first disk still needs it

    # Behind the engine's back the host drops the connection (its pins stay in the database).
    with lab.agent_client(0) as agent:
        [kept] = [c for c in agent.call("StoragePool.getConnections")
                  if c["id"] == connection]
        params = {k: kept[k] for k in ("id", "connection", "port", "iqn") if k in kept}
        for _ in range(max(1, int(kept.get("refs", 1)))):
            agent.call("StoragePool.disconnectStorageServer",
                       {"domainType": 3, "connectionParams": [params]})
        seen = agent.call("Host.getDevicesVisibility", {"guidList": [target.wwid(2)]})
    assert not engine_connections(lab, 0, ours) and not seen.get(target.wwid(2))

    offset = engine.log_size()
    attachment.update(types.DiskAttachment(active=True))
    assert attachment.get().active is True and in_guest(lab, vm.id, second.id)
    assert engine_connections(lab, 0, ours) == {connection}
    assert "despite its pins; proving it" in engine.log_since(offset)
    # engine_vms stops the VM and removes it with its disks
