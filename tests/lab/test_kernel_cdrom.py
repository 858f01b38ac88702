"""CD-ROM on the kernel path for real: ISO volumes of a block storage domain on a multipath map,
activated with ``lvchange -ay`` for a VM's CD drive and deactivated with ``-an`` when no drive
holds them — in the lab's storage host VM, whose libvirtd runs tiny nested QEMU guests (they
need not boot: QEMU opening the LV is what the CD path is about).

Through the agent's verbs over mutual TLS; checked independently inside the VM: ``lvs`` (active,
open), the live domain XML (``virsh dumpxml``). The agent is killed (``[debug] die_at``) at the
steps of ``VM.changeCD`` that touch activation, started again (its recovery reconciles drives
and holds), and then the drive holds what the recovery says and exactly the LVs a drive holds
are active: none left activated that nothing holds (oVirt's BZ1868643 class of leak).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from engine_helpers import make_iso

from virtyard.host.client import HostCallError, HostClient, HostUnreachableError
from virtyard.host.virt.metadata import read_metadata
from virtyard.lab.lab import Lab
from virtyard.lab.storage_host import PORTAL_PORT, PORTALS, StorageHostVM

pytestmark = pytest.mark.lab

MiB = 1 << 20
SLOW = 180.0
POOL = "5f1b2c9e-0000-4000-8000-00000000c0de"
CD = {"iface": "scsi", "index": 2}
CD_NAME = "sdc"
VIRSH = ["virsh", "-c", "qemu:///system"]


@dataclass(frozen=True)
class Iso:
    pdiv: dict[str, str]

    @property
    def lv(self) -> str:
        """``"<vg> <lv>"`` as :func:`active_lvs` lists it."""
        return f"{self.pdiv['domainID']} {self.pdiv['volumeID']}"

    @property
    def path(self) -> str:
        return f"/dev/{self.pdiv['domainID']}/{self.pdiv['volumeID']}"


@dataclass(frozen=True)
class IsoDomain:
    domain_id: str
    a: Iso
    b: Iso


@pytest.fixture(scope="module")
def storage_host(lab: Lab) -> StorageHostVM:
    """The lab's storage host VM (booted if it is not running). Not stopped here: the kernel-path
    module that follows reuses it and stops it; the lab stops it at the end anyway."""
    lab.start_storage_host()
    return lab.storage_host


@pytest.fixture(scope="module")
def client(storage_host: StorageHostVM) -> Iterator[HostClient]:
    with storage_host.client(timeout=SLOW) as c:
        yield c


def sh(vm: StorageHostVM, script: str, *, check: bool = True) -> str:
    return str(vm.exec(["sh", "-c", script], check=check, timeout=SLOW)["stdout"])


def active_lvs(vm: StorageHostVM) -> list[str]:
    out = sh(vm, "lvs --noheadings -o vg_name,lv_name,lv_active 2>/dev/null", check=False)
    return sorted(" ".join(line.split()[:2]) for line in out.splitlines()
                  if line.split()[2:] == ["active"])


def lv_open(vm: StorageHostVM, iso: Iso) -> bool:
    """Whether some process (QEMU) has the LV's device open (``lv_attr`` column 6)."""
    attr = sh(vm, f"lvs --noheadings -o lv_attr {iso.pdiv['domainID']}/{iso.pdiv['volumeID']}")
    return attr.strip()[5] == "o"


@pytest.fixture(scope="module")
def iso_domain(lab: Lab, storage_host: StorageHostVM, client: HostClient,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[IsoDomain]:
    """A block storage domain on a LUN reached through the kernel initiator, with two ISO
    volumes; afterwards no volume may be held, and domain, session and target go away."""
    name = f"t-kcd-{uuid.uuid4().hex[:6]}"
    target = lab.storage.create_target(name, [64 * MiB])
    params = [{"id": str(uuid.uuid4()), "connection": PORTALS[0], "port": PORTAL_PORT,
               "iqn": target.iqn}]
    domain_id = str(uuid.uuid4())
    try:
        result = client.call("StoragePool.connectStorageServer",
                             {"domainType": 3, "connectionParams": params})
        assert result[0]["status"] == 0
        client.call("StorageDomain.create",
                    {"domainID": domain_id, "guid": target.wwid(1), "name": "cd-isos"})
        isos = []
        for name in ("alpha", "bravo"):
            data = make_iso(tmp_path_factory.mktemp(name), f"{name} {uuid.uuid4().hex}\n")
            pdiv = {"poolID": POOL, "domainID": domain_id, "imageID": str(uuid.uuid4()),
                    "volumeID": str(uuid.uuid4())}
            client.call("Volume.create", {**pdiv, "size": len(data), "type": "ISO"})
            client.call("Volume.write", {**pdiv, "offset": 0,
                                         "data": base64.b64encode(data).decode()})
            verified = client.call("Volume.verify", {**pdiv, "size": len(data),
                                                     "sha256": hashlib.sha256(data).hexdigest()})
            assert verified["state"] == "READY"
            isos.append(Iso(pdiv))
        yield IsoDomain(domain_id, isos[0], isos[1])
        with storage_host.client(timeout=SLOW) as fresh:
            assert fresh.call("Image.listPrepared", {"domainID": domain_id}) == []
    finally:
        with storage_host.client(timeout=SLOW) as fresh:
            with contextlib.suppress(HostCallError):
                fresh.call("StorageDomain.remove", {"domainID": domain_id, "force": True})
            fresh.call("StoragePool.disconnectStorageServer",
                       {"domainType": 3, "connectionParams": params})
        lab.storage.delete_target(name)
    assert active_lvs(storage_host) == []


@pytest.fixture
def cd_vm(storage_host: StorageHostVM) -> Iterator[Callable[..., str]]:
    """Factory: a nested QEMU guest in the storage host VM with an empty (or loaded) SCSI
    CD-ROM; its id. It never boots anything (no kernel, 32 MiB): the drive is what counts."""
    made: list[str] = []

    def make(iso: Iso | None = None) -> str:
        vm_id = str(uuid.uuid4())
        made.append(vm_id)
        cd: dict[str, Any] = {"type": "disk", "device": "cdrom", **CD}
        if iso is not None:
            cd["PDIV"] = iso.pdiv
        with storage_host.client(timeout=SLOW) as c:
            c.call("VM.create", {"vmParams": {"vmId": vm_id, "vmName": f"cd-{vm_id[:8]}",
                                              "memSize": 32, "devices": [cd]}})
        return vm_id

    yield make
    with storage_host.client(timeout=SLOW) as c:
        for vm_id in made:
            with contextlib.suppress(HostCallError):
                c.call("VM.destroy", {"vmID": vm_id})


def change(client: HostClient, vm_id: str, iso: Iso | None) -> dict[str, Any]:
    result: dict[str, Any] = client.call("VM.changeCD", {"vmID": vm_id, "driveSpec": {
        "drive_spec": iso.pdiv if iso else {}, **CD}})
    return result


def live_xml(vm: StorageHostVM, vm_id: str) -> str:
    return str(vm.exec([*VIRSH, "dumpxml", vm_id], timeout=SLOW)["stdout"])


def live_source(vm: StorageHostVM, vm_id: str) -> str | None:
    """The block device libvirt's live XML gives the CD drive, or None for an empty tray."""
    root = ET.fromstring(live_xml(vm, vm_id))
    for disk in root.iter("disk"):
        target = disk.find("target")
        if target is not None and target.get("dev") == CD_NAME:
            source = disk.find("source")
            return None if source is None else source.get("dev")
    raise AssertionError(f"VM {vm_id} has no drive {CD_NAME}")


def holders(client: HostClient, domain_id: str) -> dict[str, list[str]]:
    return {p["volumeID"]: sorted(p["users"])
            for p in client.call("Image.listPrepared", {"domainID": domain_id})}


def assert_drive(vm: StorageHostVM, client: HostClient, isos: IsoDomain, vm_id: str, *,
                 iso: Iso | None, before: list[str]) -> None:
    """The drive holds ``iso`` (None: empty), that volume alone is held and active (and open:
    QEMU reads it), and nothing else of the domain is active."""
    assert live_source(vm, vm_id) == (iso.path if iso else None)
    assert holders(client, isos.domain_id) == (
        {iso.pdiv["volumeID"]: [f"{vm_id}:{CD_NAME}"]} if iso else {})
    assert active_lvs(vm) == sorted([*before, *([iso.lv] if iso else [])])
    if iso is not None:
        assert lv_open(vm, iso)
        assert sh(vm, f"readlink -f {iso.path}").strip().startswith("/dev/dm-")


def test_load_change_eject_activate_and_deactivate(
        storage_host: StorageHostVM, client: HostClient, iso_domain: IsoDomain,
        cd_vm: Callable[..., str]) -> None:
    before = active_lvs(storage_host)
    a, b = iso_domain.a, iso_domain.b
    vm_id = cd_vm()
    assert_drive(storage_host, client, iso_domain, vm_id, iso=None, before=before)

    loaded = change(client, vm_id, a)
    [cd] = [d for d in loaded["devices"] if d["device"] == "cdrom"]
    assert cd["PDIV"]["volumeID"] == a.pdiv["volumeID"]
    assert_drive(storage_host, client, iso_domain, vm_id, iso=a, before=before)

    change(client, vm_id, b)  # a deactivated, b activated
    assert_drive(storage_host, client, iso_domain, vm_id, iso=b, before=before)

    change(client, vm_id, None)
    assert_drive(storage_host, client, iso_domain, vm_id, iso=None, before=before)
    assert read_metadata(live_xml(storage_host, vm_id)).device(CD_NAME).pdiv is None


def test_destroying_a_vm_deactivates_its_cd(storage_host: StorageHostVM, client: HostClient,
                                            iso_domain: IsoDomain,
                                            cd_vm: Callable[..., str]) -> None:
    before = active_lvs(storage_host)
    vm_id = cd_vm(iso_domain.a)  # created with the medium in: activated by VM.create
    assert_drive(storage_host, client, iso_domain, vm_id, iso=iso_domain.a, before=before)
    client.call("VM.destroy", {"vmID": vm_id})
    assert holders(client, iso_domain.domain_id) == {}
    assert active_lvs(storage_host) == before


# (operation, step, what the drive holds after the recovery): the steps of change_cd where a
# crash leaves an activation to settle.
CRASHES = [
    # The tray was empty and the new LV is active: recovery cannot tell this from a load whose
    # medium was about to go in, and finishes the load (the volume stays held and active).
    ("load", "prepared", "new"),
    # The old medium is still in, the new LV active: recovery deactivates the new LV.
    ("change", "prepared", "old"),
    # Tray open, new LV active: recovery finishes the load and deactivates the old LV.
    ("change", "ejected", "new"),
    # The drive is empty (the new state), its record still holds the old LV: deactivated.
    ("eject", "updated", "new"),
]


@pytest.mark.parametrize("case", CRASHES, ids=[f"{o}-{s}" for o, s, _ in CRASHES])
def test_agent_killed_in_a_cd_change_leaves_no_activation(
        storage_host: StorageHostVM, iso_domain: IsoDomain, cd_vm: Callable[..., str],
        case: tuple[str, str, str]) -> None:
    operation, step, outcome = case
    a, b = iso_domain.a, iso_domain.b
    old = a if operation in ("change", "eject") else None
    new = {"load": a, "change": b, "eject": None}[operation]
    with storage_host.client(timeout=SLOW) as c:
        before = active_lvs(storage_host)
        vm_id = cd_vm(old)
        assert_drive(storage_host, c, iso_domain, vm_id, iso=old, before=before)

    log_offset = storage_host.agent_log.stat().st_size
    try:
        storage_host.restart_agent(once=f'\n[debug]\ndie_at = "changecd:{step}"\n',
                                   drop_caches=False)
        with storage_host.client(timeout=SLOW) as c, pytest.raises(HostUnreachableError):
            change(c, vm_id, new)
    finally:
        storage_host.agent_config_once.unlink(missing_ok=True)
        storage_host.wait_agent()  # init started it again, normally: its recovery ran
    with storage_host.agent_log.open() as f:
        f.seek(log_offset)
        logged = f.read()
    assert f"fault injection: dying at changecd:{step}" in logged

    holds = new if outcome == "new" else old
    with storage_host.client(timeout=SLOW) as c:
        [stats] = c.call("VM.getStats", {"vmID": vm_id})
        assert stats["status"] in ("Up", "Paused")
        assert_drive(storage_host, c, iso_domain, vm_id, iso=holds, before=before)
        meta = read_metadata(live_xml(storage_host, vm_id)).device(CD_NAME)
        assert meta.change is None
        assert (meta.pdiv.volume_id if meta.pdiv else None) == (
            holds.pdiv["volumeID"] if holds else None)
        assert c.call("Image.leftovers", {}) == []
        change(c, vm_id, None)
        assert active_lvs(storage_host) == before  # equal before and after
