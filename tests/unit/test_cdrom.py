"""Every branch of VM.changeCD and its crash recovery, on small fakes of libvirt and of the
volume service (the real-lab tests kill the agent at every step; these cover the failures that
cannot be provoked there: libvirt refusing, teardown failing, metadata writes failing).

The fake domain keeps a real domain XML and applies ``updateDeviceFlags`` and ``setMetadata`` to
it as libvirt does (the disk with the same target is replaced; the metadata element replaced),
so the code under test reads back what it wrote through the same parser it uses in production.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import libvirt
import pytest
from lxml import etree

from virtyard.host.rpc.errors import ChangeDiskError, HostError, ImageFileNotFoundError
from virtyard.host.storage.pdiv import Pdiv
from virtyard.host.storage.volumes import PreparedVolume
from virtyard.host.virt import cdrom
from virtyard.host.virt.disk_sources import IscsiSource, StorageSlice
from virtyard.host.virt.domain_xml import DiskDevice, Domain, DomainDisk
from virtyard.host.virt.metadata import (
    CdChange,
    DeviceMetadata,
    VmMetadata,
    replace_metadata,
)
from virtyard.host.virt.vms import VmManager
from virtyard.host.virt.volume_sources import VolumeSources

VM = "0c0ffee0-0000-4000-8000-000000000001"
POOL = "11111111-0000-4000-8000-000000000000"
DOMAIN = "22222222-0000-4000-8000-000000000000"
A = Pdiv(POOL, DOMAIN, "33333333-0000-4000-8000-00000000000a",
         "44444444-0000-4000-8000-00000000000a")
B = Pdiv(POOL, DOMAIN, "33333333-0000-4000-8000-00000000000b",
         "44444444-0000-4000-8000-00000000000b")
OFFSETS = {A.volume_id: 4 << 20, B.volume_id: 8 << 20}
USER = f"{VM}:sdc"
INITIATOR = "iqn.2026-11.test:h"  # the host's: QEMU logs in with it
CD = DiskDevice(device="cdrom", iface="scsi", index=2,
                address={"type": "drive", "controller": "0", "bus": "0", "target": "0",
                         "unit": "2"})


def source(pdiv: Pdiv) -> IscsiSource:
    return IscsiSource("127.0.0.1", 3260, "iqn.2026-11.org.virtyard.lab:sd", 1,
                       slice=StorageSlice(OFFSETS[pdiv.volume_id], 1 << 20),
                       initiator=INITIATOR)


class FakeDomain:
    """A running libvirt domain: its live XML, changed the way libvirt changes it."""

    def __init__(self, xml: str) -> None:
        self.xml = xml
        self.fail_update: list[str] = []  # "eject", "insert" (any) or a slice offset refused
        self.fail_metadata_writes: set[int] = set()  # the nth setMetadata call fails
        self.metadata_writes = 0
        self.updates: list[str] = []

    def UUIDString(self) -> str:  # noqa: N802 (libvirt's names)
        return VM

    def name(self) -> str:
        return "cdvm"

    def ID(self) -> int:  # noqa: N802
        return 7

    def isActive(self) -> bool:  # noqa: N802
        return True

    def state(self) -> list[int]:
        return [libvirt.VIR_DOMAIN_RUNNING, 1]

    def XMLDesc(self, flags: int = 0) -> str:  # noqa: N802
        return self.xml

    def updateDeviceFlags(self, xml: str, flags: int) -> None:  # noqa: N802
        disk = etree.fromstring(xml)
        kind = "insert" if disk.find("source") is not None else "eject"
        piece = disk.find("source/slices/slice")
        offset = "" if piece is None else piece.get("offset", "")
        if kind in self.fail_update or offset in self.fail_update:
            raise libvirt.libvirtError(f"refused to {kind} {offset}")
        root = etree.fromstring(self.xml)
        dev = disk.find("target").get("dev")
        old = root.find(f"devices/disk/target[@dev='{dev}']/..")
        old.getparent().replace(old, disk)
        self.xml = etree.tostring(root, encoding="unicode")
        self.updates.append(kind)

    def metadata(self, kind: int, uri: str) -> str:
        return Domain.from_xml(self.xml).metadata.to_libvirt_xml()

    def setMetadata(self, kind: int, text: str, key: str, uri: str,  # noqa: N802
                    flags: int) -> None:
        self.metadata_writes += 1
        if self.metadata_writes in self.fail_metadata_writes:
            raise libvirt.libvirtError("metadata write refused")
        self.xml = replace_metadata(self.xml, VmMetadata.from_xml(text))

    # What the test reads back.
    def cd(self) -> DomainDisk:
        return Domain.from_xml(self.xml).disk("sdc")

    def meta(self) -> DeviceMetadata:
        return Domain.from_xml(self.xml).metadata.device("sdc")


@dataclass
class FakeVolumes:
    """Prepared volumes held per user, with failures on demand."""

    entries: dict[str, PreparedVolume] = field(default_factory=dict)
    fail_prepare: bool = False
    fail_teardown: bool = False

    def prepare(self, pdiv: Any, user: str, *, iso: bool = False) -> PreparedVolume:
        if self.fail_prepare:
            raise ImageFileNotFoundError("no such volume")
        key = Pdiv.of(pdiv)
        entry = self.entries.get(key.key) or PreparedVolume(
            pdiv=key, method="iscsi-slice", disk_type="network", guid="3600", size=1 << 20,
            host="127.0.0.1", port=3260, iqn="iqn.2026-11.org.virtyard.lab:sd", lun=1,
            offset=OFFSETS[key.volume_id], iso=True)
        if user not in entry.users:
            entry = dataclasses.replace(entry, users=(*entry.users, user))
        self.entries[key.key] = entry
        return entry

    def teardown(self, pdiv: Any, user: str) -> PreparedVolume | None:
        if self.fail_teardown:
            raise HostError("cannot deactivate")
        key = Pdiv.of(pdiv).key
        entry = self.entries.get(key)
        if entry is None or user not in entry.users:
            return entry
        left = tuple(u for u in entry.users if u != user)
        if left:
            self.entries[key] = dataclasses.replace(entry, users=left)
            return self.entries[key]
        del self.entries[key]
        return None

    def prepared(self) -> list[PreparedVolume]:
        return list(self.entries.values())

    def holders(self) -> dict[str, tuple[str, ...]]:
        return {e.pdiv.volume_id: e.users for e in self.entries.values()}


class FakeConn:
    def __init__(self, dom: FakeDomain) -> None:
        self.dom = dom

    def lookup(self, vm_id: str) -> FakeDomain | None:
        return self.dom if vm_id == VM else None

    def call(self, fn: Any) -> Any:
        return fn(SimpleNamespace(listAllDomains=lambda flags: [self.dom]))


def make_agent(loaded: Pdiv | None = None, *,
               metadata: DeviceMetadata | None = None) -> tuple[Any, FakeDomain, FakeVolumes]:
    volumes = FakeVolumes()
    disk = dataclasses.replace(CD, pdiv=loaded)
    src = source(loaded) if loaded else None
    if loaded is not None:
        volumes.prepare(loaded, USER)
    domain = Domain(name="cdvm", uuid=VM, memory_mib=64, disks=[DomainDisk(disk, src)])
    if metadata is not None:
        domain.metadata = domain.metadata.with_device("sdc", metadata)
    dom = FakeDomain(domain.to_xml())
    vms = VmManager(FakeConn(dom), drives=None, virt_type="qemu")  # type: ignore[arg-type]
    sources = VolumeSources(volumes, connections=None, secrets=None,  # type: ignore[arg-type]
                            initiator_name=INITIATOR)
    services = cdrom.CdServices(vms, volumes, sources)  # type: ignore[arg-type]
    return services, dom, volumes


def holds(pdiv: Pdiv) -> dict[str, tuple[str, ...]]:
    return {pdiv.volume_id: (USER,)}


# -- the happy paths ----------------------------------------------------------------------------

def test_load_into_an_empty_tray() -> None:
    agent, dom, volumes = make_agent()
    cdrom.change_cd(agent, VM, A, "scsi", 2)
    assert dom.cd().source == source(A)
    assert dom.cd().device.address == CD.address  # the live address is kept
    assert dom.meta().pdiv == A and dom.meta().change is None
    assert volumes.holders() == holds(A)
    assert dom.updates == ["insert"]


def test_change_ejects_then_inserts_and_releases_the_old() -> None:
    agent, dom, volumes = make_agent(A)
    generation = Domain.from_xml(dom.xml).metadata.generation
    cdrom.change_cd(agent, VM, B, "scsi", 2)
    assert dom.updates == ["eject", "insert"]
    assert dom.cd().source == source(B)
    assert dom.meta().pdiv == B
    assert volumes.holders() == holds(B)
    assert Domain.from_xml(dom.xml).metadata.generation > generation


def test_eject() -> None:
    agent, dom, volumes = make_agent(A)
    cdrom.change_cd(agent, VM, None, "scsi", 2)
    assert dom.cd().source is None
    assert dom.meta().pdiv is None
    assert volumes.holders() == {}


def test_a_volume_shared_with_another_vm_stays_prepared() -> None:
    agent, _dom, volumes = make_agent(A)
    volumes.prepare(A, "other-vm:sdc")
    cdrom.change_cd(agent, VM, None, "scsi", 2)
    assert volumes.holders() == {A.volume_id: ("other-vm:sdc",)}


# -- failures without a crash: the old CD stays, nothing new stays prepared ---------------------

def test_prepare_fails() -> None:
    agent, dom, volumes = make_agent(A)
    volumes.fail_prepare = True
    with pytest.raises(ImageFileNotFoundError):
        cdrom.change_cd(agent, VM, B, "scsi", 2)
    assert dom.cd().source == source(A) and dom.updates == []
    assert dom.meta().pdiv == A and dom.meta().change is None
    assert volumes.holders() == holds(A)


def test_libvirt_refuses_the_insert() -> None:
    agent, dom, volumes = make_agent(A)
    dom.fail_update = [str(OFFSETS[B.volume_id])]
    with pytest.raises(ChangeDiskError):
        cdrom.change_cd(agent, VM, B, "scsi", 2)
    # The tray was opened; the old medium went back in.
    assert dom.cd().source == source(A)
    assert dom.meta().pdiv == A and dom.meta().change is None
    assert volumes.holders() == holds(A)


def test_libvirt_refuses_the_eject() -> None:
    agent, dom, volumes = make_agent(A)
    dom.fail_update = ["eject"]
    with pytest.raises(ChangeDiskError):
        cdrom.change_cd(agent, VM, B, "scsi", 2)
    assert dom.cd().source == source(A)
    assert dom.meta().change is None
    assert volumes.holders() == holds(A)


def test_libvirt_refuses_and_the_new_volume_cannot_be_released() -> None:
    agent, dom, volumes = make_agent()
    dom.fail_update = ["insert"]
    volumes.fail_teardown = True
    with pytest.raises(ChangeDiskError):
        cdrom.change_cd(agent, VM, A, "scsi", 2)
    assert dom.cd().source is None and dom.meta().change is None
    # The hold it could not drop is settled by the next reconcile.
    volumes.fail_teardown = False
    cdrom.reconcile(agent)
    assert volumes.holders() == {}


def test_libvirt_refuses_and_the_change_cannot_be_discarded() -> None:
    agent, dom, volumes = make_agent(A)
    dom.fail_update = [str(OFFSETS[B.volume_id])]
    dom.fail_metadata_writes = {2}  # 1: mark, 2: discard
    with pytest.raises(ChangeDiskError):
        cdrom.change_cd(agent, VM, B, "scsi", 2)
    assert dom.meta().change == CdChange("loading", B)  # left for recovery
    cdrom.reconcile(agent)
    assert dom.meta().change is None and dom.meta().pdiv == A
    assert volumes.holders() == holds(A)


def test_releasing_the_old_volume_fails_but_the_change_stands() -> None:
    agent, dom, volumes = make_agent(A)
    volumes.fail_teardown = True
    cdrom.change_cd(agent, VM, B, "scsi", 2)
    assert dom.cd().source == source(B) and dom.meta().pdiv == B
    volumes.fail_teardown = False
    cdrom.reconcile(agent)
    assert volumes.holders() == holds(B)


def test_applying_the_metadata_fails_but_the_change_stands() -> None:
    agent, dom, volumes = make_agent(A)
    dom.fail_metadata_writes = {2}  # 1: mark, 2: apply
    cdrom.change_cd(agent, VM, B, "scsi", 2)
    assert dom.cd().source == source(B)
    assert dom.meta().change == CdChange("loading", B)
    cdrom.reconcile(agent)
    assert dom.meta().pdiv == B and dom.meta().change is None
    assert volumes.holders() == holds(B)


def test_not_a_cdrom_and_no_such_drive() -> None:
    agent, _, _ = make_agent(A)
    with pytest.raises(HostError) as info:
        cdrom.change_cd(agent, VM, B, "scsi", 5)
    assert info.value.code == -32602
    with pytest.raises(HostError) as info:
        cdrom.change_cd(agent, str(uuid.uuid4()), B, "scsi", 2)
    assert info.value.code == 1


# -- recovery: what the drive really holds decides ----------------------------------------------

def test_recover_a_load_that_did_not_happen() -> None:
    agent, dom, volumes = make_agent(A, metadata=DeviceMetadata(
        pdiv=A, change=CdChange("loading", B)))
    volumes.prepare(B, USER)  # prepared before the crash
    cdrom.reconcile(agent)
    assert dom.meta() == DeviceMetadata(pdiv=A)
    assert volumes.holders() == holds(A)


def test_recover_a_load_that_happened() -> None:
    agent, dom, volumes = make_agent(B, metadata=DeviceMetadata(
        pdiv=A, change=CdChange("loading", B)))
    volumes.prepare(A, USER)
    cdrom.reconcile(agent)
    assert dom.meta() == DeviceMetadata(pdiv=B)
    assert volumes.holders() == holds(B)


def test_recover_a_load_interrupted_with_the_tray_open_rolls_forward() -> None:
    agent, dom, volumes = make_agent(None, metadata=DeviceMetadata(
        pdiv=A, change=CdChange("loading", B)))
    volumes.prepare(A, USER)
    volumes.prepare(B, USER)
    cdrom.reconcile(agent)
    assert dom.cd().source == source(B)
    assert dom.meta() == DeviceMetadata(pdiv=B)
    assert volumes.holders() == holds(B)


def test_recover_a_load_that_crashed_before_preparing() -> None:
    agent, dom, volumes = make_agent(None, metadata=DeviceMetadata(
        change=CdChange("loading", B)))
    cdrom.reconcile(agent)
    assert dom.cd().source is None
    assert dom.meta() == DeviceMetadata()
    assert volumes.holders() == {}


def test_recover_an_eject_that_happened_and_one_that_did_not() -> None:
    agent, dom, volumes = make_agent(None, metadata=DeviceMetadata(
        pdiv=A, change=CdChange("ejecting")))
    volumes.prepare(A, USER)
    cdrom.reconcile(agent)
    assert dom.meta() == DeviceMetadata() and volumes.holders() == {}

    agent, dom, volumes = make_agent(A, metadata=DeviceMetadata(
        pdiv=A, change=CdChange("ejecting")))
    cdrom.reconcile(agent)
    assert dom.meta() == DeviceMetadata(pdiv=A) and volumes.holders() == holds(A)


def test_recover_metadata_applied_before_libvirt_changed_the_media() -> None:
    """The other order: the record says B, the drive still holds A — the drive wins."""
    agent, dom, volumes = make_agent(A, metadata=DeviceMetadata(pdiv=B))
    volumes.prepare(B, USER)
    cdrom.reconcile(agent)
    assert dom.meta() == DeviceMetadata(pdiv=A)
    assert volumes.holders() == holds(A)


def test_reconcile_takes_the_hold_a_drive_needs_and_drops_orphans() -> None:
    agent, _dom, volumes = make_agent(A)
    volumes.entries.clear()  # the agent's state lost the hold
    volumes.prepare(B, "gone-vm:sdc")  # a VM that runs nowhere here
    result = cdrom.reconcile(agent)
    assert volumes.holders() == holds(A)
    assert result["released"] == [f"{Pdiv.of(B)} by gone-vm:sdc"]


def test_libvirt_refuses_even_the_old_medium_back() -> None:
    """Nothing can be put in: the drive is empty, and record and holds say so at once."""
    agent, dom, volumes = make_agent(A)
    dom.fail_update = ["insert"]
    with pytest.raises(ChangeDiskError):
        cdrom.change_cd(agent, VM, B, "scsi", 2)
    assert dom.cd().source is None
    assert dom.meta() == DeviceMetadata()
    assert volumes.holders() == {}


def test_fault_points_exit_at_the_named_step(monkeypatch: pytest.MonkeyPatch) -> None:
    agent, _, _ = make_agent(A)
    agent = dataclasses.replace(agent, die_at="changecd:ejected")
    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cdrom.os, "_exit", fake_exit)
    with pytest.raises(SystemExit):
        cdrom.change_cd(agent, VM, B, "scsi", 2)
    assert exits == [cdrom.FAULT_EXIT]
