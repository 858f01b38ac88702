"""Our LVM label/metadata reader against what the real LVM tools wrote and report.

Every PV here is made by ``pvcreate``/``vgcreate``/``lvcreate`` on a loop device (no
device-mapper: ``--driverloaded n``, LVs never activated), and the expected values come from
``pvs``/``vgs``/``lvs`` on the same device. Damage is done to copies of those real bytes.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from blockdevs import HEAD, Device, MiB, Reader, Scratch, require_root_and_tools

from virtyard.host.storage import lvm_label
from virtyard.host.storage.lvm_label import LvmFormatError, PvInfo

MDA_AT = 4096  # where pvcreate puts the first metadata area
LVCREATE = ("--driverloaded", "n", "-an", "-Zn", "-Wn")


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Scratch]:
    require_root_and_tools("pvcreate", "losetup")
    made = Scratch(tmp_path)
    try:
        yield made
    finally:
        made.close()


def read(device: Device) -> tuple[PvInfo | None, Reader]:
    reader = Reader.of(device)
    return lvm_label.read_pv(reader.data[:HEAD], reader), reader


def pv_row(scratch: Scratch, device: Device, devices: list[Device] | None = None
           ) -> dict[str, str]:
    rows = scratch.report("pvs", "pv_name,pv_uuid,vg_uuid,vg_name,vg_tags,pe_start,dev_size",
                          devices=devices or [device])
    return next(row for row in rows if row["pv_name"] == device.node)


def tags(text: str) -> tuple[str, ...]:
    return tuple(sorted(t for t in text.split(",") if t))


def fix_label_crc(data: bytearray, sector: int = 1) -> None:
    start = sector * 512
    struct.pack_into("<I", data, start + 16, lvm_label.lvm_crc(bytes(data[start + 20:start + 512])))


def fix_mda_crc(data: bytearray, mda: int = MDA_AT) -> None:
    struct.pack_into("<I", data, mda, lvm_label.lvm_crc(bytes(data[mda + 4:mda + 512])))


def raw_locn(data: bytes | bytearray, mda: int = MDA_AT) -> tuple[int, int, int, int]:
    offset, size, checksum, flags = struct.unpack_from("<QQII", data, mda + 40)
    return offset, size, checksum, flags


@pytest.fixture
def vg_device(scratch: Scratch) -> Device:
    """A PV in a tagged VG with two LVs, one of them in two segments."""
    dev = scratch.device()
    scratch.lvm("pvcreate", dev.node, devices=[dev])
    scratch.lvm("vgcreate", "--addtag", "z9", "--addtag", "a_b+c", "vgone", dev.node,
                devices=[dev])
    scratch.lvm("lvcreate", *LVCREATE, "-L", "8M", "-n", "lv1", "--addtag", "t1", "vgone",
                devices=[dev])
    scratch.lvm("lvcreate", *LVCREATE, "-L", "4M", "-n", "lv2", "vgone", devices=[dev])
    scratch.lvm("lvextend", "--driverloaded", "n", "-L", "+4M", "vgone/lv1", devices=[dev])
    return dev


def test_pv_in_vg_matches_pvs_vgs_lvs(scratch: Scratch, vg_device: Device) -> None:
    info, reader = read(vg_device)
    assert info is not None and info.vg is not None
    # Each commit writes the text after the previous one: four commits in, it lies past 8 KiB.
    offset, size, _, _ = raw_locn(reader.data)
    assert reader.calls == [(MDA_AT + offset, size)]
    assert info.problem == "" and info.label_valid and not info.orphan
    pv = pv_row(scratch, vg_device)
    assert info.pv_uuid == pv["pv_uuid"]
    assert info.device_size == int(pv["dev_size"]) == vg_device.size
    assert info.pe_start == int(pv["pe_start"])
    vg = info.vg
    assert (vg.uuid, vg.name, vg.tags) == (pv["vg_uuid"], pv["vg_name"], tags(pv["vg_tags"]))
    (vgs,) = scratch.report("vgs", "vg_seqno,vg_extent_size", devices=[vg_device])
    assert vg.seqno == int(vgs["vg_seqno"])
    assert vg.extent_size == int(vgs["vg_extent_size"])
    segs = scratch.report("lvs", "lv_name,lv_uuid,lv_tags,seg_start_pe,seg_size_pe,segtype,"
                          "seg_pe_ranges", "--segments", devices=[vg_device])
    ours = [(lv.name, lv.uuid, ",".join(lv.tags), str(seg.start_extent), str(seg.extent_count),
             "linear" if seg.linear else seg.type,
             f"{vg_device.node}:{seg.stripes[0].start_extent}-"
             f"{seg.stripes[0].start_extent + seg.extent_count - 1}")
            for lv in vg.lvs for seg in lv.segments]
    theirs = [(s["lv_name"], s["lv_uuid"], s["lv_tags"], s["seg_start_pe"], s["seg_size_pe"],
               s["segtype"], s["seg_pe_ranges"]) for s in segs]
    assert sorted(ours) == sorted(theirs)
    assert len(theirs) == 3  # lv1 in two pieces around lv2
    assert all(seg.stripes[0].pv_uuid == info.pv_uuid for lv in vg.lvs for seg in lv.segments)


def test_orphan_pv(scratch: Scratch) -> None:
    dev = scratch.device()
    scratch.lvm("pvcreate", dev.node, devices=[dev])
    info, _ = read(dev)
    assert info is not None
    assert info.orphan and info.vg is None and info.problem == ""
    pv = pv_row(scratch, dev)
    assert (info.pv_uuid, pv["vg_name"], pv["vg_uuid"]) == (pv["pv_uuid"], "", "")
    assert info.pe_start == int(pv["pe_start"])


def test_vg_with_two_pvs_one_metadata_area_ignored(scratch: Scratch) -> None:
    a, b = scratch.device(), scratch.device()
    scratch.lvm("pvcreate", a.node, b.node, devices=[a, b])
    scratch.lvm("vgcreate", "--addtag", "two", "vgtwo", a.node, b.node, devices=[a, b])
    scratch.lvm("pvchange", "--metadataignore", "y", b.node, devices=[a, b])
    info_a, _ = read(a)
    info_b, _ = read(b)
    assert info_a is not None and info_a.vg is not None
    assert info_b is not None and info_b.vg is not None
    for info, dev in ((info_a, a), (info_b, b)):
        pv = pv_row(scratch, dev, [a, b])
        assert info.pv_uuid == pv["pv_uuid"]
        assert info.vg is not None and info.vg.uuid == pv["vg_uuid"]
        assert info.vg.name == pv["vg_name"] == "vgtwo"
    assert not info_a.vg_from_ignored_mda
    assert info_b.vg_from_ignored_mda  # LVM no longer updates it
    assert {pv.uuid for pv in info_a.vg.pvs} == {info_a.pv_uuid, info_b.pv_uuid}


def test_pv_without_metadata_area_cannot_tell_its_vg(scratch: Scratch) -> None:
    a, b = scratch.device(), scratch.device()
    scratch.lvm("pvcreate", a.node, devices=[a, b])
    scratch.lvm("pvcreate", "--metadatacopies", "0", b.node, devices=[a, b])
    scratch.lvm("vgcreate", "vgnomda", a.node, b.node, devices=[a, b])
    info, _ = read(b)
    assert info is not None and info.vg is None and not info.orphan
    assert info.metadata_areas == ()
    assert "no metadata area" in info.problem
    assert info.pv_uuid == pv_row(scratch, b, [a, b])["pv_uuid"]


def test_large_metadata_wrapping_around_the_ring(scratch: Scratch) -> None:
    """Metadata text far beyond the first 8 KiB, and split at the end of the ring buffer."""
    dev = scratch.device()
    scratch.lvm("pvcreate", dev.node, devices=[dev])
    scratch.lvm("vgcreate", "vgbig", dev.node, devices=[dev])
    wrapped = False
    for round_ in range(10):
        added = [arg for k in range(400) for arg in ("--addtag", f"r{round_}_{k:04d}_{'x' * 96}")]
        scratch.lvm("vgchange", *added, "vgbig", devices=[dev])
        head = dev.head()
        offset, size, _, _ = raw_locn(head)
        mda_size = struct.unpack_from("<Q", head, MDA_AT + 32)[0]
        if offset + size > mda_size:
            wrapped = True
            break
    assert wrapped, "LVM never wrapped its metadata ring"
    info, reader = read(dev)
    assert info is not None and info.vg is not None, info
    assert len(reader.calls) == 2  # the piece up to the end of the ring, then the rest
    (vgs,) = scratch.report("vgs", "vg_uuid,vg_tags,vg_seqno", devices=[dev])
    assert info.vg.tags == tags(vgs["vg_tags"])
    assert (info.vg.uuid, info.vg.seqno) == (vgs["vg_uuid"], int(vgs["vg_seqno"]))


def test_second_metadata_area_is_used_when_the_first_is_damaged(scratch: Scratch) -> None:
    dev = scratch.device()
    scratch.lvm("pvcreate", "--pvmetadatacopies", "2", dev.node, devices=[dev])
    scratch.lvm("vgcreate", "--addtag", "second", "vgmda2", dev.node, devices=[dev])
    reader = Reader.of(dev)
    data = bytearray(reader.data)
    data[MDA_AT + 8] ^= 0xFF  # breaks the first MDA header's magic
    reader.data = bytes(data)
    info = lvm_label.read_pv(reader.data[:HEAD], reader)
    assert info is not None and info.vg is not None
    assert info.vg.tags == ("second",)
    assert len(info.metadata_areas) == 2
    assert reader.calls and all(o >= info.metadata_areas[1].offset for o, _ in reader.calls)
    assert info.vg.uuid == pv_row(scratch, dev)["vg_uuid"]


# --- damage: copies of real PVs' bytes ---------------------------------------------------------


@pytest.fixture
def pv_bytes(vg_device: Device) -> bytes:
    return Reader.of(vg_device).data


def test_text_checksum_mismatch(pv_bytes: bytes) -> None:
    data = bytearray(pv_bytes)
    offset, size, _, _ = raw_locn(data)
    data[MDA_AT + offset + size // 2] ^= 0x01
    info = lvm_label.read_pv(bytes(data[:HEAD]), Reader(bytes(data)))
    assert info is not None and info.label_valid and info.vg is None and not info.orphan
    assert "checksum mismatch" in info.problem
    assert info.pv_uuid == lvm_label.read_pv(pv_bytes[:HEAD], Reader(pv_bytes)).pv_uuid  # type: ignore[union-attr]


def test_truncated_metadata(pv_bytes: bytes) -> None:
    """The text lies past what we were given and the device ends early."""
    offset, size, _, _ = raw_locn(pv_bytes)
    cut = MDA_AT + offset + size // 2
    info = lvm_label.read_pv(pv_bytes[:cut], Reader(pv_bytes[:cut]))
    assert info is not None and info.vg is None
    assert "only" in info.problem and "bytes at offset" in info.problem
    # Text zeroed from its middle on, as after an interrupted write.
    data = pv_bytes[:cut] + bytes(len(pv_bytes) - cut)
    info = lvm_label.read_pv(data[:HEAD], Reader(data))
    assert info is not None and info.vg is None and "checksum mismatch" in info.problem


def test_label_checksum_mismatch_is_damage_and_lvm_ignores_it(scratch: Scratch,
                                                              pv_bytes: bytes) -> None:
    data = bytearray(pv_bytes)
    data[512 + 40] ^= 0x01  # a PV UUID character; the label CRC covers it
    info = lvm_label.read_pv(bytes(data[:HEAD]), Reader(bytes(data)))
    assert info == PvInfo(problem="LVM label checksum mismatch in sector 1")
    copy = scratch.device(size=len(data), data=bytes(data[:2 * MiB]))
    assert scratch.report("pvs", "pv_name", devices=[copy]) == []  # LVM agrees: no PV


def test_garbage_after_label(pv_bytes: bytes) -> None:
    rng = random.Random(7)
    data = pv_bytes[:1024] + rng.randbytes(MiB - 1024) + pv_bytes[MiB:]
    info = lvm_label.read_pv(data[:HEAD], Reader(data))
    assert info is not None and info.label_valid and info.vg is None
    assert "bad magic" in info.problem


def test_garbage_in_the_pv_header_behind_a_valid_crc(pv_bytes: bytes) -> None:
    data = bytearray(pv_bytes)
    data[512 + 32 + 40:1024] = b"\x01" * (1024 - 512 - 32 - 40)  # no terminating entry
    fix_label_crc(data)
    info = lvm_label.read_pv(bytes(data[:HEAD]), Reader(bytes(data)))
    assert info is not None and "not terminated" in info.problem
    data = bytearray(pv_bytes)
    struct.pack_into("<I", data, 512 + 20, 4000)  # PV header offset outside the sector
    fix_label_crc(data)
    info = lvm_label.read_pv(bytes(data[:HEAD]), Reader(bytes(data)))
    assert info is not None and "out of the label sector" in info.problem


def test_text_location_out_of_the_area(pv_bytes: bytes) -> None:
    data = bytearray(pv_bytes)
    struct.pack_into("<QQ", data, MDA_AT + 40, 600, 1 << 40)
    fix_mda_crc(data)
    info = lvm_label.read_pv(bytes(data[:HEAD]), Reader(bytes(data)))
    assert info is not None and info.vg is None and "out of the area" in info.problem


def test_random_damage_never_raises(pv_bytes: bytes) -> None:
    rng = random.Random(2026)
    offset, size, _, _ = raw_locn(pv_bytes)
    text_end = MDA_AT + offset + size
    for round_ in range(3000):
        data = bytearray(pv_bytes[:MiB])
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(520, text_end)] = rng.randrange(256)
        if round_ % 2:
            fix_label_crc(data)
        if round_ % 3 == 0:
            fix_mda_crc(data)
        info = lvm_label.read_pv(bytes(data[:HEAD]), Reader(bytes(data)))
        assert info is not None  # LABELONE itself is never touched


def test_no_label() -> None:
    assert lvm_label.read_pv(bytes(HEAD), Reader(b"")) is None
    assert lvm_label.read_pv(b"LABELONE", Reader(b"LABELONE")) == PvInfo(
        problem="LVM label in sector 0 is cut short")


# --- pieces -------------------------------------------------------------------------------------


def test_format_uuid_groups_like_lvm() -> None:
    assert (lvm_label.format_uuid(b"oA8DJLesJKm6Qk79LbfNIwlzTs4OHNJ9")
            == "oA8DJL-esJK-m6Qk-79Lb-fNIw-lzTs-4OHNJ9")


def test_parse_metadata_syntax() -> None:
    text = """# a comment
    vg-1 {  # the VG
    id = "abc"
    seqno = 3
    extent_size = 8192
    tags = ["q\\"uote", "back\\\\slash"]
    status = []
    logical_volumes {
    1lv {
    id = "lvid"
    segment1 {
    start_extent = 0
    extent_count = 2
    type = "thin"
    }
    }
    }
    }
    contents = "Text Format Volume Group"
    version = 1
    """
    vg = lvm_label.parse_metadata(text)
    assert (vg.name, vg.uuid, vg.seqno, vg.extent_size) == ("vg-1", "abc", 3, 8192 * 512)
    assert vg.tags == ('back\\slash', 'q"uote')
    (lv,) = vg.lvs
    assert lv.name == "1lv" and lv.segments[0].type == "thin" and not lv.segments[0].linear


@pytest.mark.parametrize("text", [
    "", "vg { id = 1 }", "vg { id = \"x\" seqno = 1 extent_size = 1", "vg { seqno = 1 } }",
    "vg { id = \"x\" seqno = [1, } ", "a " + "x { " * 100, "vg { id = @ }",
    "vg { id = \"x\" seqno = 1 extent_size = 8 logical_volumes { l { id = \"y\" "
    "segment1 { start_extent = 0 extent_count = 1 type = \"striped\" stripes = [\"pv0\"] } } } }",
])
def test_parse_metadata_rejects_what_lvm_never_writes(text: str) -> None:
    with pytest.raises(LvmFormatError):
        lvm_label.parse_metadata(text)
