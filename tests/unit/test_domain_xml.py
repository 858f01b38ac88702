"""Domain XML objects: disk dicts, sources, drive names, our metadata, whole domains.

No libvirt daemon: round trips go through our own formatter and parser, a live XML written by
hand as libvirt 9.0 prints it, libvirt 9.0's own RelaxNG schema (when installed) and libvirt's
in-process ``test:///default`` driver (libvirt's real parser and formatter, no daemon).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from virtyard.host.storage.pdiv import Pdiv, PdivError
from virtyard.host.virt.disk_sources import (
    BlockSource,
    DeviceSpecError,
    DomainXmlError,
    FileSource,
    IscsiSource,
    Source,
    StorageSlice,
    parse_source,
)
from virtyard.host.virt.domain_xml import (
    QEMU_GA_CHANNEL,
    VIRTYARD_GA_CHANNEL,
    Channel,
    Controller,
    DiskDevice,
    Domain,
    DomainDisk,
    KernelBoot,
    drive_name,
    parse_drive_name,
)
from virtyard.host.virt.metadata import (
    METADATA_KEY,
    METADATA_NS,
    CdChange,
    DeviceMetadata,
    MetadataError,
    VirtXmlError,
    VmMetadata,
    read_metadata,
    replace_metadata,
)

GUID = "360000000000000000e00000000010001"
GUID2 = "360000000000000000e00000000010002"
DISK_ID = "0c2f1b7e-9d3a-4c51-a8e2-5b0e6f7a8b9c"
UUID = "6f1c7a54-2c2e-4a4e-9d0e-3b1f0d2c9a11"
IQN = "iqn.2026-11.org.virtyard.lab:san1"
PDIV = Pdiv("5f0d2c9a-0000-4000-8000-000000000001", "5f0d2c9a-0000-4000-8000-000000000002",
            "5f0d2c9a-0000-4000-8000-000000000003", "5f0d2c9a-0000-4000-8000-000000000004")
PDIV2 = dataclasses.replace(PDIV, volume_id="5f0d2c9a-0000-4000-8000-000000000005")
SCSI0 = {"type": "drive", "controller": "0", "bus": "0", "target": "0", "unit": "0"}
SCSI1 = {"type": "drive", "controller": "0", "bus": "0", "target": "0", "unit": "1"}
SCSI5 = dict(SCSI0, unit="5")
PCI5 = {"type": "pci", "domain": "0x0000", "bus": "0x00", "slot": "0x05", "function": "0x0"}
SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")


def iscsi(lun: int = 1, **kw: Any) -> IscsiSource:
    return IscsiSource("127.0.0.1", 35417, IQN, lun, **kw)


# -- every disk shape, with the XML it must give ---------------------------------------------------

SHAPES: dict[str, tuple[DiskDevice, Source | None]] = {
    "virtio-block": (DiskDevice("disk", "virtio", 0, guid=GUID, serial="S1", boot_order=1,
                                address=PCI5), BlockSource.for_guid(GUID)),
    "scsi-network": (DiskDevice("disk", "scsi", 0, guid=GUID, serial="S2", disk_id=DISK_ID,
                                address=SCSI0), iscsi()),
    "scsi-network-chap-usage": (DiskDevice("disk", "scsi", 1, guid=GUID),
                                iscsi(auth_user="vy", secret_usage="virtyard-chap-san1")),
    "scsi-network-chap-uuid": (DiskDevice("disk", "scsi", 8, guid=GUID), IscsiSource(
        "::1", 3260, IQN, 0, auth_user="vy",
        secret_uuid="9a1b5c6d-0000-4000-8000-000000000001")),
    "lun-block": (DiskDevice("lun", "scsi", 2, guid=GUID, sgio="filtered", shared="shared"),
                  BlockSource.for_guid(GUID)),
    "lun-network": (DiskDevice("lun", "scsi", 3, guid=GUID2, propagate_errors="report",
                               readonly=True), iscsi(2)),
    "disk-file-cow": (DiskDevice("disk", "virtio", 1, pdiv=PDIV, format="cow", optional=True,
                                 propagate_errors="off"), FileSource("/rhev/img/v1")),
    "disk-exclusive": (DiskDevice("disk", "sata", 4, guid=GUID, shared="exclusive",
                                  propagate_errors="on"), BlockSource("/dev/loop7")),
    "ide-disk": (DiskDevice("disk", "ide", 0, pdiv=PDIV), FileSource("/img/ide")),
    "cdrom-empty": (DiskDevice("cdrom", "scsi", 5, address=SCSI5, alias="scsi0-0-0-5"), None),
    "cdrom-file": (DiskDevice("cdrom", "sata", 9, pdiv=PDIV, optional=True),
                   FileSource("/isos/tiny.iso")),
    "cdrom-block-slice": (DiskDevice("cdrom", "scsi", 6, pdiv=PDIV),
                          BlockSource("/dev/loop3", StorageSlice(1048576, 4194304))),
    "cdrom-network-slice": (DiskDevice("cdrom", "ide", 2, pdiv=PDIV2),
                            iscsi(3, slice=StorageSlice(4 * 1048576, 8 * 1048576))),
    "lun-network-host-initiator": (DiskDevice("disk", "scsi", 11, guid="36001405feed"),
                                   iscsi(1, initiator="iqn.2026-11.org.virtyard:host7")),
    "cdrom-file-slice": (DiskDevice("cdrom", "scsi", 7), FileSource("/pv.img",
                                                                    StorageSlice(0, 2048))),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_disk_round_trip(shape: str) -> None:
    device, source = SHAPES[shape]
    xml = device.to_xml(source)
    parsed = DomainDisk.from_xml(xml, DeviceMetadata(
        guid=device.guid, pdiv=device.pdiv,
        shared="exclusive" if device.shared == "exclusive" else None))
    assert parsed == DomainDisk(device, source)
    assert parse_source(etree.fromstring(xml)) == source


def _disk(device: DiskDevice, source: Source | None) -> etree._Element:
    return etree.fromstring(device.to_xml(source))


def test_network_disk_xml() -> None:
    disk = _disk(*SHAPES["scsi-network-chap-usage"])
    assert (disk.get("type"), disk.get("device")) == ("network", "disk")
    src = disk.find("source")
    assert src is not None
    assert (src.get("protocol"), src.get("name")) == ("iscsi", f"{IQN}/1")
    assert src.find("host").attrib == {"name": "127.0.0.1", "port": "35417"}  # type: ignore[union-attr]
    assert src.find("auth").get("username") == "vy"  # type: ignore[union-attr]
    assert src.find("auth/secret").attrib == {  # type: ignore[union-attr]
        "type": "iscsi", "usage": "virtyard-chap-san1"}
    assert disk.find("driver").attrib == {  # type: ignore[union-attr]
        "name": "qemu", "type": "raw", "cache": "none", "io": "threads"}
    assert disk.find("target").attrib == {"dev": "sdb", "bus": "scsi"}  # type: ignore[union-attr]


def test_block_disk_xml() -> None:
    disk = _disk(*SHAPES["virtio-block"])
    assert disk.get("type") == "block"
    assert disk.find("source").attrib == {"dev": f"/dev/mapper/{GUID}"}  # type: ignore[union-attr]
    assert disk.find("driver").get("io") == "native"  # type: ignore[union-attr]
    assert disk.findtext("serial") == "S1"
    assert disk.find("boot").get("order") == "1"  # type: ignore[union-attr]
    assert disk.find("address").attrib == PCI5  # type: ignore[union-attr]
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}  # type: ignore[union-attr]


def test_passthrough_lun_xml() -> None:
    disk = _disk(*SHAPES["lun-block"])
    assert (disk.get("device"), disk.get("sgio")) == ("lun", "filtered")
    assert disk.find("serial") is None
    assert disk.find("shareable") is not None
    assert disk.find("alias") is None


@pytest.mark.parametrize(("propagate", "policy", "rpolicy"), [
    ("on", "enospace", "report"), ("report", "report", "report"), ("off", "stop", "stop")])
def test_error_policy(propagate: str, policy: str, rpolicy: str) -> None:
    device = DiskDevice("disk", "scsi", 0, guid=GUID,
                        propagate_errors=propagate)  # type: ignore[arg-type]
    driver = _disk(device, iscsi()).find("driver")
    assert driver is not None
    assert (driver.get("error_policy"), driver.get("rerror_policy")) == (policy, rpolicy)


def test_no_error_policy_when_not_asked() -> None:
    driver = _disk(DiskDevice("disk", "scsi", 0, guid=GUID), iscsi()).find("driver")
    assert driver is not None
    assert "error_policy" not in driver.attrib and "rerror_policy" not in driver.attrib


def test_user_alias_from_disk_id() -> None:
    disk = _disk(*SHAPES["scsi-network"])
    assert disk.find("alias").get("name") == f"ua-{DISK_ID}"  # type: ignore[union-attr]
    assert SHAPES["scsi-network"][0].alias == f"ua-{DISK_ID}"
    assert DiskDevice("disk", "scsi", 0, alias=f"ua-{DISK_ID}").disk_id == DISK_ID


def test_cdrom_shapes() -> None:
    empty = _disk(*SHAPES["cdrom-empty"])
    assert (empty.get("type"), empty.get("device")) == ("file", "cdrom")
    assert empty.find("source") is None
    assert empty.find("readonly") is not None
    # No cache/io: updateDeviceFlags refuses to change them, so every CD shape has one driver.
    assert empty.find("driver").attrib == {"name": "qemu", "type": "raw"}  # type: ignore[union-attr]
    assert empty.find("address").attrib == SCSI5  # type: ignore[union-attr]
    loaded = _disk(*SHAPES["cdrom-file"])
    assert loaded.find("source").attrib == {  # type: ignore[union-attr]
        "file": "/isos/tiny.iso", "startupPolicy": "optional"}
    assert loaded.find("driver").attrib == {"name": "qemu", "type": "raw"}  # type: ignore[union-attr]
    sliced = _disk(*SHAPES["cdrom-network-slice"])
    assert sliced.find("source/slices/slice").attrib == {  # type: ignore[union-attr]
        "type": "storage", "offset": str(4 * 1048576), "size": str(8 * 1048576)}
    assert DiskDevice("cdrom", "scsi", 0).readonly is True


def test_cd_change_keeps_address() -> None:
    """changeCD: the live device with a new volume repeats its live address."""
    live = DomainDisk(*SHAPES["cdrom-empty"])
    loaded = dataclasses.replace(live.device, pdiv=PDIV)
    disk = _disk(loaded, FileSource("/isos/new.iso"))
    assert disk.find("address").attrib == SCSI5  # type: ignore[union-attr]
    assert disk.find("target").attrib == {"dev": "sdf", "bus": "scsi"}  # type: ignore[union-attr]


def test_optional_is_dropped_where_libvirt_has_no_place() -> None:
    device = DiskDevice("cdrom", "scsi", 0, pdiv=PDIV, optional=True)
    disk = _disk(device, iscsi())
    assert disk.find("source").get("startupPolicy") is None  # type: ignore[union-attr]
    assert DomainDisk.from_element(disk).device.optional is False


# -- drive names -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("iface", "index", "name"), [
    ("virtio", 0, "vda"), ("virtio", 25, "vdz"), ("virtio", 26, "vdaa"), ("scsi", 27, "sdab"),
    ("sata", 2, "sdc"), ("ide", 2, "hdc"), ("scsi", 701, "sdzz"), ("scsi", 702, "sdaaa")])
def test_drive_names(iface: str, index: int, name: str) -> None:
    assert drive_name(iface, index) == name
    assert parse_drive_name(name) == (name[:2], index)


def test_drive_names_both_ways_exhaustive() -> None:
    for index in range(2000):
        assert parse_drive_name(drive_name("virtio", index)) == ("vd", index)


@pytest.mark.parametrize(("args", "reason"), [
    (("floppy", 0), "unknown_iface"), (("scsi", -1), "negative_index"),
    (("scsi", "1"), "invalid_index"), (("scsi", True), "invalid_index")])
def test_drive_name_errors(args: tuple[Any, Any], reason: str) -> None:
    with pytest.raises(DeviceSpecError) as err:
        drive_name(*args)
    assert err.value.reason == reason


@pytest.mark.parametrize("name", ["fda", "sd", "sdA", "xvda", "sda1", ""])
def test_parse_drive_name_errors(name: str) -> None:
    with pytest.raises(DeviceSpecError) as err:
        parse_drive_name(name)
    assert err.value.reason == "invalid_drive_name"


@pytest.mark.parametrize(("device", "source", "reason"), [
    (DiskDevice("disk", "scsi", 0), None, "missing_source"),
    (DiskDevice("lun", "scsi", 0), None, "missing_source"),
    (DiskDevice("lun", "scsi", 0), FileSource("/img"), "lun_source")])
def test_to_xml_errors(device: DiskDevice, source: Source | None, reason: str) -> None:
    with pytest.raises(DeviceSpecError) as err:
        device.to_xml(source)
    assert err.value.reason == reason


@pytest.mark.parametrize("make", [
    lambda: BlockSource("dev/sda"),
    lambda: FileSource("relative.iso"),
    lambda: IscsiSource("", 3260, IQN, 0),
    lambda: IscsiSource("h", 0, IQN, 0),
    lambda: IscsiSource("h", 65536, IQN, 0),
    lambda: IscsiSource("h", 3260, "", 0),
    lambda: IscsiSource("h", 3260, "iqn.x/1", 0),
    lambda: IscsiSource("h", 3260, IQN, -1),
    lambda: IscsiSource("h", 3260, IQN, 0, auth_user="u"),
    lambda: IscsiSource("h", 3260, IQN, 0, secret_usage="s"),
    lambda: IscsiSource("h", 3260, IQN, 0, auth_user="u", secret_usage="s", secret_uuid="x"),
    lambda: StorageSlice(-1, 10),
    lambda: StorageSlice(0, 0),
])
def test_source_errors(make: Any) -> None:
    with pytest.raises(DeviceSpecError) as err:
        make()
    assert err.value.reason == "invalid_source"


# -- parsing disk XML ------------------------------------------------------------------------------

def test_parse_disk_infers_guid_from_mapper_path() -> None:
    xml = (f"<disk type='block' device='lun'><driver name='qemu' type='raw'/>"
           f"<source dev='/dev/mapper/{GUID}' index='1'/><backingStore/>"
           f"<target dev='sda' bus='scsi'/><alias name='scsi0-0-0-0'/></disk>")
    disk = DomainDisk.from_xml(xml)
    assert disk.device.guid == GUID
    assert disk.device.alias == "scsi0-0-0-0" and disk.device.disk_id is None


def test_parse_disk_old_style_auth() -> None:
    xml = (f"<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
           f"<auth username='vy'><secret type='iscsi' usage='chap1'/></auth>"
           f"<source protocol='iscsi' name='{IQN}'><host name='10.0.0.1'/></source>"
           f"<target dev='vdb'/></disk>")
    disk = DomainDisk.from_xml(xml)
    assert disk.source == IscsiSource("10.0.0.1", 3260, IQN, 0, auth_user="vy",
                                      secret_usage="chap1")
    assert (disk.device.iface, disk.device.index) == ("virtio", 1)


@pytest.mark.parametrize(("xml", "reason"), [
    ("<disk type='file' device='disk'><source file='/x'/></disk>", "invalid_xml"),
    ("<disk type='file' device='floppy'><target dev='fda' bus='fdc'/></disk>",
     "invalid_drive_name"),
    ("<disk type='file' device='disk'><source file='/x'/><target dev='sda' bus='usb'/></disk>",
     "unsupported_disk"),
    ("<disk type='file' device='disk'><source file='/x'/><target dev='vda' bus='scsi'/></disk>",
     "unsupported_disk"),
    ("<disk type='file' device='floppy'><target dev='sda' bus='scsi'/></disk>",
     "unknown_device"),
    ("<disk type='file' device='disk'><driver name='qemu' type='vmdk'/><source file='/x'/>"
     "<target dev='sda' bus='scsi'/></disk>", "unsupported_disk"),
    ("<disk type='network' device='disk'><source protocol='rbd' name='p/i'/>"
     "<target dev='sda' bus='scsi'/></disk>", "unsupported_disk"),
    ("<disk type='network' device='disk'><source protocol='iscsi' name='iqn.x/1'/>"
     "<target dev='sda' bus='scsi'/></disk>", "invalid_xml"),
    ("<disk type='network' device='disk'><source protocol='iscsi' name='iqn.x/1'>"
     "<host name='h' port='x'/></source><target dev='sda' bus='scsi'/></disk>", "invalid_xml"),
    ("<disk type='file' device='lun'><source file='/x'/><target dev='sda' bus='scsi'/>"
     "<serial>S</serial></disk>", "serial_on_passthrough"),
    ("<disk", "malformed_xml"),
])
def test_parse_disk_errors(xml: str, reason: str) -> None:
    with pytest.raises(VirtXmlError) as err:
        DomainDisk.from_xml(xml)
    assert err.value.reason == reason


# -- metadata --------------------------------------------------------------------------------------

META = VmMetadata(7, {
    "sda": DeviceMetadata(guid=GUID, disk_id=DISK_ID, guest_name="/dev/sda"),
    "sdb": DeviceMetadata(guid=GUID2, shared="exclusive"),
    "sdc": DeviceMetadata(pdiv=PDIV, change=CdChange("loading", PDIV2)),
    "sdd": DeviceMetadata(pdiv=PDIV, change=CdChange("ejecting")),
    "sde": DeviceMetadata(),
})


def test_metadata_round_trip() -> None:
    assert VmMetadata.from_xml(META.to_xml()) == META
    assert VmMetadata.from_xml(META.to_libvirt_xml()) == META
    assert VmMetadata.from_xml(VmMetadata().to_xml()) == VmMetadata()


def test_metadata_xml_shape() -> None:
    root = etree.fromstring(META.to_xml())
    ns = {"vy": METADATA_NS}
    assert root.tag == f"{{{METADATA_NS}}}vm" and root.prefix == METADATA_KEY
    assert root.findtext("vy:generation", namespaces=ns) == "7"
    change = root.find("vy:device[@name='sdc']/vy:change", ns)
    assert change is not None
    assert change.findtext("vy:state", namespaces=ns) == "loading"
    assert change.findtext("vy:volumeID", namespaces=ns) == PDIV2.volume_id
    ejecting = root.find("vy:device[@name='sdd']/vy:change", ns)
    assert ejecting is not None
    assert [etree.QName(e).localname for e in ejecting] == ["state"]
    empty = root.find("vy:device[@name='sde']", ns)
    assert empty is not None and len(empty) == 0
    plain = etree.fromstring(META.to_libvirt_xml())
    assert plain.tag == "vm" and not plain.nsmap
    assert all(isinstance(e.tag, str) and not e.tag.startswith("{") for e in plain.iter())


def test_metadata_parses_by_namespace_not_prefix() -> None:
    xml = (f"<x:vm xmlns:x='{METADATA_NS}'><x:generation>2</x:generation>"
           f"<x:device name='vda'><x:GUID>{GUID}</x:GUID></x:device></x:vm>")
    assert VmMetadata.from_xml(xml) == VmMetadata(2, {"vda": DeviceMetadata(guid=GUID)})


def test_cd_change_lifecycle() -> None:
    current = DeviceMetadata(pdiv=PDIV, guest_name="/dev/sr0")
    loading = current.begin_change(CdChange("loading", PDIV2))
    assert loading.pdiv == PDIV and loading.change == CdChange("loading", PDIV2)
    assert loading.apply_change() == DeviceMetadata(pdiv=PDIV2, guest_name="/dev/sr0")
    assert loading.discard_change() == current
    ejecting = current.begin_change(CdChange("ejecting"))
    assert ejecting.apply_change() == DeviceMetadata(guest_name="/dev/sr0")
    assert current.apply_change() == current


def test_metadata_helpers() -> None:
    meta = META.next_generation().with_device("sde", None).with_device(
        "vda", DeviceMetadata(guid=GUID))
    assert meta.generation == 8 and "sde" not in meta.devices
    assert meta.device("vda").guid == GUID and meta.device("nope") == DeviceMetadata()
    assert META.generation == 7 and "sde" in META.devices


def test_read_and_replace_metadata_in_domain_xml() -> None:
    other = "<app:x xmlns:app='https://example.org/app'>kept</app:x>"
    xml = f"<domain type='qemu'><name>a</name><metadata>{other}</metadata></domain>"
    assert read_metadata(xml) == VmMetadata()
    replaced = replace_metadata(xml, META)
    assert read_metadata(replaced) == META
    again = replace_metadata(replaced, VmMetadata(1))
    assert read_metadata(again) == VmMetadata(1)
    root = etree.fromstring(again)
    assert len(root.findall(f"metadata/{{{METADATA_NS}}}vm")) == 1
    assert root.findtext("metadata/{https://example.org/app}x") == "kept"
    bare = replace_metadata(f"<domain type='qemu'><name>a</name><uuid>{UUID}</uuid>"
                            "<memory>1</memory></domain>", META)
    assert [e.tag for e in etree.fromstring(bare)][:3] == ["name", "uuid", "metadata"]
    assert read_metadata(replace_metadata("<domain/>", META)) == META


@pytest.mark.parametrize(("xml", "reason"), [
    ("<vm xmlns='https://example.org/other'/>", "not_virtyard_metadata"),
    (f"<vm xmlns='{METADATA_NS}'><generation>-1</generation></vm>", "invalid_generation"),
    (f"<vm xmlns='{METADATA_NS}'><generation>x</generation></vm>", "invalid_generation"),
    (f"<vm xmlns='{METADATA_NS}'><device/></vm>", "invalid_device"),
    (f"<vm xmlns='{METADATA_NS}'><device name='a'/><device name='a'/></vm>",
     "duplicate_device"),
    (f"<vm xmlns='{METADATA_NS}'><device name='a'><poolID>p</poolID></device></vm>",
     "invalid_pdiv"),
    (f"<vm xmlns='{METADATA_NS}'><device name='a'><shared>shared</shared></device></vm>",
     "invalid_shared"),
    (f"<vm xmlns='{METADATA_NS}'><device name='a'><change><state>flying</state></change>"
     "</device></vm>", "invalid_change"),
    (f"<vm xmlns='{METADATA_NS}'><device name='a'><change><state>loading</state></change>"
     "</device></vm>", "invalid_change"),
    ("<vm", "malformed_xml"),
])
def test_metadata_errors(xml: str, reason: str) -> None:
    with pytest.raises(VirtXmlError) as err:
        VmMetadata.from_xml(xml)
    assert err.value.reason == reason


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: CdChange("ejecting", PDIV), "invalid_change"),
    (lambda: CdChange("flying"), "invalid_change"),  # type: ignore[arg-type]
    (lambda: VmMetadata(-1), "invalid_generation"),
])
def test_metadata_object_errors(make: Any, reason: str) -> None:
    with pytest.raises(MetadataError) as err:
        make()
    assert err.value.reason == reason


@pytest.mark.parametrize("make", [
    lambda: Pdiv("p", "d", "i", ""),
    lambda: Pdiv.from_dict("p/d/i/v"),
])
def test_pdiv_errors(make: Any) -> None:
    """The one Pdiv (storage's) refuses a bad id with the same reason metadata reports."""
    with pytest.raises(PdivError) as err:
        make()
    assert err.value.reason == "invalid_pdiv"


def test_replace_metadata_needs_a_domain() -> None:
    with pytest.raises(VirtXmlError) as err:
        replace_metadata("<network/>", META)
    assert err.value.reason == "not_a_domain"


# -- whole domains ---------------------------------------------------------------------------------

def _domain(**kw: Any) -> Domain:
    disks = [DomainDisk(*SHAPES[name]) for name in (
        "scsi-network", "lun-block", "disk-file-cow", "cdrom-empty", "disk-exclusive")]
    base: dict[str, Any] = dict(
        name="tiny-1", uuid=UUID, memory_mib=256, vcpus=2, virt_type="qemu", machine="pc",
        kernel_boot=KernelBoot("/boot/vmlinuz", "/boot/initrd.gz", "console=ttyS0"),
        disks=disks, console_log="/var/log/vy/tiny-1.log",
        channels=[Channel(QEMU_GA_CHANNEL),
                  Channel(VIRTYARD_GA_CHANNEL, f"/var/lib/vy/channels/{UUID}.vy")],
        metadata=VmMetadata(3, {"sda": DeviceMetadata(guest_name="/dev/sda"),
                                "sdf": DeviceMetadata(change=CdChange("loading", PDIV2))}))
    base.update(kw)
    return Domain(**base)


DOMAINS: dict[str, Domain] = {
    "full": _domain(),
    "kvm-no-kernel": _domain(virt_type="kvm", kernel_boot=None, console_log=None,
                             machine="q35", on_crash="preserve", on_reboot="destroy"),
    "kernel-only": _domain(kernel_boot=KernelBoot("/k"), disks=[], metadata=VmMetadata()),
    "with-addresses": _domain(
        controllers=[Controller("scsi", 0, "virtio-scsi", PCI5),
                     Controller("virtio-serial", 0, None, dict(PCI5, slot="0x06"))],
        channels=[Channel(QEMU_GA_CHANNEL, None, {"type": "virtio-serial", "controller": "0",
                                                  "bus": "0", "port": "1"})]),
    "every-shape": _domain(disks=[DomainDisk(*shape) for shape in SHAPES.values()]),
}


@pytest.mark.parametrize("name", DOMAINS)
def test_domain_round_trip(name: str) -> None:
    domain = DOMAINS[name]
    assert Domain.from_xml(domain.to_xml()) == domain


def test_same_drive_address_on_different_buses() -> None:
    scsi = DomainDisk(*SHAPES["scsi-network"])
    ide = DomainDisk(DiskDevice("disk", "ide", 0, pdiv=PDIV, address=SCSI0), FileSource("/x"))
    assert Domain.from_xml(_domain(disks=[scsi, ide]).to_xml()).disks == [scsi, ide]


def test_domain_metadata_follows_disks() -> None:
    domain = DOMAINS["full"]
    meta = domain.metadata
    assert meta.generation == 3
    assert meta.devices["sda"] == DeviceMetadata(guid=GUID, disk_id=DISK_ID,
                                                 guest_name="/dev/sda")
    assert meta.devices["sde"] == DeviceMetadata(guid=GUID, shared="exclusive")
    assert meta.devices["sdf"] == DeviceMetadata(change=CdChange("loading", PDIV2))
    assert meta.devices["vdb"].pdiv == PDIV
    parsed = Domain.from_xml(domain.to_xml())
    assert parsed.disk("sde").device.shared == "exclusive"
    assert parsed.disk("sda").device.guid == GUID
    with pytest.raises(KeyError):
        parsed.disk("sdz")


def test_domain_xml_shape() -> None:
    root = etree.fromstring(DOMAINS["full"].to_xml())
    assert root.get("type") == "qemu"
    assert root.find("memory").attrib == {"unit": "MiB"}  # type: ignore[union-attr]
    assert root.findtext("os/kernel") == "/boot/vmlinuz"
    assert root.find("os/type").attrib == {"arch": "x86_64", "machine": "pc"}  # type: ignore[union-attr]
    assert [c.get("model") for c in root.iterfind("devices/controller")] == ["virtio-scsi",
                                                                             None]
    names = [c.find("target").get("name")  # type: ignore[union-attr]
             for c in root.iterfind("devices/channel")]
    assert names == [QEMU_GA_CHANNEL, VIRTYARD_GA_CHANNEL]
    assert root.find("devices/serial/source").attrib == {  # type: ignore[union-attr]
        "path": "/var/log/vy/tiny-1.log", "append": "on"}
    assert root.find(f"metadata/{{{METADATA_NS}}}vm") is not None


@pytest.mark.parametrize(("kw", "reason"), [
    ({"name": ""}, "invalid_domain"), ({"uuid": "nope"}, "invalid_domain"),
    ({"memory_mib": 0}, "invalid_domain"), ({"vcpus": 0}, "invalid_domain"),
    ({"virt_type": "xen"}, "invalid_domain"), ({"on_crash": "explode"}, "invalid_domain"),
    ({"disks": [DomainDisk(*SHAPES["scsi-network"]),
                DomainDisk(*SHAPES["scsi-network"])]}, "duplicate_disk"),
    ({"disks": [DomainDisk(*SHAPES["scsi-network"]), DomainDisk(dataclasses.replace(
        SHAPES["cdrom-empty"][0], address=SCSI0), None)]}, "duplicate_address"),
    ({"disks": [DomainDisk(*SHAPES["virtio-block"]), DomainDisk(dataclasses.replace(
        SHAPES["disk-file-cow"][0], address=PCI5), FileSource("/x"))]}, "duplicate_address"),
])
def test_domain_errors(kw: dict[str, Any], reason: str) -> None:
    with pytest.raises(DomainXmlError) as err:
        _domain(**kw)
    assert err.value.reason == reason


def test_controller_type_checked() -> None:
    with pytest.raises(DomainXmlError) as err:
        Controller("usb")  # type: ignore[arg-type]
    assert err.value.reason == "invalid_domain"


@pytest.mark.parametrize(("xml", "reason"), [
    ("<network/>", "not_a_domain"),
    ("<domain type='qemu'><uuid>" + UUID + "</uuid><memory>1024</memory><vcpu>1</vcpu>"
     "</domain>", "invalid_xml"),
    ("<domain type='qemu'><name>a</name><uuid>" + UUID + "</uuid><vcpu>1</vcpu></domain>",
     "invalid_xml"),
    ("<domain type='qemu'><name>a</name><uuid>" + UUID + "</uuid>"
     "<memory unit='PiB'>1</memory><vcpu>1</vcpu></domain>", "invalid_xml"),
    ("<domain type='qemu'><name>a</name><uuid>" + UUID + "</uuid>"
     "<memory unit='KiB'>1000</memory><vcpu>1</vcpu></domain>", "invalid_xml"),
    ("<domain type='qemu'><name>a</name><uuid>" + UUID + "</uuid>"
     "<memory>1024</memory><vcpu>many</vcpu></domain>", "invalid_xml"),
    ("<domain type='lxc'><name>a</name><uuid>" + UUID + "</uuid>"
     "<memory>1024</memory><vcpu>1</vcpu></domain>", "invalid_domain"),
])
def test_parse_domain_errors(xml: str, reason: str) -> None:
    with pytest.raises(VirtXmlError) as err:
        Domain.from_xml(xml)
    assert err.value.reason == reason


@pytest.mark.parametrize(("unit", "value"), [
    ("KiB", 262144), ("k", 262144), ("MiB", 256), ("M", 256), ("GiB", 1), ("b", 2**28),
    ("bytes", 2**28)])
def test_memory_units(unit: str, value: int) -> None:
    xml = (f"<domain type='qemu'><name>a</name><uuid>{UUID}</uuid>"
           f"<memory unit='{unit}'>{value}</memory><vcpu>1</vcpu></domain>")
    expected = 1024 if unit in ("GiB",) else 256
    assert Domain.from_xml(xml).memory_mib == expected


# -- libvirt 9.0's live XML of the tiny guest, as `virsh dumpxml` prints it ------------------------

CHANNELS = "/var/lib/libvirt/qemu/channel/target/domain-3-tiny-1"
LIVE_XML = f"""<domain type='qemu' id='3'>
  <name>tiny-1</name>
  <uuid>{UUID}</uuid>
  <metadata>
    <vy:vm xmlns:vy="https://virtyard.org/vm/1">
      <vy:generation>4</vy:generation>
      <vy:device name="sda">
        <vy:GUID>{GUID}</vy:GUID>
        <vy:diskId>{DISK_ID}</vy:diskId>
        <vy:guestName>/dev/sda</vy:guestName>
      </vy:device>
      <vy:device name="sdb">
        <vy:poolID>{PDIV.pool_id}</vy:poolID>
        <vy:domainID>{PDIV.domain_id}</vy:domainID>
        <vy:imageID>{PDIV.image_id}</vy:imageID>
        <vy:volumeID>{PDIV.volume_id}</vy:volumeID>
      </vy:device>
      <vy:device name="sdc"/>
    </vy:vm>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>/root/.cache/virtyard/guest/cloud-3f2a/vmlinuz</kernel>
    <initrd>/root/.cache/virtyard/guest/cloud-3f2a/initrd.gz</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
  </features>
  <cpu mode='custom' match='exact' check='full'>
    <model fallback='forbid'>qemu64</model>
    <feature policy='require' name='x2apic'/>
    <feature policy='require' name='hypervisor'/>
    <feature policy='require' name='lahf_lm'/>
    <feature policy='disable' name='svm'/>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none' error_policy='stop' rerror_policy='stop' \
io='threads'/>
      <source protocol='iscsi' name='{IQN}/1' index='3'>
        <host name='127.0.0.1' port='35417'/>
        <auth username='vy'>
          <secret type='iscsi' usage='virtyard-chap-san1'/>
        </auth>
      </source>
      <backingStore/>
      <target dev='sda' bus='scsi'/>
      <serial>0c2f1b7e9d3a4c51a8e2</serial>
      <boot order='1'/>
      <alias name='ua-{DISK_ID}'/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>
    <disk type='network' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source protocol='iscsi' name='{IQN}/2' index='2'>
        <host name='127.0.0.1' port='35417'/>
        <slices>
          <slice type='storage' offset='4194304' size='8388608'/>
        </slices>
      </source>
      <backingStore/>
      <target dev='sdb' bus='scsi'/>
      <readonly/>
      <alias name='scsi0-0-0-1'/>
      <address type='drive' controller='0' bus='0' target='0' unit='1'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sdc' bus='scsi'/>
      <readonly/>
      <alias name='scsi0-0-0-2'/>
      <address type='drive' controller='0' bus='0' target='0' unit='2'/>
    </disk>
    <controller type='scsi' index='0' model='virtio-scsi'>
      <alias name='scsi0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </controller>
    <controller type='virtio-serial' index='0'>
      <alias name='virtio-serial0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </controller>
    <controller type='usb' index='0' model='piix3-uhci'>
      <alias name='usb'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/>
    </controller>
    <controller type='pci' index='0' model='pci-root'>
      <alias name='pci.0'/>
    </controller>
    <controller type='ide' index='0'>
      <alias name='ide'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x1'/>
    </controller>
    <serial type='file'>
      <source path='/work/main/.lab-test/guests/tiny-1/console.log' append='on'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial0'/>
    </serial>
    <console type='file'>
      <source path='/work/main/.lab-test/guests/tiny-1/console.log' append='on'/>
      <target type='serial' port='0'/>
      <alias name='serial0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='{CHANNELS}/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
      <alias name='channel0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='{CHANNELS}/org.virtyard.guest_agent.0'/>
      <target type='virtio' name='org.virtyard.guest_agent.0' state='disconnected'/>
      <alias name='channel1'/>
      <address type='virtio-serial' controller='0' bus='0' port='2'/>
    </channel>
    <input type='mouse' bus='ps2'>
      <alias name='input0'/>
    </input>
    <input type='keyboard' bus='ps2'>
      <alias name='input1'/>
    </input>
    <audio id='1' type='none'/>
    <video>
      <model type='none'/>
      <alias name='video0'/>
    </video>
    <memballoon model='none'/>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+0:+0</label>
    <imagelabel>+0:+0</imagelabel>
  </seclabel>
</domain>
"""


def test_parse_live_xml() -> None:
    dom = Domain.from_xml(LIVE_XML)
    assert (dom.name, dom.uuid, dom.memory_mib, dom.vcpus) == ("tiny-1", UUID, 256, 1)
    assert (dom.virt_type, dom.machine, dom.arch) == ("qemu", "pc-i440fx-7.2", "x86_64")
    assert dom.kernel_boot == KernelBoot("/root/.cache/virtyard/guest/cloud-3f2a/vmlinuz",
                                         "/root/.cache/virtyard/guest/cloud-3f2a/initrd.gz",
                                         "console=ttyS0 quiet")
    assert dom.console_log == "/work/main/.lab-test/guests/tiny-1/console.log"
    assert [d.name for d in dom.disks] == ["sda", "sdb", "sdc"]
    sda = dom.disk("sda")
    assert sda == DomainDisk(
        DiskDevice("disk", "scsi", 0, guid=GUID, address=SCSI0, boot_order=1,
                   propagate_errors="off", serial="0c2f1b7e9d3a4c51a8e2", disk_id=DISK_ID),
        IscsiSource("127.0.0.1", 35417, IQN, 1, auth_user="vy",
                    secret_usage="virtyard-chap-san1"))
    assert sda.device.alias == f"ua-{DISK_ID}"
    sdb = dom.disk("sdb")
    assert sdb == DomainDisk(
        DiskDevice("cdrom", "scsi", 1, pdiv=PDIV, address=SCSI1, alias="scsi0-0-0-1"),
        IscsiSource("127.0.0.1", 35417, IQN, 2, slice=StorageSlice(4194304, 8388608)))
    sdc = dom.disk("sdc")
    assert sdc.source is None and sdc.device.address == dict(SCSI1, unit="2")
    assert [(c.type, c.model, (c.address or {}).get("slot")) for c in dom.controllers] == [
        ("scsi", "virtio-scsi", "0x03"), ("virtio-serial", None, "0x04")]
    assert [(c.name, c.path, (c.address or {}).get("port")) for c in dom.channels] == [
        (QEMU_GA_CHANNEL, f"{CHANNELS}/{QEMU_GA_CHANNEL}", "1"),
        (VIRTYARD_GA_CHANNEL, f"{CHANNELS}/{VIRTYARD_GA_CHANNEL}", "2")]
    assert dom.metadata.generation == 4
    assert dom.metadata.devices["sda"].guest_name == "/dev/sda"


def test_live_xml_keeps_addresses_across_redefine() -> None:
    """What we define from the live XML (restart, migration) carries the same addresses,
    aliases and metadata, and reads back equal."""
    live = Domain.from_xml(LIVE_XML)
    redefined = Domain.from_xml(live.to_xml())
    assert redefined == live
    root = etree.fromstring(live.to_xml())
    addresses = {d.find("target").get("dev"): d.find("address").attrib  # type: ignore[union-attr]
                 for d in root.iterfind("devices/disk")}
    assert addresses == {"sda": SCSI0, "sdb": SCSI1, "sdc": dict(SCSI1, unit="2")}
    assert root.find("devices/controller[@type='scsi']/address").get(  # type: ignore[union-attr]
        "slot") == "0x03"


def test_cd_change_from_live_xml() -> None:
    """changeCD on the live empty tray: same target and address, new source."""
    live = Domain.from_xml(LIVE_XML).disk("sdc")
    new = dataclasses.replace(live.device, pdiv=PDIV2)
    disk = etree.fromstring(new.to_xml(BlockSource("/dev/loop4", StorageSlice(512, 1024))))
    assert disk.get("type") == "block"
    assert disk.find("address").attrib == dict(SCSI1, unit="2")  # type: ignore[union-attr]
    assert disk.find("alias").get("name") == "scsi0-0-0-2"  # type: ignore[union-attr]
    assert disk.find("driver").attrib == {"name": "qemu", "type": "raw"}  # type: ignore[union-attr]


# -- libvirt's own schema and parser (no daemon) ---------------------------------------------------

@pytest.fixture(scope="module")
def relaxng() -> etree.RelaxNG:
    if not SCHEMA.exists():
        pytest.skip(f"libvirt's schema is not installed ({SCHEMA})")
    return etree.RelaxNG(etree.parse(str(SCHEMA)))


@pytest.mark.parametrize("name", DOMAINS)
def test_domain_validates_against_libvirt_schema(relaxng: etree.RelaxNG, name: str) -> None:
    doc = etree.fromstring(DOMAINS[name].to_xml())
    assert relaxng.validate(doc), relaxng.error_log


def test_live_xml_validates_against_libvirt_schema(relaxng: etree.RelaxNG) -> None:
    assert relaxng.validate(etree.fromstring(LIVE_XML.encode())), relaxng.error_log


def _without_addresses(domain: Domain) -> Domain:
    """Without disk addresses and libvirt's own aliases (a define keeps only ``ua-`` ones),
    disks in name order (libvirt sorts them by bus, then name)."""
    disks = [DomainDisk(dataclasses.replace(
        d.device, address=None, alias=d.device.alias if d.device.disk_id else None), d.source)
        for d in sorted(domain.disks, key=lambda d: d.name)]
    controllers = [dataclasses.replace(c, address=None) for c in domain.controllers]
    return dataclasses.replace(domain, disks=disks, controllers=controllers)


@pytest.mark.parametrize("name", DOMAINS)
def test_libvirt_test_driver_accepts_and_returns_it(name: str) -> None:
    """libvirt's in-process test driver (its real domain parser and formatter, no daemon)
    defines our XML; what it prints back parses to our domain plus the addresses it assigned."""
    libvirt = pytest.importorskip("libvirt")
    domain = DOMAINS[name]
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(domain.to_xml())
        try:
            printed = Domain.from_xml(dom.XMLDesc(0))
        finally:
            dom.undefine()
    finally:
        conn.close()
    ours, theirs = _without_addresses(domain), _without_addresses(printed)
    # libvirt adds the SCSI controllers that disks without an address need (narrow buses:
    # 7 units per controller in the generic code) after ours.
    assert theirs.controllers[:len(ours.controllers)] == ours.controllers
    assert dataclasses.replace(theirs, controllers=ours.controllers) == ours
    for disk in domain.disks:
        printed_disk = printed.disk(disk.name)
        if disk.device.address is not None:
            assert printed_disk.device.address == disk.device.address
        elif disk.device.iface != "virtio":  # PCI addresses are the QEMU driver's job
            assert printed_disk.device.address is not None


def test_libvirt_set_metadata_round_trip() -> None:
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    try:
        dom = conn.lookupByName("test")
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, META.to_libvirt_xml(),
                        METADATA_KEY, METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        answer = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS,
                              libvirt.VIR_DOMAIN_AFFECT_LIVE)
        assert VmMetadata.from_xml(answer) == META
        assert read_metadata(dom.XMLDesc(0)) == META
    finally:
        conn.close()


def test_libvirt_refuses_unfiltered_sgio() -> None:
    """Why ``sgio='unfiltered'`` is a spec error here: libvirt 9.0 itself refuses it."""
    libvirt = pytest.importorskip("libvirt")
    xml = _domain(disks=[DomainDisk(*SHAPES["lun-block"])]).to_xml().replace(
        'sgio="filtered"', 'sgio="unfiltered"')
    conn = libvirt.open("test:///default")
    try:
        with pytest.raises(libvirt.libvirtError, match="unfiltered sgio"):
            conn.defineXML(xml)
    finally:
        conn.close()
