"""Device dicts (``VM.create``'s devices, hot-plug's drive, changeCD's driveSpec): the rules
that turn one into a disk and back, and the wire models that run them (-32602 naming the field,
with the rule's reason)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from virtyard.engine.hosts import vm_spec
from virtyard.host.rpc.errors import InvalidParamsError
from virtyard.host.storage.pdiv import Pdiv
from virtyard.host.verbs import SCHEMA
from virtyard.host.virt.device_specs import (
    CdDriveSpec,
    DiskSpec,
    disk_device,
    disk_dict,
    parse_disks,
)
from virtyard.host.virt.disk_sources import DeviceSpecError, DomainXmlError
from virtyard.host.virt.domain_xml import DiskDevice
from virtyard.host.virt.metadata import VirtXmlError

GUID = "360000000000000000e00000000010001"
GUID2 = "360000000000000000e00000000010002"
DISK_ID = "0c2f1b7e-9d3a-4c51-a8e2-5b0e6f7a8b9c"
VM = "6f1c7a54-2c2e-4a4e-9d0e-3b1f0d2c9a11"
PDIV = Pdiv("5f0d2c9a-0000-4000-8000-000000000001", "5f0d2c9a-0000-4000-8000-000000000002",
            "5f0d2c9a-0000-4000-8000-000000000003", "5f0d2c9a-0000-4000-8000-000000000004")
SCSI0 = {"type": "drive", "controller": "0", "bus": "0", "target": "0", "unit": "0"}
SCSI1 = {"type": "drive", "controller": "0", "bus": "0", "target": "0", "unit": "1"}
PCI5 = {"type": "pci", "domain": "0x0000", "bus": "0x00", "slot": "0x05", "function": "0x0"}


LUN_DICT: dict[str, Any] = {"type": "disk", "device": "lun", "iface": "scsi", "index": 1,
                            "GUID": GUID, "format": "raw", "propagateErrors": "off",
                            "shared": True, "diskId": DISK_ID, "address": dict(SCSI1)}
DISK_DICT: dict[str, Any] = {"type": "disk", "device": "disk", "iface": "virtio", "index": 0,
                             "GUID": GUID, "serial": "0c2f1b7e9d3a4c51a8e2", "bootOrder": 1,
                             "readonly": False, "specParams": {"ignored": True}}
CD_DICT: dict[str, Any] = {"type": "disk", "device": "cdrom", "iface": "sata", "index": 2,
                           "PDIV": PDIV.to_dict(), "optional": True}


def test_from_dict() -> None:
    lun = disk_device(LUN_DICT)
    assert lun == DiskDevice("lun", "scsi", 1, guid=GUID, propagate_errors="off",
                             shared="shared", disk_id=DISK_ID, address=SCSI1)
    assert lun.name == "sdb" and lun.alias == f"ua-{DISK_ID}"
    disk = disk_device(DISK_DICT)
    assert (disk.name, disk.serial, disk.boot_order) == ("vda", "0c2f1b7e9d3a4c51a8e2", 1)
    cd = disk_device(CD_DICT)
    assert (cd.name, cd.pdiv, cd.readonly, cd.optional) == ("sdc", PDIV, True, True)
    empty = disk_device({"type": "disk", "device": "cdrom", "iface": "ide",
                                  "index": "2"})
    assert (empty.name, empty.pdiv) == ("hdc", None)


def test_from_dict_copies_address() -> None:
    raw = dict(LUN_DICT, address=dict(SCSI1))
    device = disk_device(raw)
    raw["address"]["unit"] = "9"
    assert device.address == SCSI1


@pytest.mark.parametrize("raw", [LUN_DICT, DISK_DICT, CD_DICT])
def test_dict_round_trip(raw: dict[str, Any]) -> None:
    device = disk_device(raw)
    out = disk_dict(device)
    assert disk_device(out) == device
    for key in ("type", "device", "iface", "index", "name"):
        assert key in out
    assert ("GUID" in out) != ("PDIV" in out)


def test_to_dict_contract() -> None:
    out = disk_dict(disk_device(DISK_DICT))
    assert out == {"type": "disk", "device": "disk", "iface": "virtio", "index": 0,
                   "name": "vda", "format": "raw", "readonly": False, "shared": "none",
                   "optional": False, "GUID": GUID, "serial": "0c2f1b7e9d3a4c51a8e2",
                   "bootOrder": 1}
    assert disk_dict(disk_device(CD_DICT))["PDIV"] == PDIV.to_dict()


@pytest.mark.parametrize(("shared", "expected"), [
    (True, "shared"), (False, "none"), ("true", "shared"), ("false", "none"),
    ("shared", "shared"), ("exclusive", "exclusive"), ("none", "none"), (None, "none")])
def test_shared_values(shared: object, expected: str) -> None:
    assert disk_device(dict(DISK_DICT, shared=shared)).shared == expected


def _without(raw: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k != key}


SPEC_ERRORS: list[tuple[object, str]] = [
    (["not", "a", "dict"], "invalid_spec"),
    (dict(DISK_DICT, type="interface"), "unknown_type"),
    (_without(DISK_DICT, "device"), "missing_device"),
    (_without(DISK_DICT, "iface"), "missing_iface"),
    (_without(DISK_DICT, "index"), "missing_index"),
    (dict(DISK_DICT, device="floppy"), "unknown_device"),
    (dict(DISK_DICT, iface="usb"), "unknown_iface"),
    (dict(DISK_DICT, index=-1), "negative_index"),
    (dict(DISK_DICT, index="one"), "invalid_index"),
    (dict(DISK_DICT, index=1.5), "invalid_index"),
    (dict(LUN_DICT, iface="virtio"), "lun_needs_scsi"),
    (dict(LUN_DICT, iface="sata"), "lun_needs_scsi"),
    (dict(LUN_DICT, format="cow"), "lun_format"),
    (dict(CD_DICT, format="cow"), "cdrom_format"),
    (dict(DISK_DICT, format="qcow3"), "unknown_format"),
    (dict(LUN_DICT, serial="S"), "serial_on_passthrough"),
    (dict(DISK_DICT, serial=42), "invalid_serial"),
    (dict(LUN_DICT, sgio="unfiltered"), "sgio_unfiltered_unsupported"),
    (dict(DISK_DICT, sgio="filtered"), "invalid_sgio"),
    (dict(LUN_DICT, sgio="sometimes"), "invalid_sgio"),
    (dict(CD_DICT, iface="virtio"), "cdrom_on_virtio"),
    (dict(DISK_DICT, propagateErrors="yes"), "invalid_propagate_errors"),
    (dict(DISK_DICT, shared="sometimes"), "invalid_shared"),
    (dict(DISK_DICT, bootOrder=0), "invalid_boot_order"),
    (dict(DISK_DICT, bootOrder="first"), "invalid_boot_order"),
    (dict(DISK_DICT, GUID="/dev/sda"), "invalid_guid"),
    (dict(DISK_DICT, GUID=""), "invalid_guid"),
    (dict(DISK_DICT, GUID=None, PDIV={"poolID": "p"}), "invalid_pdiv"),
    (dict(DISK_DICT, GUID=None, PDIV=dict(PDIV.to_dict(), imageID="")), "invalid_pdiv"),
    (dict(DISK_DICT, GUID=None), "disk_needs_guid_or_pdiv"),
    (dict(DISK_DICT, PDIV=PDIV.to_dict()), "disk_needs_guid_or_pdiv"),
    (_without(LUN_DICT, "GUID"), "lun_needs_guid"),
    (dict(LUN_DICT, PDIV=PDIV.to_dict()), "lun_needs_guid"),
    (dict(CD_DICT, GUID=GUID), "guid_on_cdrom"),
    (dict(DISK_DICT, address={"controller": "0"}), "invalid_address"),
    (dict(DISK_DICT, address={"type": "pci", "slot": 5}), "invalid_address"),
    (dict(DISK_DICT, address="pci:0:5"), "invalid_address"),
    (dict(DISK_DICT, address=SCSI0), "address_type"),
    (dict(LUN_DICT, address=PCI5), "address_type"),
    (dict(DISK_DICT, diskId="no spaces"), "invalid_disk_id"),
    (dict(DISK_DICT, diskId=7), "invalid_disk_id"),
    (dict(LUN_DICT, alias="scsi0-0-0-1"), "alias_mismatch"),
    (dict(DISK_DICT, alias=""), "invalid_alias"),
    (dict(DISK_DICT, readonly="yes"), "invalid_readonly"),
    (dict(CD_DICT, optional=1), "invalid_optional"),
    (dict(DISK_DICT, name="sda"), "name_mismatch"),
]


@pytest.mark.parametrize(("raw", "reason"), SPEC_ERRORS,
                         ids=[reason for _, reason in SPEC_ERRORS])
def test_from_dict_errors(raw: Any, reason: str) -> None:
    with pytest.raises(DeviceSpecError) as err:
        disk_device(raw)
    assert err.value.reason == reason
    assert reason in str(err.value)


def test_spec_errors_are_typed() -> None:
    with pytest.raises(DeviceSpecError) as err:
        disk_device(dict(LUN_DICT, serial="S"))
    assert err.value.key == "serial"
    assert isinstance(err.value, DomainXmlError) and isinstance(err.value, VirtXmlError)
    assert isinstance(err.value, ValueError)


# -- the wire models -------------------------------------------------------------------------------

def _refused(verb: str, params: dict[str, Any]) -> InvalidParamsError:
    with pytest.raises(InvalidParamsError) as err:
        SCHEMA.verbs[verb].parse_params(params)
    return err.value


def _create(devices: list[Any]) -> dict[str, Any]:
    return {"vmParams": {"vmId": VM, "devices": devices}}


IN_A_LIST = [(raw, reason) for raw, reason in SPEC_ERRORS if reason != "unknown_type"]


@pytest.mark.parametrize(("raw", "reason"), IN_A_LIST, ids=[r for _, r in IN_A_LIST])
def test_create_names_the_field_and_the_reason(raw: Any, reason: str) -> None:
    with pytest.raises(DeviceSpecError) as rule:
        disk_device(raw)
    error = _refused("VM.create", _create([LUN_DICT, raw]))
    where = "vmParams.devices[1]" + (f".{rule.value.key}" if rule.value.key else "")
    assert error.code == -32602
    assert error.message == f"invalid parameter '{where}': {rule.value}"
    assert (error.data["parameter"], error.data["reason"]) == (where, reason)


def test_create_checks_disks_together_by_their_place() -> None:
    other = {"type": "interface", "nicModel": "virtio"}
    error = _refused("VM.create", _create([other, DISK_DICT, dict(DISK_DICT, GUID=GUID2)]))
    assert error.data["parameter"] == "vmParams.devices[2].index"
    assert error.data["reason"] == "duplicate_index"
    assert "virtio index 0 (vda) is already used" in error.message
    twice = dict(LUN_DICT, index=2, shared=False)
    error = _refused("VM.create", _create([LUN_DICT, twice]))
    assert (error.data["parameter"], error.data["reason"]) == ("vmParams.devices[1].GUID",
                                                               "duplicate_lun")


def test_create_keeps_disks_and_drops_other_devices() -> None:
    params = SCHEMA.verbs["VM.create"].parse_params(_create([
        {"type": "balloon"}, LUN_DICT, dict(LUN_DICT, index=4), CD_DICT]))
    devices = params.vmParams.devices  # type: ignore[attr-defined]
    assert [d.disk() for d in devices] == [disk_device(LUN_DICT),
                                           disk_device(dict(LUN_DICT, index=4)),
                                           disk_device(CD_DICT)]
    assert devices[0].wire() == disk_dict(disk_device(LUN_DICT))
    assert devices[0].shared == "shared" and devices[0].alias == f"ua-{DISK_ID}"


def test_disk_spec_is_built_like_the_engine_sends_it() -> None:
    spec = DiskSpec(device="cdrom", iface="sata", index=2, PDIV=PDIV.to_dict(), optional=True)
    assert spec.disk() == disk_device(CD_DICT)
    assert DiskSpec.model_validate(spec.wire()) == spec


def test_parse_disks_names_the_place_in_the_list() -> None:
    with pytest.raises(InvalidParamsError) as err:
        parse_disks([DISK_DICT], existing=[disk_device(DISK_DICT)])
    assert err.value.data == {"reason": "duplicate_index", "parameter": "devices[0].index"}


def test_hotplug_and_unplug_drives() -> None:
    error = _refused("VM.hotplugDisk", {"vmID": VM, "drive": dict(LUN_DICT, iface="ide")})
    assert (error.data["parameter"], error.data["reason"]) == ("drive.iface", "lun_needs_scsi")
    unplug = SCHEMA.verbs["VM.hotunplugDisk"].parse_params(
        {"vmID": VM, "drive": {"iface": "scsi", "index": "1", "specParams": {}}})
    assert unplug.drive.wire() == {"iface": "scsi", "index": 1}  # type: ignore[attr-defined]


@pytest.mark.parametrize(("drive", "volume", "loads"), [
    ({"drive_spec": PDIV.to_dict()}, PDIV, True),
    ({"drive_spec": {}}, None, True),
    ({"drive_spec": None}, None, True),
    ({"path": "/iso/x.iso"}, None, False),
])
def test_cd_drive_spec(drive: dict[str, Any], volume: Pdiv | None, loads: bool) -> None:
    spec = CdDriveSpec.model_validate({"iface": "scsi", "index": 3, **drive})
    assert spec.loads_volume == loads
    assert (None if spec.drive_spec is None else spec.drive_spec.pdiv) == volume


@pytest.mark.parametrize(("drive", "parameter"), [
    ({"iface": "scsi", "index": "3"}, "driveSpec.index"),
    ({"iface": "scsi", "index": True}, "driveSpec.index"),
    ({"index": 3}, "driveSpec.iface"),
    ({"iface": "scsi", "index": 3, "drive_spec": {"poolID": "p"}},
     "driveSpec.drive_spec.domainID"),
    ({"iface": "scsi", "index": 3, "drive_spec": dict(PDIV.to_dict(), imageID="a b")},
     "driveSpec.drive_spec"),
])
def test_cd_drive_spec_errors(drive: dict[str, Any], parameter: str) -> None:
    error = _refused("VM.changeCD", {"vmID": VM, "driveSpec": drive})
    assert error.data["parameter"] == parameter


# -- the engine builds what the models take ------------------------------------------------------

def _engine_disk(*, sgio: str | None, shareable: bool, boot: bool, iface: str) -> Any:
    return vm_spec.VmDisk(
        disk=SimpleNamespace(id=DISK_ID, sgio=sgio, shareable=shareable, propagate_errors=True),
        element=SimpleNamespace(disk_interface=iface, is_boot=boot),
        device=SimpleNamespace(is_readonly=False), lun=SimpleNamespace(lun_id=GUID))  # type: ignore[arg-type]


@pytest.mark.parametrize(("sgio", "shareable", "boot", "iface", "address"), [
    (None, False, True, "virtio", None),
    (None, True, False, "virtio_scsi", SCSI1),
    ("filtered", False, False, "virtio_scsi", SCSI1),
    (None, False, False, "sata", None),
])
def test_the_engines_drives_are_valid_disk_specs(sgio: str | None, shareable: bool, boot: bool,
                                                 iface: str, address: Any) -> None:
    place = vm_spec.DiskPlace(1, address)
    drive = _engine_disk(sgio=sgio, shareable=shareable, boot=boot, iface=iface).drive(place)
    wire = DiskSpec.model_validate(drive).wire()
    assert {k: wire[k] for k in drive} == drive  # taken as sent: nothing renamed or changed
    cd = vm_spec.cdrom_drive(vm_spec.DiskPlace(3, None), PDIV.to_dict())
    assert DiskSpec.model_validate(cd).wire()["PDIV"] == PDIV.to_dict()
    assert DiskSpec.model_validate(vm_spec.cdrom_drive(vm_spec.DiskPlace(3, None), None))
