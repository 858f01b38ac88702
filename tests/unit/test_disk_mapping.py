"""Naming VM disks from what the guest reported: real captured answers, and disagreements.

The captured guest (``tests/data/guest/all-buses``) had a disk on every bus and a passthrough
LUN; qemu-guest-agent's and libvirt's answers and our agent's scan of the same guest are the
inputs, the VM's own disk list (``vm-disks.json``) the other side.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from virtyard.guest import agent
from virtyard.host.virt.disk_mapping import (
    QEMU_GA,
    VIRTYARD_GA,
    GuestReport,
    VmDisk,
    canonical,
    disk_identities,
    guest_identity,
    map_disks,
    merge_reports,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "guest" / "all-buses"

EXPECTED = {"sdb": "/dev/sda", "sdc": "/dev/sdc", "sdd": "/dev/sdb", "sde": "/dev/sdd",
            "sdf": "/dev/sde", "vdb": "/dev/vda", "vdd": "/dev/vdc", "sda": "/dev/sr0"}


def vm_disks() -> list[VmDisk]:
    return [VmDisk.from_device(raw) for raw in json.loads((DATA / "vm-disks.json").read_text())]


def ours(received: float = 10.0) -> GuestReport:
    mapping = agent.disk_mapping(agent.scan_disks(str(DATA)))
    return GuestReport.from_agent_mapping(mapping, received)


def guest_info(received: float = 10.0) -> GuestReport:
    params = json.loads((DATA / "libvirt-guestinfo-disks.json").read_text())
    return GuestReport.from_guest_info(params, received)


def guest_get_disks(received: float = 10.0) -> GuestReport:
    disks = json.loads((DATA / "qga-guest-get-disks.json").read_text())
    return GuestReport.from_guest_get_disks(disks, received)


# -- normalising serials --------------------------------------------------------------------


@pytest.mark.parametrize("reported, identity", [
    ("0QEMU_QEMU_HARDDISK_VYSCSI2", "VYSCSI2"),
    ("SQEMU_QEMU_HARDDISK_VYSCSI2", "VYSCSI2"),  # scsi_id's page 0x80 form
    ("0QEMU_QEMU_CD-ROM_drive-scsi0-0-0-0", "drive-scsi0-0-0-0"),
    ("QEMU_HARDDISK_QM00001", "QM00001"),  # ata_id (SATA, IDE)
    ("QEMU_DVD-ROM_QM00003", "QM00003"),
    ("360000000000000000E00000000010004", "360000000000000000e00000000010004"),
    ("wwn-0x60000000000000000e00000000010004", "360000000000000000e00000000010004"),
    ("wwn-0x5000c50015ea71ad", "35000c50015ea71ad"),
    ("vy_ virtio_ 4", "vy__virtio__4"),  # udev's $attr{serial} of libvirt's "vy\ virtio\ 4"
    ("VY\\ SCSI\\ 3", "VY__SCSI__3"),  # the bare VPD 0x80 serial
    ("  spaced  ", "spaced"),
    ("MiXeD-Case.1", "MiXeD-Case.1"),  # only WWIDs are folded
])
def test_guest_identity(reported: str, identity: str) -> None:
    assert guest_identity(reported) == identity


def test_disk_identities_cover_every_form_the_guest_may_show() -> None:
    exact, truncated, targets = disk_identities(
        VmDisk("d", iface="virtio", serial="vy virtio 4 long enough to be cut", target="vdd"))
    assert {"vy_virtio_4_long_enough_to_be_cut", "vy__virtio__4__long__enough__to__be__cut"} \
        <= set(exact)
    assert guest_identity("vy_ virtio_ 4_ long_") in truncated  # 20 escaped bytes
    assert guest_identity("vy virtio 4 long eno") in truncated
    assert targets == ["target:vdd"]
    lun = disk_identities(VmDisk("l", device="lun", iface="scsi",
                                 guid="360000000000000000E00000000010004"))
    assert lun == (["360000000000000000e00000000010004"], [], [])
    no_serial = disk_identities(VmDisk("s", iface="scsi", alias="ua-disk1"))
    assert no_serial[0] == ["drive-ua-disk1"]
    assert canonical("a b\\c") == "a_b_c"


def test_from_device_reads_a_disk_dict() -> None:
    disk = VmDisk.from_device({"device": "lun", "iface": "scsi", "index": 3, "name": "sdd",
                               "GUID": "36001", "alias": "ua-x", "serial": None})
    assert disk == VmDisk("sdd", "lun", "scsi", None, "36001", "sdd", "ua-x")
    assert VmDisk.from_device({"name": "vda"}, key="disk-1").key == "disk-1"


# -- the captured guest ---------------------------------------------------------------------


def test_our_agent_alone_names_every_disk_with_an_identity() -> None:
    result = map_disks(vm_disks(), [ours()])
    assert result.names == {**EXPECTED, "vdc": ""}  # a virtio disk without serial: no way
    assert set(result.sources.values()) == {VIRTYARD_GA}
    assert result.conflicts == ()


def test_libvirt_guest_info_alone_names_every_disk_through_its_targets() -> None:
    result = map_disks(vm_disks(), [guest_info()])
    assert result.names == {**EXPECTED, "vdc": "/dev/vdb"}
    assert result.guest_disk_mapping["360000000000000000e00000000010004"] == {"name": "/dev/sdb"}


def test_guest_get_disks_names_what_has_a_serial() -> None:
    result = map_disks(vm_disks(), [guest_get_disks()])
    assert result.names == {**EXPECTED, "vdc": ""}


def test_both_sources_agree_and_merge() -> None:
    result = map_disks(vm_disks(), [guest_info(10.0), ours(11.0)])
    assert result.names == {**EXPECTED, "vdc": "/dev/vdb"}
    assert result.conflicts == ()
    reported = result.guest_disk_mapping
    assert reported["beaf14"] == {"name": "/dev/sdb"}  # only our agent says this
    assert reported["0QEMU_QEMU_HARDDISK_VYSCSI2"] == {"name": "/dev/sdc"}
    assert reported["VYSCSI2"] == {"name": "/dev/sdc"}
    assert result.sources["vdc"] == QEMU_GA and result.sources["sdd"] == VIRTYARD_GA


def test_no_report_means_no_names() -> None:
    result = map_disks(vm_disks(), [None, None])
    assert set(result.names.values()) == {""}
    assert result.guest_disk_mapping == {}


# -- disagreements: the fresher report wins -------------------------------------------------

A = VmDisk("a", iface="scsi", serial="AAA", target="sdb")
B = VmDisk("b", iface="scsi", serial="BBB", target="sdc")
LUN = VmDisk("lun", device="lun", iface="scsi", guid="36001405abcdef0000000000000000001")


def qga(serials: dict[str, str], at: float, **targets: str) -> GuestReport:
    return GuestReport(QEMU_GA, serials, at, {f"/dev/{k}": v for k, v in targets.items()},
                       tuple(serials.values()))


def mine(serials: dict[str, str], at: float) -> GuestReport:
    return GuestReport(VIRTYARD_GA, serials, at)


def test_fresher_report_wins_whichever_source_it_is() -> None:
    old = qga({"0QEMU_QEMU_HARDDISK_AAA": "/dev/sdb"}, 1.0)
    new = mine({"AAA": "/dev/sdd"}, 2.0)
    assert map_disks([A], [old, new]).names == {"a": "/dev/sdd"}
    old, new = mine({"AAA": "/dev/sdb"}, 1.0), qga({"0QEMU_QEMU_HARDDISK_AAA": "/dev/sdd"}, 2.0)
    result = map_disks([A], [new, old])
    assert result.names == {"a": "/dev/sdd"}
    assert result.guest_disk_mapping == {"0QEMU_QEMU_HARDDISK_AAA": {"name": "/dev/sdd"}}
    assert any("AAA" in c for c in result.conflicts)


def test_on_a_tie_qemu_ga_wins() -> None:
    result = map_disks([A], [mine({"AAA": "/dev/sdd"}, 5.0),
                             qga({"0QEMU_QEMU_HARDDISK_AAA": "/dev/sdb"}, 5.0)])
    assert result.names == {"a": "/dev/sdb"}


def test_an_unplugged_disk_goes_with_the_fresher_report() -> None:
    before = qga({"0QEMU_QEMU_HARDDISK_AAA": "/dev/sdb",
                  "0QEMU_QEMU_HARDDISK_BBB": "/dev/sdc"}, 1.0)
    after = mine({"BBB": "/dev/sdc"}, 2.0)  # A was unplugged
    result = map_disks([B], [before, after])
    assert result.names == {"b": "/dev/sdc"}
    assert "0QEMU_QEMU_HARDDISK_AAA" not in result.guest_disk_mapping
    assert "0QEMU_QEMU_HARDDISK_BBB" in result.guest_disk_mapping  # same disk: merged


def test_a_name_reused_by_another_disk_is_not_given_to_the_old_one() -> None:
    before = qga({"0QEMU_QEMU_HARDDISK_AAA": "/dev/sdb"}, 1.0)
    after = mine({"BBB": "/dev/sdb"}, 2.0)  # A out, B in, the guest reused the name
    result = map_disks([A, B], [before, after])
    assert result.names == {"a": "", "b": "/dev/sdb"}
    assert result.guest_disk_mapping == {"BBB": {"name": "/dev/sdb"}}


def test_unplug_and_replug_under_a_new_name() -> None:
    before = mine({"AAA": "/dev/sdb"}, 1.0)
    after = qga({"0QEMU_QEMU_HARDDISK_AAA": "/dev/sde"}, 2.0)
    assert map_disks([A], [before, after]).names == {"a": "/dev/sde"}


def test_a_fresh_qga_answer_without_serial_yet_keeps_ours() -> None:
    """Right after a hot-plug qemu-ga may list the disk before udev gave it a serial."""
    ours_now = mine({"3" + "6001405abcdef0000000000000000001": "/dev/sdc"}, 1.0)
    qga_later = GuestReport(QEMU_GA, {}, 1.2, {"/dev/sdc": "sdd"}, ("/dev/sdc",))
    result = map_disks([LUN], [ours_now, qga_later])
    assert result.names == {"lun": "/dev/sdc"}
    assert result.conflicts == ()


def test_an_older_serialless_disk_is_kept() -> None:
    vdc = VmDisk("vdc", target="vdc")
    older = qga({}, 1.0, vdb="vdc")
    newer = mine({"S": "/dev/vda"}, 2.0)
    assert map_disks([vdc], [older, newer]).names == {"vdc": "/dev/vdb"}


def test_passthrough_lun_by_wwn_or_wwid_in_any_case() -> None:
    for serial in ("36001405ABCDEF0000000000000000001", "wwn-0x6001405abcdef0000000000000000001"):
        assert map_disks([LUN], [mine({serial: "/dev/sdx"}, 1.0)]).names == {"lun": "/dev/sdx"}


def test_truncated_serials_are_used_only_when_unambiguous() -> None:
    long1 = VmDisk("one", serial="prefix-shared-20-chr-ONE")
    long2 = VmDisk("two", serial="prefix-shared-20-chr-TWO")
    report = mine({"prefix-shared-20-chr": "/dev/vda"}, 1.0)
    result = map_disks([long1, long2], [report])
    assert result.names == {"one": "", "two": ""}
    assert any("fits disks" in c for c in result.conflicts)
    assert map_disks([long1], [report]).names == {"one": "/dev/vda"}


def test_exact_match_beats_a_truncated_one() -> None:
    short = VmDisk("short", serial="abcdefghijklmnopqrst")  # exactly 20
    long = VmDisk("long", serial="abcdefghijklmnopqrstuvwxyz")
    report = mine({"abcdefghijklmnopqrst": "/dev/vda"}, 1.0)
    assert map_disks([short, long], [report]).names == {"short": "/dev/vda", "long": ""}


def test_a_name_goes_to_one_disk_only() -> None:
    twin1, twin2 = VmDisk("t1", serial="SAME"), VmDisk("t2", serial="SAME")
    result = map_disks([twin1, twin2], [mine({"SAME": "/dev/vda"}, 1.0)])
    assert result.names == {"t1": "", "t2": ""}


def test_merge_reports_lists_its_reasons() -> None:
    merged, sources, conflicts = merge_reports([
        mine({"AAA": "/dev/sdb"}, 3.0),
        qga({"0QEMU_QEMU_HARDDISK_BBB": "/dev/sdb", "0QEMU_QEMU_HARDDISK_CCC": "/dev/sdd"}, 2.0),
        qga({"0QEMU_QEMU_HARDDISK_AAA": "/dev/sdc"}, 1.0),
    ])
    assert set(merged) == {"/dev/sdb"}
    assert sources == {"/dev/sdb": VIRTYARD_GA}
    assert len(conflicts) == 3
