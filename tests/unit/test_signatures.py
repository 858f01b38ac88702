"""``signatures.probe`` on real devices, against what ``pvs`` and ``blkid -p`` say of them.

Each case makes a loop device over a sparse file with the real tools, reads its first 8 KiB in
Python as the host agent would over iSCSI, and hands anything else out through a counting
``read_more``, so the tests also pin down which LUNs pay for a second read.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from blockdevs import HEAD, Device, MiB, Reader, Scratch, blkid_p, require_root_and_tools, run

from virtyard.host.storage import signatures
from virtyard.host.storage.signatures import Usage

LVCREATE = ("--driverloaded", "n", "-an", "-Zn", "-Wn")


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Scratch]:
    require_root_and_tools("pvcreate", "losetup", "blkid")
    made = Scratch(tmp_path)
    try:
        yield made
    finally:
        made.close()


def probe(device: Device, **options: bool) -> tuple[Usage, Reader]:
    reader = Reader.of(device)
    return signatures.probe(reader.data[:HEAD], device.size, reader, **options), reader


def truth(scratch: Scratch, device: Device, devices: list[Device] | None = None) -> Usage:
    """What the real tools say, in our terms."""
    pvs = [row for row in scratch.report("pvs", "pv_name,pv_uuid,vg_uuid,vg_name,vg_tags",
                                         devices=devices or [device])
           if row["pv_name"] == device.node]
    if pvs:
        (pv,) = pvs
        return Usage("used", "lvm-pv", pv_uuid=pv["pv_uuid"], vg_uuid=pv["vg_uuid"],
                     vg_name=pv["vg_name"],
                     vg_tags=tuple(sorted(t for t in pv["vg_tags"].split(",") if t)),
                     blkid_type="LVM2_member")
    status, values = blkid_p(device.node)
    if status == 2:
        return Usage("free")
    if status == 8:
        return Usage("used", "other-signature")
    assert status == 0, status
    if values.get("USAGE") == "filesystem":
        return Usage("used", "filesystem", blkid_type=values["TYPE"])
    if "TYPE" not in values:
        return Usage("used", "partition-table", blkid_type=values["PTTYPE"])
    return Usage("used", "other-signature", blkid_type=values["TYPE"])


def same(ours: Usage, theirs: Usage) -> None:
    assert replace_detail(ours) == theirs, ours.detail


def replace_detail(usage: Usage) -> Usage:
    return Usage(usage.status, usage.reason, "", usage.pv_uuid, usage.vg_uuid, usage.vg_name,
                 usage.vg_tags, usage.blkid_type)


# --- the cases: how each device is made --------------------------------------------------------


def zeros(scratch: Scratch) -> Device:
    return scratch.device()


def pv_in_tagged_vg(scratch: Scratch) -> Device:
    dev = scratch.device()
    scratch.lvm("pvcreate", dev.node, devices=[dev])
    scratch.lvm("vgcreate", "--addtag", "RHAT_storage_domain", "--addtag", "MDT_x=1",
                "vgsig", dev.node, devices=[dev])
    scratch.lvm("lvcreate", *LVCREATE, "-L", "8M", "-n", "metadata", "vgsig", devices=[dev])
    return dev


def orphan_pv(scratch: Scratch) -> Device:
    dev = scratch.device()
    scratch.lvm("pvcreate", dev.node, devices=[dev])
    return dev


def ext4(scratch: Scratch) -> Device:
    dev = scratch.device()
    run("mkfs.ext4", "-q", "-F", "-L", "e4", dev.node)
    return dev


def xfs(scratch: Scratch) -> Device:
    require_root_and_tools("mkfs.xfs")
    dev = scratch.device(320 * MiB)
    run("mkfs.xfs", "-q", "-f", dev.node)
    return dev


def swap(scratch: Scratch) -> Device:
    dev = scratch.device()
    run("mkswap", dev.node)
    return dev


def partition_table(label: str) -> Callable[[Scratch], Device]:
    def make(scratch: Scratch) -> Device:
        require_root_and_tools("sfdisk")
        dev = scratch.device()
        subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", dev.node],
                       input=f"label: {label}\n,16M\n,\n", text=True, check=True,
                       capture_output=True)
        return dev
    make.__name__ = f"{label}_partition_table"
    return make


def iso(scratch: Scratch) -> Device:
    require_root_and_tools("genisoimage")
    image = scratch.file(0, "cd.iso")
    run("genisoimage", "-quiet", "-V", "VY", "-o", str(image.path),
        str(Path(signatures.__file__).parent))
    return scratch.device(data=image.path.read_bytes())


CASES = [zeros, pv_in_tagged_vg, orphan_pv, ext4, xfs, swap, partition_table("dos"),
         partition_table("gpt"), iso]


@pytest.mark.parametrize("make", CASES, ids=lambda make: make.__name__)
def test_probe_agrees_with_pvs_and_blkid(scratch: Scratch,
                                         make: Callable[[Scratch], Device]) -> None:
    dev = make(scratch)
    usage, reader = probe(dev)
    same(usage, truth(scratch, dev))
    assert usage.detail
    if usage.status == "free" or usage.blkid_type == "iso9660":
        assert 1 <= len(reader.calls) <= 5  # the second look: where libblkid looks
    else:
        assert reader.calls == []  # the first 8 KiB were enough


def test_expected_answers(scratch: Scratch) -> None:
    """The same devices, spelled out, so that a wrong truth() cannot hide a wrong answer."""
    assert probe(zeros(scratch))[0] == Usage("free", detail="no signature: all zero")
    usage = probe(pv_in_tagged_vg(scratch))[0]
    assert (usage.reason, usage.vg_name, usage.vg_tags) == (
        "lvm-pv", "vgsig", ("MDT_x=1", "RHAT_storage_domain"))
    assert usage.pv is not None and usage.pv.vg is not None
    assert [lv.name for lv in usage.pv.vg.lvs] == ["metadata"]
    assert probe(orphan_pv(scratch))[0].detail == "LVM PV in no VG"
    assert probe(ext4(scratch))[0].blkid_type == "ext4"
    assert probe(swap(scratch))[0].reason == "other-signature"
    assert probe(iso(scratch))[0].reason == "filesystem"


def test_without_second_look_an_iso_looks_free(scratch: Scratch) -> None:
    usage, reader = probe(iso(scratch), second_look=False)
    assert usage == Usage("free", detail="no signature in the first 8 KiB: all zero")
    assert reader.calls == []


def test_unknown_data_is_free_but_said_so(scratch: Scratch) -> None:
    dev = scratch.device(data=b"hello, not a signature" * 100)
    usage, _ = probe(dev)
    same(usage, truth(scratch, dev))
    assert usage == Usage("free", detail="no known signature (data is not zero)")


def test_damaged_pv_is_used_with_empty_vg(scratch: Scratch) -> None:
    dev = pv_in_tagged_vg(scratch)
    reader = Reader.of(dev)
    data = bytearray(reader.data)
    offset, size = struct.unpack_from("<QQ", data, 4096 + 40)  # the current text's place
    data[4096 + offset + size // 2] ^= 0xFF
    reader.data = bytes(data)
    usage = signatures.probe(reader.data[:HEAD], dev.size, reader)
    assert (usage.status, usage.reason, usage.vg_uuid, usage.vg_name, usage.vg_tags) == (
        "used", "lvm-pv", "", "", ())
    assert usage.pv_uuid and "VG unknown" in usage.detail


def test_damaged_label_alone_is_still_used(scratch: Scratch) -> None:
    dev = orphan_pv(scratch)
    reader = Reader.of(dev)
    data = bytearray(reader.data)
    data[512 + 40] ^= 0x01
    reader.data = bytes(data)
    usage = signatures.probe(reader.data[:HEAD], dev.size, reader)
    assert (usage.status, usage.reason, usage.pv_uuid) == ("used", "lvm-pv", "")
    assert usage.detail == "damaged LVM label: LVM label checksum mismatch in sector 1"


def test_ambivalent_is_used(scratch: Scratch) -> None:
    """XFS at 0 and an ext4 superblock at 1024, both in the first 8 KiB."""
    dev = xfs(scratch)
    other = ext4(scratch)
    with open(dev.node, "r+b") as f:
        f.seek(1024)
        f.write(other.read(1024, 1024))
    usage, _ = probe(dev)
    same(usage, truth(scratch, dev))
    assert "ambivalent" in usage.detail and "ext4" in usage.detail and "xfs" in usage.detail


def test_first_signature_found_wins_without_looking_further(scratch: Scratch) -> None:
    """Once the head shows a signature the LUN is used; nothing more is read, so a second
    signature further in (here ISO 9660 descriptors at 32 KiB) is not reported, where
    ``blkid -p``, reading everything, calls the device ambivalent."""
    dev = ext4(scratch)
    cd = iso(scratch)
    with open(dev.node, "r+b") as f:
        f.seek(32 * 1024)
        f.write(cd.read(32 * 1024, 8 * 1024))
    usage, reader = probe(dev)
    assert blkid_p(dev.node)[0] == 8
    assert (usage.status, usage.reason, usage.blkid_type) == ("used", "filesystem", "ext4")
    assert reader.calls == []


def test_lvm_inside_a_partition_is_a_partition_table(scratch: Scratch) -> None:
    """What the whole LUN shows is the table; the PV in partition 1 is not at its start."""
    dev = partition_table("gpt")(scratch)
    partition = scratch.device(16 * MiB)
    scratch.lvm("pvcreate", partition.node, devices=[partition])
    with open(dev.node, "r+b") as f:
        f.seek(MiB)  # sfdisk's first partition starts at 1 MiB
        f.write(partition.read(0, MiB))
    usage, _ = probe(dev)
    same(usage, truth(scratch, dev))
    assert usage.reason == "partition-table"


def test_two_pvs_fill_the_vg_from_each_other(scratch: Scratch) -> None:
    """A PV without metadata area learns its VG from its peer's metadata, as pvs does."""
    a, b = scratch.device(), scratch.device()
    scratch.lvm("pvcreate", a.node, devices=[a, b])
    scratch.lvm("pvcreate", "--metadatacopies", "0", b.node, devices=[a, b])
    scratch.lvm("vgcreate", "--addtag", "pair", "vgpair", a.node, b.node, devices=[a, b])
    usage_a, _ = probe(a)
    usage_b, _ = probe(b)
    assert usage_b.reason == "lvm-pv" and usage_b.vg_uuid == ""
    filled = signatures.fill_vgs_from_peers([usage_a, usage_b])
    for usage, dev in zip(filled, (a, b), strict=True):
        same(usage, truth(scratch, dev, [a, b]))
    assert filled[0] is usage_a


def test_ignored_metadata_area_is_flagged_then_refreshed_by_peers(scratch: Scratch) -> None:
    a, b = scratch.device(), scratch.device()
    scratch.lvm("pvcreate", a.node, b.node, devices=[a, b])
    scratch.lvm("vgcreate", "--addtag", "old", "vgign", a.node, b.node, devices=[a, b])
    scratch.lvm("pvchange", "--metadataignore", "y", b.node, devices=[a, b])
    scratch.lvm("vgchange", "--deltag", "old", "--addtag", "new", "vgign", devices=[a, b])
    usage_a, _ = probe(a)
    usage_b, _ = probe(b)
    assert usage_b.vg_tags == ("old",) and "may be stale" in usage_b.detail
    filled = signatures.fill_vgs_from_peers([usage_a, usage_b])
    for usage, dev in zip(filled, (a, b), strict=True):
        same(usage, truth(scratch, dev, [a, b]))
    assert filled[1].vg_tags == ("new",)


def test_short_reads_at_the_end_are_tolerated(scratch: Scratch) -> None:
    """A device whose reads come back short (the caller's read_more cut at the end)."""
    dev = zeros(scratch)
    reader = Reader(Reader.of(dev).data[:3 * MiB])
    usage = signatures.probe(reader.data[:HEAD], dev.size, reader)
    assert usage == Usage("free", detail="no signature: all zero")
