"""VMs, disks, disk attachments and CD-ROMs through the REST API, in process (no lab), on SQLite
and PostgreSQL: what the oVirt SDK writes is accepted and what we answer the SDK reads; lists
cost a fixed number of SQL statements however many rows they hold; secrets never leave."""

from __future__ import annotations

import gc
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ovirtsdk4.types as sdk
import ovirtsdk4.writers as sdk_writers
import pytest
from engine_db import context
from ovirtsdk4.reader import Reader
from ovirtsdk4.writer import Writer
from sqlalchemy import event, func, insert, select
from starlette.testclient import TestClient

from virtyard.common.pki import create_ca, issue
from virtyard.engine.api.app import build_app
from virtyard.engine.api.types import base, disks, hosts, vms
from virtyard.engine.commands.base import run
from virtyard.engine.commands.errors import CommandError
from virtyard.engine.commands.vms import AddVm, Ref
from virtyard.engine.config import EngineConfig, HostsConfig
from virtyard.engine.db.database import Database
from virtyard.engine.db.models import (
    DEFAULT_CLUSTER_ID,
    BaseDisk,
    Cluster,
    DiskVmElement,
    Event,
    Host,
    Lun,
    LunConnection,
    StorageServerConnection,
    Vm,
    VmDevice,
    VmDynamic,
    VmPlacementHost,
)
from virtyard.engine.queries.batch import INLINE_MAX, gc_paused, ids_in
from virtyard.engine.services import Services, build_services

API = "/ovirt-engine/api"
CDROM_ID = "00000000-0000-0000-0000-000000000000"
BLANK_ID = "00000000-0000-0000-0000-000000000000"
SECRET = "chap-secret-never-rendered"
SDK_HEADERS = {"Accept": "application/xml", "Content-Type": "application/xml", "Version": "4"}


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    ca = create_ca(root)
    issue(ca, root, "engine", common_name="virtyard-engine", server=False, client=True)
    return root


@dataclass
class Api:
    """The engine's app in process, logged in as admin@internal, speaking as the SDK does."""

    client: TestClient
    services: Services

    @property
    def db(self) -> Database:
        return self.services.db

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.client.get(API + path, params=params)

    def post(self, path: str, body: str | bytes, **params: Any) -> httpx.Response:
        return self.client.post(API + path, content=body, params=params)

    def delete(self, path: str, **params: Any) -> httpx.Response:
        return self.client.delete(API + path, params=params)


@pytest.fixture
def api(any_db: Database, pki: Path, tmp_path: Path) -> Iterator[Api]:
    config = EngineConfig(state_dir=tmp_path, hosts=HostsConfig(
        ca=pki / "ca.pem", cert=pki / "engine.pem", key=pki / "engine-key.pem"))
    services = build_services(config, any_db)
    services.auth.add_user("admin@internal", "password", "admin")
    client = TestClient(build_app(services))
    token = client.post("/ovirt-engine/sso/oauth/token", data={
        "grant_type": "password", "scope": "ovirt-app-api", "username": "admin@internal",
        "password": "password"}).json()["access_token"]
    client.headers.update({**SDK_HEADERS, "Authorization": f"Bearer {token}"})
    yield Api(client, services)
    client.close()


# ---------------------------------------------------------------------------- seeding


def add_hosts(db: Database, *names: str, cluster_id: str = DEFAULT_CLUSTER_ID) -> list[str]:
    with db.transaction() as tx:
        existing = int(tx.scalar(select(func.count()).select_from(Host)) or 0)
        ids = [f"00000000-0000-4000-8000-{existing + i:012d}" for i in range(1, len(names) + 1)]
        tx.execute(insert(Host), [
            {"id": host_id, "name": name, "address": f"10.0.0.{existing + i}", "port": 54321,
             "cluster_id": cluster_id, "status": "up"}
            for i, (host_id, name) in enumerate(zip(ids, names, strict=True), 1)])
    return ids


def vm_id_of(prefix: str, i: int) -> str:
    return f"{prefix}-{i:05d}-0000-0000-0000-000000000000"[:36]


def disk_id_of(prefix: str, i: int, j: int) -> str:
    return f"{prefix}-{i:05d}-{j:04d}-0000-000000000000"[:36]


def seed(db: Database, count: int, *, prefix: str = "vm", disks_per_vm: int = 5,
         status: str = "down", host_id: str | None = None) -> list[str]:
    """``count`` VMs with ``disks_per_vm`` LUN disks each (plugged, one with a guest name),
    every LUN reached through one CHAP connection; bulk inserts. Returns the VM ids."""
    vm_rows, dyn, disk_rows, luns, maps, dves, devices = [], [], [], [], [], [], []
    conn_id = f"c-{prefix}"
    for i in range(count):
        vm_id = vm_id_of(prefix, i)
        vm_rows.append({"id": vm_id, "name": f"{prefix}{i:05d}", "cluster_id": DEFAULT_CLUSTER_ID,
                        "iso_path": f"iso-{prefix}" if i == 0 else ""})
        dyn.append({"vm_id": vm_id, "status": status, "run_on_host_id": host_id,
                    "current_cd": f"current-{prefix}" if i == 0 else ""})
        for j in range(disks_per_vm):
            disk_id = disk_id_of(prefix, i, j)
            wwid = f"36001405{prefix}{i:05d}{j:04d}"
            disk_rows.append({"id": disk_id, "alias": f"{prefix}{i:05d}_disk{j}",
                              "storage_type": "lun", "sgio": "unfiltered" if j == 1 else ""})
            luns.append({"lun_id": wwid, "disk_id": disk_id, "device_size": (j + 1) << 30,
                         "serial": f"SER{i}{j}", "vendor_id": "LIO-ORG", "product_id": "disk",
                         "lun_mapping": j + 1})
            maps.append({"lun_id": wwid, "connection_id": conn_id})
            dves.append({"disk_id": disk_id, "vm_id": vm_id, "is_boot": j == 0,
                         "disk_interface": "virtio_scsi", "exclusive_disk_id": disk_id})
            devices.append({"device_id": disk_id, "vm_id": vm_id, "type": "disk", "device": "lun",
                            "is_plugged": j != 2, "is_readonly": j == 3,
                            "logical_name": "/dev/sdb" if j == 1 else ""})
    with db.transaction() as tx:
        tx.execute(insert(StorageServerConnection), [{
            "id": conn_id, "connection": "192.0.2.10", "port": 3260,
            "iqn": f"iqn.2003-01.org.example:{prefix}", "portal": "1", "user_name": "chapuser",
            "password": SECRET}])
        for model, rows in ((Vm, vm_rows), (VmDynamic, dyn), (BaseDisk, disk_rows),
                            (Lun, luns), (LunConnection, maps), (DiskVmElement, dves),
                            (VmDevice, devices)):
            if rows:
                tx.execute(insert(model), rows)
    return [row["id"] for row in vm_rows]


@contextmanager
def counting(db: Database) -> Iterator[list[str]]:
    """The SQL statements run meanwhile (on both of the database's engines)."""
    statements: list[str] = []
    lock = threading.Lock()

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        with lock:
            statements.append(statement)

    engines = {db.engine, db.read_engine}
    for engine in engines:
        event.listen(engine, "before_cursor_execute", on_execute)
    try:
        yield statements
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", on_execute)


def sdk_read(response: httpx.Response) -> Any:
    assert response.status_code in (200, 201), response.text
    assert SECRET.encode() not in response.content
    return Reader.read(response.content)


# ---------------------------------------------------------------------------- reading


def test_vm_list_and_get_as_the_sdk_reads_them(api: Api) -> None:
    [host_id] = add_hosts(api.db, "h1")
    down = seed(api.db, 2, prefix="dn")
    [up] = seed(api.db, 1, prefix="up", status="up", host_id=host_id)
    listed = sdk_read(api.get("/vms"))
    assert [v.name for v in listed] == ["dn00000", "dn00001", "up00000"]
    vm = sdk_read(api.get(f"/vms/{up}"))
    assert vm.status == sdk.VmStatus.UP and vm.host.id == host_id
    assert vm.high_availability.enabled is False and vm.memory == 1 << 30
    assert vm.cpu.topology.sockets == 1 and vm.os.type == "other"
    assert vm.cluster.id == DEFAULT_CLUSTER_ID and vm.template.id == BLANK_ID
    assert vm.disk_attachments.href == f"{API}/vms/{up}/diskattachments"
    assert vm.cdroms.href == f"{API}/vms/{up}/cdroms"
    # follow_link: the SDK GETs the href and reads a list.
    attachments = sdk_read(api.client.get(vm.disk_attachments.href))
    assert len(attachments) == 5
    assert sdk_read(api.get(f"/vms/{down[0]}")).status == sdk.VmStatus.DOWN
    assert sdk_read(api.get(f"/vms/{down[0]}")).host is None
    assert api.get("/vms/no-such-vm").status_code == 404


def test_vm_search(api: Api) -> None:
    [host_id] = add_hosts(api.db, "h1")
    seed(api.db, 3, prefix="web", disks_per_vm=0)
    seed(api.db, 2, prefix="db", status="up", host_id=host_id, disks_per_vm=0)

    def names(**params: Any) -> list[str]:
        return [v.name for v in sdk_read(api.get("/vms", **params))]

    assert names(search="name=web*") == ["web00000", "web00001", "web00002"]
    assert names(search='name="WEB00001"', case_sensitive="false") == ["web00001"]
    assert names(search="status=up") == ["db00000", "db00001"]
    assert names(search="host=h1 and name=db00001") == ["db00001"]
    assert names(search="cluster=Default", max="2") == ["db00000", "db00001"]
    assert names(search="Vms: name=nothing") == []
    bad = api.get("/vms", search="colour=red")
    assert bad.status_code == 400 and b"colour" in bad.content


def test_disk_attachments_map_vm_device_and_disk_vm_element(api: Api) -> None:
    [vm_id] = seed(api.db, 1)
    attachments = sdk_read(api.get(f"/vms/{vm_id}/diskattachments"))
    assert [a.id for a in attachments] == [disk_id_of("vm", 0, j) for j in range(5)]
    first, second, unplugged, readonly = attachments[:4]
    assert first.bootable and first.active and first.interface == sdk.DiskInterface.VIRTIO_SCSI
    assert first.logical_name is None and second.logical_name == "/dev/sdb"
    assert unplugged.active is False and readonly.read_only is True
    assert first.pass_discard is False and first.uses_scsi_reservation is False
    assert first.disk.id == first.id and first.vm.id == vm_id
    assert first.href == f"{API}/vms/{vm_id}/diskattachments/{first.id}"
    one = sdk_read(api.get(f"/vms/{vm_id}/diskattachments/{second.id}", follow="disk"))
    lun = one.disk.lun_storage
    assert one.disk.alias == one.disk.name == "vm00000_disk1"
    assert one.disk.storage_type == sdk.DiskStorageType.LUN
    assert one.disk.sgio == sdk.ScsiGenericIO.UNFILTERED
    assert lun.id == lun.logical_units[0].id == "36001405vm000000001"
    assert lun.type == sdk.StorageType.ISCSI
    unit = lun.logical_units[0]
    assert (unit.address, unit.port, unit.target, unit.portal, unit.username) == (
        "192.0.2.10", 3260, "iqn.2003-01.org.example:vm", "1", "chapuser")
    assert unit.password is None and unit.size == 2 << 30 and unit.disk_id == one.disk.id
    assert unit.status == sdk.LunStatus.USED and unit.serial == "SER01"
    assert api.get(f"/vms/{vm_id}/diskattachments/nope").status_code == 404
    assert api.get("/vms/nope/diskattachments").status_code == 404


def test_follow_renders_inline_and_checks_paths(api: Api) -> None:
    [host_id] = add_hosts(api.db, "h1")
    seed(api.db, 2, status="up", host_id=host_id)
    vms_ = sdk_read(api.get("/vms", follow="disk_attachments.disk,cdroms,host,cluster"))
    for vm in vms_:
        assert len(vm.disk_attachments) == 5
        assert all(a.disk.lun_storage.logical_units[0].id.startswith("36001405")
                   for a in vm.disk_attachments)
        assert len(vm.cdroms) == 1 and vm.cdroms[0].id == CDROM_ID
        assert vm.host.name == "h1" and vm.cluster.name == "Default"
    assert vms_[0].cdroms[0].file.id == "iso-vm" and vms_[1].cdroms[0].file is None
    deep = sdk_read(api.get("/vms", follow="disk_attachments.disk.vms"))
    assert deep[0].disk_attachments[0].disk.vms[0].name == deep[0].name
    for path, named in (("bogus", "'bogus'"), ("disk_attachments.colour", "'colour'"),
                        ("name", "'name'")):
        answer = api.get("/vms", follow=path)
        assert answer.status_code == 400 and named.encode() in answer.content
    as_json = api.client.get(f"{API}/vms", params={"follow": "disk_attachments"},
                             headers={"Accept": "application/json"}).json()
    assert len(as_json["vm"][0]["disk_attachments"]["disk_attachment"]) == 5
    assert api.get("/vms", follow="").status_code == 200


def test_cdrom_holds_the_iso_path_or_the_current_cd(api: Api) -> None:
    first, second = seed(api.db, 2, disks_per_vm=0)
    [cdrom] = sdk_read(api.get(f"/vms/{first}/cdroms"))
    assert cdrom.id == CDROM_ID and cdrom.file.id == "iso-vm" and cdrom.vm.id == first
    current = sdk_read(api.get(f"/vms/{first}/cdroms/{CDROM_ID}", current="true"))
    assert current.file.id == "current-vm"
    empty = sdk_read(api.get(f"/vms/{second}/cdroms/{CDROM_ID}"))
    assert empty.file is None
    assert api.get(f"/vms/{first}/cdroms/other").status_code == 404
    assert api.get("/vms/nope/cdroms").status_code == 404
    with_vm = sdk_read(api.get(f"/vms/{first}/cdroms", follow="vm"))
    assert with_vm[0].vm.name == "vm00000"


def test_disks_list_search_and_get(api: Api) -> None:
    seed(api.db, 2, disks_per_vm=2)
    with api.db.transaction() as tx:
        tx.execute(insert(BaseDisk), [{"id": "iso-disk", "alias": "debian.iso",
                                       "storage_type": "image", "content_type": "iso",
                                       "provisioned_size": 1 << 20, "image_id": "img"}])

    def aliases(**params: Any) -> list[str]:
        return [d.alias for d in sdk_read(api.get("/disks", **params))]

    assert aliases() == ["debian.iso", "vm00000_disk0", "vm00000_disk1", "vm00001_disk0",
                         "vm00001_disk1"]
    assert aliases(search="name=vm00001_disk1") == ["vm00001_disk1"]
    assert aliases(search="alias=VM00000*", case_sensitive="false") == [
        "vm00000_disk0", "vm00000_disk1"]
    assert aliases(search="disk_type=image") == ["debian.iso"]
    assert aliases(search="lun_id=36001405vm000000001") == ["vm00000_disk1"]
    assert aliases(search="disk_type=lun", max="1") == ["vm00000_disk0"]
    iso = sdk_read(api.get("/disks/iso-disk"))
    assert iso.content_type == sdk.DiskContentType.ISO and iso.provisioned_size == 1 << 20
    assert iso.storage_type == sdk.DiskStorageType.IMAGE and iso.lun_storage is None
    lun = sdk_read(api.get("/disks", search="name=vm00000_disk0"))[0]
    assert lun.provisioned_size is None and lun.lun_storage.logical_units[0].size == 1 << 30
    assert lun.status == sdk.DiskStatus.OK
    with_vms = sdk_read(api.get(f"/disks/{lun.id}", follow="vms"))
    assert [v.name for v in with_vms.vms] == ["vm00000"]
    assert api.get("/disks/nope").status_code == 404


def test_blank_template(api: Api) -> None:
    [blank] = sdk_read(api.get("/templates"))
    assert (blank.id, blank.name, blank.status) == (BLANK_ID, "Blank", sdk.TemplateStatus.OK)
    assert sdk_read(api.get("/templates", search="name=Blank"))[0].id == BLANK_ID
    assert sdk_read(api.get("/templates", search="name=b*", case_sensitive="false"))
    assert sdk_read(api.get("/templates", search="name=Other")) == []
    assert sdk_read(api.get(f"/templates/{BLANK_ID}")).name == "Blank"
    assert api.get("/templates/other").status_code == 404
    vm_id = seed(api.db, 1, disks_per_vm=0)[0]
    assert sdk_read(api.get(f"/vms/{vm_id}", follow="template")).template.name == "Blank"


def test_no_password_in_any_answer(api: Api) -> None:
    [vm_id] = seed(api.db, 1)
    for path, params in (("/vms", {"follow": "disk_attachments.disk"}),
                         (f"/vms/{vm_id}/diskattachments", {"follow": "disk"}),
                         ("/disks", {}), (f"/vms/{vm_id}", {"follow": "disk_attachments.disk"})):
        for accept in ("application/xml", "application/json"):
            answer = api.client.get(API + path, params=params, headers={"Accept": accept})
            assert answer.status_code == 200
            assert SECRET.encode() not in answer.content
            assert b"password" not in answer.content


# ---------------------------------------------------------------------------- statement counts


def test_statements_do_not_grow_with_rows(api: Api) -> None:
    """oVirt's v3 API loaded each VM's links one by one; here a list is a fixed number of
    statements, and long id lists (over INLINE_MAX) travel as one parameter."""
    paths = ["/vms", "/vms?follow=disk_attachments.disk",
             "/vms?follow=disk_attachments.disk.vms,cdroms,host,cluster,template",
             "/vms/{vm}/diskattachments", "/vms/{vm}/diskattachments?follow=disk",
             "/vms/{vm}", "/disks", "/disks?search=name={alias}", "/disks?follow=vms"]
    counts: dict[int, list[int]] = {}
    total = 0
    for size in (5, 50, 300):
        ids = seed(api.db, size - total, prefix=f"s{size}")
        alias = f"s{size}{len(ids) - 1:05d}_disk3"
        total = size
        counts[size] = []
        for path in paths:
            url = path.format(vm=ids[-1], alias=alias)
            with counting(api.db) as statements:
                answer = api.client.get(API + url)
            assert answer.status_code == 200, answer.text
            counts[size].append(len(statements))
        followed = sdk_read(api.get("/vms", follow="disk_attachments.disk"))
        assert len(followed) == total
        assert sum(len(v.disk_attachments) for v in followed) == 5 * total
        assert all(a.disk.lun_storage is not None for v in followed for a in v.disk_attachments)
    assert counts[5] == counts[50] == counts[300], dict(zip(paths, zip(*counts.values(),
                                                                       strict=True),
                                                            strict=True))
    assert total * 5 > INLINE_MAX


def test_ids_in_long_lists(api: Api) -> None:
    ids = seed(api.db, INLINE_MAX * 2, disks_per_vm=0)
    with api.db.read() as tx:
        found = tx.scalars(select(Vm.id).where(ids_in(tx, Vm.id, [*ids, "nope", ids[0]])))
        assert sorted(found) == sorted(ids)
        assert list(tx.scalars(select(Vm.id).where(ids_in(tx, Vm.id, [])))) == []


def test_gc_pauses_nest_and_restore() -> None:
    assert gc.isenabled()
    with gc_paused():
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


# ---------------------------------------------------------------------------- add and remove


def test_sdk_written_vm_is_added(api: Api) -> None:
    h1, h2 = add_hosts(api.db, "h1", "h2")
    vm = sdk.Vm(
        name="myvm", memory=2 << 30, description="d",
        cluster=sdk.Cluster(name="Default"), template=sdk.Template(name="Blank"),
        high_availability=sdk.HighAvailability(enabled=True, priority=50),
        cpu=sdk.Cpu(topology=sdk.CpuTopology(sockets=2, cores=4, threads=1),
                    architecture=sdk.Architecture.X86_64),
        os=sdk.OperatingSystem(type="rhel_9x64", kernel="/boot/vmlinuz", initrd="/boot/initrd",
                               cmdline="console=ttyS0",
                               boot=sdk.Boot(devices=[sdk.BootDevice.HD, sdk.BootDevice.CDROM])),
        placement_policy=sdk.VmPlacementPolicy(affinity=sdk.VmAffinity.MIGRATABLE,
                                               hosts=[sdk.Host(name="h2"), sdk.Host(id=h1),
                                                      sdk.Host(name="h2")]))
    answer = api.post("/vms", Writer.write(vm))
    assert answer.status_code == 201, answer.text
    added = sdk_read(answer)
    assert added.name == "myvm" and added.status == sdk.VmStatus.DOWN and added.memory == 2 << 30
    assert added.high_availability.enabled and added.high_availability.priority == 50
    assert (added.cpu.topology.sockets, added.cpu.topology.cores) == (2, 4)
    assert (added.os.type, added.os.kernel, added.os.initrd, added.os.cmdline) == (
        "rhel_9x64", "/boot/vmlinuz", "/boot/initrd", "console=ttyS0")
    assert [h.id for h in added.placement_policy.hosts] == [h2, h1]
    assert added.template.id == BLANK_ID and added.cluster.id == DEFAULT_CLUSTER_ID
    assert sdk_read(api.get(f"/vms/{added.id}")).name == "myvm"
    assert sdk_read(api.get(f"/vms/{added.id}/diskattachments")) == []
    with api.db.read() as tx:
        rows = list(tx.execute(select(VmPlacementHost.host_id, VmPlacementHost.position)
                               .where(VmPlacementHost.vm_id == added.id)
                               .order_by(VmPlacementHost.position)))
        assert [tuple(r) for r in rows] == [(h2, 0), (h1, 1)]
        assert tx.scalar(select(VmDynamic.status).where(VmDynamic.vm_id == added.id)) == "down"
        created = tx.scalars(select(Event).where(Event.code == 34)).one()
    assert created.vm_id == added.id and created.description == \
        "VM myvm was created by admin@internal."
    events = sdk_read(api.get("/events", search="code=34"))
    assert [e.vm.id for e in events] == [added.id]
    minimal = api.post("/vms", Writer.write(sdk.Vm(name="tiny")))
    assert minimal.status_code == 201 and sdk_read(minimal).cluster.id == DEFAULT_CLUSTER_ID


def test_every_field_the_sdk_writes_for_a_vm_is_accepted(api: Api) -> None:
    """A Vm with the SDK's less common elements: accepted (and unused), not refused."""
    vm = sdk.Vm(
        name="full", comment="c", memory=1 << 30, stateless=False, type=sdk.VmType.SERVER,
        delete_protected=False, soundcard_enabled=False, start_paused=False, tpm_enabled=False,
        cpu_shares=0, custom_cpu_model="", custom_emulated_machine="", migration_downtime=-1,
        bios=sdk.Bios(type=sdk.BiosType.Q35_OVMF, boot_menu=sdk.BootMenu(enabled=False)),
        console=sdk.Console(enabled=True), io=sdk.Io(threads=1),
        display=sdk.Display(type=sdk.DisplayType.VNC, monitors=1),
        memory_policy=sdk.MemoryPolicy(guaranteed=1 << 30, max=4 << 30, ballooning=True),
        time_zone=sdk.TimeZone(name="Etc/GMT"), usb=sdk.Usb(enabled=False),
        serial_number=sdk.SerialNumber(policy=sdk.SerialNumberPolicy.VM),
        sso=sdk.Sso(methods=[sdk.Method(id=sdk.SsoMethod.GUEST_AGENT)]),
        rng_device=sdk.RngDevice(source=sdk.RngSource.URANDOM,
                                 rate=sdk.Rate(bytes=1024, period=1000)),
        migration=sdk.MigrationOptions(auto_converge=sdk.InheritableBoolean.INHERIT,
                                       policy=sdk.MigrationPolicy(id="p")),
        custom_properties=[sdk.CustomProperty(name="a", value="b")],
        virtio_scsi=sdk.VirtioScsi(enabled=True), cpu_profile=sdk.CpuProfile(id="cp"),
        lease=sdk.StorageDomainLease(storage_domain=sdk.StorageDomain(id="sd")),
        custom_compatibility_version=sdk.Version(major=4, minor=7),
        storage_error_resume_behaviour=sdk.VmStorageErrorResumeBehaviour.AUTO_RESUME)
    answer = api.post("/vms", Writer.write(vm))
    assert answer.status_code == 201, answer.text


def _sdk_writer_fields() -> dict[str, list[tuple[str, str | None]]]:
    """Per SDK type: each element its writer writes, and the SDK type of a nested one."""
    text = Path(sdk_writers.__file__).read_text()
    out: dict[str, list[tuple[str, str | None]]] = {}
    for match in re.finditer(r"\nclass (\w+)Writer\(Writer\):(.*?)def write_many", text, re.S):
        body = match.group(2)
        fields: list[tuple[str, str | None]] = []
        fields += [(tag, None) for tag in re.findall(
            r"if obj\.\w+ is not None:\n\s+Writer\.write_\w+\(writer, '(\w+)'", body)]
        fields += [(tag, kind) for kind, tag in re.findall(
            r"(\w+)Writer\.write_one\(obj\.\w+, writer, '(\w+)'\)", body)]
        fields += [(container, kind) for kind, container in re.findall(
            r"(\w+)Writer\.write_many\(obj\.\w+, writer, '\w+', '(\w+)'\)", body)]
        fields += [(container, None) for container in re.findall(
            r"writer\.write_start\('(\w+)'\)\n\s+for item in", body)]
        out[match.group(1)] = fields
    return out


# SDK elements deliberately not accepted (a request carrying one gets a 400 naming it).
NOT_ACCEPTED = {
    "Vm": {"initialization", "payloads", "nics", "permissions", "affinity_labels", "applications",
           "floppies", "graphics_consoles", "host_devices", "katello_errata", "mediated_devices",
           "host_numa_nodes", "reported_devices", "sessions", "snapshots", "statistics", "tags",
           "watchdogs", "domain", "dynamic_cpu", "external_host_provider",
           "guest_operating_system"},
    "Cpu": {"cores", "cpu_tune"},
    "Disk": {"disk_snapshots", "permissions", "statistics", "openstack_volume_type",
             "snapshot"},
    "Cdrom": set(), "DiskAttachment": set(), "HostStorage": set(), "LogicalUnit": set(),
    "File": set(), "OperatingSystem": set(), "HighAvailability": set(), "Template": None,
    "Version": {"name", "description", "comment"}, "Display": {"certificate"},
}


def test_our_descriptions_accept_what_the_sdk_writes() -> None:
    """Every element the SDK's writer emits for these types (recursively, through the nested
    types we describe) is a field of our description, or deliberately refused above."""
    writer_fields = _sdk_writer_fields()
    seen: set[tuple[str, str]] = set()
    problems: list[str] = []

    def check(sdk_type: str, ours: base.Type, where: str) -> None:
        if (sdk_type, ours.tag) in seen:
            return
        seen.add((sdk_type, ours.tag))
        refused = NOT_ACCEPTED.get(sdk_type, set())
        if refused is None:  # a reference only (e.g. the Blank template): id and name suffice
            return
        for tag, nested in writer_fields[sdk_type]:
            if tag in refused:
                continue
            field = ours.field_named(tag)
            if field is None:
                problems.append(f"{where}.{tag}")
                continue
            kind = field.kind.item if isinstance(field.kind, base.ListOf) else field.kind
            if nested is not None and isinstance(kind, base.Type) and kind.fields:
                check(nested, kind, f"{where}.{tag}")

    for sdk_type, ours in (("Vm", vms.VM), ("Disk", disks.DISK),
                           ("DiskAttachment", disks.DISK_ATTACHMENT),
                           ("HostStorage", disks.HOST_STORAGE),
                           ("LogicalUnit", disks.LOGICAL_UNIT), ("Cdrom", disks.CDROM),
                           ("File", disks.FILE)):
        check(sdk_type, ours, ours.tag)
    # Nested hosts, clusters, users are other descriptions; only ours are checked in depth.
    problems = [p for p in problems if not re.search(r"\.(host|hosts|cluster|user|data_center|"
                                                     r"storage_domain|storage_domains|"
                                                     r"vm|vms|template|original_template|"
                                                     r"instance_type|cpu_profile|quota|"
                                                     r"vm_pool|disk_profile|policy)\.", p)]
    assert not problems, problems
    assert hosts.CPU.field_named("architecture") is not None


@pytest.mark.parametrize(("body", "status", "text"), [
    (sdk.Vm(memory=1 << 30), 400, "Vm [name] required for add"),
    (sdk.Vm(name="bad name!"), 400, "ACTION_TYPE_FAILED_NAME_MAY_NOT_CONTAIN_SPECIAL_CHARS"),
    (sdk.Vm(name="v", cluster=sdk.Cluster(name="nope")), 400,
     "ACTION_TYPE_FAILED_CLUSTER_IS_NOT_VALID"),
    (sdk.Vm(name="v", template=sdk.Template(name="Other")), 400,
     "ACTION_TYPE_FAILED_TEMPLATE_DOES_NOT_EXIST"),
    (sdk.Vm(name="v", template=sdk.Template(id="123")), 400,
     "ACTION_TYPE_FAILED_TEMPLATE_DOES_NOT_EXIST"),
    (sdk.Vm(name="v", placement_policy=sdk.VmPlacementPolicy(hosts=[sdk.Host(name="ghost")])),
     400, "Host ghost of the placement policy does not exist"),
    (sdk.Vm(name="v", placement_policy=sdk.VmPlacementPolicy(hosts=[sdk.Host()])), 400,
     "Vm [placement_policy.hosts.id|name] required for add"),
    (sdk.Vm(name="v", memory=0), 400, "ACTION_TYPE_FAILED_MEMORY_SIZE_IS_NOT_VALID"),
    (sdk.Vm(name="v", cpu=sdk.Cpu(topology=sdk.CpuTopology(sockets=0))), 400,
     "ACTION_TYPE_FAILED_CPU_TOPOLOGY_IS_NOT_VALID"),
    (sdk.Vm(name="v", high_availability=sdk.HighAvailability(priority=1 << 40)), 400,
     "ACTION_TYPE_FAILED_HA_PRIORITY_IS_NOT_VALID"),
    (sdk.Vm(name="v", os=sdk.OperatingSystem(type="x" * 65)), 400, "os.type is longer"),
    (sdk.Vm(name="v", disk_attachments=[sdk.DiskAttachment(disk=sdk.Disk(id="d"))]), 400,
     "disk_attachments cannot be given"),
    (sdk.Vm(name="v", nics=[sdk.Nic(name="nic1")]), 400, "Unknown element 'nics'"),
])
def test_add_vm_refusals(api: Api, body: sdk.Vm, status: int, text: str) -> None:
    answer = api.post("/vms", Writer.write(body))
    assert answer.status_code == status and text in answer.text, answer.text
    with api.db.read() as tx:
        assert tx.scalar(select(func.count()).select_from(Vm)) == 0


def test_add_vm_name_conflicts_and_other_cluster_hosts(api: Api) -> None:
    with api.db.transaction() as tx:
        tx.add(Cluster(id="c2", name="Other", data_center_id=tx.scalar(
            select(Cluster.data_center_id).where(Cluster.id == DEFAULT_CLUSTER_ID))))
    add_hosts(api.db, "far", cluster_id="c2")
    assert api.post("/vms", Writer.write(sdk.Vm(name="same"))).status_code == 201
    again = api.post("/vms", Writer.write(sdk.Vm(name="same")))
    assert again.status_code == 409 and "ACTION_TYPE_FAILED_NAME_ALREADY_USED" in again.text
    far = api.post("/vms", Writer.write(sdk.Vm(
        name="v", placement_policy=sdk.VmPlacementPolicy(hosts=[sdk.Host(name="far")]))))
    assert far.status_code == 400 and "DEDICATED_VDS_NOT_IN_SAME_CLUSTER" in far.text
    there = api.post("/vms", Writer.write(sdk.Vm(
        name="v", cluster=sdk.Cluster(id="c2"),
        placement_policy=sdk.VmPlacementPolicy(hosts=[sdk.Host(name="far")]))))
    assert there.status_code == 201 and sdk_read(there).cluster.id == "c2"


class _AddVmUnchecked(AddVm):
    """AddVm whose checks another request already passed (it lost the race)."""

    def validate(self, tx: Any, ctx: Any) -> None:
        self.cluster = Ref(id=DEFAULT_CLUSTER_ID)


def test_database_keeps_vm_names_unique(api: Api) -> None:
    run(AddVm(name="raced"), context(api.db))
    with pytest.raises(CommandError) as err:
        run(_AddVmUnchecked(name="raced"), context(api.db))
    assert (err.value.key, err.value.status) == ("ACTION_TYPE_FAILED_NAME_ALREADY_USED", 409)


def test_remove_vm(api: Api) -> None:
    [host_id] = add_hosts(api.db, "h1")
    [running] = seed(api.db, 1, prefix="run", status="up", host_id=host_id)
    [down] = seed(api.db, 1, prefix="dn", disks_per_vm=2)
    refused = api.delete(f"/vms/{running}")
    assert refused.status_code == 409 and "ACTION_TYPE_FAILED_VM_IS_RUNNING" in refused.text
    assert "VM run00000 is up; stop it first." in refused.text
    disk_ids = [a.disk.id for a in sdk_read(api.get(f"/vms/{down}/diskattachments"))]
    [kept] = seed(api.db, 1, prefix="kp", disks_per_vm=1)
    kept_disks = [a.disk.id for a in sdk_read(api.get(f"/vms/{kept}/diskattachments"))]
    assert api.delete(f"/vms/{kept}", detach_only="true").status_code == 200
    for disk_id in kept_disks:  # detach_only: the LUN disks stay, as floating disks
        assert sdk_read(api.get(f"/disks/{disk_id}")).lun_storage is not None
    removed = api.delete(f"/vms/{down}", detach_only="false")
    assert removed.status_code == 200 and b"<status>complete</status>" in removed.content
    assert api.get(f"/vms/{down}").status_code == 404
    for disk_id in disk_ids:  # as oVirt: the VM's disks go with it
        assert api.get(f"/disks/{disk_id}").status_code == 404
    with api.db.read() as tx:
        for table in (DiskVmElement, VmDevice, VmDynamic, VmPlacementHost):
            assert tx.scalar(select(func.count()).select_from(table)
                             .where(table.vm_id == down)) == 0
        codes = [e.code for e in tx.scalars(select(Event).where(Event.vm_id == down)
                                            .order_by(Event.id))]
    assert codes == [2018, 2018, 113]
    assert api.delete(f"/vms/{down}").status_code == 404
    assert sdk_read(api.get(f"/vms/{running}")).name == "run00000"


def test_readonly_user_cannot_add_or_remove(api: Api) -> None:
    api.services.auth.add_user("viewer@internal", "password", "readonly")
    [vm_id] = seed(api.db, 1, disks_per_vm=0)
    token = api.client.post("/ovirt-engine/sso/oauth/token", data={
        "grant_type": "password", "username": "viewer@internal",
        "password": "password"}).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert api.client.get(f"{API}/vms", headers=headers).status_code == 200
    added = api.client.post(f"{API}/vms", content=Writer.write(sdk.Vm(name="x")),
                            headers=headers)
    assert added.status_code == 403
    assert api.client.delete(f"{API}/vms/{vm_id}", headers=headers).status_code == 403
