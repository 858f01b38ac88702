"""libvirt domain XML as small objects that format and parse (lxml).

The host agent turns the engine's device dicts into :class:`DiskDevice` objects
(:mod:`virtyard.host.virt.device_specs`; every rule fails with :class:`DeviceSpecError`),
resolves each disk's storage to a :class:`Source` elsewhere (a SAN LUN is :class:`BlockSource`
``/dev/mapper/<GUID>`` with the kernel initiator, :class:`IscsiSource` with the user-space one),
and formats a
:class:`Domain` (``VM.create``) or one disk (hot-plug, changeCD). :meth:`Domain.from_xml` parses
libvirt's live XML back — addresses, aliases and our metadata included — so a VM keeps its device
addresses across restarts and migration.

Choices worth knowing:

* A ``device='lun'`` (SCSI passthrough) disk with a ``serial`` is rejected, not silently
  stripped: libvirt refuses ``<serial>`` there and the guest sees the array's own WWID/serial, so
  a caller that expects its serial in the guest must learn now, not at guest disk mapping.
* ``sgio='unfiltered'`` is rejected (``sgio_unfiltered_unsupported``): libvirt 9.0 refuses it
  ("unfiltered sgio is no longer supported"); only ``'filtered'`` (libvirt's default) is kept.
* CD-ROMs are always read-only, and their ``<driver>`` carries neither ``cache`` nor ``io``:
  libvirt's ``updateDeviceFlags`` refuses to change those fields, so a CD-ROM keeps one driver
  shape whether it is empty or holds a file, block or network volume.
* ``optional`` (``startupPolicy='optional'``) lives on ``<source>`` and libvirt accepts it only on
  file and block sources: it is left out for network sources and empty trays, so it reads back as
  ``False`` there.
* ``diskId`` becomes the user alias ``ua-<diskId>`` and is read back from it; any other live alias
  (``scsi0-0-0-1``) is kept in ``alias`` (libvirt ignores non-``ua-`` aliases on define).
* GUID, PDIV and diskId live in our metadata (:mod:`virtyard.host.virt.metadata`), keyed by target
  name; :class:`Domain` keeps its metadata in step with its disks.
"""

from __future__ import annotations

import dataclasses
import re
import uuid as uuid_mod
from dataclasses import dataclass, field
from typing import Literal

from lxml import etree

from virtyard.host.storage.pdiv import Pdiv
from virtyard.host.virt.disk_sources import (
    BlockSource,
    DeviceSpecError,
    DomainXmlError,
    FileSource,
    Source,
    int_attr,
    parse_source,
    sub_element,
)
from virtyard.host.virt.metadata import (
    DeviceMetadata,
    VmMetadata,
    find_metadata,
    parse_xml,
    put_metadata,
)

DeviceKind = Literal["disk", "lun", "cdrom"]
Iface = Literal["virtio", "scsi", "ide", "sata"]
DiskFormat = Literal["raw", "cow"]
PropagateErrors = Literal["on", "off", "report"]
Shared = Literal["shared", "exclusive", "none"]
Sgio = Literal["filtered"]

DEVICES: tuple[DeviceKind, ...] = ("disk", "lun", "cdrom")
IFACES: tuple[Iface, ...] = ("virtio", "scsi", "ide", "sata")
DRIVE_PREFIXES: dict[str, str] = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd"}
QEMU_GA_CHANNEL = "org.qemu.guest_agent.0"
VIRTYARD_GA_CHANNEL = "org.virtyard.guest_agent.0"
DEFAULT_EMULATOR = "/usr/bin/qemu-system-x86_64"
USER_ALIAS_PREFIX = "ua-"

_ERROR_POLICIES: dict[str, tuple[str, str]] = {
    # propagateErrors -> (error_policy, rerror_policy), as vdsm maps it. enospace pauses only on
    # ENOSPC writes (thin volumes being extended); QEMU cannot apply it to reads.
    "on": ("enospace", "report"), "report": ("report", "report"), "off": ("stop", "stop")}
_PROPAGATE_FROM_POLICY = {policy: key for key, (policy, _) in _ERROR_POLICIES.items()}
_FORMAT_TO_DRIVER = {"raw": "raw", "cow": "qcow2"}
_FORMAT_FROM_DRIVER = {v: k for k, v in _FORMAT_TO_DRIVER.items()}
_GUID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_ALIAS_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LIFECYCLE_ACTIONS = ("destroy", "restart", "preserve", "rename-restart", "coredump-destroy",
                      "coredump-restart")
_MEMORY_UNITS = {"b": 1, "bytes": 1, "KB": 10**3, "k": 2**10, "KiB": 2**10, "MB": 10**6,
                 "M": 2**20, "MiB": 2**20, "GB": 10**9, "G": 2**30, "GiB": 2**30,
                 "TB": 10**12, "T": 2**40, "TiB": 2**40}


# -- target device names ------------------------------------------------------------------------

def drive_name(iface: str, index: int) -> str:
    """The target device name vdsm's ``drivename.make`` gives: ``("scsi", 26) -> "sdaa"``."""
    prefix = DRIVE_PREFIXES.get(iface)
    if prefix is None:
        raise DeviceSpecError("unknown_iface", f"iface must be one of {IFACES}, not {iface!r}",
                              key="iface")
    if isinstance(index, bool) or not isinstance(index, int):
        raise DeviceSpecError("invalid_index", f"index must be an int, not {index!r}",
                              key="index")
    if index < 0:
        raise DeviceSpecError("negative_index", f"index must be >= 0, not {index}", key="index")
    letters = ""
    num = index
    while num >= 0:
        letters = chr(ord("a") + num % 26) + letters
        num = num // 26 - 1
    return prefix + letters


def parse_drive_name(name: str) -> tuple[str, int]:
    """``"sdaa" -> ("sd", 26)``: the prefix (vd, sd, hd) and the index, the inverse of
    :func:`drive_name` (``sd`` is both scsi and sata: the bus tells them apart)."""
    match = re.fullmatch(r"(vd|sd|hd)([a-z]+)", name)
    if match is None:
        raise DeviceSpecError("invalid_drive_name", f"not a vd/sd/hd drive name: {name!r}",
                              key="name")
    index = 0
    for char in match.group(2):
        index = index * 26 + (ord(char) - ord("a") + 1)
    return match.group(1), index - 1


# -- disks --------------------------------------------------------------------------------------

def _spec(reason: str, message: str, key: str) -> DeviceSpecError:
    return DeviceSpecError(reason, message, key=key)


def _check_address(address: dict[str, str] | None, iface: str) -> None:
    if address is None:
        return
    if not isinstance(address, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in address.items()) \
            or "type" not in address:
        raise _spec("invalid_address", "address must be a dict of strings with a 'type', "
                    f"not {address!r}", "address")
    wanted = "pci" if iface == "virtio" else "drive"
    if address["type"] != wanted:
        raise _spec("address_type", f"a {iface} disk needs a {wanted!r} address, "
                    f"not {address['type']!r}", "address")


@dataclass(frozen=True)
class DiskDevice:
    """One disk of a VM as the engine describes it (no host paths: see :class:`Source`).

    The structural rules hold for every instance; a disk dict must also say what its storage is
    (a LUN's ``GUID``, a disk's ``GUID`` or ``PDIV``: :mod:`~virtyard.host.virt.device_specs`),
    which a disk parsed from foreign XML may not know.
    """

    device: DeviceKind
    iface: Iface
    index: int
    guid: str | None = None
    pdiv: Pdiv | None = None
    address: dict[str, str] | None = None
    format: DiskFormat = "raw"
    boot_order: int | None = None
    propagate_errors: PropagateErrors | None = None
    shared: Shared = "none"
    optional: bool = False
    readonly: bool = False
    serial: str | None = None
    disk_id: str | None = None
    sgio: Sgio | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise _spec("unknown_device", f"device must be one of {DEVICES}, "
                        f"not {self.device!r}", "device")
        drive_name(self.iface, self.index)  # unknown_iface, invalid_index, negative_index
        if self.device == "lun" and self.iface != "scsi":
            raise _spec("lun_needs_scsi", f"a passthrough LUN needs iface 'scsi', "
                        f"not {self.iface!r}", "iface")
        if self.device == "cdrom" and self.iface == "virtio":
            raise _spec("cdrom_on_virtio", "virtio disks have no removable media", "iface")
        if self.format not in _FORMAT_TO_DRIVER:
            raise _spec("unknown_format", f"format must be raw or cow, not {self.format!r}",
                        "format")
        if self.format != "raw" and self.device != "disk":
            raise _spec(f"{self.device}_format", f"a {self.device} must be raw, "
                        f"not {self.format!r}", "format")
        if self.serial is not None and self.device == "lun":
            raise _spec("serial_on_passthrough", "a passthrough LUN cannot have a serial: the "
                        "guest sees the array's own", "serial")
        if self.serial is not None and not isinstance(self.serial, str):
            raise _spec("invalid_serial", f"serial must be a string, not {self.serial!r}",
                        "serial")
        if self.sgio == "unfiltered":  # type: ignore[comparison-overlap]
            raise _spec("sgio_unfiltered_unsupported", "libvirt 9.0 refuses sgio='unfiltered' "
                        "('unfiltered sgio is no longer supported')", "sgio")
        if self.sgio is not None and (self.device != "lun" or self.sgio != "filtered"):
            raise _spec("invalid_sgio", "sgio is 'filtered', on a LUN only, "
                        f"not {self.sgio!r} on a {self.device}", "sgio")
        if self.propagate_errors not in (None, *_ERROR_POLICIES):
            raise _spec("invalid_propagate_errors", "propagateErrors must be on, off or "
                        f"report, not {self.propagate_errors!r}", "propagateErrors")
        if self.shared not in ("shared", "exclusive", "none"):
            raise _spec("invalid_shared", f"shared must be shared, exclusive or none, "
                        f"not {self.shared!r}", "shared")
        if self.boot_order is not None and (isinstance(self.boot_order, bool)
                                            or not isinstance(self.boot_order, int)
                                            or self.boot_order < 1):
            raise _spec("invalid_boot_order", f"bootOrder must be an int >= 1, "
                        f"not {self.boot_order!r}", "bootOrder")
        if self.guid is not None and not _GUID_RE.match(self.guid):
            raise _spec("invalid_guid", f"not a LUN GUID: {self.guid!r}", "GUID")
        _check_address(self.address, self.iface)
        self._normalize_alias()
        if self.device == "cdrom":
            object.__setattr__(self, "readonly", True)

    def _normalize_alias(self) -> None:
        # diskId and the user alias are one fact: ``ua-<diskId>``.
        if self.disk_id is None and self.alias is not None \
                and self.alias.startswith(USER_ALIAS_PREFIX):
            object.__setattr__(self, "disk_id", self.alias[len(USER_ALIAS_PREFIX):])
        if self.disk_id is None:
            return
        if not isinstance(self.disk_id, str) or not _ALIAS_ID_RE.match(self.disk_id):
            raise _spec("invalid_disk_id", f"diskId must be letters, digits, '-', '_' or '.', "
                        f"not {self.disk_id!r}", "diskId")
        user_alias = USER_ALIAS_PREFIX + self.disk_id
        if self.alias not in (None, user_alias):
            raise _spec("alias_mismatch", f"alias {self.alias!r} is not the user alias "
                        f"{user_alias!r} of diskId", "alias")
        object.__setattr__(self, "alias", user_alias)

    @property
    def name(self) -> str:
        """The target device name, e.g. ``sda``."""
        return drive_name(self.iface, self.index)

    # -- libvirt XML ----------------------------------------------------------------------------

    def to_element(self, source: Source | None) -> etree._Element:
        """The ``<disk>`` element with ``source`` (``None``: an empty CD-ROM tray)."""
        if source is None and self.device != "cdrom":
            raise _spec("missing_source", f"a {self.device} needs a source; only a CD-ROM can "
                        "be empty", "source")
        if self.device == "lun" and isinstance(source, FileSource):
            raise _spec("lun_source", "a passthrough LUN needs a block or iSCSI source",
                        "source")
        disk = etree.Element("disk", type="file" if source is None else source.disk_type,
                             device=self.device)
        if self.sgio is not None:
            disk.set("sgio", self.sgio)
        driver = sub_element(disk, "driver", name="qemu", type=_FORMAT_TO_DRIVER[self.format])
        if self.device != "cdrom" and source is not None:
            driver.set("cache", "none")
            driver.set("io", "native" if isinstance(source, BlockSource) else "threads")
        if self.propagate_errors is not None:
            policy, rpolicy = _ERROR_POLICIES[self.propagate_errors]
            driver.set("error_policy", policy)
            driver.set("rerror_policy", rpolicy)
        if source is not None:
            disk.append(source.to_element(optional=self.optional))
        sub_element(disk, "target", dev=self.name, bus=self.iface)
        if self.readonly:
            sub_element(disk, "readonly")
        if self.shared == "shared":
            sub_element(disk, "shareable")
        if self.serial is not None:
            sub_element(disk, "serial", self.serial)
        if self.boot_order is not None:
            sub_element(disk, "boot", order=str(self.boot_order))
        if self.alias is not None:
            sub_element(disk, "alias", name=self.alias)
        if self.address is not None:
            sub_element(disk, "address", **self.address)
        return disk

    def to_xml(self, source: Source | None) -> str:
        """The ``<disk>`` XML for define, hot-plug or ``updateDeviceFlags``."""
        return etree.tostring(self.to_element(source), encoding="unicode", pretty_print=True)


@dataclass(frozen=True)
class DomainDisk:
    """A disk with its resolved source, as a domain holds it."""

    device: DiskDevice
    source: Source | None

    @property
    def name(self) -> str:
        return self.device.name

    def to_element(self) -> etree._Element:
        return self.device.to_element(self.source)

    def to_xml(self) -> str:
        return self.device.to_xml(self.source)

    @classmethod
    def from_element(cls, disk: etree._Element,
                     metadata: DeviceMetadata | None = None) -> DomainDisk:
        """A ``<disk>`` element (live or inactive) with our metadata of that device, if any."""
        meta = metadata or DeviceMetadata()
        device = disk.get("device", "disk")
        target = disk.find("target")
        if target is None or not target.get("dev"):
            raise DomainXmlError("invalid_xml", "a <disk> has no <target dev=…>")
        prefix, index = parse_drive_name(target.get("dev") or "")
        bus = target.get("bus") or {"vd": "virtio", "hd": "ide", "sd": "scsi"}[prefix]
        if bus not in IFACES or DRIVE_PREFIXES[bus] != prefix:
            raise DomainXmlError("unsupported_disk", f"disk {target.get('dev')!r} on bus "
                                 f"{bus!r}")
        source = parse_source(disk)
        driver = disk.find("driver")
        driver_type = "raw" if driver is None else driver.get("type", "raw")
        if driver_type not in _FORMAT_FROM_DRIVER:
            raise DomainXmlError("unsupported_disk", f"disk format {driver_type!r}")
        policy = None if driver is None else driver.get("error_policy")
        boot = disk.find("boot")
        serial = disk.find("serial")
        alias = disk.find("alias")
        address = disk.find("address")
        guid = meta.guid
        if guid is None and isinstance(source, BlockSource) \
                and source.path.startswith("/dev/mapper/"):
            guid = source.path.removeprefix("/dev/mapper/")
        shared = "shared" if disk.find("shareable") is not None else (meta.shared or "none")
        return cls(DiskDevice(
            device=device, iface=bus, index=index,  # type: ignore[arg-type]
            guid=guid, pdiv=meta.pdiv, address=None if address is None else dict(address.attrib),
            format=_FORMAT_FROM_DRIVER[driver_type],  # type: ignore[arg-type]
            boot_order=None if boot is None else int_attr(boot, "order"),
            propagate_errors=_PROPAGATE_FROM_POLICY.get(policy or ""),  # type: ignore[arg-type]
            shared=shared,
            optional=disk.find("source[@startupPolicy='optional']") is not None,
            readonly=disk.find("readonly") is not None,
            serial=None if serial is None else serial.text or "",
            disk_id=meta.disk_id, sgio=disk.get("sgio"),  # type: ignore[arg-type]
            alias=None if alias is None else alias.get("name")), source)

    @classmethod
    def from_xml(cls, xml: str | bytes, metadata: DeviceMetadata | None = None) -> DomainDisk:
        return cls.from_element(parse_xml(xml), metadata)


# -- the domain ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot: the host paths of kernel and initrd, and the kernel command line."""

    kernel: str
    initrd: str | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class Controller:
    """A ``<controller>``: ``scsi`` (model ``virtio-scsi``) or ``virtio-serial``."""

    type: Literal["scsi", "virtio-serial"]
    index: int = 0
    model: str | None = None
    address: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.type not in ("scsi", "virtio-serial"):
            raise DomainXmlError("invalid_domain", f"controller type must be scsi or "
                                 f"virtio-serial, not {self.type!r}")


@dataclass(frozen=True)
class Channel:
    """A virtio-serial channel over a unix socket; ``path=None`` lets libvirt choose one."""

    name: str
    path: str | None = None
    address: dict[str, str] | None = None


def _default_controllers() -> list[Controller]:
    return [Controller("scsi", 0, "virtio-scsi"), Controller("virtio-serial", 0)]


def _default_channels() -> list[Channel]:
    return [Channel(QEMU_GA_CHANNEL), Channel(VIRTYARD_GA_CHANNEL)]


@dataclass
class Domain:
    """A VM's domain XML: what we define, and what we read back from libvirt's live XML.

    ``metadata`` is kept in step with ``disks`` (their GUID, PDIV, diskId and an exclusive
    ``shared`` win), while guest names, change records and the generation are only in it.
    """

    name: str
    uuid: str
    memory_mib: int
    vcpus: int = 1
    virt_type: Literal["kvm", "qemu"] = "qemu"
    machine: str = "pc"
    arch: str = "x86_64"
    kernel_boot: KernelBoot | None = None
    emulator: str = DEFAULT_EMULATOR
    disks: list[DomainDisk] = field(default_factory=list)
    controllers: list[Controller] = field(default_factory=_default_controllers)
    channels: list[Channel] = field(default_factory=_default_channels)
    console_log: str | None = None
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    metadata: VmMetadata = field(default_factory=VmMetadata)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise DomainXmlError("invalid_domain", f"bad domain name {self.name!r}")
        try:
            uuid_mod.UUID(self.uuid)
        except (ValueError, TypeError, AttributeError):
            raise DomainXmlError("invalid_domain", f"bad uuid {self.uuid!r}") from None
        if self.memory_mib < 1 or self.vcpus < 1:
            raise DomainXmlError("invalid_domain", "memory and vcpus must be positive")
        if self.virt_type not in ("kvm", "qemu"):
            raise DomainXmlError("invalid_domain", f"type must be kvm or qemu, "
                                 f"not {self.virt_type!r}")
        for action in (self.on_poweroff, self.on_reboot, self.on_crash):
            if action not in _LIFECYCLE_ACTIONS:
                raise DomainXmlError("invalid_domain", f"unknown lifecycle action {action!r}")
        self.metadata = self.synced_metadata()

    def synced_metadata(self) -> VmMetadata:
        """``metadata`` with every disk's identity written into its device entry."""
        metadata = self.metadata
        seen: set[str] = set()
        # A drive address is per controller type: sda and hda can both be controller 0 unit 0.
        addresses: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        for disk in self.disks:
            dev = disk.device
            if dev.name in seen:
                raise DomainXmlError("duplicate_disk", f"two disks are named {dev.name!r}")
            seen.add(dev.name)
            if dev.address is not None:
                key = (dev.iface, tuple(sorted(dev.address.items())))
                if key in addresses:
                    raise DomainXmlError("duplicate_address", f"disk {dev.name!r} has the "
                                         f"address of another disk: {dev.address}")
                addresses.add(key)
            entry = dataclasses.replace(
                metadata.device(dev.name), guid=dev.guid, pdiv=dev.pdiv, disk_id=dev.disk_id,
                shared="exclusive" if dev.shared == "exclusive" else None)
            metadata = metadata.with_device(dev.name, entry)
        return metadata

    def disk(self, name: str) -> DomainDisk:
        """The disk with target name ``name``."""
        for disk in self.disks:
            if disk.name == name:
                return disk
        raise KeyError(name)

    def to_element(self) -> etree._Element:
        dom = etree.Element("domain", type=self.virt_type)
        sub_element(dom, "name", self.name)
        sub_element(dom, "uuid", self.uuid)
        put_metadata(dom, self.synced_metadata())
        sub_element(dom, "memory", str(self.memory_mib), unit="MiB")
        sub_element(dom, "vcpu", str(self.vcpus))
        os_elem = sub_element(dom, "os")
        sub_element(os_elem, "type", "hvm", arch=self.arch, machine=self.machine)
        if self.kernel_boot is not None:
            sub_element(os_elem, "kernel", self.kernel_boot.kernel)
            if self.kernel_boot.initrd is not None:
                sub_element(os_elem, "initrd", self.kernel_boot.initrd)
            if self.kernel_boot.cmdline is not None:
                sub_element(os_elem, "cmdline", self.kernel_boot.cmdline)
        sub_element(sub_element(dom, "features"), "acpi")
        sub_element(dom, "on_poweroff", self.on_poweroff)
        sub_element(dom, "on_reboot", self.on_reboot)
        sub_element(dom, "on_crash", self.on_crash)
        devices = sub_element(dom, "devices")
        sub_element(devices, "emulator", self.emulator)
        for disk in self.disks:
            devices.append(disk.to_element())
        for ctrl in self.controllers:
            elem = sub_element(devices, "controller", type=ctrl.type, index=str(ctrl.index))
            if ctrl.model is not None:
                elem.set("model", ctrl.model)
            if ctrl.address is not None:
                sub_element(elem, "address", **ctrl.address)
        for chan in self.channels:
            elem = sub_element(devices, "channel", type="unix")
            if chan.path is not None:
                sub_element(elem, "source", mode="bind", path=chan.path)
            sub_element(elem, "target", type="virtio", name=chan.name)
            if chan.address is not None:
                sub_element(elem, "address", **chan.address)
        if self.console_log is not None:
            serial = sub_element(devices, "serial", type="file")
            sub_element(serial, "source", path=self.console_log, append="on")
            sub_element(serial, "target", port="0")
        sub_element(devices, "memballoon", model="none")
        sub_element(sub_element(devices, "video"), "model", type="none")
        return dom

    def to_xml(self) -> str:
        return etree.tostring(self.to_element(), encoding="unicode", pretty_print=True)

    @classmethod
    def from_xml(cls, xml: str | bytes) -> Domain:
        """Parse a domain XML (ours, or libvirt's live/inactive one); devices we do not model
        (USB, PCI root, input, …) are skipped, disks we cannot model are an error."""
        dom = parse_xml(xml)
        if dom.tag != "domain":
            raise DomainXmlError("not_a_domain", f"expected <domain>, not {dom.tag!r}")
        metadata = find_metadata(dom)
        os_type = dom.find("os/type")
        kernel = dom.findtext("os/kernel")
        disks = [DomainDisk.from_element(d, metadata.devices.get(_target_dev(d)))
                 for d in dom.iterfind("devices/disk")]
        controllers = [
            Controller(c.get("type"), int_attr(c, "index", default=0),  # type: ignore[arg-type]
                       c.get("model"), _address(c))
            for c in dom.iterfind("devices/controller") if c.get("type") in ("scsi",
                                                                              "virtio-serial")]
        channels = []
        for chan in dom.iterfind("devices/channel[@type='unix']"):
            target = chan.find("target[@type='virtio']")
            if target is not None and target.get("name"):
                source = chan.find("source")
                channels.append(Channel(target.get("name") or "",
                                        None if source is None else source.get("path"),
                                        _address(chan)))
        console = dom.find("devices/serial[@type='file']/source")
        return cls(
            name=_required_text(dom, "name"), uuid=_required_text(dom, "uuid"),
            memory_mib=_memory_mib(dom), vcpus=_vcpus(dom),
            virt_type=dom.get("type"),  # type: ignore[arg-type]
            machine="pc" if os_type is None else os_type.get("machine", "pc"),
            arch="x86_64" if os_type is None else os_type.get("arch", "x86_64"),
            kernel_boot=None if kernel is None else KernelBoot(
                kernel, dom.findtext("os/initrd"), dom.findtext("os/cmdline")),
            emulator=dom.findtext("devices/emulator") or DEFAULT_EMULATOR,
            disks=disks, controllers=controllers, channels=channels,
            console_log=None if console is None else console.get("path"),
            on_poweroff=dom.findtext("on_poweroff") or "destroy",
            on_reboot=dom.findtext("on_reboot") or "restart",
            on_crash=dom.findtext("on_crash") or "destroy",
            metadata=metadata)


def _target_dev(disk: etree._Element) -> str:
    target = disk.find("target")
    return "" if target is None else target.get("dev", "")


def _address(elem: etree._Element) -> dict[str, str] | None:
    address = elem.find("address")
    return None if address is None else dict(address.attrib)


def _required_text(dom: etree._Element, tag: str) -> str:
    text = dom.findtext(tag)
    if not text or not text.strip():
        raise DomainXmlError("invalid_xml", f"<domain> has no <{tag}>")
    return text.strip()


def _vcpus(dom: etree._Element) -> int:
    text = _required_text(dom, "vcpu")
    if not text.isdigit():
        raise DomainXmlError("invalid_xml", f"<vcpu> must be an integer, not {text!r}")
    return int(text)


def _memory_mib(dom: etree._Element) -> int:
    elem = dom.find("memory")
    if elem is None or not (elem.text or "").strip().isdigit():
        raise DomainXmlError("invalid_xml", "<domain> has no integer <memory>")
    unit = elem.get("unit", "KiB")
    if unit not in _MEMORY_UNITS:
        raise DomainXmlError("invalid_xml", f"unknown memory unit {unit!r}")
    size = int((elem.text or "").strip()) * _MEMORY_UNITS[unit]
    if size % 2**20:
        raise DomainXmlError("invalid_xml", f"memory {size} bytes is not whole MiB")
    return size // 2**20
