"""Storage domains and the CD-ROM, engine side, without hosts: the checks (oVirt's keys) that
refuse before any host is called, the domain states and the pins hosts keep, where the CD
drive sits, and monitoring taking what a drive really holds — on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid

import pytest
from engine_db import VIEWER, context
from sqlalchemy import select

from virtyard.engine.commands.base import run
from virtyard.engine.commands.cd_media import CDROM_ID, cd_place, held_volume, iso_of_volume
from virtyard.engine.commands.cdrom import ChangeCd, SetNextRunCd
from virtyard.engine.commands.errors import CommandError
from virtyard.engine.commands.storage import Portal
from virtyard.engine.commands.storage_domains import (
    AddStorageDomain,
    AttachStorageDomain,
    RemoveStorageDomain,
    SetDomainState,
    forget_domain,
    pin_domains,
)
from virtyard.engine.db.database import Database
from virtyard.engine.db.models import (
    DEFAULT_CLUSTER_ID,
    DEFAULT_DATA_CENTER_ID,
    BaseDisk,
    Host,
    HostConnectionPin,
    Lun,
    LunConnection,
    StorageDomain,
    StorageServerConnection,
    Vm,
    VmDevice,
    VmDynamic,
)
from virtyard.engine.hosts import vm_spec
from virtyard.engine.monitoring import sync

WWID = "360000000000000000e00000000010001"
PORTAL = Portal("127.0.0.1", 3260, "iqn.2026-12.org.example:t1")


@pytest.fixture
def db(any_db: Database) -> Database:
    return any_db


def host(db: Database, name: str = "h1", status: str = "up") -> str:
    with db.transaction() as tx:
        row = Host(name=name, address=f"10.0.{uuid.uuid4().int % 250}.{len(name)}",
                   port=54321, cluster_id=DEFAULT_CLUSTER_ID, status=status)
        tx.add(row)
        tx.flush()
        return row.id


def domain(db: Database, status: str = "active", wwid: str = WWID) -> str:
    """A domain row with its LUN and one connection, as adding it leaves them."""
    with db.transaction() as tx:
        dc = DEFAULT_DATA_CENTER_ID if status != "unattached" else None
        sd = StorageDomain(name=f"sd-{uuid.uuid4().hex[:6]}", status=status, data_center_id=dc)
        tx.add(sd)
        conn = StorageServerConnection(storage_type="iscsi", connection="127.0.0.1",
                                       port=3260, iqn=f"iqn.2026-12.org.example:{wwid[-4:]}",
                                       portal="1", user_name="", password="")
        tx.add(conn)
        tx.flush()
        sd.storage = sd.id
        tx.add(Lun(lun_id=wwid, storage_domain_id=sd.id, volume_group_id=sd.id))
        tx.flush()
        tx.add(LunConnection(lun_id=wwid, connection_id=conn.id))
        return sd.id


def iso(db: Database, domain_id: str, status: str = "ok", content_size: int = 1 << 20) -> str:
    with db.transaction() as tx:
        disk = BaseDisk(alias=f"iso-{uuid.uuid4().hex[:6]}", storage_type="image",
                        content_type="iso", storage_domain_id=domain_id,
                        image_id=str(uuid.uuid4()), volume_id=str(uuid.uuid4()),
                        provisioned_size=1 << 20, content_size=content_size, status=status)
        tx.add(disk)
        tx.flush()
        return disk.id


def vm(db: Database, status: str = "down", host_id: str | None = None) -> str:
    with db.transaction() as tx:
        row = Vm(name=f"vm-{uuid.uuid4().hex[:6]}", cluster_id=DEFAULT_CLUSTER_ID)
        tx.add(row)
        tx.flush()
        tx.add(VmDynamic(vm_id=row.id, status=status, run_on_host_id=host_id))
        return row.id


def refused(command: object, db: Database) -> str:
    with pytest.raises(CommandError) as err:
        run(command, context(db))  # type: ignore[arg-type]
    return err.value.key


def add_command(**kwargs: object) -> AddStorageDomain:
    args: dict[str, object] = {"name": "isos", "wwids": [WWID], "portals": [PORTAL],
                               **kwargs}
    return AddStorageDomain(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"name": ""}, "ACTION_TYPE_FAILED_NAME_MAY_NOT_BE_EMPTY"),
    ({"domain_type": "export"}, "ACTION_TYPE_FAILED_STORAGE_DOMAIN_TYPE_ILLEGAL"),
    ({"storage_type": "nfs"}, "ACTION_TYPE_FAILED_STORAGE_DOMAIN_STORAGE_TYPE_ILLEGAL"),
    ({"wwids": [WWID, WWID[:-1] + "2"]}, "ACTION_TYPE_FAILED_STORAGE_DOMAIN_ONE_LUN"),
    ({"wwids": ["x y"]}, "ACTION_TYPE_FAILED_DISK_LUN_HAS_NO_VALID_TYPE"),
    ({"portals": []}, "ACTION_TYPE_FAILED_DISK_LUN_ISCSI_MISSING_CONNECTION_PARAMS"),
    ({"portals": [Portal("127.0.0.1", 3260, "not-an-iqn")]},
     "VALIDATION_STORAGE_CONNECTION_INVALID_IQN"),
])
def test_add_checks_before_any_host_call(db: Database, kwargs: dict[str, object],
                                         key: str) -> None:
    host(db)
    assert refused(add_command(**kwargs), db) == key
    with db.read() as tx:
        assert tx.scalars(select(StorageDomain)).all() == []
        assert tx.get(Lun, WWID) is None


def test_add_refuses_luns_in_use_and_hosts_not_up(db: Database) -> None:
    host(db, status="maintenance")
    assert refused(add_command(host_ref="h1"), db) == "VDS_STATUS_ILLEGAL"
    assert refused(add_command(), db) == "ACTION_TYPE_FAILED_NO_VDS_IN_POOL"
    assert refused(add_command(host_ref="nope"), db) == "ACTION_TYPE_FAILED_HOST_NOT_EXIST"
    host(db, "h2")
    with db.transaction() as tx:
        disk = BaseDisk(alias="lun", storage_type="lun")
        tx.add(disk)
        tx.flush()
        tx.add(Lun(lun_id=WWID, disk_id=disk.id))
    assert refused(add_command(), db) == "ACTION_TYPE_FAILED_LUNS_ALREADY_USED_BY_DISKS"
    other = WWID[:-1] + "9"
    domain(db, wwid=other)
    assert refused(add_command(wwids=[other]), db) == \
        "ACTION_TYPE_FAILED_LUNS_ALREADY_PART_OF_STORAGE_DOMAINS"


def test_readonly_user_cannot_add(db: Database) -> None:
    host(db)
    with pytest.raises(CommandError) as err:
        run(add_command(), context(db, VIEWER))
    assert err.value.status == 403


def test_domain_states_and_the_pins_hosts_keep(db: Database) -> None:
    h1, h2 = host(db, "h1"), host(db, "h22")
    host(db, "h333", status="maintenance")
    sd = domain(db, status="unattached")
    with db.read() as tx:
        sd_name = tx.get(StorageDomain, sd).name  # type: ignore[union-attr]
    attached = run(AttachStorageDomain(DEFAULT_DATA_CENTER_ID, sd_name), context(db))
    assert attached.status == "active" and attached.data_center_id == DEFAULT_DATA_CENTER_ID

    def pinned() -> set[str]:
        with db.read() as tx:
            return set(tx.scalars(select(HostConnectionPin.host_id).where(
                HostConnectionPin.owner == f"sd:{sd}")))

    assert pinned() == {h1, h2}  # every Up host, not the one in maintenance
    assert refused(AttachStorageDomain(DEFAULT_DATA_CENTER_ID, sd), db) == \
        "ACTION_TYPE_FAILED_STORAGE_DOMAIN_STATUS_ILLEGAL2"
    assert refused(SetDomainState(DEFAULT_DATA_CENTER_ID, sd, "activate"), db) == \
        "ACTION_TYPE_FAILED_STORAGE_DOMAIN_STATUS_ILLEGAL2"
    assert refused(SetDomainState(DEFAULT_DATA_CENTER_ID, sd, "detach"), db) == \
        "ACTION_TYPE_FAILED_STORAGE_DOMAIN_STATUS_ILLEGAL2"
    assert refused(RemoveStorageDomain(sd), db) == \
        "ACTION_TYPE_FAILED_STORAGE_DOMAIN_STATUS_ILLEGAL2"

    # A VM whose next-run CD is one of its ISOs keeps it from maintenance.
    vm_id = vm(db)
    run(SetNextRunCd(vm_id, iso(db, sd)), context(db))
    assert refused(SetDomainState(DEFAULT_DATA_CENTER_ID, sd, "deactivate"), db) == \
        "ACTION_TYPE_FAILED_STORAGE_DOMAIN_USED_BY_VMS"
    run(SetNextRunCd(vm_id, ""), context(db))
    run(SetDomainState(DEFAULT_DATA_CENTER_ID, sd, "deactivate"), context(db))
    assert pinned() == set()
    run(SetDomainState(DEFAULT_DATA_CENTER_ID, sd, "activate"), context(db))
    assert pinned() == {h1, h2}
    run(SetDomainState(DEFAULT_DATA_CENTER_ID, sd, "deactivate"), context(db))
    run(SetDomainState(DEFAULT_DATA_CENTER_ID, sd, "detach"), context(db))
    run(RemoveStorageDomain(sd), context(db))  # forget: no host needed
    with db.read() as tx:
        assert tx.get(StorageDomain, sd) is None and tx.get(Lun, WWID) is None
        assert tx.scalars(select(BaseDisk).where(BaseDisk.content_type == "iso")).all() == []


def test_pins_converge_from_any_state(db: Database) -> None:
    h1 = host(db)
    sd = domain(db)
    with db.transaction() as tx:
        assert pin_domains(tx) == [h1]
        assert pin_domains(tx) == []  # nothing more to do
    stale = domain(db, status="maintenance", wwid=WWID[:-1] + "7")
    with db.transaction() as tx:  # a pin of a domain that is not active goes
        conn_id = tx.scalars(select(LunConnection.connection_id)).first()
        tx.add(HostConnectionPin(host_id=h1, connection_id=conn_id, owner=f"sd:{stale}"))
    with db.transaction() as tx:
        assert pin_domains(tx, h1) == [h1]
        owners = set(tx.scalars(select(HostConnectionPin.owner)))
    assert owners == {f"sd:{sd}"}


def test_a_host_coming_up_keeps_the_pin_of_a_domain_being_made(db: Database) -> None:
    """CI saw it: an engine restart's host-up pinning dropped the pin of an add in flight (its
    domain is not active), the host logged out, and ``StorageDomain.create`` found no LUN."""
    h1 = host(db)
    add = add_command()
    ctx = context(db)
    with db.transaction() as tx:
        add.validate(tx, ctx)
        tx.add(add.begin(tx, ctx))

    def owners() -> set[str]:
        with db.read() as tx:
            return set(tx.scalars(select(HostConnectionPin.owner).where(
                HostConnectionPin.host_id == h1)))

    made = owners()
    assert made == {f"sd-work:{add.domain_id}"}
    with db.transaction() as tx:
        assert pin_domains(tx, h1) == []
        assert pin_domains(tx) == []
    assert owners() == made
    # Remove (forget) drops the work pin with the domain's own.
    with db.transaction() as tx:
        assert forget_domain(tx, add.domain_id) == [h1]
    assert owners() == set()


def test_iso_checks_of_a_cd_change(db: Database) -> None:
    h1 = host(db)
    sd = domain(db)
    down_vm = vm(db)
    ok = iso(db, sd)
    assert refused(ChangeCd(down_vm, ok), db) == "ACTION_TYPE_FAILED_VM_STATUS_ILLEGAL"
    running = vm(db, "up", h1)
    with db.transaction() as tx:
        cd_place(tx, running)
    assert refused(ChangeCd(running, str(uuid.uuid4())), db) == \
        "ERROR_CANNOT_FIND_ISO_IMAGE_PATH"
    assert refused(ChangeCd(running, iso(db, sd, status="locked")), db) == \
        "ERROR_ISO_IMAGE_STATUS_ILLEGAL"
    assert refused(ChangeCd(running, iso(db, sd, content_size=0)), db) == \
        "ERROR_ISO_IMAGE_STATUS_ILLEGAL"  # made, never uploaded into
    inactive = domain(db, status="maintenance", wwid=WWID[:-1] + "5")
    assert refused(ChangeCd(running, iso(db, inactive)), db) == \
        "VM_CANNOT_RUN_FROM_CD_WITHOUT_ACTIVE_STORAGE_DOMAIN_ISO"
    without_drive = vm(db, "up", h1)  # started before VMs had a drive
    assert refused(ChangeCd(without_drive, ok), db) == "ACTION_TYPE_FAILED_CDROM_NOT_EXIST"
    assert refused(SetNextRunCd(down_vm, str(uuid.uuid4())), db) == \
        "ERROR_CANNOT_FIND_ISO_IMAGE_PATH"
    with db.read() as tx:  # nothing was locked or left behind
        assert tx.get(VmDynamic, running).current_cd == ""  # type: ignore[union-attr]


def test_the_drive_sits_where_no_disk_does_and_stays(db: Database) -> None:
    vm_id = vm(db)
    with db.transaction() as tx:
        first = cd_place(tx, vm_id, {0, 1})
        assert first.index == 2
        assert cd_place(tx, vm_id, {0, 1}).index == 2  # kept
        assert cd_place(tx, vm_id, {0, 1, 2}).index == 3  # a disk took it: moved
        row = tx.get(VmDevice, (CDROM_ID, vm_id))
        assert row is not None and row.type == "cdrom" and row.is_readonly
        # A hot-plug never takes the drive's index.
        assert vm_spec.taken_places(tx, vm_id) == {"scsi": {3}}
    drive = vm_spec.cdrom_drive(vm_spec.DiskPlace(3, None), None)
    assert drive["device"] == "cdrom" and "PDIV" not in drive


def test_monitoring_takes_what_the_drive_holds(db: Database) -> None:
    h1 = host(db)
    sd = domain(db)
    loaded = iso(db, sd)
    vm_id = vm(db, "up", h1)
    with db.read() as tx:
        volume = tx.get(BaseDisk, loaded).volume_id  # type: ignore[union-attr]
    report = [{"vmId": vm_id, "hash": "h2", "devices": [
        {"device": "cdrom", "iface": "scsi", "index": 2,
         "PDIV": {"poolID": DEFAULT_DATA_CENTER_ID, "domainID": sd, "imageID": "i",
                  "volumeID": volume}}]}]
    devices, dropped = sync.parse_full_list(report)
    assert dropped == 0 and devices[0].cd == volume
    stats, _ = sync.parse_stats([{"vmId": vm_id, "status": "Up", "hash": "h2"}])
    with db.transaction() as tx:
        sync.apply(tx, h1, stats, devices, complete=True)
    with db.read() as tx:
        assert tx.get(VmDynamic, vm_id).current_cd == loaded  # type: ignore[union-attr]
    empty, _ = sync.parse_full_list([{"vmId": vm_id, "hash": "h3", "devices": [
        {"device": "cdrom", "iface": "scsi", "index": 2}]}])
    with db.transaction() as tx:
        sync.apply(tx, h1, stats, empty, complete=True)
        assert iso_of_volume(tx, "") == ""
    with db.read() as tx:
        assert tx.get(VmDynamic, vm_id).current_cd == ""  # type: ignore[union-attr]
    assert held_volume(report[0], "scsi", 2) == volume
    assert held_volume(report[0], "scsi", 3) is None
    hostile, dropped = sync.parse_full_list([{"vmId": vm_id, "devices": [
        {"device": "cdrom", "PDIV": {"volumeID": "../../etc/passwd"}}]}])
    assert hostile[0].cd == ""
