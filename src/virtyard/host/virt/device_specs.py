"""The engine's device dicts — ``VM.create``'s devices, ``VM.hotplugDisk``'s and
``VM.hotunplugDisk``'s drive, ``VM.changeCD``'s driveSpec — as wire models and as disks.

One set of rules turns a dict into a :class:`~virtyard.host.virt.domain_xml.DiskDevice`
(:func:`disk_device`) and back (:func:`disk_dict`); the pydantic models (:class:`DiskSpec`,
:class:`UnplugSpec`, :class:`CdDriveSpec`, :class:`PdivSpec`) run those rules while they
validate, so a bad dict is -32602 naming the field (``vmParams.devices[2].iface``) with the rule's
stable ``reason`` (``lun_needs_scsi``, ``duplicate_index``…), and the generated API reference
shows every field. Wire keys are oVirt's (``GUID``, ``PDIV``, ``diskId``, ``bootOrder``…);
unknown keys (``specParams``…) are ignored, as the engine may send more than a host uses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    StrictInt,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from virtyard.host.rpc.errors import InvalidParamsError
from virtyard.host.storage.pdiv import Pdiv, PdivError
from virtyard.host.virt.disk_sources import DeviceSpecError
from virtyard.host.virt.domain_xml import (
    DeviceKind,
    DiskDevice,
    DiskFormat,
    Iface,
    PropagateErrors,
    Sgio,
    Shared,
)

log = logging.getLogger("virtyard.host.virt")


def _spec(reason: str, message: str, key: str) -> DeviceSpecError:
    return DeviceSpecError(reason, message, key=key)


# -- dict <-> DiskDevice ------------------------------------------------------------------------

def disk_device(raw: object) -> DiskDevice:
    """A disk from the engine's device dict; :class:`DeviceSpecError` naming the rule and key."""
    if not isinstance(raw, dict):
        raise _spec("invalid_spec", f"a disk spec is a dict, not {raw!r}", "")
    if raw.get("type", "disk") != "disk":
        raise _spec("unknown_type", f"type must be 'disk', not {raw.get('type')!r}", "type")
    for key in ("device", "iface", "index"):
        if key not in raw:
            raise _spec(f"missing_{key}", f"a disk dict needs {key!r}", key)
    guid = _opt_str(raw, "GUID", "invalid_guid")
    try:
        pdiv = Pdiv.from_dict(raw["PDIV"]) if raw.get("PDIV") is not None else None
    except PdivError as exc:
        raise _spec("invalid_pdiv", str(exc), "PDIV") from exc
    device = raw["device"]
    if device == "cdrom" and guid is not None:
        raise _spec("guid_on_cdrom", "a CD-ROM holds a volume (PDIV), not a LUN", "GUID")
    if device == "lun" and (guid is None or pdiv is not None):
        raise _spec("lun_needs_guid", "a passthrough LUN is named by its GUID only", "GUID")
    if device == "disk" and (guid is None) == (pdiv is None):
        raise _spec("disk_needs_guid_or_pdiv", "a disk needs exactly one of GUID and PDIV",
                    "GUID")
    disk = DiskDevice(
        device=device, iface=raw["iface"], index=_int(raw, "index", "invalid_index"),
        guid=guid, pdiv=pdiv, address=_address_dict(raw.get("address")),
        format=raw.get("format", "raw"),
        boot_order=_int(raw, "bootOrder", "invalid_boot_order")
        if raw.get("bootOrder") is not None else None,
        propagate_errors=raw.get("propagateErrors"), shared=_shared(raw.get("shared")),
        optional=_bool(raw, "optional"), readonly=_bool(raw, "readonly"),
        serial=raw.get("serial"), disk_id=_opt_str(raw, "diskId", "invalid_disk_id"),
        sgio=raw.get("sgio"), alias=_opt_str(raw, "alias", "invalid_alias"))
    if raw.get("name") is not None and raw["name"] != disk.name:
        raise _spec("name_mismatch", f"name {raw['name']!r} is not {disk.name!r} of iface "
                    f"{disk.iface!r} index {disk.index}", "name")
    return disk


def disk_dict(disk: DiskDevice) -> dict[str, Any]:
    """The device dict: ``type``, ``device``, ``iface``, ``index``, ``name``, ``format``,
    ``readonly``, ``shared``, ``optional`` always; ``GUID``/``PDIV``, ``serial``, ``address``,
    ``bootOrder``, ``propagateErrors``, ``sgio``, ``diskId``, ``alias`` when set."""
    out: dict[str, Any] = {"type": "disk", "device": disk.device, "iface": disk.iface,
                           "index": disk.index, "name": disk.name, "format": disk.format,
                           "readonly": disk.readonly, "shared": disk.shared,
                           "optional": disk.optional}
    optional: dict[str, Any] = {
        "GUID": disk.guid, "PDIV": None if disk.pdiv is None else disk.pdiv.to_dict(),
        "serial": disk.serial, "address": None if disk.address is None else dict(disk.address),
        "bootOrder": disk.boot_order, "propagateErrors": disk.propagate_errors,
        "sgio": disk.sgio, "diskId": disk.disk_id, "alias": disk.alias}
    out.update({k: v for k, v in optional.items() if v is not None})
    return out


def _opt_str(raw: dict[str, Any], key: str, reason: str) -> str | None:
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise _spec(reason, f"{key} must be a non-empty string, not {value!r}", key)
    return value


def _address_dict(value: object) -> Any:
    # A copy, so the device does not share the caller's dict; the checks are DiskDevice's.
    return dict(value) if isinstance(value, dict) else value


def _int(raw: dict[str, Any], key: str, reason: str) -> int:
    value = raw[key]
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _spec(reason, f"{key} must be an integer, not {value!r}", key)
    return value


def _bool(raw: dict[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if value in ("true", "false"):
        return bool(value == "true")
    if not isinstance(value, bool):
        raise _spec(f"invalid_{key}", f"{key} must be a boolean, not {value!r}", key)
    return value


def _shared(value: object) -> Shared:
    if value is None or value is False or value == "false":
        return "none"
    if value is True or value == "true":
        return "shared"
    if value in ("shared", "exclusive", "none"):
        return value
    raise _spec("invalid_shared", f"shared must be a boolean or shared, exclusive or none, "
                f"not {value!r}", "shared")


# -- a VM's disks together ----------------------------------------------------------------------

class DuplicateDiskError(DeviceSpecError):
    """Two disks of one VM clash; ``position`` is the later one's place in its list."""

    def __init__(self, reason: str, message: str, *, key: str, position: int) -> None:
        super().__init__(reason, message, key=key)
        self.position = position
        self.detail = message


def check_together(disks: Sequence[tuple[int, DiskDevice]],
                   existing: Sequence[DiskDevice] = ()) -> None:
    """Refuse two disks at one iface/index, or one LUN twice without both ``shared``
    (:class:`DuplicateDiskError`); ``existing``: the disks a running VM has already."""
    taken = {d.name: d for d in existing}
    luns = {d.guid: d for d in existing if d.guid}
    for position, disk in disks:
        if disk.name in taken:
            raise DuplicateDiskError(
                "duplicate_index", f"{disk.iface} index {disk.index} ({disk.name}) is already "
                "used", key="index", position=position)
        if disk.guid and disk.guid in luns and not (
                disk.shared == "shared" and luns[disk.guid].shared == "shared"):
            raise DuplicateDiskError(
                "duplicate_lun", f"LUN {disk.guid} is already a disk of this VM", key="GUID",
                position=position)
        taken[disk.name] = disk
        if disk.guid:
            luns[disk.guid] = disk


def parse_disk(raw: object, where: str) -> DiskDevice:
    """One disk dict, or -32602 naming ``where`` and the field."""
    if not isinstance(raw, dict):
        raise InvalidParamsError(f"invalid parameter '{where}': a device must be an object")
    try:
        return disk_device(raw)
    except DeviceSpecError as exc:
        field = f"{where}.{exc.key}" if exc.key else where
        raise InvalidParamsError(f"invalid parameter '{field}': {exc}", reason=exc.reason,
                                 parameter=field) from None


def parse_disks(devices: Sequence[object],
                existing: Sequence[DiskDevice] = ()) -> list[DiskDevice]:
    """The disk dicts of ``devices`` (other device types are ignored), checked against each
    other and against ``existing`` disks of a running VM; -32602 naming ``devices[i]``."""
    disks: list[tuple[int, DiskDevice]] = []
    for i, raw in enumerate(devices):
        if isinstance(raw, dict) and raw.get("type", "disk") != "disk":
            log.info("ignoring device devices[%d] of type %r", i, raw.get("type"))
            continue
        disks.append((i, parse_disk(raw, f"devices[{i}]")))
    try:
        check_together(disks, existing)
    except DuplicateDiskError as exc:
        field = f"devices[{exc.position}].{exc.key}"
        raise InvalidParamsError(f"invalid parameter '{field}': {exc.detail}",
                                 reason=exc.reason, parameter=field) from None
    return [disk for _, disk in disks]


# -- wire models --------------------------------------------------------------------------------

def _custom(exc: DeviceSpecError, field: str | None = None) -> PydanticCustomError:
    """A rule's error as pydantic's: its reason as the type; ``field`` (in the context) names
    the key inside the checked value, which the verb schema adds to the parameter's name."""
    where = exc.key if field is None else field
    return PydanticCustomError(exc.reason, "{detail}",
                               {"detail": str(exc), "field": where or ""})


class PdivSpec(BaseModel):
    """A volume on a storage domain by its ids."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    poolID: str = Field(description="storage pool id")
    domainID: str = Field(description="storage domain id")
    imageID: str = Field(description="image id")
    volumeID: str = Field(description="volume id")

    @model_validator(mode="after")
    def _ids(self) -> PdivSpec:
        self.pdiv  # noqa: B018  (raises PdivError, a ValueError, on a bad id)
        return self

    @property
    def pdiv(self) -> Pdiv:
        return Pdiv(self.poolID, self.domainID, self.imageID, self.volumeID)


class DiskSpec(BaseModel):
    """A disk dict: a LUN by `GUID` (device disk or lun), a volume by `PDIV` (a disk or a
    CD-ROM), or an empty CD-ROM. Every disk rule runs when one is validated, and it holds the
    normalized dict (`shared` true is "shared", `alias` is ua-<diskId>, `name` is filled in).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["disk"] = Field(default="disk", description="other device types are ignored")
    device: DeviceKind = Field(description="disk, lun (SCSI passthrough) or cdrom")
    iface: Iface = Field(description="bus; a lun needs scsi, a cdrom is not on virtio")
    index: int = Field(ge=0, description="index on the bus (scsi 1 is sdb)")
    name: str | None = Field(default=None, description="target name; must match iface+index")
    GUID: str | None = Field(default=None, description="the LUN's WWID (disk or lun)")
    PDIV: PdivSpec | None = Field(default=None, description="a volume (disk or cdrom)")
    format: DiskFormat = Field(default="raw", description="cow only for a disk")
    readonly: bool = False
    shared: Shared = Field(default="none",
                           description="also true (shared) or false (none) on the wire")
    optional: bool = Field(default=False, description="start without it if its file is gone")
    serial: str | None = Field(default=None, description="the serial the guest sees (not lun)")
    diskId: str | None = Field(default=None, description="the engine's disk id (alias ua-<id>)")
    alias: str | None = Field(default=None, description="ua-<diskId>, or libvirt's alias")
    address: dict[str, str] | None = Field(
        default=None, description="pci (virtio) or drive (others) address as reported")
    bootOrder: int | None = Field(default=None, ge=1)
    propagateErrors: PropagateErrors | None = Field(
        default=None, description="on: pause on ENOSPC, report or off (stop) on I/O errors")
    sgio: Sgio | None = Field(default=None, description="filtered, on a lun only")

    @model_validator(mode="wrap")
    @classmethod
    def _rules(cls, raw: Any, handler: ModelWrapValidatorHandler[DiskSpec]) -> DiskSpec:
        if isinstance(raw, DiskSpec):
            return raw
        if isinstance(raw, dict):
            raw = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in raw.items()}
        try:
            disk = disk_device(raw)
        except DeviceSpecError as exc:
            raise _custom(exc) from None
        return handler(disk_dict(disk))

    def disk(self) -> DiskDevice:
        """The disk this dict describes."""
        return disk_device(self.wire())

    def wire(self) -> dict[str, Any]:
        """The dict as it travels (keys that are not set are left out)."""
        return self.model_dump(exclude_none=True)


def _disk_or_skip(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A list item: a disk dict is validated; another device type is ignored (``None``)."""
    if isinstance(value, dict) and value.get("type", "disk") != "disk":
        log.info("ignoring a device of type %r", value.get("type"))
        return None
    return handler(value)


# A VM's ``devices``: disks validated one by one (other device types dropped), then together.
DeviceItem = Annotated[DiskSpec, WrapValidator(_disk_or_skip)]


def disks_together(devices: list[DiskSpec | None]) -> list[DiskSpec]:
    """The disks of a validated ``devices`` list, checked together (a field validator's body:
    errors name ``devices[i].index`` / ``.GUID`` by the dict's place in the list)."""
    disks = [(i, d) for i, d in enumerate(devices) if isinstance(d, DiskSpec)]
    try:
        check_together([(i, d.disk()) for i, d in disks])
    except DuplicateDiskError as exc:
        raise PydanticCustomError(exc.reason, "{detail}",
                                  {"detail": exc.detail,
                                   "field": f"{exc.position}.{exc.key}"}) from None
    return [d for _, d in disks]


class UnplugSpec(BaseModel):
    """Which disk to unplug: by `GUID`, or by `iface` and `index`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    GUID: str | None = Field(default=None, description="the LUN's WWID")
    iface: str | None = None
    index: int | None = None

    def wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class CdDriveSpec(BaseModel):
    """A CD-ROM drive and what to put in it: `drive_spec` (a volume, or empty to eject), or
    the legacy `path` of an ISO file on this host."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    iface: str = Field(description="the drive's bus")
    index: StrictInt = Field(description="the drive's index on its bus")
    drive_spec: PdivSpec | None = Field(
        default=None, description="the volume to load; empty ({} or null) ejects")
    path: str | None = Field(default=None, description="legacy: an ISO file on this host")

    @field_validator("drive_spec", mode="before")
    @classmethod
    def _empty_ejects(cls, value: object) -> object:
        return value or None

    @property
    def loads_volume(self) -> bool:
        """``drive_spec`` was given (a volume, or empty: eject)."""
        return "drive_spec" in self.model_fields_set
