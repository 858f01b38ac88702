"""The engine's VM parameters (device dicts) checked before anything touches libvirt.

Every rule a device dict must follow fails here with -32602 naming the parameter
(``devices[2].iface``) and a stable ``reason``: a passthrough LUN off SCSI, a LUN in another
format than raw, two disks at one iface/index, one LUN twice on one VM without ``shared``.
"""

from __future__ import annotations

import logging
from typing import Any

from virtyard.host.rpc.errors import InvalidParamsError
from virtyard.host.virt.domain_xml import DeviceSpecError, DiskDevice

log = logging.getLogger("virtyard.host.virt")


def parse_disk(raw: object, where: str) -> DiskDevice:
    """One disk dict, or -32602 naming ``where`` and the field."""
    if not isinstance(raw, dict):
        raise InvalidParamsError(f"invalid parameter '{where}': a device must be an object")
    try:
        return DiskDevice.from_dict(raw)
    except DeviceSpecError as exc:
        field = f"{where}.{exc.key}" if exc.key else where
        raise InvalidParamsError(f"invalid parameter '{field}': {exc}", reason=exc.reason,
                                 parameter=field) from None
    except (TypeError, ValueError) as exc:
        raise InvalidParamsError(f"invalid parameter '{where}': {exc}") from None


def parse_disks(devices: list[Any], existing: list[DiskDevice] | None = None) -> list[DiskDevice]:
    """The disk dicts of ``devices`` (other device types are left to defaults), checked
    against each other and against ``existing`` disks of a running VM."""
    disks: list[DiskDevice] = []
    taken = {d.name: d for d in existing or []}
    luns = {d.guid: d for d in existing or [] if d.guid}
    for i, raw in enumerate(devices):
        where = f"devices[{i}]"
        if isinstance(raw, dict) and raw.get("type", "disk") != "disk":
            log.info("ignoring device %s of type %r", where, raw.get("type"))
            continue
        disk = parse_disk(raw, where)
        if disk.name in taken:
            raise InvalidParamsError(
                f"invalid parameter '{where}.index': {disk.iface} index {disk.index} "
                f"({disk.name}) is already used", reason="duplicate_index",
                parameter=f"{where}.index")
        if disk.guid and disk.guid in luns and not (
                disk.shared == "shared" and luns[disk.guid].shared == "shared"):
            raise InvalidParamsError(
                f"invalid parameter '{where}.GUID': LUN {disk.guid} is already a disk of this "
                "VM", reason="duplicate_lun", parameter=f"{where}.GUID")
        taken[disk.name] = disk
        if disk.guid:
            luns[disk.guid] = disk
        disks.append(disk)
    return disks
