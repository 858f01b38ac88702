"""SCSI page parsing and scsi_id-compatible WWIDs, on real tgt answers and hand-built pages.

The ``TGT_*`` constants were captured with ``virtyard.host.storage.libiscsi`` from the lab's
tgtd (tgt 1.0.x, Debian 12): target tid 1 with an 8 MiB LUN 1 and a 3 GiB + 4 KiB LUN 2, a
second target tid 2, and a 256-LUN target (for LUN 256 and REPORT LUNS).
"""

from __future__ import annotations

import pytest

from virtyard.host.storage import scsi
from virtyard.host.storage.scsi import (
    Association,
    CodeSet,
    Designator,
    DesignatorType,
    ScsiParseError,
)

TGT_INQUIRY_LUN0 = bytes.fromhex(
    "0c0005123d0000024945542020202020436f6e74726f6c6c65722020202020203030303100000000000000"
    "00000000000000000000000000000004c0096001fb0000")
TGT_INQUIRY_LUN1 = bytes.fromhex(
    "000005123d00000249455420202020205649525455414c2d4449534b2020202030303031000000000000"
    "0000000000000000000000000000000004c0096003000000")
TGT_VPD00_LUN1 = bytes.fromhex("00000006008083b0b1b2")
TGT_VPD80_LUN1 = bytes.fromhex(
    "00800024202020202020202020202020202020202020202020202020202020202020626561663131")
TGT_VPD83_TID1_LUN1 = bytes.fromhex(
    "00830048020100244945542020202020303030313030303100000000000000000000000000000000000000"
    "000103000830000001000000010103001060000000000000000e00000000010001")
TGT_VPD83_TID2_LUN1 = bytes.fromhex(
    "00830048020100244945542020202020303030323030303100000000000000000000000000000000000000"
    "000103000830000002000000010103001060000000000000000e00000000020001")
TGT_VPD83_TID1_LUN256 = bytes.fromhex(
    "00830048020100244945542020202020303030313031303000000000000000000000000000000000000000"
    "000103000830000001000001000103001060000000000000000e00000000010100")
TGT_VPDB0_LUN1 = bytes.fromhex("00b0003c0080" + "00" * 58)
TGT_VPDB0_LUN0 = bytes.fromhex("0cb0003c0080" + "00" * 58)
TGT_RC16_LUN1 = bytes.fromhex(  # 8 MiB
    "0000000000003fff000002000003000000000000000000000000000000000000")
TGT_RC16_LUN2 = bytes.fromhex(  # 3 GiB + 4 KiB
    "0000000000600007000002000003000000000000000000000000000000000000")
TGT_REPORT_LUNS_3 = bytes.fromhex(
    "0000001800000000000000000000000000010000000000000002000000000000")
TGT_REPORT_LUNS_ENTRIES_255_256 = bytes.fromhex("00ff0000000000004100000000000000")

# What a guest's udev named tid 1 LUN 1 (lab.md: by-id scsi-360000000000000000e00000000010001).
GUEST_WWID_TID1_LUN1 = "360000000000000000e00000000010001"


def page83(*descriptors: bytes, device_type: int = 0) -> bytes:
    body = b"".join(descriptors)
    return bytes([device_type, 0x83]) + len(body).to_bytes(2, "big") + body


def desc(value: bytes, *, dtype: int, code_set: int = CodeSet.BINARY,
         association: int = Association.LOGICAL_UNIT, protocol: int = 0,
         piv: bool = False) -> bytes:
    return bytes([(protocol << 4) | code_set,
                  (0x80 if piv else 0) | (association << 4) | dtype, 0, len(value)]) + value


def designator(value: bytes, *, dtype: int, code_set: int = CodeSet.BINARY,
               association: int = Association.LOGICAL_UNIT) -> Designator:
    return Designator(protocol_identifier=0, code_set=code_set, piv=False,
                      association=association, designator_type=dtype, value=value)


NAA6 = bytes.fromhex("6001405abcdef0123456789abcdef012")
NAA5 = bytes.fromhex("5000c50012345678")
NAA3 = bytes.fromhex("3000000100000001")
NAA2 = bytes.fromhex("2000001122334455")
EUI64 = bytes.fromhex("0011223344556677")


# --- standard INQUIRY -------------------------------------------------------------------------


def test_standard_inquiry_of_a_tgt_disk() -> None:
    inq = scsi.parse_standard_inquiry(TGT_INQUIRY_LUN1)
    assert (inq.peripheral_qualifier, inq.device_type) == (0, scsi.DeviceType.DIRECT_ACCESS)
    assert inq.connected and inq.is_disk and not inq.removable
    assert (inq.vendor, inq.product, inq.revision) == ("IET", "VIRTUAL-DISK", "0001")
    assert inq.vendor_raw == b"IET     " and inq.product_raw == b"VIRTUAL-DISK    "
    assert inq.version == 5  # SPC-3


def test_standard_inquiry_of_tgt_controller_lun0() -> None:
    inq = scsi.parse_standard_inquiry(TGT_INQUIRY_LUN0)
    assert inq.device_type == scsi.DeviceType.STORAGE_ARRAY_CONTROLLER
    assert inq.product == "Controller" and not inq.is_disk


def test_standard_inquiry_of_an_absent_lun_has_qualifier_3() -> None:
    data = bytes([0x7F]) + TGT_INQUIRY_LUN0[1:]  # what tgt answers for a LUN it lacks
    inq = scsi.parse_standard_inquiry(data)
    assert inq.peripheral_qualifier == 3 and inq.device_type == 0x1F and not inq.connected


@pytest.mark.parametrize("size", [0, 4, 5, 20, 35])
def test_standard_inquiry_truncated(size: int) -> None:
    with pytest.raises(ScsiParseError, match="INQUIRY"):
        scsi.parse_standard_inquiry(TGT_INQUIRY_LUN1[:size])


def test_standard_inquiry_whose_additional_length_is_too_short() -> None:
    data = bytearray(TGT_INQUIRY_LUN1)
    data[4] = 20  # announces 25 bytes although 36 are needed
    with pytest.raises(ScsiParseError, match="truncated"):
        scsi.parse_standard_inquiry(bytes(data))


def test_inquiry_text_fields_with_nul_padding_and_garbage() -> None:
    data = bytearray(TGT_INQUIRY_LUN1)
    data[8:16] = b"ACME\0\0\0\0"
    data[16:32] = b"DISK\x01X          "
    inq = scsi.parse_standard_inquiry(bytes(data))
    assert inq.vendor == "ACME" and inq.product == "DISK\ufffdX"


# --- VPD pages --------------------------------------------------------------------------------


def test_supported_pages() -> None:
    assert scsi.parse_supported_pages(TGT_VPD00_LUN1) == (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)


def test_unit_serial_number_is_stripped() -> None:
    assert scsi.parse_unit_serial_number(TGT_VPD80_LUN1) == "beaf11"


def test_unit_serial_number_nul_padded() -> None:
    assert scsi.parse_unit_serial_number(b"\x00\x80\x00\x08SN42\0\0\0\0") == "SN42"


def test_vpd_page_code_mismatch() -> None:
    with pytest.raises(ScsiParseError, match="expected"):
        scsi.parse_unit_serial_number(TGT_VPD00_LUN1)


@pytest.mark.parametrize("parse, data", [
    (scsi.parse_supported_pages, TGT_VPD00_LUN1),
    (scsi.parse_unit_serial_number, TGT_VPD80_LUN1),
    (scsi.parse_device_identification, TGT_VPD83_TID1_LUN1),
    (scsi.parse_block_limits, TGT_VPDB0_LUN1),
])
@pytest.mark.parametrize("cut", [0, 3, -1])
def test_truncated_vpd_pages(parse: object, data: bytes, cut: int) -> None:
    assert callable(parse)
    with pytest.raises(ScsiParseError):
        parse(data[:cut])


def test_vpd_page_length_from_header() -> None:
    assert scsi.vpd_page_length(TGT_VPD83_TID1_LUN1[:4]) == len(TGT_VPD83_TID1_LUN1) == 76


def test_device_identification_of_tgt() -> None:
    t10, naa3, naa6 = scsi.parse_device_identification(TGT_VPD83_TID1_LUN1)
    assert t10.designator_type == DesignatorType.T10_VENDOR_ID
    assert t10.code_set == CodeSet.ASCII and t10.association == Association.LOGICAL_UNIT
    assert t10.value == b"IET     00010001" + bytes(20) and t10.text == "IET     00010001"
    assert naa3.designator_type == DesignatorType.NAA and naa3.naa == scsi.Naa.LOCALLY_ASSIGNED
    assert naa3.value.hex() == "3000000100000001"
    assert naa6.naa == scsi.Naa.IEEE_REGISTERED_EXTENDED
    assert naa6.text == "60000000000000000e00000000010001"
    assert t10.naa is None


def test_designator_header_fields() -> None:
    page = page83(desc(b"\x00\x01", dtype=DesignatorType.RELATIVE_TARGET_PORT,
                       association=Association.TARGET_PORT, protocol=5, piv=True))
    (d,) = scsi.parse_device_identification(page)
    assert (d.protocol_identifier, d.piv, d.association, d.designator_type) == (
        5, True, Association.TARGET_PORT, DesignatorType.RELATIVE_TARGET_PORT)


def test_designator_running_past_the_page() -> None:
    page = bytearray(page83(desc(NAA6, dtype=DesignatorType.NAA)))
    page[7] = 40  # the designator claims 40 bytes, the page holds 16
    with pytest.raises(ScsiParseError, match="announces 40 bytes"):
        scsi.parse_device_identification(bytes(page))


def test_designator_header_cut() -> None:
    page = page83(desc(NAA6, dtype=DesignatorType.NAA)) + b"\x01\x03"
    page = page[:2] + (len(page) - 4).to_bytes(2, "big") + page[4:]
    with pytest.raises(ScsiParseError, match="truncated"):
        scsi.parse_device_identification(page)


def test_block_limits_of_tgt_report_no_unmap() -> None:
    limits = scsi.parse_block_limits(TGT_VPDB0_LUN1)
    assert limits.max_compare_and_write_length == 0x80
    assert limits.max_unmap_lba_count == 0 and not limits.unmap_supported
    capacity = scsi.parse_read_capacity16(TGT_RC16_LUN1)
    assert scsi.discard_max_bytes(limits, capacity) == 0


def block_limits_page(*, max_unmap: int, granularity: int, alignment: int | None = None,
                      length: int = 0x3C) -> bytes:
    body = bytearray(length)
    body[2:4] = (8).to_bytes(2, "big")  # optimal transfer length granularity
    body[4:8] = (2048).to_bytes(4, "big")  # maximum transfer length
    body[8:12] = (1024).to_bytes(4, "big")  # optimal transfer length
    if length >= 0x3C:
        body[16:20] = max_unmap.to_bytes(4, "big")
        body[20:24] = (64).to_bytes(4, "big")
        body[24:28] = granularity.to_bytes(4, "big")
        if alignment is not None:
            body[28:32] = (0x80000000 | alignment).to_bytes(4, "big")
        body[32:40] = (0xFFFF).to_bytes(8, "big")
    return b"\x00\xb0" + length.to_bytes(2, "big") + bytes(body)


def test_block_limits_with_unmap_and_discard_max_bytes() -> None:
    limits = scsi.parse_block_limits(block_limits_page(max_unmap=0x400000, granularity=8,
                                                       alignment=3))
    assert limits.max_unmap_lba_count == 0x400000 and limits.unmap_supported
    assert limits.max_unmap_block_descriptor_count == 64
    assert limits.optimal_unmap_granularity == 8
    assert limits.unmap_granularity_alignment_valid and limits.unmap_granularity_alignment == 3
    assert limits.max_transfer_length == 2048 and limits.optimal_transfer_length == 1024
    assert limits.optimal_transfer_length_granularity == 8
    assert limits.max_write_same_length == 0xFFFF
    thin = scsi.Capacity(last_lba=1 << 20, logical_block_size=512, provisioning_enabled=True)
    assert scsi.discard_max_bytes(limits, thin) == 0x400000 * 512
    thick = scsi.Capacity(last_lba=1 << 20, logical_block_size=512)
    assert scsi.discard_max_bytes(limits, thick) == 0  # LBPME clear: no UNMAP
    assert scsi.discard_max_bytes(None, thin) == 0


def test_short_sbc2_block_limits_page() -> None:
    limits = scsi.parse_block_limits(block_limits_page(max_unmap=0, granularity=0, length=0x0C))
    assert limits.max_transfer_length == 2048
    assert limits.max_unmap_lba_count == 0 and limits.max_write_same_length == 0


def test_block_limits_page_too_short() -> None:
    with pytest.raises(ScsiParseError, match="page length 8"):
        scsi.parse_block_limits(b"\x00\xb0\x00\x08" + bytes(8))


# --- READ CAPACITY ----------------------------------------------------------------------------


def test_read_capacity16_of_tgt_luns() -> None:
    small = scsi.parse_read_capacity16(TGT_RC16_LUN1)
    assert small.capacity_bytes == 8 * 1024 * 1024 and small.block_count == 16384
    assert small.logical_block_size == 512 and small.physical_block_size == 4096
    assert not small.provisioning_enabled
    big = scsi.parse_read_capacity16(TGT_RC16_LUN2)
    assert big.capacity_bytes == 3 * 1024**3 + 4096


def test_read_capacity16_provisioning_and_alignment_bits() -> None:
    data = bytes.fromhex("00000001ffffffff00001000") + bytes([0, 0x01, 0xC0, 0x07]) + bytes(16)
    cap = scsi.parse_read_capacity16(data)
    assert cap.capacity_bytes == 0x200000000 * 4096
    assert cap.physical_block_size == 8192
    assert cap.provisioning_enabled and cap.provisioning_read_zeros
    assert cap.lowest_aligned_lba == 7


def test_read_capacity16_minimal_and_truncated() -> None:
    assert scsi.parse_read_capacity16(TGT_RC16_LUN1[:12]).physical_block_size == 512
    with pytest.raises(ScsiParseError, match="truncated"):
        scsi.parse_read_capacity16(TGT_RC16_LUN1[:11])
    with pytest.raises(ScsiParseError, match="block length is 0"):
        scsi.parse_read_capacity16(bytes(32))


def test_read_capacity10() -> None:
    cap = scsi.parse_read_capacity10(bytes.fromhex("00003fff00000200"))
    assert cap.capacity_bytes == 8 * 1024 * 1024 and cap.physical_block_size == 512
    with pytest.raises(ScsiParseError):
        scsi.parse_read_capacity10(bytes(7))


# --- REPORT LUNS ------------------------------------------------------------------------------


def test_report_luns_of_tgt() -> None:
    assert scsi.parse_report_luns(TGT_REPORT_LUNS_3) == (0, 1, 2)


def test_report_luns_flat_addressing_above_255() -> None:
    data = (16).to_bytes(4, "big") + bytes(4) + TGT_REPORT_LUNS_ENTRIES_255_256
    assert scsi.parse_report_luns(data) == (255, 256)  # tgt sends LUN 256 as 0x4100 (flat)
    assert scsi.encode_lun(255) == 0x00FF and scsi.encode_lun(256) == 0x4100


def test_report_luns_truncated() -> None:
    assert scsi.report_luns_length(TGT_REPORT_LUNS_3[:16]) == 32
    with pytest.raises(ScsiParseError, match="truncated"):
        scsi.parse_report_luns(TGT_REPORT_LUNS_3[:16])
    with pytest.raises(ScsiParseError):
        scsi.report_luns_length(b"\x00")


# --- WWID -------------------------------------------------------------------------------------


def test_wwid_of_tgt_tid1_lun1_is_what_the_guest_saw() -> None:
    assert scsi.wwid_from_page83(TGT_VPD83_TID1_LUN1) == GUEST_WWID_TID1_LUN1
    designators = scsi.parse_device_identification(TGT_VPD83_TID1_LUN1)
    assert scsi.wwid(designators) == GUEST_WWID_TID1_LUN1


@pytest.mark.parametrize("page, expected", [
    (TGT_VPD83_TID2_LUN1, "360000000000000000e00000000020001"),
    (TGT_VPD83_TID1_LUN256, "360000000000000000e00000000010100"),
])
def test_wwid_of_other_tgt_luns_follows_tid_and_lun(page: bytes, expected: str) -> None:
    assert scsi.wwid_from_page83(page) == expected


def test_naa6_wins_over_an_earlier_naa3() -> None:
    page = page83(desc(NAA3, dtype=DesignatorType.NAA), desc(NAA6, dtype=DesignatorType.NAA))
    assert scsi.wwid_from_page83(page) == "3" + NAA6.hex()


@pytest.mark.parametrize("first, second, expected", [
    (NAA5, NAA6, NAA6), (NAA6, NAA5, NAA6),  # registered extended before registered
    (NAA3, NAA5, NAA5), (NAA2, NAA5, NAA5),  # registered before the rest
    # NAA 2 and 3 share one rule in scsi_id: the one listed first wins, either way round.
    (NAA3, NAA2, NAA3), (NAA2, NAA3, NAA2),
])
def test_naa_preference(first: bytes, second: bytes, expected: bytes) -> None:
    designators = [designator(first, dtype=DesignatorType.NAA),
                   designator(second, dtype=DesignatorType.NAA)]
    assert scsi.wwid(designators) == "3" + expected.hex()


def test_binary_naa_before_ascii_naa_of_the_same_kind() -> None:
    ascii_naa6 = designator(b"6ABCDEF", dtype=DesignatorType.NAA, code_set=CodeSet.ASCII)
    binary_naa6 = designator(NAA6, dtype=DesignatorType.NAA)
    assert scsi.wwid([ascii_naa6, binary_naa6]) == "3" + NAA6.hex()
    # ...but an ASCII NAA "6" (high nibble of '6' is 3, so it only counts as "any NAA")
    # loses to a binary NAA 5.
    assert scsi.wwid([ascii_naa6, designator(NAA5, dtype=DesignatorType.NAA)]) == "3" + NAA5.hex()
    assert scsi.wwid([ascii_naa6]) == "36ABCDEF"


def test_only_logical_unit_designators_count() -> None:
    port_naa = designator(NAA6, dtype=DesignatorType.NAA, association=Association.TARGET_PORT)
    device_naa = designator(NAA5, dtype=DesignatorType.NAA,
                            association=Association.TARGET_DEVICE)
    eui = designator(EUI64, dtype=DesignatorType.EUI64)
    assert scsi.wwid([port_naa, device_naa, eui]) == "2" + EUI64.hex()
    assert scsi.wwid([port_naa, device_naa]) == ""


def test_eui64_before_t10_vendor_id() -> None:
    t10 = designator(b"ACME    LUN-0001", dtype=DesignatorType.T10_VENDOR_ID,
                     code_set=CodeSet.ASCII)
    eui = designator(EUI64, dtype=DesignatorType.EUI64)
    assert scsi.wwid([t10, eui]) == "20011223344556677"
    eui_ascii = designator(b"0011223344556677", dtype=DesignatorType.EUI64,
                           code_set=CodeSet.ASCII)
    assert scsi.wwid([t10, eui_ascii]) == "20011223344556677"


def test_t10_vendor_id_spaces_become_underscores() -> None:
    t10 = designator(b"ACME    LUN  0001  ", dtype=DesignatorType.T10_VENDOR_ID,
                     code_set=CodeSet.ASCII)
    assert scsi.wwid([t10]) == "1ACME_LUN_0001"


def test_tgt_t10_vendor_id_alone_stops_at_its_nul_padding() -> None:
    t10, _, _ = scsi.parse_device_identification(TGT_VPD83_TID1_LUN1)
    assert scsi.wwid([t10]) == "1IET_00010001"


def test_binary_t10_vendor_id_is_hex() -> None:
    t10 = designator(b"\x01\x02", dtype=DesignatorType.T10_VENDOR_ID)
    assert scsi.wwid([t10]) == "10102"


def test_vendor_specific_uses_vendor_and_model_from_inquiry() -> None:
    inquiry = scsi.parse_standard_inquiry(TGT_INQUIRY_LUN1)
    vendor_specific = designator(b"\xca\xfe", dtype=DesignatorType.VENDOR_SPECIFIC)
    assert scsi.wwid([vendor_specific], inquiry) == "0IET_VIRTUAL-DISK_cafe"
    assert scsi.wwid([vendor_specific]) == ""  # scsi_id cannot build it without INQUIRY data


def test_scsi_name_string_only_as_last_resort() -> None:
    name = designator(b"iqn.2026-11.org.example:disk1,L,0x0001\0\0",
                      dtype=DesignatorType.SCSI_NAME_STRING, code_set=CodeSet.UTF8)
    assert scsi.wwid([name]) == "8iqn.2026-11.org.example:disk1_L_0x0001"
    assert scsi.wwid([name, designator(EUI64, dtype=DesignatorType.EUI64)]).startswith("2")


def test_target_port_group_and_relative_port_are_never_the_wwid() -> None:
    tpg = designator(b"\x00\x00\x00\x01", dtype=DesignatorType.TARGET_PORT_GROUP,
                     association=Association.TARGET_PORT)
    rel = designator(b"\x00\x00\x00\x01", dtype=DesignatorType.RELATIVE_TARGET_PORT,
                     association=Association.TARGET_PORT)
    uuid = designator(bytes(18), dtype=DesignatorType.UUID)
    assert scsi.wwid([tpg, rel, uuid]) == ""


def test_identifier_too_long_for_scsi_id_is_skipped() -> None:
    huge = designator(bytes(range(128)), dtype=DesignatorType.NAA)  # 128*2 + 2 > 256
    eui = designator(EUI64, dtype=DesignatorType.EUI64)
    assert scsi.wwid([huge, eui]) == "2" + EUI64.hex()


def test_udev_character_cleanup() -> None:
    t10 = designator("AC/ME\tDisk é\x7f".encode(), dtype=DesignatorType.T10_VENDOR_ID,
                     code_set=CodeSet.ASCII)
    assert scsi.wwid([t10]) == "1AC_ME_Disk_é_"
    escaped = designator(b"A\\x2fB\xff", dtype=DesignatorType.T10_VENDOR_ID,
                         code_set=CodeSet.ASCII)
    assert scsi.wwid([escaped]) == "1A\\x2fB_"


def test_wwid_from_pre_spc3_page83() -> None:
    # EMC Symmetrix style: a bare 16-byte WWN after the header, byte 6 non-zero.
    wwn = bytes.fromhex("60060480000190100123533030334530")
    page = b"\x00\x83\x00\x10" + wwn
    assert scsi.wwid_from_page83(page) == "3" + wwn.hex()


def test_wwid_from_page83_ignores_a_designator_cut_by_scsi_ids_buffer() -> None:
    filler = desc(bytes(240), dtype=DesignatorType.VENDOR_SPECIFIC)  # ends at byte 248
    page = page83(filler, desc(NAA6, dtype=DesignatorType.NAA))  # NAA 6 runs past byte 254
    assert scsi.wwid(scsi.parse_device_identification(page)) == "3" + NAA6.hex()
    assert scsi.wwid_from_page83(page) == ""  # scsi_id never sees it (and cannot build '0')


def test_wwid_from_page83_rejects_other_pages() -> None:
    with pytest.raises(ScsiParseError):
        scsi.wwid_from_page83(TGT_VPD80_LUN1)
