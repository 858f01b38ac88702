"""CD-ROM media on block storage: load, eject and change atomically, and recover after a crash.

``change_cd`` follows the design page, step by step, each step a named fault point:

1. ``marked``: our metadata records the change in flight (``loading`` + the new PDIV, or
   ``ejecting``) before anything else happens;
2. ``prepared``: the new volume is prepared for this VM's drive (a reference per VM and drive);
3. ``ejected``: when one medium replaces another, the tray is opened first (the guest sees a
   real media change, and libvirt would not see two slices of one LUN as different media);
4. ``updated``: libvirt changes the media (the live ``<address>`` repeated, as it requires);
5. ``applied``: the metadata takes the new PDIV (or the empty tray) and drops the change;
6. ``torn-down``: the old volume is released by this drive (it stays prepared while another VM
   uses it).

On any failure before 5 the old CD goes back into the drive and the new volume is released.
After a crash, :func:`reconcile` — run when the agent starts — trusts what the drive really
holds (the live XML): a load whose tray was left open is finished (the new volume is already
prepared), a load that happened is applied, anything else is discarded; then prepared volumes
and drives are made to agree: every prepared volume is held by a CD (or disk) that uses it, and
every CD's volume is prepared. That also covers a crash between the libvirt update and the
metadata update in either order.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import libvirt

from virtyard.host.rpc.errors import (
    ChangeDiskError,
    HostError,
    ImageFileNotFoundError,
    InvalidParamsError,
)
from virtyard.host.storage.pdiv import Pdiv
from virtyard.host.storage.volumes import VolumeService
from virtyard.host.virt.disk_sources import BlockSource, FileSource, IscsiSource, Source
from virtyard.host.virt.domain_xml import DomainDisk, drive_name
from virtyard.host.virt.metadata import CdChange, VmMetadata
from virtyard.host.virt.vms import VmManager, VmSnapshot
from virtyard.host.virt.volume_sources import VolumeSources, drive_user

log = logging.getLogger("virtyard.host.virt.cdrom")

FAULT_EXIT = 97


@dataclasses.dataclass(frozen=True)
class CdServices:
    """What CD changes use: the VMs, the volume service, volumes as sources, and the
    configured fault point of crash tests (``[debug] die_at``)."""

    vms: VmManager
    volumes: VolumeService
    sources: VolumeSources
    die_at: str = ""


def fault_point(svc: CdServices, step: str) -> None:
    """Die here if the configuration asks for it (``[debug] die_at``): crash tests."""
    if svc.die_at == f"changecd:{step}":
        log.critical("fault injection: dying at changecd:%s", step)
        logging.shutdown()
        os._exit(FAULT_EXIT)


def _key(pdiv: Pdiv | None) -> str | None:
    return None if pdiv is None else Pdiv.of(pdiv).key


def _same_media(live: Source | None, wanted: Source | None) -> bool:
    if live is None or wanted is None:
        return live is wanted
    if isinstance(live, IscsiSource) and isinstance(wanted, IscsiSource):
        return (live.host, live.port, live.iqn, live.lun, live.slice) == (
            wanted.host, wanted.port, wanted.iqn, wanted.lun, wanted.slice)
    if isinstance(live, BlockSource | FileSource) and isinstance(wanted, BlockSource):
        return (live.path, live.slice) == (wanted.path, wanted.slice)
    return False


def _cd_disk(snap: VmSnapshot, iface: str, index: int) -> DomainDisk:
    try:
        name = drive_name(iface, index)
        disk = snap.domain.disk(name)
    except (KeyError, ValueError):
        raise InvalidParamsError(f"invalid parameter 'driveSpec': VM {snap.vm_id} has no drive "
                                 f"{iface} {index}", reason="no_such_drive") from None
    if disk.device.device != "cdrom":
        raise InvalidParamsError(f"invalid parameter 'driveSpec': {name} is a "
                                 f"{disk.device.device}, not a CD-ROM", reason="not_a_cdrom")
    return disk


def _update(dom: libvirt.virDomain, disk: DomainDisk) -> None:
    xml = disk.to_xml()
    try:
        dom.updateDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError:
        # A guest that locked the tray: libvirt's force flag ejects it anyway.
        dom.updateDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE
                              | libvirt.VIR_DOMAIN_DEVICE_MODIFY_FORCE)


def change_cd(svc: CdServices, vm_id: str, pdiv: Pdiv | None, iface: str,
              index: int) -> VmSnapshot:
    """Load ``pdiv`` into (or, with ``None``, eject) the VM's CD drive ``iface``/``index``."""
    vms = svc.vms
    with vms.locks.hold([vm_id]):
        dom = vms.domain(vm_id)
        snap = vms.snapshot(dom)
        cd = _cd_disk(snap, iface, index)
        user = drive_user(vm_id, cd.name)
        entry = snap.metadata.device(cd.name)
        old = entry.pdiv
        if entry.change is not None:  # a crashed change not yet recovered: settle it first
            reconcile_vm(svc, dom)
            snap = vms.snapshot(dom)
            entry = snap.metadata.device(cd.name)
            old = entry.pdiv
        change = CdChange("loading", pdiv) if pdiv is not None else CdChange("ejecting")
        marked = snap.metadata.with_device(cd.name, entry.begin_change(change))
        vms.write_metadata(dom, marked)
        fault_point(svc, "marked")

        source: Source | None = None
        if pdiv is not None:
            try:
                source = svc.sources.prepare(pdiv, user, iso=True)
            except Exception as exc:
                _undo(svc, dom, marked, cd.name, new=None, user=user)
                if isinstance(exc, HostError):
                    raise
                raise ImageFileNotFoundError(f"cannot prepare {pdiv}: {exc}") from None
        fault_point(svc, "prepared")  # (an eject prepares nothing: the step is empty)
        new_disk = DomainDisk(dataclasses.replace(cd.device, pdiv=pdiv), source)
        try:
            if cd.source is not None and source is not None:
                # Open the tray first: the guest then sees a real media change (and libvirt
                # would take two slices of one LUN for the same medium and change nothing).
                _update(dom, DomainDisk(dataclasses.replace(cd.device, pdiv=None), None))
        except libvirt.libvirtError as exc:
            _undo(svc, dom, marked, cd.name, new=pdiv, user=user)
            raise ChangeDiskError(f"libvirt refused to eject {cd.name}: "
                                  f"{exc.get_error_message()}", vmId=vm_id) from None
        fault_point(svc, "ejected")
        try:
            _update(dom, new_disk)
        except libvirt.libvirtError as exc:
            back = _reinsert(dom, cd)
            _undo(svc, dom, marked, cd.name, new=pdiv, user=user)
            if not back:  # the drive stays empty: record and holds must say so now
                reconcile_vm(svc, dom)
                if old is not None:
                    _release(svc, old, user)
            raise ChangeDiskError(f"libvirt refused the media change of {cd.name}: "
                                  f"{exc.get_error_message()}", vmId=vm_id) from None
        fault_point(svc, "updated")

        applied = marked.with_device(cd.name, marked.device(cd.name).apply_change())
        try:
            vms.write_metadata(dom, applied.next_generation())
        except libvirt.libvirtError as exc:  # the drive holds the new media: recovery applies
            log.warning("VM %s: metadata of %s not updated (recovery will): %s", vm_id,
                        cd.name, exc)
        fault_point(svc, "applied")

        if old is not None and _key(old) != _key(pdiv):
            _release(svc, old, user)  # (on failure the next reconcile retries)
        fault_point(svc, "torn-down")
        log.info("VM %s: %s now holds %s", vm_id, cd.name, pdiv or "no medium")
        return vms.snapshot(dom)


def _reinsert(dom: libvirt.virDomain, old: DomainDisk) -> bool:
    """Put the old medium back after a failed insert; whether the drive holds it again."""
    if old.source is None:
        return True  # the tray was empty before: nothing to put back
    try:
        _update(dom, old)
    except libvirt.libvirtError as exc:
        log.warning("putting the old medium back into %s failed: %s", old.name, exc)
        return False
    return True


def _release(svc: CdServices, pdiv: Pdiv, user: str) -> None:
    try:
        svc.volumes.teardown(pdiv, user)
    except Exception as exc:  # the next reconcile retries
        log.warning("releasing %s for %s failed: %s", pdiv, user, exc)


def _undo(svc: CdServices, dom: libvirt.virDomain, marked: VmMetadata, name: str, *,
          new: Pdiv | None, user: str) -> None:
    """The change did not happen: release the new volume, forget the change."""
    if new is not None:
        current = marked.device(name).pdiv
        if _key(current) != _key(new):
            try:
                svc.volumes.teardown(new, user)
            except Exception as exc:
                log.warning("releasing %s after a failed change failed: %s", new, exc)
    try:
        svc.vms.write_metadata(dom, marked.with_device(name, marked.device(name)
                                                         .discard_change()))
    except libvirt.libvirtError as exc:
        log.warning("discarding the change of %s failed (recovery will): %s", name, exc)


def change_cd_legacy(svc: CdServices, vm_id: str, path: str, iface: str,
                     index: int) -> VmSnapshot:
    """The old form: a plain file path (or ``""`` to eject); no volume is prepared."""
    vms = svc.vms
    with vms.locks.hold([vm_id]):
        dom = vms.domain(vm_id)
        snap = vms.snapshot(dom)
        cd = _cd_disk(snap, iface, index)
        if path and not os.path.isfile(path):
            raise ImageFileNotFoundError(f"no such image file {path}", path=path)
        old = snap.metadata.device(cd.name).pdiv
        new_disk = DomainDisk(dataclasses.replace(cd.device, pdiv=None),
                              FileSource(path) if path else None)
        try:
            _update(dom, new_disk)
        except libvirt.libvirtError as exc:
            raise ChangeDiskError(f"libvirt refused the media change of {cd.name}: "
                                  f"{exc.get_error_message()}", vmId=vm_id) from None
        entry = dataclasses.replace(snap.metadata.device(cd.name), pdiv=None, change=None)
        vms.write_metadata(dom, snap.metadata.with_device(cd.name, entry).next_generation())
        if old is not None:
            try:
                svc.volumes.teardown(old, drive_user(vm_id, cd.name))
            except Exception as exc:
                log.warning("VM %s: releasing old CD %s failed: %s", vm_id, old, exc)
        return vms.snapshot(dom)


# -- recovery -----------------------------------------------------------------------------------

def _actual_pdiv(svc: CdServices, vm_id: str, disk: DomainDisk,
                 candidates: list[Pdiv | None]) -> Pdiv | None:
    """Which volume the drive really holds (the live source), among ``candidates`` and every
    volume prepared for this drive; ``None`` for an empty tray or a plain file."""
    live = disk.source
    if live is None or isinstance(live, FileSource):
        return None
    user = drive_user(vm_id, disk.name)
    seen: set[str] = set()
    by_key = {p.pdiv.key: p for p in svc.volumes.prepared()}
    options = [c for c in candidates if c is not None]
    options += [p.pdiv for p in by_key.values() if user in p.users]
    for pdiv in options:
        key = _key(pdiv)
        if key in seen or key is None:
            continue
        seen.add(key)
        prepared = by_key.get(key)
        borrowed = prepared is None
        if prepared is None:
            try:  # not prepared: take a reference to compare, released again if no match
                prepared = svc.volumes.prepare(pdiv, user)
            except Exception:
                continue
        if _same_media(live, svc.sources.source_of(prepared)):
            return pdiv
        if borrowed:
            svc.volumes.teardown(pdiv, user)
    return None


def _finish_load(svc: CdServices, dom: libvirt.virDomain, vm_id: str, disk: DomainDisk,
                 pdiv: Pdiv | None) -> Pdiv | None:
    """A load that crashed with the tray open: insert the new medium (roll forward), so the
    drive ends with the new CD, not with none."""
    user = drive_user(vm_id, disk.name)
    if pdiv is None or not any(p.pdiv.key == _key(pdiv) and user in p.users
                               for p in svc.volumes.prepared()):
        return None  # crashed before the volume was prepared: nothing to insert
    try:
        source = svc.sources.prepare(pdiv, user, iso=True)
        _update(dom, DomainDisk(dataclasses.replace(disk.device, pdiv=pdiv), source))
    except Exception as exc:
        log.warning("VM %s %s: finishing the interrupted load failed: %s", vm_id, disk.name, exc)
        return None
    log.info("VM %s %s: finished an interrupted load of %s", vm_id, disk.name, pdiv)
    return pdiv


def reconcile_vm(svc: CdServices, dom: libvirt.virDomain) -> dict[str, Pdiv | None]:
    """Settle every CD change in flight of one VM from what its drives really hold; returns
    what each volume-backed drive holds. Caller holds the VM's lock."""
    vms = svc.vms
    snap = vms.snapshot(dom)
    metadata = snap.metadata
    holds: dict[str, Pdiv | None] = {}
    for disk in snap.domain.disks:
        entry = metadata.device(disk.name)
        if disk.device.device != "cdrom":
            if entry.pdiv is not None:
                holds[disk.name] = entry.pdiv
            continue
        change = entry.change
        actual = _actual_pdiv(svc, snap.vm_id, disk,
                              [entry.pdiv, change.pdiv if change else None])
        if change is not None and change.state == "loading" and actual is None \
                and disk.source is None:
            actual = _finish_load(svc, dom, snap.vm_id, disk, change.pdiv)
        if change is not None:
            done = (_key(actual) == _key(change.pdiv)) if change.state == "loading" \
                else actual is None
            log.info("VM %s %s: recovering a %s change: %s", snap.vm_id, disk.name,
                     change.state, "it happened" if done else "it did not happen")
            entry = entry.apply_change() if done else entry.discard_change()
        if _key(entry.pdiv) != _key(actual):  # trust the drive over the record
            entry = dataclasses.replace(entry, pdiv=actual)
        metadata = metadata.with_device(disk.name, entry)
        holds[disk.name] = actual
    if metadata != snap.metadata:
        vms.write_metadata(dom, metadata.next_generation())
    return holds


def reconcile(svc: CdServices) -> dict[str, Any]:
    """Make prepared volumes and drives agree on this host (agent start, after destroys and
    migrations): settle in-flight CD changes, release every hold no running drive uses, and
    take the hold every drive's volume needs. Returns what it did."""
    expected: dict[str, str] = {}  # user -> PDIV key it should hold
    wanted: dict[str, Pdiv] = {}
    done: dict[str, Any] = {"settled_vms": 0, "released": [], "taken": []}
    for dom in svc.vms.running():
        vm_id = dom.UUIDString()
        if not svc.vms.is_ours(dom):
            continue
        try:
            with svc.vms.locks.hold([vm_id]):
                holds = reconcile_vm(svc, dom)
        except Exception as exc:  # the VM went away meanwhile, or libvirt failed: next time
            log.warning("reconcile of VM %s skipped: %s", vm_id, exc)
            continue
        done["settled_vms"] += 1
        for name, pdiv in holds.items():
            if pdiv is not None:
                user = drive_user(vm_id, name)
                expected[user] = str(_key(pdiv))
                wanted[user] = pdiv
    for prepared in svc.volumes.prepared():
        for user in prepared.users:
            if expected.get(user) != prepared.pdiv.key:
                svc.volumes.teardown(prepared.pdiv, user)
                done["released"].append(f"{prepared.pdiv} by {user}")
    held = {(u, p.pdiv.key) for p in svc.volumes.prepared() for u in p.users}
    for user, key in expected.items():
        if (user, key) not in held:
            svc.volumes.prepare(wanted[user], user)
            done["taken"].append(f"{wanted[user]} by {user}")
    if done["released"] or done["taken"]:
        log.info("volume reconcile: released %s; taken %s", done["released"], done["taken"])
    return done
