"""Block storage domains on SAN LUNs: create, list and remove them and their volumes, and write
and verify a volume's bytes (an ISO upload).

The layout (:mod:`~virtyard.host.storage.domain_tags` is the convention every host shares):

* a domain is an LVM VG named by the domain UUID, tagged ``VIRTYARD_SD`` (and ``VY_MD_NAME=<name>``
  when it has a name), on one LUN; extents are :data:`EXTENT_SIZE` (4 MiB: an ISO wastes at
  most 4 MiB, and a 1 TiB LUN is 262 144 extents, far below anything LVM minds; oVirt's 128 MiB
  suits large VM disks, not CD images);
* a volume is an LV named by the volume UUID, allocated contiguously (``--contiguous y``) so
  that its bytes are one range of the LUN, with tags ``VY_POOL=``, ``VY_IMAGE=``, ``VY_TYPE=``
  (``ISO`` or ``DATA``) and ``VY_STATE=`` (``EMPTY`` until :meth:`BlockDomains.verify` checked an
  upload, then ``READY`` with ``VY_SIZE=`` and ``VY_SHA256=`` of the content).

Reading needs no device: the domain's LVM metadata is read over the initiator
(:func:`lvm_label.read_pv`) — fresh from the LUN for every operation, so a stale cache can never
send bytes to the wrong place — and the LUN that holds a domain is found in the device list the
agent already keeps (``Host.getDeviceList``'s probing). Only LVM changes (``pvcreate``,
``vgcreate``, ``lvcreate``, tags) need a local device, and get one just for that operation
(:mod:`~virtyard.host.storage.lun_device`). Writing an upload's bytes needs none with the
user-space initiator (WRITE(16) on its own session: making a device costs ten times the write).

An LV's bytes start at ``pe_start + start_extent * extent_size`` on its PV
(:func:`lv_extent`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from virtyard.host.rpc.errors import (
    CannotDeleteVolumeError,
    ImagePathError,
    ImageVerificationError,
    InaccessiblePhysDevError,
    IncorrectFormatError,
    InvalidParameterError,
    LogicalVolumeReplaceTagError,
    MiscBlockReadError,
    MiscBlockWriteError,
    NoSpaceLeftOnDomainError,
    PhysDevInitializationError,
    StorageDomainAccessError,
    StorageDomainAlreadyExistsError,
    StorageDomainCreationError,
    StorageDomainDoesNotExistError,
    StorageDomainNotEmptyError,
    VolumeAlreadyExistsError,
    VolumeCreationError,
    VolumeDoesNotExistError,
    VolumeGroupHasDomainTagError,
    VolumeGroupRemoveError,
    VolumeNonWritableError,
)
from virtyard.host.storage import lvm_label
from virtyard.host.storage.devices import DeviceEntry, DeviceService
from virtyard.host.storage.domain_tags import DOMAIN_TAG, domain_of
from virtyard.host.storage.initiator import Device, Initiator, InitiatorError
from virtyard.host.storage.lun_device import LunDeviceError, LunDevices
from virtyard.host.storage.lvm import Lvm, LvmError
from virtyard.host.storage.lvm_label import LogicalVolume, PvInfo, VgMetadata
from virtyard.host.storage.pdiv import Pdiv, canonical_uuid

log = logging.getLogger("virtyard.host.storage.block_domain")

MiB: Final = 1 << 20
EXTENT_SIZE: Final = 4 * MiB
HEAD_BYTES: Final = 64 * 1024  # LVM label + metadata text of a VG with dozens of LVs
READ_CHUNK: Final = 8 * MiB  # verify reads (and hashes) this much per initiator call
MAX_WRITE: Final = 8 * MiB  # one Volume.write (base64 of it stays below the 16 MiB body limit)
ISO_MAGIC_OFFSET: Final = 32769  # "CD001" of the primary volume descriptor, sector 16 + 1
ISO_MAGIC: Final = b"CD001"

TAG_NAME: Final = "VY_MD_NAME="
TAG_POOL: Final = "VY_POOL="
TAG_IMAGE: Final = "VY_IMAGE="
TAG_TYPE: Final = "VY_TYPE="
TAG_STATE: Final = "VY_STATE="
TAG_SIZE: Final = "VY_SIZE="
TAG_SHA256: Final = "VY_SHA256="

VolumeType = Literal["ISO", "DATA"]
VolumeState = Literal["EMPTY", "READY"]
VOLUME_TYPES: Final = ("ISO", "DATA")
DOMAIN_NAME: Final = re.compile(r"^[A-Za-z0-9_.+-]{0,64}$")


# -- what a domain and its volumes are ----------------------------------------------------------

@dataclass(frozen=True)
class Extent:
    """Where a volume's bytes are: ``size`` bytes from ``offset`` of LUN ``guid``."""

    guid: str
    pv_uuid: str
    offset: int
    size: int


@dataclass(frozen=True)
class VolumeInfo:
    """One volume as its LV and tags describe it. ``size`` is the LV's (whole extents);
    ``content_size`` and ``sha256`` what :meth:`BlockDomains.verify` found, once READY.
    ``extent`` is ``None`` for an LV that is not one run of extents on one PV."""

    domain_id: str
    volume_id: str
    image_id: str
    pool_id: str
    type: str
    state: str
    size: int
    content_size: int
    sha256: str
    lv_uuid: str
    extent: Extent | None
    tags: tuple[str, ...] = ()

    @property
    def pdiv(self) -> Pdiv:
        return Pdiv(self.pool_id, self.domain_id, self.image_id, self.volume_id)


@dataclass(frozen=True)
class DomainPv:
    """A PV of a domain: the LUN it is on (``device`` to reach it) and its data area."""

    guid: str
    pv_uuid: str
    pe_start: int
    pe_count: int
    device: Device | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class DomainInfo:
    """A block storage domain: its VG, the LUNs under it, its space and its volumes."""

    domain_id: str
    name: str
    vg_uuid: str
    extent_size: int
    pvs: tuple[DomainPv, ...]
    size: int
    free: int
    seqno: int
    volumes: tuple[VolumeInfo, ...] = ()

    def volume(self, volume_id: str) -> VolumeInfo | None:
        return next((v for v in self.volumes if v.volume_id == volume_id), None)

    def pv(self, pv_uuid: str) -> DomainPv | None:
        return next((p for p in self.pvs if p.pv_uuid == pv_uuid), None)


def tag_value(tags: Sequence[str], prefix: str) -> str:
    """The value of the first ``prefix<value>`` tag, or ``""``."""
    return next((t[len(prefix):] for t in tags if t.startswith(prefix)), "")


def lv_extent(vg: VgMetadata, lv: LogicalVolume, guid_of_pv: Mapping[str, str]) -> Extent | None:
    """The one byte range of one PV holding ``lv``, or ``None`` when there is none.

    Linear segments that follow each other on the same PV (LVM splits an LV in segments when it
    is extended, even into adjacent extents) make one range. ``guid_of_pv`` maps PV UUIDs to the
    LUN GUIDs they are on ("" when unknown).
    """
    if not lv.segments:
        return None
    first_pv = ""
    start = expected = 0
    logical = 0
    for segment in lv.segments:
        if not segment.linear or segment.start_extent != logical:
            return None
        stripe = segment.stripes[0]
        if not first_pv:
            first_pv, start, expected = stripe.pv_uuid, stripe.start_extent, stripe.start_extent
        if stripe.pv_uuid != first_pv or stripe.start_extent != expected:
            return None
        expected += segment.extent_count
        logical += segment.extent_count
    pv = vg.pv(first_pv)
    if pv is None:
        return None
    return Extent(guid_of_pv.get(first_pv, ""), first_pv,
                  pv.pe_start + start * vg.extent_size, logical * vg.extent_size)


def volume_info(domain_id: str, vg: VgMetadata, lv: LogicalVolume,
                guid_of_pv: Mapping[str, str]) -> VolumeInfo:
    """A volume from its LV (sizes in bytes)."""
    size = sum(s.extent_count for s in lv.segments) * vg.extent_size
    content = tag_value(lv.tags, TAG_SIZE)
    return VolumeInfo(
        domain_id=domain_id, volume_id=lv.name, image_id=tag_value(lv.tags, TAG_IMAGE),
        pool_id=tag_value(lv.tags, TAG_POOL), type=tag_value(lv.tags, TAG_TYPE) or "DATA",
        state=tag_value(lv.tags, TAG_STATE) or "EMPTY", size=size,
        content_size=int(content) if content.isdigit() else 0,
        sha256=tag_value(lv.tags, TAG_SHA256), lv_uuid=lv.uuid,
        extent=lv_extent(vg, lv, guid_of_pv), tags=lv.tags)


def domain_info(vg: VgMetadata, pvs: Sequence[DomainPv]) -> DomainInfo:
    """A domain from its VG metadata and its PVs (those found on this host's LUNs)."""
    domain_id = domain_of(vg.name, vg.tags) or vg.name
    guid_of = {p.pv_uuid: p.guid for p in pvs}
    total = sum(p.pe_count for p in vg.pvs)
    used = sum(s.extent_count for lv in vg.lvs for s in lv.segments)
    volumes = tuple(sorted((volume_info(domain_id, vg, lv, guid_of) for lv in vg.lvs),
                           key=lambda v: v.volume_id))
    return DomainInfo(domain_id=domain_id, name=tag_value(vg.tags, TAG_NAME), vg_uuid=vg.uuid,
                      extent_size=vg.extent_size, pvs=tuple(pvs), size=total * vg.extent_size,
                      free=(total - used) * vg.extent_size, seqno=vg.seqno, volumes=volumes)


def is_iso9660(data: bytes) -> bool:
    """Whether ``data`` (the first bytes of a volume, at least 32 774) start an ISO 9660 image."""
    return data[ISO_MAGIC_OFFSET:ISO_MAGIC_OFFSET + len(ISO_MAGIC)] == ISO_MAGIC


def round_up(size: int, unit: int) -> int:
    return -(-size // unit) * unit


# -- the service --------------------------------------------------------------------------------

class BlockDomains:
    """Block storage domains and their volumes on the LUNs this host sees."""

    def __init__(self, devices: DeviceService, initiator: Initiator, lun_devices: LunDevices,
                 *, dm: bool, timeout: float, udev: bool = False) -> None:
        self.devices = devices
        self.initiator = initiator
        self.lun_devices = lun_devices
        self.dm = dm
        self.udev = udev  # LVM works with udev (lvm.udev_setting)
        self.timeout = timeout

    # -- reading ------------------------------------------------------------------------

    def read(self, device: Device, offset: int, length: int) -> bytes:
        """Bytes of a LUN over the initiator (no local device)."""
        try:
            return self.initiator.read_many([(device, offset, length)], timeout=self.timeout)[0]
        except InitiatorError as exc:
            raise MiscBlockReadError(f"reading {length} bytes at {offset} of LUN {device.guid} "
                                     f"failed: {exc}", guid=device.guid) from None

    def _read_pv(self, device: Device) -> PvInfo | None:
        head = self.read(device, 0, HEAD_BYTES)
        return lvm_label.read_pv(head, lambda offset, length: self.read(device, offset, length))

    def _entries(self, refresh: bool) -> list[DeviceEntry]:
        try:
            return self.devices.listing(guids=None, check_status=True, refresh=refresh)
        except InitiatorError as exc:
            raise StorageDomainAccessError(f"listing LUNs failed: {exc}") from None

    @staticmethod
    def _domain_entries(entries: Sequence[DeviceEntry]) -> dict[str, list[DeviceEntry]]:
        found: dict[str, list[DeviceEntry]] = {}
        for entry in entries:
            usage = entry.usage
            domain = domain_of(usage.vg_name, usage.vg_tags) if usage else None
            if domain is not None:
                found.setdefault(domain, []).append(entry)
        return found

    def list_domains(self) -> list[DomainInfo]:
        """Every block storage domain on the LUNs this host sees (one full device listing)."""
        domains = []
        for entries in self._domain_entries(self._entries(refresh=True)).values():
            vg = next((e.usage.pv.vg for e in entries
                       if e.usage and e.usage.pv and e.usage.pv.vg), None)
            if vg is not None:
                domains.append(domain_info(vg, [_domain_pv(e, vg, e.usage.pv_uuid)
                                                for e in entries if e.usage]))
        return sorted(domains, key=lambda d: d.domain_id)

    def domain(self, domain_id: str) -> DomainInfo:
        """One domain, its metadata read fresh from its LUN (:class:`StorageDomainDoesNotExist`
        when no LUN this host sees holds it)."""
        domain_id = canonical_uuid(domain_id, "domainID")
        for refresh in (False, True):
            entries = self._domain_entries(self._entries(refresh)).get(domain_id, [])
            for entry in entries:
                pv = self._read_pv(entry.device)
                vg = pv.vg if pv else None
                if pv is None or vg is None or domain_of(vg.name, vg.tags) != domain_id:
                    continue  # stale cache: that LUN is no longer this domain's
                known = {e.usage.pv_uuid: e for e in entries if e.usage}
                known[pv.pv_uuid] = entry  # read just now: wins over the cache
                pvs = [_domain_pv(known[p.uuid], vg, p.uuid) for p in vg.pvs if p.uuid in known]
                return domain_info(vg, pvs)
        raise StorageDomainDoesNotExistError(
            f"storage domain {domain_id} is not on any LUN this host sees",
            domainID=domain_id)

    def volume(self, pdiv: Pdiv) -> VolumeInfo:
        """The volume a PDIV names, checked: it exists in that domain, image and pool."""
        pdiv = Pdiv.of(pdiv)
        domain = self.domain(pdiv.domain_id)
        volume = domain.volume(pdiv.volume_id)
        if volume is None:
            elsewhere = self._cached_domain_of_volume(pdiv.volume_id, pdiv.domain_id)
            hint = f" (it is in storage domain {elsewhere})" if elsewhere else ""
            raise VolumeDoesNotExistError(
                f"volume {pdiv.volume_id} is not in storage domain {pdiv.domain_id}{hint}",
                **pdiv.to_dict(), **({"actualDomainID": elsewhere} if elsewhere else {}))
        for what, wanted, actual in (("image", pdiv.image_id, volume.image_id),
                                     ("pool", pdiv.pool_id, volume.pool_id)):
            if wanted != actual:
                raise VolumeDoesNotExistError(
                    f"volume {pdiv.volume_id} of storage domain {pdiv.domain_id} belongs to "
                    f"{what} {actual or '(none)'}, not {wanted}", **pdiv.to_dict())
        return volume

    def _cached_domain_of_volume(self, volume_id: str, not_domain: str) -> str:
        """Which other domain holds ``volume_id``, from the cached listing (no I/O)."""
        with contextlib.suppress(StorageDomainAccessError):
            for domain_id, entries in self._domain_entries(self._entries(False)).items():
                for entry in entries:
                    vg = entry.usage.pv.vg if entry.usage and entry.usage.pv else None
                    if domain_id != not_domain and vg and any(lv.name == volume_id
                                                              for lv in vg.lvs):
                        return domain_id
        return ""

    def read_volume(self, volume: VolumeInfo, offset: int, length: int) -> bytes:
        """Bytes of a volume (over the initiator)."""
        extent, device = self._located(volume)
        length = max(0, min(length, extent.size - offset))
        return self.read(device, extent.offset + offset, length)

    def _located(self, volume: VolumeInfo) -> tuple[Extent, Device]:
        if volume.extent is None:
            raise ImagePathError(f"volume {volume.volume_id} is not one contiguous range of one "
                                 "LUN; it can only be used through LV activation",
                                 volumeID=volume.volume_id)
        for entry in self._entries(False):
            if entry.device.guid == volume.extent.guid:
                return volume.extent, entry.device
        raise InaccessiblePhysDevError(f"LUN {volume.extent.guid} of volume "
                                       f"{volume.volume_id} is not visible on this host",
                                       guid=volume.extent.guid)

    def cached_domain_ids(self) -> list[str]:
        """The domains the device list last showed (no I/O when it is cached)."""
        return sorted(self._domain_entries(self._entries(False)))

    def devices_of_domain(self, domain_id: str) -> list[Device]:
        """The LUNs of a domain, from the device list (no I/O when it is cached)."""
        return [e.device for e in self._domain_entries(self._entries(False)).get(domain_id, [])]

    def device_of(self, guid: str) -> Device:
        """The device (with its paths) of a LUN this host sees."""
        for entry in self._entries(False):
            if entry.device.guid == guid:
                return entry.device
        raise InaccessiblePhysDevError(f"LUN {guid} is not visible on this host", guid=guid)

    # -- changing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lvm(self, devices: Sequence[Device]) -> Iterator[Lvm]:
        """LVM restricted to local devices of ``devices`` for the ``with`` block."""
        with contextlib.ExitStack() as stack:
            paths = []
            for device in devices:
                try:
                    local = stack.enter_context(self.lun_devices.attached(device, block=True))
                except LunDeviceError as exc:
                    raise InaccessiblePhysDevError(str(exc), guid=device.guid) from None
                paths.append(local.block_device)
            yield Lvm(tuple(paths), dm=self.dm, udev=self.udev)

    def _refresh_cache(self, guids: Sequence[str]) -> None:
        """Re-probe LUNs whose LVM metadata we changed, so the device list shows it at once."""
        try:
            self.devices.listing(guids=frozenset(guids), check_status=True, refresh=True)
        except InitiatorError as exc:
            log.warning("refreshing the device list after an LVM change failed: %s", exc)

    def create(self, domain_id: str, guid: str, name: str = "") -> DomainInfo:
        """A new domain on a free LUN: PV, then VG named ``domain_id`` tagged as a domain.

        Refuses a LUN that is not free (any signature at all, or one whose status cannot be
        told) and a domain UUID that already exists on any LUN this host sees.
        """
        domain_id = canonical_uuid(domain_id, "domainID")
        if not DOMAIN_NAME.match(name):
            raise InvalidParameterError(f"domain name {name!r}: up to 64 of A-Z a-z 0-9 _ . + -")
        entries = self._entries(refresh=True)
        existing = self._domain_entries(entries).get(domain_id)
        if existing:
            raise StorageDomainAlreadyExistsError(
                f"storage domain {domain_id} already exists on LUN "
                f"{existing[0].device.guid}", domainID=domain_id)
        entry = next((e for e in entries if e.device.guid == guid), None)
        if entry is None:
            raise InaccessiblePhysDevError(f"LUN {guid} is not visible on this host", guid=guid)
        usage = entry.usage
        if usage is None:
            raise PhysDevInitializationError(f"LUN {guid}: cannot tell whether it is free "
                                             "(its first bytes could not be read)", guid=guid)
        if usage.status != "free":
            other = domain_of(usage.vg_name, usage.vg_tags)
            if other:
                raise VolumeGroupHasDomainTagError(
                    f"LUN {guid} is not free: it holds storage domain {other}",
                    guid=guid, storageDomainID=other)
            raise PhysDevInitializationError(
                f"LUN {guid} is not free: {usage.reason}: {usage.detail}", guid=guid,
                usedReason=usage.reason or "")
        tags = [DOMAIN_TAG] + ([TAG_NAME + name] if name else [])
        with self._lvm([entry.device]) as lvm:
            device = lvm.devices[0]
            try:
                lvm.pvcreate(device)
            except LvmError as exc:
                raise PhysDevInitializationError(f"pvcreate on LUN {guid} failed: {exc}",
                                                 guid=guid) from None
            try:
                lvm.vgcreate(domain_id, [device], extent_size=EXTENT_SIZE, tags=tags)
            except LvmError as exc:
                with contextlib.suppress(LvmError):
                    lvm.pvremove(device)
                raise StorageDomainCreationError(f"vgcreate on LUN {guid} failed: {exc}",
                                                 domainID=domain_id, guid=guid) from None
        self._refresh_cache([guid])
        log.info("storage domain %s created on LUN %s", domain_id, guid)
        return self.domain(domain_id)

    def remove(self, domain_id: str, *, force: bool = False) -> DomainInfo:
        """Remove a domain: VG (with its volumes when ``force``), then the PV labels, so its
        LUNs are free again. The caller makes sure no volume is in use."""
        domain = self.domain(domain_id)
        if domain.volumes and not force:
            raise StorageDomainNotEmptyError(
                f"storage domain {domain.domain_id} still has {len(domain.volumes)} volume(s); "
                "remove them first or pass force", domainID=domain.domain_id,
                volumes=[v.volume_id for v in domain.volumes])
        devices = [p.device for p in domain.pvs if p.device is not None]
        with self._lvm(devices) as lvm:
            try:
                lvm.vgremove(domain.domain_id)
                for path in lvm.devices:
                    lvm.pvremove(path)
            except LvmError as exc:
                raise VolumeGroupRemoveError(f"removing storage domain {domain.domain_id} "
                                             f"failed: {exc}", domainID=domain.domain_id) from None
        self._refresh_cache([p.guid for p in domain.pvs])
        log.info("storage domain %s removed", domain.domain_id)
        return domain

    def create_volume(self, pdiv: Pdiv, size: int, vtype: str) -> VolumeInfo:
        """A new volume: an LV of ``size`` bytes (rounded up to whole extents), contiguous,
        tagged with its image, pool, type and state ``EMPTY``."""
        pdiv = Pdiv.of(pdiv)
        if vtype not in VOLUME_TYPES:
            raise InvalidParameterError(f"volume type must be ISO or DATA, not {vtype!r}")
        if size <= 0:
            raise InvalidParameterError(f"volume size must be positive, not {size}")
        domain = self.domain(pdiv.domain_id)
        if domain.volume(pdiv.volume_id) is not None:
            raise VolumeAlreadyExistsError(f"volume {pdiv.volume_id} already exists in storage "
                                           f"domain {pdiv.domain_id}", **pdiv.to_dict())
        if round_up(size, domain.extent_size) > domain.free:
            raise NoSpaceLeftOnDomainError(
                f"no space left on storage domain {pdiv.domain_id}: {size} bytes asked, "
                f"{domain.free} free", domainID=pdiv.domain_id)
        tags = [TAG_POOL + pdiv.pool_id, TAG_IMAGE + pdiv.image_id, TAG_TYPE + vtype,
                TAG_STATE + "EMPTY"]
        devices = [p.device for p in domain.pvs if p.device is not None]
        with self._lvm(devices) as lvm:
            try:
                lvm.lvcreate(pdiv.domain_id, pdiv.volume_id, size, tags=tags)
            except LvmError as exc:
                raise VolumeCreationError(f"lvcreate of volume {pdiv.volume_id} failed: {exc}",
                                          **pdiv.to_dict()) from None
        log.info("volume %s created (%d bytes, %s)", pdiv, size, vtype)
        return self.volume(pdiv)

    def remove_volume(self, pdiv: Pdiv) -> VolumeInfo:
        """Remove a volume's LV. The caller makes sure it is not in use."""
        volume = self.volume(pdiv)
        domain = self.domain(volume.domain_id)
        devices = [p.device for p in domain.pvs if p.device is not None]
        with self._lvm(devices) as lvm:
            try:
                lvm.lvremove(volume.domain_id, volume.volume_id)
            except LvmError as exc:
                raise CannotDeleteVolumeError(f"lvremove of volume {volume.volume_id} failed: "
                                              f"{exc}", **volume.pdiv.to_dict()) from None
        log.info("volume %s removed", volume.pdiv)
        return volume

    def write(self, pdiv: Pdiv, offset: int, data: bytes) -> VolumeInfo:
        """Write ``data`` at ``offset`` of a volume that is not READY yet (an upload)."""
        volume = self.volume(pdiv)
        if volume.state == "READY":
            raise VolumeNonWritableError(f"volume {volume.volume_id} is READY (verified): it "
                                         "cannot change any more; remove and re-create it",
                                         **volume.pdiv.to_dict())
        if offset < 0 or offset + len(data) > volume.size:
            raise InvalidParameterError(f"writing {len(data)} bytes at {offset} goes past the end "
                                        f"of volume {volume.volume_id} ({volume.size} bytes)")
        if len(data) > MAX_WRITE:
            raise InvalidParameterError(f"write at most {MAX_WRITE} bytes at once")
        extent, device = self._located(volume)
        try:
            if self._write_direct(device, extent.offset + offset, data):
                return volume
            with self.lun_devices.attached(device, block=False) as local:
                _pwrite_all(local.path, extent.offset + offset, data)
        except (LunDeviceError, OSError, InitiatorError) as exc:
            raise MiscBlockWriteError(f"writing {len(data)} bytes at {offset} of volume "
                                      f"{volume.volume_id} failed: {exc}",
                                      **volume.pdiv.to_dict()) from None
        return volume

    def _write_direct(self, device: Device, offset: int, data: bytes) -> bool:
        """Write through the initiator's own session when it has one (user space: WRITE(16),
        no local device to make, which costs far more than the write); a range that does not
        start or end on a block boundary is completed from the LUN's bytes first."""
        block = device.logical_block_size or 512
        start = offset - offset % block
        end = -(-(offset + len(data)) // block) * block
        if (start, end) != (offset, offset + len(data)):
            head = self.read(device, start, block) if start < offset else b""
            tail_at = end - block
            tail = self.read(device, tail_at, block) if end > offset + len(data) else b""
            buffer = bytearray(end - start)
            if head:
                buffer[:block] = head
            if tail:
                buffer[tail_at - start:] = tail
            buffer[offset - start:offset - start + len(data)] = data
            data, offset = bytes(buffer), start
        return self.initiator.write(device, offset, data, timeout=self.timeout)

    def verify(self, pdiv: Pdiv, size: int, sha256: str) -> VolumeInfo:
        """Check the first ``size`` bytes of a volume against ``sha256`` (read back over the
        initiator, not through the path that wrote them); an ISO volume must also hold an
        ISO 9660 image. On success the volume becomes READY with size and checksum in its tags.
        """
        volume = self.volume(pdiv)
        wanted = sha256.lower()
        if not re.fullmatch(r"[0-9a-f]{64}", wanted):
            raise InvalidParameterError(f"sha256 must be 64 hex digits, not {sha256!r}")
        if not 0 < size <= volume.size:
            raise InvalidParameterError(f"size {size} must be between 1 and the volume's "
                                        f"{volume.size} bytes")
        extent, device = self._located(volume)
        digest = hashlib.sha256()
        first = b""
        for start in range(0, size, READ_CHUNK):
            chunk = self.read(device, extent.offset + start, min(READ_CHUNK, size - start))
            if start == 0:
                first = chunk
            digest.update(chunk)
        actual = digest.hexdigest()
        if actual != wanted:
            raise ImageVerificationError(
                f"volume {volume.volume_id}: sha256 of its first {size} bytes is {actual}, "
                f"not {wanted}", **volume.pdiv.to_dict(), expected=wanted, actual=actual)
        if volume.type == "ISO" and not is_iso9660(first):
            raise IncorrectFormatError(f"volume {volume.volume_id} is of type ISO but holds no "
                                       "ISO 9660 image (no CD001 at byte 32769)",
                                       **volume.pdiv.to_dict())
        old = [t for t in volume.tags if t.startswith((TAG_STATE, TAG_SIZE, TAG_SHA256))]
        new = [TAG_STATE + "READY", TAG_SIZE + str(size), TAG_SHA256 + actual]
        domain = self.domain(volume.domain_id)
        devices = [p.device for p in domain.pvs if p.device is not None]
        with self._lvm(devices) as lvm:
            try:
                lvm.lvchange_tags(volume.domain_id, volume.volume_id, add=new,
                                  delete=[t for t in old if t not in new])
            except LvmError as exc:
                raise LogicalVolumeReplaceTagError(f"marking volume {volume.volume_id} READY "
                                                   f"failed: {exc}", **volume.pdiv.to_dict()
                                                   ) from None
        log.info("volume %s verified: %d bytes, sha256 %s", volume.pdiv, size, actual)
        return self.volume(volume.pdiv)


def _domain_pv(entry: DeviceEntry, vg: VgMetadata, pv_uuid: str) -> DomainPv:
    listed = vg.pv(pv_uuid)
    return DomainPv(guid=entry.device.guid, pv_uuid=pv_uuid,
                    pe_start=listed.pe_start if listed else 0,
                    pe_count=listed.pe_count if listed else 0, device=entry.device)


def _pwrite_all(path: str, offset: int, data: bytes,
                opener: Callable[[str, int], int] = os.open) -> None:
    """Write all of ``data`` at ``offset`` of ``path`` and make it durable (fsync)."""
    fd = opener(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            written = os.pwrite(fd, view[done:], offset + done)
            if written <= 0:
                raise OSError(f"short write at {offset + done}")
            done += written
        os.fsync(fd)
    finally:
        os.close(fd)
