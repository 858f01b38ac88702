"""Which device name the guest gave each VM disk: normalise serials, merge the guest's reports.

Two sources tell us, for each guest disk, its device name and serial: qemu-guest-agent
(``guest-get-disks``, or libvirt's ``guestInfo`` disks, which adds the libvirt target each guest
disk belongs to) and our own guest agent (a ``disks-usage`` mapping). The serial a guest reports
is not the one we gave:

* virtio: ``S``, cut to 20 bytes (the virtio-blk ID field);
* SCSI (and the SATA/IDE equivalents): udev's ``0QEMU_QEMU_HARDDISK_S`` / ``QEMU_HARDDISK_S``,
  or the bare VPD 0x80 serial ``S`` (cut to 36 bytes by QEMU);
* a passthrough LUN has no serial of ours at all: the guest sees the array's WWID, as
  ``3<NAA hex>`` (udev's ID_SERIAL, equal to the LUN's GUID) or ``wwn-0x<NAA hex>``;
* libvirt passes a space in ``<serial>`` to QEMU as ``\\ ``, and udev turns characters outside
  its safe set into ``_`` (``a b`` arrives as ``a\\ b``, ``a_ b`` or ``a__b``).

:func:`guest_identity` and :func:`disk_identities` bring both sides to one canonical form.

**Precedence when the sources disagree: the fresher report wins** (qemu-ga on a tie), device by
device, rather than vdsm's "qemu-ga always overrides". qemu-ga is polled (on a period, or when
we ask after a hot-plug) while our agent pushes within a fraction of a second of a change, so
either may be the stale one; vdsm's fixed order let a stale qemu-ga answer hide a fresh one.
Each report is a complete snapshot, so an older report may only add what the fresher ones do
not contradict: another identity of a device the fresher one also names (our bare VPD 0x80
serial, libvirt's target), or a device it could not have named (one without any serial). An
older device is left out when a fresher report gives its name to a disk with other serials
(the name was reused after an unplug), gives one of its identities another name (the disk came
back under a new name), or lists serial disks without it (it was unplugged).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

QEMU_GA = "qemu-ga"
VIRTYARD_GA = "virtyard-ga"

VIRTIO_SERIAL_BYTES = 20  # VIRTIO_BLK_ID_BYTES
ATA_SERIAL_BYTES = 20  # IDENTIFY DEVICE words 10-19
SCSI_UNIT_SERIAL_BYTES = 36  # QEMU's MAX_SERIAL_LEN for VPD page 0x80
_TRUNCATION = {"virtio": (VIRTIO_SERIAL_BYTES,), "sata": (ATA_SERIAL_BYTES,),
               "ide": (ATA_SERIAL_BYTES,), "scsi": (SCSI_UNIT_SERIAL_BYTES,)}

_UNSAFE = re.compile(r"[^A-Za-z0-9#+\-.:=@]")  # udev's safe set, less "_" which they become
_QEMU_MODEL_PREFIX = re.compile(
    r"(?:[0S]QEMU_QEMU_(?:HARDDISK|CD-ROM)|QEMU_(?:HARDDISK|DVD-ROM))_(.+)")
_WWN = re.compile(r"wwn-0x([0-9A-Fa-f]{16}|[0-9A-Fa-f]{32})")
_WWID = re.compile(r"[23][0-9A-Fa-f]{16,32}")
_TARGET = "target:"


def canonical(text: str) -> str:
    """A serial as udev would write it (unsafe characters ``_``), WWIDs in lower case."""
    out = _UNSAFE.sub("_", text.strip())
    return out.lower() if _WWID.fullmatch(out) else out


def guest_identity(serial: str) -> str:
    """The canonical identity behind a serial reported by the guest.

    ``0QEMU_QEMU_HARDDISK_S`` (and QEMU's other model prefixes) give ``S``; ``wwn-0x<hex>``
    gives ``3<hex>``, the WWID udev and our GUIDs use; anything else is itself.
    """
    text = serial.strip()
    wwn = _WWN.fullmatch(text)
    if wwn:
        return "3" + wwn.group(1).lower()
    prefixed = _QEMU_MODEL_PREFIX.fullmatch(text)
    return canonical(prefixed.group(1) if prefixed else text)


@dataclass(frozen=True)
class VmDisk:
    """What the host knows of one VM disk. ``key`` is the caller's name for it."""

    key: str
    device: str = "disk"  # disk | lun | cdrom
    iface: str = "virtio"  # virtio | scsi | sata | ide
    serial: str | None = None
    guid: str | None = None  # a LUN's WWID (passthrough, or a LUN used as a plain disk)
    target: str | None = None  # libvirt target dev ("sdb"): libvirt's guestInfo names it
    alias: str | None = None  # libvirt device alias: QEMU's SCSI device id without a serial

    @classmethod
    def from_device(cls, raw: Mapping[str, Any], key: str | None = None) -> VmDisk:
        """From a disk device dict (``device``, ``iface``, ``serial``, ``GUID``, ``name``,
        ``alias``); the key defaults to the target name."""
        def text(name: str) -> str | None:
            value = raw.get(name)
            return value if isinstance(value, str) and value else None

        target = text("name")
        return cls(key=key or target or "", device=text("device") or "disk",
                   iface=text("iface") or "virtio", serial=text("serial"), guid=text("GUID"),
                   target=target, alias=text("alias"))


def _serial_forms(serial: str) -> list[str]:
    """The given serial as it may reach the guest: as is, with libvirt's ``\\ `` for each
    space, and with whitespace runs squeezed (udev's scsi_id)."""
    forms = [serial, serial.replace(" ", "\\ "), " ".join(serial.split())]
    return list(dict.fromkeys(forms))


def disk_identities(disk: VmDisk) -> tuple[list[str], list[str], list[str]]:
    """Canonical identities a guest may report for ``disk``: exact ones, truncated ones (only
    trusted when unambiguous), and libvirt's target (the last resort)."""
    exact: list[str] = []
    truncated: list[str] = []
    if disk.guid:
        exact.append(guest_identity(disk.guid))
    if disk.serial:
        for form in _serial_forms(disk.serial):
            exact.append(canonical(form))
            for limit in _TRUNCATION.get(disk.iface, ()):
                if len(form.encode()) > limit:
                    cut = form.encode()[:limit].decode(errors="ignore")
                    truncated.append(canonical(cut))
    elif disk.alias and disk.iface == "scsi":
        exact.append(canonical(f"drive-{disk.alias}"))  # QEMU's default SCSI device id
    targets = [_TARGET + disk.target] if disk.target else []
    exact = list(dict.fromkeys(exact))
    truncated = [t for t in dict.fromkeys(truncated) if t not in exact]
    return exact, truncated, targets


@dataclass(frozen=True)
class GuestReport:
    """One answer of one source: ``{guest serial: device name}`` and when it arrived.

    ``targets`` (from libvirt's ``guestInfo``) is ``{device name: libvirt target dev}``;
    ``names`` lists devices the source saw without a serial (they may still have a target).
    """

    source: str
    serials: Mapping[str, str]
    received: float  # time.monotonic()
    targets: Mapping[str, str] = field(default_factory=dict)
    names: tuple[str, ...] = ()

    @classmethod
    def from_guest_get_disks(cls, disks: Iterable[Any], received: float) -> GuestReport:
        """From qemu-ga's ``guest-get-disks`` answer (serial under ``address``)."""
        serials: dict[str, str] = {}
        names: list[str] = []
        for disk in disks:
            if not isinstance(disk, dict) or disk.get("partition"):
                continue
            name = disk.get("name")
            if not isinstance(name, str):
                continue
            names.append(name)
            address = disk.get("address")
            serial = address.get("serial") if isinstance(address, dict) else None
            if isinstance(serial, str) and serial:
                serials[serial] = name
        return cls(QEMU_GA, serials, received, names=tuple(names))

    @classmethod
    def from_guest_info(cls, params: Mapping[str, Any], received: float) -> GuestReport:
        """From libvirt's ``guestInfo(VIR_DOMAIN_GUEST_INFO_DISKS)`` typed parameters."""
        serials: dict[str, str] = {}
        targets: dict[str, str] = {}
        names: list[str] = []
        count = params.get("disk.count")
        for index in range(count if isinstance(count, int) else 0):
            name = params.get(f"disk.{index}.name")
            if not isinstance(name, str) or params.get(f"disk.{index}.partition"):
                continue
            names.append(name)
            serial = params.get(f"disk.{index}.serial")
            if isinstance(serial, str) and serial:
                serials[serial] = name
            alias = params.get(f"disk.{index}.alias")
            if isinstance(alias, str) and alias:
                targets[name] = alias
        return cls(QEMU_GA, serials, received, targets, tuple(names))

    @classmethod
    def from_agent_mapping(cls, mapping: Mapping[str, Mapping[str, str]],
                           received: float) -> GuestReport:
        """From our agent's validated ``disks-usage`` mapping ``{serial: {"name": …}}``."""
        return cls(VIRTYARD_GA, {serial: value["name"] for serial, value in mapping.items()},
                   received)


@dataclass
class _Device:
    serials: set[str] = field(default_factory=set)  # canonical identities from serials
    targets: set[str] = field(default_factory=set)
    raw: dict[str, str] = field(default_factory=dict)  # reported serial -> name

    def compatible(self, other: _Device) -> bool:
        """Two descriptions of one name agree unless they name it by different serials or
        different targets."""
        if self.serials and other.serials and not self.serials & other.serials:
            return False
        return not (self.targets and other.targets and not self.targets & other.targets)


def _devices(report: GuestReport) -> dict[str, _Device]:
    devices: dict[str, _Device] = {}
    for name in report.names:
        devices.setdefault(name, _Device())
    for serial, name in report.serials.items():
        device = devices.setdefault(name, _Device())
        device.serials.add(guest_identity(serial))
        device.raw[serial] = name
    for name, target in report.targets.items():
        devices.setdefault(name, _Device()).targets.add(_TARGET + target)
    return devices


@dataclass(frozen=True)
class DiskMapping:
    """The outcome: every disk's guest name ("" until known) and the merged report."""

    names: dict[str, str]  # {disk key: "/dev/…" or ""}
    guest_disk_mapping: dict[str, dict[str, str]]  # {guest serial: {"name": …}}, as reported
    sources: dict[str, str]  # {disk key: source whose report named it}
    conflicts: tuple[str, ...]  # what was left out and why, for a log line


def merge_reports(reports: Iterable[GuestReport | None]
                  ) -> tuple[dict[str, _Device], dict[str, str], list[str]]:
    """Merge reports, fresher first: devices by name, their sources, and what was left out."""
    ordered = sorted((r for r in reports if r is not None),
                     key=lambda r: (-r.received, r.source != QEMU_GA))
    merged: dict[str, _Device] = {}
    source_of: dict[str, str] = {}
    owner: dict[str, str] = {}  # identity -> name
    conflicts: list[str] = []
    for rank, report in enumerate(ordered):
        for name, device in sorted(_devices(report).items()):
            existing = merged.get(name)
            identities = device.serials | device.targets
            if existing is None and rank > 0 and device.serials:
                conflicts.append(f"{report.source}: {name} {sorted(device.raw)} is in no "
                                 "fresher report (unplugged?)")
                continue
            if existing is not None and not existing.compatible(device):
                conflicts.append(f"{report.source}: {name} {sorted(device.raw)} is another "
                                 f"disk in a fresher report {sorted(existing.raw)}")
                continue
            moved = sorted(i for i in identities if owner.get(i, name) != name)
            if moved:
                conflicts.append(f"{report.source}: {moved[0]} is {owner[moved[0]]} in a "
                                 f"fresher report, not {name}")
                continue
            target = merged.setdefault(name, _Device())
            source_of.setdefault(name, report.source)
            target.serials |= device.serials
            target.targets |= device.targets
            for serial, value in device.raw.items():
                target.raw.setdefault(serial, value)
            for identity in identities:
                owner[identity] = name
    return merged, source_of, conflicts


def map_disks(disks: Sequence[VmDisk], reports: Iterable[GuestReport | None]) -> DiskMapping:
    """Name every disk from the reports (``None`` for a source that never answered).

    A disk is matched by its exact identities first (serial forms, GUID, QEMU's default SCSI
    device id), then by truncated serials, then by libvirt's target; an identity two disks
    share at one level is not used for either. A name goes to one disk only.
    """
    merged, source_of, conflicts = merge_reports(reports)
    owner = {identity: name for name, device in merged.items()
             for identity in device.serials | device.targets}
    names = {disk.key: "" for disk in disks}
    sources: dict[str, str] = {}
    taken: set[str] = set()
    levels = [disk_identities(disk) for disk in disks]
    for level in range(3):
        claims: dict[str, list[str]] = {}
        for disk, identities in zip(disks, levels, strict=True):
            if names[disk.key]:
                continue
            for identity in identities[level]:
                claims.setdefault(identity, [])
                if disk.key not in claims[identity]:
                    claims[identity].append(disk.key)
        for disk, identities in zip(disks, levels, strict=True):
            if names[disk.key]:
                continue
            for identity in identities[level]:
                name = owner.get(identity)
                if name is None or name in taken:
                    continue
                if len(claims[identity]) > 1:
                    conflicts.append(f"{identity} fits disks {claims[identity]}; used for none")
                    continue
                names[disk.key] = name
                sources[disk.key] = source_of.get(name, "")
                taken.add(name)
                break
    guest_disk_mapping = {serial: {"name": name} for device in merged.values()
                          for serial, name in sorted(device.raw.items())}
    return DiskMapping(names, dict(sorted(guest_disk_mapping.items())), sources,
                       tuple(conflicts))
