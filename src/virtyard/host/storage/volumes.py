"""Prepare and tear down volumes of block storage domains for VMs, reference-counted per user.

``prepare(pdiv, user)`` gives what QEMU needs to open a volume (:class:`PreparedVolume`);
``teardown(pdiv, user)`` releases that user's hold. A *user* is one VM device (say
``<vm-uuid>:sdc``): several VMs may hold one ISO, and tearing down a volume another user still
holds only drops that user (not an error), the volume stays prepared. Teardown of a user that
holds nothing is a no-op, so a retry after a crash is always safe.

How a volume is exposed is chosen once per host by capability detection (:func:`choose_method`):

``lvm-activation`` (production: kernel initiator, device-mapper loaded)
    ``lvchange -ay`` on the first user, ``lvchange -an`` after the last; QEMU opens
    ``/dev/<domain>/<volume>`` (``disk_type`` ``block``).
``iscsi-slice`` (user-space initiator; what runs on the lab machines, which have neither
device-mapper nor a kernel initiator)
    QEMU reads the LUN itself over iSCSI and sees only the LV's bytes through a libvirt storage
    slice: ``<source protocol='iscsi' name='IQN/LUN'><host/>…<slices><slice type='storage'
    offset='X' size='Y'/></slices></source>`` (``disk_type`` ``network``). Preparing needs no host
    resource at all — nothing to activate, nothing that can leak, nothing to undo after a crash.
    Chosen over a read-only loop device (``losetup -r --offset --sizelimit``) because that needs
    a local block device of the LUN for as long as the VM runs: a ``qemu-storage-daemon`` per LUN
    that would have to survive agent restarts and could be left behind.
``block-slice`` (kernel initiator without device-mapper: not a real configuration, kept because
it costs nothing)
    the same slice over the LUN's local block device.

The slice covers the verified content (``VY_SIZE``) of a READY volume, else the whole LV, so
the guest's CD is exactly the ISO. ``prepare(..., iso=True)`` (for a CD-ROM) also checks that
the volume is an ``ISO`` volume, READY, and holds ISO 9660 (``CD001`` at byte 32769).

Prepared volumes are written to ``<root>/prepared.json`` (atomic replace, fsync) on every
change, so an agent restart finds every one of them with its users: none lost, none invented.
With LV activation the record is written *before* activating and removed *after* deactivating,
so no activation ever exists without a record; :meth:`VolumeService.recover` (to run at agent
start) re-activates recorded volumes that are not active (a host reboot) and deactivates active,
unopened LVs of our domains that no record accounts for; :meth:`VolumeService.leftovers` lists
what is not accounted for without touching it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

from virtyard.host.rpc.errors import (
    CannotActivateLogicalVolumeError,
    CannotDeactivateLogicalVolumeError,
    ImagePathError,
    IncorrectFormatError,
    InvalidParameterError,
    VolumeIsBusyError,
)
from virtyard.host.rpc.locks import KeyedLocks
from virtyard.host.storage.block_domain import (
    ISO_MAGIC,
    ISO_MAGIC_OFFSET,
    BlockDomains,
    DomainInfo,
    VolumeInfo,
)
from virtyard.host.storage.devices import DeviceService
from virtyard.host.storage.initiator import Initiator
from virtyard.host.storage.lun_device import LunDevices
from virtyard.host.storage.lvm import (
    Lvm,
    LvmError,
    LvReport,
    Runner,
    device_mapper_available,
    run_lvm,
    udev_setting,
)
from virtyard.host.storage.pdiv import Pdiv, canonical_uuid

log = logging.getLogger("virtyard.host.storage.volumes")

Method = Literal["lvm-activation", "block-slice", "iscsi-slice"]
DiskType = Literal["block", "network"]

# The libvirt secret holding a connection's CHAP password is named by the connection id; the
# VM side defines it (virt.volume_sources.ChapSecrets) under this usage.
CHAP_SECRET_USAGE_PREFIX: Final = "virtyard-chap-"
USER: Final = re.compile(r"^[A-Za-z0-9_.:@/+-]{1,256}$")


def choose_method(initiator_kind: str, dm: bool) -> Method:
    """How this host exposes a volume: LV activation needs the PV as a local block device
    (kernel initiator) and device-mapper; without a kernel initiator QEMU reads the LUN itself."""
    if initiator_kind == "kernel":
        return "lvm-activation" if dm else "block-slice"
    return "iscsi-slice"


@dataclass(frozen=True)
class PreparedVolume:
    """What the VM side needs to build the disk XML of a prepared volume.

    ``disk_type`` ``block``: ``path`` (and, for ``block-slice``, ``offset``/``size``).
    ``disk_type`` ``network``: iSCSI ``host``, ``port``, ``iqn``, ``lun``, the slice ``offset``
    and ``size``, and with CHAP ``chap_user`` plus the libvirt secret's ``chap_secret_usage``.
    ``users`` hold it; ``iso`` says the volume was checked to hold an ISO 9660 image.
    """

    pdiv: Pdiv
    method: Method
    disk_type: DiskType
    guid: str
    size: int
    users: tuple[str, ...] = ()
    path: str = ""
    offset: int | None = None
    host: str = ""
    port: int = 0
    iqn: str = ""
    lun: int = 0
    connection_id: str = ""
    chap_user: str = ""
    chap_secret_usage: str = ""
    volume_type: str = ""
    iso: bool = False

    def to_json(self) -> dict[str, Any]:
        raw = {k: v for k, v in self.__dict__.items() if k not in ("pdiv", "users")}
        return {"pdiv": self.pdiv.to_dict(), "users": list(self.users), **raw}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PreparedVolume:
        fields = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        fields["pdiv"] = Pdiv.from_dict(raw["pdiv"])
        fields["users"] = tuple(raw.get("users", ()))
        return cls(**fields)


class PreparedState:
    """The prepared volumes by PDIV key, kept in a JSON file replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, PreparedVolume] = {}
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return
        for item in raw:
            volume = PreparedVolume.from_json(item)
            self.entries[volume.pdiv.key] = volume

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        data = json.dumps([v.to_json() for _, v in sorted(self.entries.items())], indent=1)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class VolumeService:
    """Block storage domains (``domains``) and prepared volumes of this host."""

    def __init__(self, root: Path, initiator: Initiator, devices: DeviceService, *,
                 initiator_name: str, timeout: float, dm: bool | None = None,
                 lvm_runner: Runner = run_lvm, lvm_udev: str = "auto",
                 locks: KeyedLocks | None = None) -> None:
        self.root = root
        self.lvm_runner = lvm_runner
        self.initiator = initiator
        self.dm = device_mapper_available() if dm is None else dm
        self.udev = udev_setting(lvm_udev)  # the host's answer, once: LVM's udev settings
        self.method: Method = choose_method(initiator.kind, self.dm)
        self.lun_devices = LunDevices(root, initiator, initiator_name=initiator_name)
        self.domains = BlockDomains(devices, initiator, self.lun_devices, dm=self.dm,
                                    timeout=timeout, udev=self.udev)
        self._lock = threading.Lock()
        # One prepare or teardown of a volume at a time (``prepare:<domain>/<volume>``).
        self._volume_locks = (KeyedLocks() if locks is None else locks).scope("prepare:")
        self._state = PreparedState(root / "prepared.json")
        # Volumes (domain/volume) and domains a prepare is working on, and those being removed:
        # removal and prepare exclude each other without serialising prepares.
        self._inflight: Counter[str] = Counter()
        self._removing: set[str] = set()

    # -- prepare / teardown ---------------------------------------------------------------

    def prepare(self, pdiv: Pdiv, user: str, *, iso: bool = False) -> PreparedVolume:
        """Hold a volume for ``user``; the first user makes it usable by QEMU."""
        pdiv = Pdiv.of(pdiv)
        _check_user(user)
        with self._volume_lock(pdiv):
            with self._lock:
                for key in _busy_keys(pdiv):
                    if key in self._removing:
                        raise VolumeIsBusyError(f"{key} is being removed", **pdiv.to_dict())
                entry = self._state.entries.get(pdiv.key)
                if entry is not None and (entry.iso or not iso):
                    if user not in entry.users:
                        entry = replace(entry, users=(*entry.users, user))
                        self._put(entry)
                    return entry
                self._inflight.update(_busy_keys(pdiv))
            try:
                volume = self.domains.volume(pdiv)
                checked_iso = self._check_iso(volume) if iso else False
                if entry is not None:  # prepared before, now also asked for as an ISO
                    entry = replace(entry, iso=checked_iso, users=tuple(
                        dict.fromkeys((*entry.users, user))))
                    with self._lock:
                        self._put(entry)
                    return entry
                entry = replace(self._expose(volume), users=(user,), iso=checked_iso)
                with self._lock:
                    self._put(entry)  # recorded before anything is activated
                if self.method == "lvm-activation":
                    self._activate(entry, forget_on_failure=True)
                log.info("volume %s prepared for %s (%s)", pdiv, user, self.method)
                return entry
            finally:
                with self._lock:
                    self._inflight.subtract(_busy_keys(pdiv))
                    self._inflight += Counter()  # drop zero counts

    def teardown(self, pdiv: Pdiv, user: str) -> PreparedVolume | None:
        """Release ``user``'s hold; the volume stays prepared (and is returned) while other users
        hold it, and after the last one is released (``None``). Idempotent."""
        pdiv = Pdiv.of(pdiv)
        _check_user(user)
        with self._volume_lock(pdiv):
            with self._lock:
                entry = self._state.entries.get(pdiv.key)
            if entry is None or user not in entry.users:
                return entry
            remaining = tuple(u for u in entry.users if u != user)
            if remaining:
                entry = replace(entry, users=remaining)
                with self._lock:
                    self._put(entry)
                log.info("volume %s released by %s, still used by %s", pdiv, user,
                         ", ".join(remaining))
                return entry
            if entry.method == "lvm-activation":
                self._deactivate(entry)  # raises: record kept, teardown can be retried
            with self._lock:
                self._state.entries.pop(pdiv.key, None)
                self._state.save()
            log.info("volume %s torn down (last user %s)", pdiv, user)
            return None

    def prepared(self, domain_id: str | None = None) -> list[PreparedVolume]:
        """Every prepared volume (of one domain), as recorded."""
        if domain_id is not None:
            domain_id = canonical_uuid(domain_id, "domainID")
        with self._lock:
            return [v for _, v in sorted(self._state.entries.items())
                    if domain_id is None or v.pdiv.domain_id == domain_id]

    def users_of(self, domain_id: str, volume_id: str | None = None) -> list[str]:
        """Who holds volumes of a domain (or one volume of it), as ``volume: user``."""
        with self._lock:
            return self._users_locked(domain_id, volume_id)

    def _users_locked(self, domain_id: str, volume_id: str | None) -> list[str]:
        return [f"{v.pdiv.volume_id}: {user}" for _, v in sorted(self._state.entries.items())
                if v.pdiv.domain_id == domain_id
                and (volume_id is None or v.pdiv.volume_id == volume_id) for user in v.users]

    # -- removal guarded against use ------------------------------------------------------

    def remove_domain(self, domain_id: str, *, force: bool = False) -> DomainInfo:
        """Remove a domain none of whose volumes is prepared."""
        domain_id = canonical_uuid(domain_id, "domainID")
        key = f"domain:{domain_id}"
        with self._guard_removal(key, domain_id, None):
            return self.domains.remove(domain_id, force=force)

    def remove_volume(self, pdiv: Pdiv) -> VolumeInfo:
        """Remove a volume that is not prepared."""
        pdiv = Pdiv.of(pdiv)
        key = f"volume:{pdiv.domain_id}/{pdiv.volume_id}"
        with self._guard_removal(key, pdiv.domain_id, pdiv.volume_id):
            return self.domains.remove_volume(pdiv)

    def write(self, pdiv: Pdiv, offset: int, data: bytes) -> VolumeInfo:
        """Write into a volume that is not prepared (an upload)."""
        pdiv = Pdiv.of(pdiv)
        self._refuse_if_used(pdiv.domain_id, pdiv.volume_id)
        return self.domains.write(pdiv, offset, data)

    @contextlib.contextmanager
    def _guard_removal(self, key: str, domain_id: str,
                       volume_id: str | None) -> Iterator[None]:
        with self._lock:
            users = self._users_locked(domain_id, volume_id)
            if users or self._inflight[key]:
                what = f"volume {volume_id}" if volume_id else f"storage domain {domain_id}"
                raise VolumeIsBusyError(f"{what} is in use: " + ("; ".join(users)
                                                                 or "being prepared"),
                                        domainID=domain_id, users=users)
            self._removing.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._removing.discard(key)

    def _refuse_if_used(self, domain_id: str, volume_id: str) -> None:
        users = self.users_of(domain_id, volume_id)
        if users:
            raise VolumeIsBusyError(f"volume {volume_id} is prepared: {'; '.join(users)}",
                                    domainID=domain_id, volumeID=volume_id, users=users)

    # -- after a restart --------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """Local devices and LV activations that nothing recorded accounts for."""
        found = self.lun_devices.leftovers()
        if self.method == "lvm-activation":
            recorded = {(v.pdiv.domain_id, v.pdiv.volume_id) for v in self.prepared()}
            for lv in self._active_lvs():
                if (lv.vg_name, lv.name) not in recorded:
                    found.append(f"active LV {lv.vg_name}/{lv.name} prepared for nobody")
        return found

    def recover(self) -> list[str]:
        """Make activations match the records (LV activation only; slices hold nothing).

        Returns what was done. Run once at agent start, before the VMs' own recovery.
        """
        if self.method != "lvm-activation":
            return []
        done = []
        recorded = {(v.pdiv.domain_id, v.pdiv.volume_id): v for v in self.prepared()}
        active = self._active_lvs()
        is_active = {(lv.vg_name, lv.name) for lv in active}
        for key, entry in recorded.items():
            if key not in is_active:
                try:
                    self._activate(entry, forget_on_failure=False)
                    done.append(f"re-activated {key[0]}/{key[1]} (prepared for "
                                f"{', '.join(entry.users)})")
                except CannotActivateLogicalVolumeError as exc:
                    log.warning("recovery: %s", exc)
        for lv in active:
            if (lv.vg_name, lv.name) not in recorded and not lv.open:
                try:
                    self._lvm_for(lv.vg_name).deactivate(lv.vg_name, lv.name)
                    done.append(f"deactivated {lv.vg_name}/{lv.name} (prepared for nobody)")
                except LvmError as exc:
                    log.warning("recovery: cannot deactivate %s/%s: %s", lv.vg_name, lv.name,
                                exc)
        return done

    # -- internals ------------------------------------------------------------------------

    def _volume_lock(self, pdiv: Pdiv) -> AbstractContextManager[None]:
        return self._volume_locks.hold([f"{pdiv.domain_id}/{pdiv.volume_id}"])

    def _put(self, entry: PreparedVolume) -> None:
        """Record ``entry`` (caller holds ``_lock``)."""
        self._state.entries[entry.pdiv.key] = entry
        self._state.save()

    def _check_iso(self, volume: VolumeInfo) -> bool:
        if volume.type != "ISO":
            raise IncorrectFormatError(f"volume {volume.volume_id} is of type {volume.type}, "
                                       "not ISO", **volume.pdiv.to_dict())
        if volume.state != "READY":
            raise IncorrectFormatError(f"volume {volume.volume_id} holds no verified ISO yet "
                                       f"(state {volume.state})", **volume.pdiv.to_dict())
        magic = self.domains.read_volume(volume, ISO_MAGIC_OFFSET, len(ISO_MAGIC))
        if magic != ISO_MAGIC:
            raise IncorrectFormatError(f"volume {volume.volume_id} holds no ISO 9660 image "
                                       "(no CD001 at byte 32769)", **volume.pdiv.to_dict())
        return True

    def _expose(self, volume: VolumeInfo) -> PreparedVolume:
        """The prepared form of ``volume`` for this host's method (no side effect)."""
        pdiv = volume.pdiv
        if self.method == "lvm-activation":
            guid = volume.extent.guid if volume.extent else ""
            return PreparedVolume(pdiv=pdiv, method=self.method, disk_type="block", guid=guid,
                                  size=volume.size, path=f"/dev/{pdiv.domain_id}/{pdiv.volume_id}",
                                  volume_type=volume.type)
        extent = volume.extent
        if extent is None:
            raise ImagePathError(f"volume {volume.volume_id} is not one contiguous range of one "
                                 "LUN: it cannot be exposed without device-mapper",
                                 **pdiv.to_dict())
        size = volume.content_size if volume.state == "READY" and volume.content_size else \
            volume.size
        size = min(size, extent.size)
        device = self.domains.device_of(extent.guid)
        if self.method == "block-slice":
            path = self.initiator.device_path(extent.guid)
            if path is None:
                raise ImagePathError(f"LUN {extent.guid} has no local device", **pdiv.to_dict())
            return PreparedVolume(pdiv=pdiv, method=self.method, disk_type="block",
                                  guid=extent.guid, size=size, path=path, offset=extent.offset,
                                  volume_type=volume.type)
        if not device.paths:
            raise ImagePathError(f"LUN {extent.guid} has no path on this host", **pdiv.to_dict())
        path_info = device.paths[0]
        connection = path_info.connection
        return PreparedVolume(
            pdiv=pdiv, method=self.method, disk_type="network", guid=extent.guid, size=size,
            offset=extent.offset, host=connection.portal.host, port=connection.portal.port,
            iqn=connection.iqn, lun=path_info.lun, connection_id=connection.id,
            chap_user=connection.chap.username if connection.chap else "",
            chap_secret_usage=(CHAP_SECRET_USAGE_PREFIX + connection.id
                               if connection.chap else ""),
            volume_type=volume.type)

    def _lvm_for(self, domain_id: str) -> Lvm:
        paths = []
        for device in self.domains.devices_of_domain(domain_id):
            path = self.initiator.device_path(device.guid)
            if path is not None:
                paths.append(path)
        return Lvm(tuple(paths), dm=self.dm, runner=self.lvm_runner, udev=self.udev)

    def _activate(self, entry: PreparedVolume, *, forget_on_failure: bool) -> None:
        """``lvchange -ay``; when it fails for a new prepare, its record goes too."""
        vg, lv = entry.pdiv.domain_id, entry.pdiv.volume_id
        try:
            self._lvm_for(vg).activate(vg, lv)
        except LvmError as exc:
            if not forget_on_failure:
                raise CannotActivateLogicalVolumeError(f"activating {vg}/{lv} failed: {exc}",
                                                       **entry.pdiv.to_dict()) from None
            with self._lock:
                current = self._state.entries.get(entry.pdiv.key)
                if current is not None and current.users == entry.users:
                    self._state.entries.pop(entry.pdiv.key)
                    self._state.save()
            raise CannotActivateLogicalVolumeError(f"activating {vg}/{lv} failed: {exc}",
                                                   **entry.pdiv.to_dict()) from None

    def _deactivate(self, entry: PreparedVolume) -> None:
        vg, lv = entry.pdiv.domain_id, entry.pdiv.volume_id
        try:
            self._lvm_for(vg).deactivate(vg, lv)
        except LvmError as exc:
            raise CannotDeactivateLogicalVolumeError(f"deactivating {vg}/{lv} failed: {exc}",
                                                     **entry.pdiv.to_dict()) from None

    def _active_lvs(self) -> list[LvReport]:
        active = []
        for domain_id in self.domains.cached_domain_ids():
            try:
                active += [lv for lv in self._lvm_for(domain_id).lvs(domain_id) if lv.active]
            except LvmError as exc:
                log.warning("cannot list LVs of storage domain %s: %s", domain_id, exc)
        return active


def _busy_keys(pdiv: Pdiv) -> list[str]:
    return [f"domain:{pdiv.domain_id}", f"volume:{pdiv.domain_id}/{pdiv.volume_id}"]


def _check_user(user: str) -> None:
    if not USER.match(user):
        raise InvalidParameterError(f"user must be 1-256 of A-Z a-z 0-9 _ . : @ / + -, "
                                    f"not {user!r}")
