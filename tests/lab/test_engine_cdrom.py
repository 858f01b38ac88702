"""CD-ROM on block storage through the engine, end to end with the official SDK on the real lab.

A block storage domain made on a free lab LUN through ``POST storagedomains`` (the SDK's
``add_iscsi_data_storage_domain.py`` request), attached to the data center and active; its LUN
shows ``used`` by the domain and is refused as a Direct LUN disk. Two ISO disks on it (their
volumes written through the agent here: the upload through image transfers has its own tests).
A VM runs with an empty drive; the design page's test plan: load ISO 1 (the guest mounts it and
reads a known file, the live domain XML holds the volume), change to ISO 2, eject (no medium),
the host's prepared volumes back to what they were; the next run's CD set and booted with;
bad input refused with oVirt's keys; the domain deactivated, detached and removed (formatted:
its LUN is free again).
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ovirtsdk4 as sdk4
import pytest
import sqlalchemy as sa
from engine_helpers import add_tiny_vm, domain_on, guest_cd_sha, make_iso
from ovirtsdk4 import types

from virtyard.lab import qga
from virtyard.lab.lab import Lab

pytestmark = pytest.mark.lab

MiB = 1 << 20


def add_domain(sdk: sdk4.Connection, host: types.Host, target: Any, lun: int = 1
               ) -> types.StorageDomain:
    """As the SDK example sends it."""
    return sdk.system_service().storage_domains_service().add(types.StorageDomain(
        name=f"isos-{uuid.uuid4().hex[:6]}", type=types.StorageDomainType.DATA,
        host=types.Host(name=host.name), storage_format=types.StorageFormat.V5,
        storage=types.HostStorage(type=types.StorageType.ISCSI, override_luns=True,
                                  volume_group=types.VolumeGroup(logical_units=[
                                      types.LogicalUnit(id=target.wwid(lun),
                                                        address=target.address,
                                                        port=target.port,
                                                        target=target.iqn)]))))


def attach(sdk: sdk4.Connection, domain_id: str) -> Any:
    """Attach to the Default data center; the attached domain's service."""
    dcs = sdk.system_service().data_centers_service()
    dc = dcs.list(search="name=Default")[0]
    attached = dcs.data_center_service(dc.id).storage_domains_service()
    attached.add(types.StorageDomain(id=domain_id))
    return attached.storage_domain_service(domain_id)


def iso_disk(engine: Any, lab: Lab, domain_id: str, pool_id: str, data: bytes) -> str:
    """An ISO disk on the domain: its volume written and verified by an agent, its row in the
    engine's database (what a finished upload leaves)."""
    from virtyard.engine.db.models import BaseDisk  # noqa: PLC0415  (the engine's model)

    disk_id, image_id, volume_id = (str(uuid.uuid4()) for _ in range(3))
    pdiv = {"poolID": pool_id, "domainID": domain_id, "imageID": image_id,
            "volumeID": volume_id}
    with lab.agent_client(0) as agent:
        agent.call("Volume.create", {**pdiv, "size": len(data), "type": "ISO"})
        agent.call("Volume.write", {**pdiv, "offset": 0,
                                    "data": base64.b64encode(data).decode()})
        agent.call("Volume.verify", {**pdiv, "size": len(data),
                                     "sha256": hashlib.sha256(data).hexdigest()})
    db = engine.database()
    try:
        with db.begin() as conn:
            conn.execute(sa.insert(BaseDisk).values(
                id=disk_id, alias=f"iso-{disk_id[:6]}", storage_type="image",
                content_type="iso", storage_domain_id=domain_id, image_id=image_id,
                volume_id=volume_id, provisioned_size=len(data), content_size=len(data),
                status="ok"))
    finally:
        db.dispose()
    return disk_id


def prepared(lab: Lab, index: int, domain_id: str) -> list[dict[str, Any]]:
    with lab.agent_client(index) as agent:
        found: list[dict[str, Any]] = agent.call("Image.listPrepared", {"domainID": domain_id})
    return found


def live_cd_volume(lab: Lab, index: int, vm_id: str) -> str:
    """The volume the running domain's CD-ROM holds, from the live XML ('' when empty)."""
    dom = domain_on(lab, index, vm_id)
    assert dom is not None
    xml = dom.XMLDesc(0)
    start = xml.index("device='cdrom'")
    block = xml[start:xml.index("</disk>", start)]
    return block if re.search(r"<source [^>]*\b(file|dev|name)=", block) else ""


def refused(call: Callable[[], Any]) -> sdk4.Error:
    with pytest.raises(sdk4.Error) as err:
        call()
    return err.value


def test_domain_and_cd_load_change_eject(engine: Any, sdk: sdk4.Connection, lab: Lab, *,
                                         two_hosts: list[types.Host], make_target: Any,
                                         engine_vms: list[str], tmp_path: Path) -> None:
    system = sdk.system_service()
    host1, _host2 = two_hosts
    target = make_target([64 * MiB, 16 * MiB])

    domain = add_domain(sdk, host1, target)
    assert domain.status == types.StorageDomainStatus.UNATTACHED
    assert domain.storage.volume_group.logical_units[0].id == target.wwid(1)
    again = refused(lambda: add_domain(sdk, host1, target))
    assert again.code == 409 and "part of a storage domain" in str(again)
    attached = attach(sdk, domain.id)
    assert attached.get().status == types.StorageDomainStatus.ACTIVE
    listed = {d.id: d for d in system.storage_domains_service().list()}
    assert listed[domain.id].status == types.StorageDomainStatus.ACTIVE

    # The domain's LUN is used (with the reason) and no Direct LUN disk can take it.
    units = {s.id: s.logical_units[0] for s in
             system.hosts_service().host_service(host1.id).storage_service().list()}
    assert units[target.wwid(1)].status == types.LunStatus.USED
    assert units[target.wwid(1)].storage_domain_id == domain.id
    lun_disk = refused(lambda: system.disks_service().add(types.Disk(
        alias="steal", lun_storage=types.HostStorage(
            type=types.StorageType.ISCSI, logical_units=[types.LogicalUnit(
                id=target.wwid(1), address=target.address, port=target.port,
                target=target.iqn)]))))
    assert lun_disk.code == 409

    dc = system.data_centers_service().list(search="name=Default")[0]
    texts = [f"{n} {uuid.uuid4().hex}\n" for n in ("alpha", "bravo")]
    isos = [iso_disk(engine, lab, domain.id, dc.id, make_iso(tmp_path, t)) for t in texts]
    shas = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    data_disk = system.disks_service().add(types.Disk(
        alias=f"data-{uuid.uuid4().hex[:6]}", lun_storage=types.HostStorage(
            type=types.StorageType.ISCSI, logical_units=[types.LogicalUnit(
                id=target.wwid(2), address=target.address, port=target.port,
                target=target.iqn)])))

    vm = add_tiny_vm(sdk, lab, "cd", [host1])
    engine_vms.append(vm.id)
    vm_service = system.vms_service().vm_service(vm.id)
    cdroms = vm_service.cdroms_service()
    cd = cdroms.list()[0]
    assert cd.id == "00000000-0000-0000-0000-000000000000" and cd.file is None
    cd_service = cdroms.cdrom_service(cd.id)
    down = refused(lambda: cd_service.update(types.Cdrom(file=types.File(id=isos[0])),
                                             current=True))
    assert down.code == 409  # the VM is not running

    vm_service.start()
    assert vm_service.get().status == types.VmStatus.UP
    dom = domain_on(lab, 0, vm.id)
    assert dom is not None
    qga.wait_ready(dom)
    before = prepared(lab, 0, domain.id)
    assert guest_cd_sha(dom) is None  # an empty drive

    cd_service.update(types.Cdrom(file=types.File(id=isos[0])), current=True)
    assert cd_service.get(current=True).file.id == isos[0]
    assert cd_service.get().file is None  # the next run's CD is unchanged
    assert guest_cd_sha(dom) == shas[0]
    assert live_cd_volume(lab, 0, vm.id)
    cd_service.update(types.Cdrom(file=types.File(id=isos[1])), current=True)
    assert cd_service.get(current=True).file.id == isos[1]
    assert guest_cd_sha(dom) == shas[1]
    assert [p["volumeID"] for p in prepared(lab, 0, domain.id)] == \
        [p["volumeID"] for p in before] + [iso_volume(engine, isos[1])]
    cd_service.update(types.Cdrom(file=types.File(id="")), current=True)
    assert cd_service.get(current=True).file is None
    assert guest_cd_sha(dom) is None
    assert live_cd_volume(lab, 0, vm.id) == ""
    assert prepared(lab, 0, domain.id) == before

    # Bad input: not a disk, not an ISO disk, a CD-ROM that does not exist.
    bad = refused(lambda: cd_service.update(types.Cdrom(file=types.File(id=str(uuid.uuid4()))),
                                            current=True))
    assert bad.code == 400 and "ISO" in str(bad)
    not_iso = refused(lambda: cd_service.update(types.Cdrom(file=types.File(id=data_disk.id)),
                                                current=True))
    assert not_iso.code == 400
    missing = refused(lambda: cdroms.cdrom_service(str(uuid.uuid4())).update(
        types.Cdrom(file=types.File(id=isos[0])), current=True))
    assert missing.code == 404

    # The next run's CD: set while it runs, booted with after a stop; the domain is busy then.
    cd_service.update(types.Cdrom(file=types.File(id=isos[0])))
    assert cd_service.get().file.id == isos[0] and cd_service.get(current=True).file is None
    busy = refused(attached.deactivate)
    assert busy.code == 409 and vm.name in str(busy)
    vm_service.stop()
    assert prepared(lab, 0, domain.id) == []
    assert cd_service.get(current=True).file is None
    vm_service.start()
    assert cd_service.get(current=True).file.id == isos[0]
    dom = domain_on(lab, 0, vm.id)
    assert dom is not None
    qga.wait_ready(dom)
    assert guest_cd_sha(dom) == shas[0]
    vm_service.stop()
    assert prepared(lab, 0, domain.id) == []

    # Maintenance, detach, remove (formatted): the LUN is free again.
    cd_service.update(types.Cdrom(file=types.File(id="")))
    attached.deactivate()
    assert attached.get().status == types.StorageDomainStatus.MAINTENANCE
    attached.remove()
    assert system.storage_domains_service().storage_domain_service(domain.id).get().status \
        == types.StorageDomainStatus.UNATTACHED
    system.storage_domains_service().storage_domain_service(domain.id).remove(
        host=host1.name, format=True)
    assert domain.id not in {d.id for d in system.storage_domains_service().list()}
    host_service = system.hosts_service().host_service(host1.id)
    host_service.iscsi_login(iscsi=types.IscsiDetails(address=target.address, port=target.port,
                                                      target=target.iqn))
    units = {s.id: s.logical_units[0] for s in host_service.storage_service().list()}
    assert units[target.wwid(1)].status == types.LunStatus.FREE
    system.disks_service().disk_service(data_disk.id).remove()


def iso_volume(engine: Any, disk_id: str) -> str:
    db = engine.database()
    try:
        with db.connect() as conn:
            return str(conn.execute(sa.text("SELECT volume_id FROM base_disks WHERE id = :i"),
                                    {"i": disk_id}).scalar_one())
    finally:
        db.dispose()
