"""CD-ROM on block storage, for real: ISOs on an LVM storage domain on a SAN LUN, loaded,
changed and ejected in a running guest that mounts them — and the agent killed at every step
of every operation, then restarted, with the drive, the metadata and the prepared volumes
checked to agree."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
from engine_helpers import guest_cd_sha, make_iso

from virtyard.host.client import HostCallError, HostClient, HostUnreachableError
from virtyard.host.virt.metadata import read_metadata
from virtyard.lab import qga
from virtyard.lab.guest_image import DEFAULT_CMDLINE
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab, loop_devices_under

pytestmark = pytest.mark.lab

MiB = 1 << 20
POOL = "5f1b2c9e-0000-4000-8000-000000000001"
CD = {"iface": "scsi", "index": 2}
CD_NAME = "sdc"
STEPS = ["marked", "prepared", "ejected", "updated", "applied", "torn-down"]


@dataclass
class Iso:
    pdiv: dict[str, str]
    text: str

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass
class IsoDomain:
    domain_id: str
    a: Iso
    b: Iso
    data: dict[str, str]  # a DATA volume (not an ISO)


def upload(client: HostClient, pdiv: dict[str, str], data: bytes, vtype: str = "ISO") -> None:
    client.call("Volume.create", {**pdiv, "size": len(data), "type": vtype})
    client.call("Volume.write", {**pdiv, "offset": 0, "data": base64.b64encode(data).decode()})
    client.call("Volume.verify", {**pdiv, "size": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest()})


def new_pdiv(domain_id: str) -> dict[str, str]:
    return {"poolID": POOL, "domainID": domain_id, "imageID": str(uuid.uuid4()),
            "volumeID": str(uuid.uuid4())}


@pytest.fixture
def iso_domain(lab: Lab, host_client: HostClient, make_target: Callable[..., TargetInfo],
               connect_target: Callable[..., Any], tmp_path: Path) -> Iterator[IsoDomain]:
    """A block storage domain on a fresh LUN with two small ISOs and one DATA volume,
    connected on both hosts; removed after the test (which fails if a volume is still held)."""
    target = make_target([64 * MiB])
    connect_target(target, host=0)
    connect_target(target, host=1)
    domain_id = str(uuid.uuid4())
    host_client.call("StorageDomain.create", {"domainID": domain_id, "guid": target.wwid(1)})
    isos = []
    for name in ("alpha", "bravo"):
        text = f"{name} {uuid.uuid4().hex}\n"
        pdiv = new_pdiv(domain_id)
        upload(host_client, pdiv, make_iso(tmp_path, text))
        isos.append(Iso(pdiv, text))
    data = new_pdiv(domain_id)
    upload(host_client, data, b"\x5a" * (1 * MiB), vtype="DATA")
    yield IsoDomain(domain_id, isos[0], isos[1], data)
    with lab.agent_client(0) as client:
        assert client.call("Image.listPrepared", {"domainID": domain_id}) == []
        client.call("StorageDomain.remove", {"domainID": domain_id, "force": True})


@pytest.fixture
def cd_vm(lab: Lab) -> Iterator[Callable[..., str]]:
    """Factory: a running tiny guest on host 1 with an empty (or loaded) SCSI CD-ROM; its id."""
    made: list[str] = []

    def make(pdiv: dict[str, str] | None = None) -> str:
        vm_id = str(uuid.uuid4())
        made.append(vm_id)
        image = lab.guest_image
        cd: dict[str, Any] = {"type": "disk", "device": "cdrom", **CD}
        if pdiv is not None:
            cd["PDIV"] = pdiv
        with lab.agent_client(0) as client:
            client.call("VM.create", {"vmParams": {
                "vmId": vm_id, "vmName": f"cd-{vm_id[:8]}", "memSize": 256,
                "kernel": str(image.kernel), "initrd": str(image.initrd),
                "kernelArgs": DEFAULT_CMDLINE, "devices": [cd],
                "consoleLog": str(lab.console_dir / f"{vm_id}.log")}})
        qga.wait_ready(domain(lab, vm_id))
        return vm_id

    yield make
    with lab.agent_client(0) as client:
        for vm_id in made:
            with contextlib.suppress(HostCallError):
                client.call("VM.destroy", {"vmID": vm_id})


def domain(lab: Lab, vm_id: str) -> libvirt.virDomain:
    return libvirt.open(lab.hosts[0].uri).lookupByUUIDString(vm_id)


def guest_reads(lab: Lab, vm_id: str) -> str | None:
    """The sha256 of hello.txt on the guest's CD, or None when the drive has no medium."""
    return guest_cd_sha(domain(lab, vm_id))


def change(client: HostClient, vm_id: str, pdiv: dict[str, str] | None) -> dict[str, Any]:
    result: dict[str, Any] = client.call("VM.changeCD", {"vmID": vm_id, "driveSpec": {
        "drive_spec": pdiv or {}, **CD}})
    return result


def holders(client: HostClient, domain_id: str) -> dict[str, list[str]]:
    return {p["volumeID"]: sorted(p["users"])
            for p in client.call("Image.listPrepared", {"domainID": domain_id})}


def cd_metadata(lab: Lab, vm_id: str) -> Any:
    return read_metadata(domain(lab, vm_id).XMLDesc(0)).device(CD_NAME)


def test_load_change_eject_in_a_real_guest(lab: Lab, host_client: HostClient,
                                           iso_domain: IsoDomain,
                                           cd_vm: Callable[..., str]) -> None:
    vm_id = cd_vm()
    user = f"{vm_id}:{CD_NAME}"
    assert guest_reads(lab, vm_id) is None

    loaded = change(host_client, vm_id, iso_domain.a.pdiv)
    cd = next(d for d in loaded["devices"] if d["device"] == "cdrom")
    assert cd["PDIV"]["volumeID"] == iso_domain.a.pdiv["volumeID"]
    assert guest_reads(lab, vm_id) == iso_domain.a.sha
    assert holders(host_client, iso_domain.domain_id) == {
        iso_domain.a.pdiv["volumeID"]: [user]}

    change(host_client, vm_id, iso_domain.b.pdiv)
    assert guest_reads(lab, vm_id) == iso_domain.b.sha
    assert holders(host_client, iso_domain.domain_id) == {
        iso_domain.b.pdiv["volumeID"]: [user]}

    change(host_client, vm_id, None)
    assert guest_reads(lab, vm_id) is None
    assert holders(host_client, iso_domain.domain_id) == {}
    assert cd_metadata(lab, vm_id).pdiv is None


def test_create_with_a_loaded_cd_and_destroy_releases_it(lab: Lab, host_client: HostClient,
                                                         iso_domain: IsoDomain,
                                                         cd_vm: Callable[..., str]) -> None:
    vm_id = cd_vm(iso_domain.a.pdiv)
    assert guest_reads(lab, vm_id) == iso_domain.a.sha
    assert holders(host_client, iso_domain.domain_id) == {
        iso_domain.a.pdiv["volumeID"]: [f"{vm_id}:{CD_NAME}"]}
    host_client.call("VM.destroy", {"vmID": vm_id})
    assert holders(host_client, iso_domain.domain_id) == {}


def test_a_vm_that_dies_by_itself_releases_its_cd_at_once(
        lab: Lab, host_client: HostClient, iso_domain: IsoDomain,
        cd_vm: Callable[..., str]) -> None:
    host_client.call("Host.getEvents", {"since": 0, "timeout": 0})  # the agent follows VMs
    vm_id = cd_vm(iso_domain.a.pdiv)
    assert holders(host_client, iso_domain.domain_id) == {
        iso_domain.a.pdiv["volumeID"]: [f"{vm_id}:{CD_NAME}"]}
    domain(lab, vm_id).destroy()  # QEMU gone behind the agent's back (a crash, say)
    deadline = time.monotonic() + 10
    while holders(host_client, iso_domain.domain_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert holders(host_client, iso_domain.domain_id) == {}  # not at the next agent start


def test_two_vms_share_one_iso(lab: Lab, host_client: HostClient, iso_domain: IsoDomain,
                               cd_vm: Callable[..., str]) -> None:
    first, second = cd_vm(), cd_vm()
    change(host_client, first, iso_domain.a.pdiv)
    change(host_client, second, iso_domain.a.pdiv)
    assert holders(host_client, iso_domain.domain_id) == {iso_domain.a.pdiv["volumeID"]: sorted(
        [f"{first}:{CD_NAME}", f"{second}:{CD_NAME}"])}
    change(host_client, first, None)
    assert holders(host_client, iso_domain.domain_id) == {
        iso_domain.a.pdiv["volumeID"]: [f"{second}:{CD_NAME}"]}
    assert guest_reads(lab, second) == iso_domain.a.sha
    change(host_client, second, None)


def test_bad_input_changes_nothing(lab: Lab, host_client: HostClient, iso_domain: IsoDomain,
                                   cd_vm: Callable[..., str]) -> None:
    vm_id = cd_vm()
    change(host_client, vm_id, iso_domain.a.pdiv)
    before = holders(host_client, iso_domain.domain_id)

    def refused(pdiv: dict[str, str], vm: str = vm_id) -> int:
        with pytest.raises(HostCallError) as info:
            change(host_client, vm, pdiv)
        return info.value.code

    unknown_volume = {**iso_domain.a.pdiv, "volumeID": str(uuid.uuid4())}
    assert refused(unknown_volume) == 201
    other_domain = {**iso_domain.a.pdiv, "domainID": str(uuid.uuid4())}
    assert refused(other_domain) == 358
    assert refused(iso_domain.data) == 202  # not an ISO
    assert refused(iso_domain.b.pdiv, vm=str(uuid.uuid4())) == 1  # no such VM
    with pytest.raises(HostCallError) as info:
        host_client.call("VM.changeCD", {"vmID": vm_id, "driveSpec": {
            "drive_spec": iso_domain.b.pdiv, "iface": "scsi", "index": 5}})
    assert info.value.code == -32602

    assert guest_reads(lab, vm_id) == iso_domain.a.sha
    assert holders(host_client, iso_domain.domain_id) == before
    assert cd_metadata(lab, vm_id).change is None
    change(host_client, vm_id, None)


def _restart(lab: Lab, extra: str = "") -> None:
    agent = lab.agents[0]
    agent.stop()
    agent.extra_config = extra
    agent.start()


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("operation", ["load", "change", "eject"])
def test_agent_killed_at_every_step_recovers(lab: Lab, iso_domain: IsoDomain,
                                             cd_vm: Callable[..., str], operation: str,
                                             step: str) -> None:
    vm_id = cd_vm()
    user = f"{vm_id}:{CD_NAME}"
    a, b = iso_domain.a, iso_domain.b
    with lab.agent_client(0) as client:
        if operation in ("change", "eject"):
            change(client, vm_id, a.pdiv)
    old_sha = a.sha if operation in ("change", "eject") else None
    new = {"load": a, "change": b, "eject": None}[operation]
    new_sha = new.sha if new else None

    try:
        _restart(lab, f'\n[debug]\ndie_at = "changecd:{step}"\n')
        with lab.agent_client(0) as client, pytest.raises(HostUnreachableError):
            change(client, vm_id, new.pdiv if new else None)
    finally:
        _restart(lab)  # recovery runs at start

    with lab.agent_client(0) as client:
        [stats] = client.call("VM.getStats", {"vmID": vm_id})
        assert stats["status"] == "Up"
        held = holders(client, iso_domain.domain_id)
        leftovers = client.call("Image.leftovers", {})
    reads = guest_reads(lab, vm_id)
    assert reads in (old_sha, new_sha)
    meta = cd_metadata(lab, vm_id)
    assert meta.change is None
    expected_volume = {a.sha: a, b.sha: b}.get(reads) if reads else None
    if expected_volume is None:
        assert meta.pdiv is None and held == {}
    else:
        assert meta.pdiv is not None
        assert meta.pdiv.volume_id == expected_volume.pdiv["volumeID"]
        assert held == {expected_volume.pdiv["volumeID"]: [user]}
    assert leftovers == []
    assert loop_devices_under(lab.state_dir) == []  # no loop device, no LUN attachment left
    # Past the point of no return the new medium must be in: from 'updated' on.
    if STEPS.index(step) >= STEPS.index("updated"):
        assert reads == new_sha
    if step in ("marked",):
        assert reads == old_sha
    with lab.agent_client(0) as client:
        change(client, vm_id, None)


def test_legacy_path_form_still_works(lab: Lab, host_client: HostClient,
                                      cd_vm: Callable[..., str], tmp_path: Path) -> None:
    """The old driveSpec form {path, iface, index}: a plain ISO file, nothing prepared."""
    text = f"legacy {uuid.uuid4().hex}\n"
    iso = tmp_path / "legacy.iso"
    iso.write_bytes(make_iso(tmp_path, text))
    vm_id = cd_vm()
    host_client.call("VM.changeCD", {"vmID": vm_id, "driveSpec": {"path": str(iso), **CD}})
    assert guest_reads(lab, vm_id) == hashlib.sha256(text.encode()).hexdigest()
    with pytest.raises(HostCallError) as info:
        host_client.call("VM.changeCD", {"vmID": vm_id, "driveSpec": {
            "path": str(tmp_path / "missing.iso"), **CD}})
    assert info.value.code == 13
    host_client.call("VM.changeCD", {"vmID": vm_id, "driveSpec": {"path": "", **CD}})
    assert guest_reads(lab, vm_id) is None
