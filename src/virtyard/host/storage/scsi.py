"""Parse SCSI (SPC-4 / SBC-3) responses into typed values, and name LUNs the way udev does.

Pure functions over ``bytes``: no I/O, so the rules can be tested byte for byte. The transport
(``virtyard.host.storage.libiscsi``) only fetches raw pages; everything that interprets them lives
here. :func:`wwid` reproduces the ``ID_SERIAL`` that udev's ``scsi_id --whitelisted --page=0x83``
gives a disk, because multipath, ``/dev/disk/by-id/scsi-…`` and oVirt's device GUIDs all use it:
a WWID computed any other way would not match what a host with a kernel initiator reports.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

# Page codes of the VPD pages we read.
VPD_SUPPORTED_PAGES = 0x00
VPD_UNIT_SERIAL_NUMBER = 0x80
VPD_DEVICE_IDENTIFICATION = 0x83
VPD_BLOCK_LIMITS = 0xB0

STANDARD_INQUIRY_MIN_LEN = 36  # through the product revision level
READ_CAPACITY10_LEN = 8
READ_CAPACITY16_MIN_LEN = 12  # last LBA + block length; the rest defaults to zero
BLOCK_LIMITS_MIN_PAGE_LEN = 12  # SBC-2's short page (through optimal transfer length)


class ScsiParseError(ValueError):
    """A SCSI response is truncated or malformed; the message says which page and why."""


class DeviceType(enum.IntEnum):
    """Peripheral device types (SPC-4) we name; others stay plain ints."""

    DIRECT_ACCESS = 0x00
    SEQUENTIAL_ACCESS = 0x01
    CD_DVD = 0x05
    OPTICAL_MEMORY = 0x07
    MEDIUM_CHANGER = 0x08
    STORAGE_ARRAY_CONTROLLER = 0x0C
    ENCLOSURE_SERVICES = 0x0D
    WELL_KNOWN_LU = 0x1E
    UNKNOWN = 0x1F


class CodeSet(enum.IntEnum):
    """How a designator's value is encoded (SPC-4)."""

    BINARY = 1
    ASCII = 2
    UTF8 = 3


class Association(enum.IntEnum):
    """What a designator names (SPC-4): the LU itself, a target port or the device."""

    LOGICAL_UNIT = 0
    TARGET_PORT = 1
    TARGET_DEVICE = 2


class DesignatorType(enum.IntEnum):
    """Designator types of VPD page 0x83 (SPC-4)."""

    VENDOR_SPECIFIC = 0x0
    T10_VENDOR_ID = 0x1
    EUI64 = 0x2
    NAA = 0x3
    RELATIVE_TARGET_PORT = 0x4
    TARGET_PORT_GROUP = 0x5
    LOGICAL_UNIT_GROUP = 0x6
    MD5_LOGICAL_UNIT = 0x7
    SCSI_NAME_STRING = 0x8
    PROTOCOL_SPECIFIC_PORT = 0x9
    UUID = 0xA


class Naa(enum.IntEnum):
    """NAA field values (high nibble of an NAA designator's first byte)."""

    IEEE_EXTENDED = 0x2
    LOCALLY_ASSIGNED = 0x3
    IEEE_REGISTERED = 0x5
    IEEE_REGISTERED_EXTENDED = 0x6


def _text(raw: bytes) -> str:
    """ASCII field as text: NUL-padded or space-padded on the right, unprintables replaced."""
    text = raw.split(b"\0", 1)[0].decode("ascii", errors="replace")
    return "".join(c if c.isprintable() else "\ufffd" for c in text).strip()


def _be(data: bytes, start: int, size: int) -> int:
    return int.from_bytes(data[start:start + size], "big")


# --- standard INQUIRY -------------------------------------------------------------------------


@dataclass(frozen=True)
class StandardInquiry:
    """The standard INQUIRY data a host shows as vendor, model and revision.

    ``vendor_raw``/``product_raw`` keep the exact padded fields: scsi_id builds vendor-specific
    WWIDs from them, padding included.
    """

    peripheral_qualifier: int
    device_type: int
    removable: bool
    version: int
    tpgs: int
    vendor: str
    product: str
    revision: str
    vendor_raw: bytes
    product_raw: bytes

    @property
    def connected(self) -> bool:
        """Qualifier 0: a device of this type is connected to this LUN (not just supported)."""
        return self.peripheral_qualifier == 0

    @property
    def is_disk(self) -> bool:
        return self.device_type == DeviceType.DIRECT_ACCESS


def parse_standard_inquiry(data: bytes) -> StandardInquiry:
    """Standard INQUIRY data (EVPD=0); at least the first 36 bytes are required."""
    if len(data) < 5:
        raise ScsiParseError(f"standard INQUIRY: {len(data)} bytes, the header needs 5")
    available = 5 + data[4]
    if len(data) < STANDARD_INQUIRY_MIN_LEN or available < STANDARD_INQUIRY_MIN_LEN:
        raise ScsiParseError(
            f"standard INQUIRY truncated: {min(len(data), available)} bytes, "
            f"vendor/product/revision need {STANDARD_INQUIRY_MIN_LEN}")
    return StandardInquiry(
        peripheral_qualifier=data[0] >> 5,
        device_type=data[0] & 0x1F,
        removable=bool(data[1] & 0x80),
        version=data[2],
        tpgs=(data[5] >> 4) & 0x3,
        vendor=_text(data[8:16]),
        product=_text(data[16:32]),
        revision=_text(data[32:36]),
        vendor_raw=bytes(data[8:16]),
        product_raw=bytes(data[16:32]),
    )


# --- VPD pages --------------------------------------------------------------------------------


def vpd_page_length(data: bytes) -> int:
    """Total size of a VPD page as its header announces it (to re-ask with a larger buffer)."""
    if len(data) < 4:
        raise ScsiParseError(f"VPD page: {len(data)} bytes, the header needs 4")
    return 4 + _be(data, 2, 2)


def _vpd_body(data: bytes, page: int, name: str) -> bytes:
    if len(data) < 4:
        raise ScsiParseError(f"VPD page 0x{page:02x} ({name}): {len(data)} bytes, header needs 4")
    if data[1] != page:
        raise ScsiParseError(
            f"VPD page 0x{page:02x} ({name}) expected, the device returned page 0x{data[1]:02x}")
    end = vpd_page_length(data)
    if len(data) < end:
        raise ScsiParseError(
            f"VPD page 0x{page:02x} ({name}) truncated: {len(data)} of {end} bytes")
    return bytes(data[4:end])


def parse_supported_pages(data: bytes) -> tuple[int, ...]:
    """VPD page 0x00: the VPD page codes the logical unit supports."""
    return tuple(_vpd_body(data, VPD_SUPPORTED_PAGES, "supported pages"))


def parse_unit_serial_number(data: bytes) -> str:
    """VPD page 0x80: the product serial number, without the padding arrays put around it."""
    body = _vpd_body(data, VPD_UNIT_SERIAL_NUMBER, "unit serial number")
    return body.split(b"\0", 1)[0].decode("ascii", errors="replace").strip()


@dataclass(frozen=True)
class Designator:
    """One identification descriptor of VPD page 0x83, undecoded beyond its header."""

    protocol_identifier: int
    code_set: int
    piv: bool
    association: int
    designator_type: int
    value: bytes

    @property
    def naa(self) -> int | None:
        """The NAA field of an NAA designator (None for other types or an empty value).

        For an ASCII-coded NAA designator this is the high nibble of the first character, which
        is what scsi_id compares, whatever the characters mean.
        """
        if self.designator_type != DesignatorType.NAA or not self.value:
            return None
        return self.value[0] >> 4

    @property
    def text(self) -> str:
        """The value as text for ASCII/UTF-8 designators, lower-case hex for binary ones."""
        if self.code_set == CodeSet.BINARY:
            return self.value.hex()
        return self.value.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _parse_designators(body: bytes, *, strict: bool) -> list[Designator]:
    designators: list[Designator] = []
    offset = 0
    while offset < len(body):
        if offset + 4 > len(body):
            if not strict:
                break
            raise ScsiParseError(
                f"VPD page 0x83: designator header at offset {offset + 4} is truncated")
        length = body[offset + 3]
        end = offset + 4 + length
        if end > len(body):
            if not strict:
                break
            raise ScsiParseError(
                f"VPD page 0x83: designator at offset {offset + 4} announces {length} bytes, "
                f"only {len(body) - offset - 4} present")
        designators.append(Designator(
            protocol_identifier=body[offset] >> 4,
            code_set=body[offset] & 0x0F,
            piv=bool(body[offset + 1] & 0x80),
            association=(body[offset + 1] >> 4) & 0x3,
            designator_type=body[offset + 1] & 0x0F,
            value=bytes(body[offset + 4:end]),
        ))
        offset = end
    return designators


def parse_device_identification(data: bytes) -> tuple[Designator, ...]:
    """VPD page 0x83: every designator, in the order the device lists them."""
    body = _vpd_body(data, VPD_DEVICE_IDENTIFICATION, "device identification")
    return tuple(_parse_designators(body, strict=True))


@dataclass(frozen=True)
class BlockLimits:
    """VPD page 0xb0 (SBC-3). Fields a short (SBC-2) page lacks read as 0, i.e. "not reported"."""

    write_same_non_zero: bool
    max_compare_and_write_length: int
    optimal_transfer_length_granularity: int
    max_transfer_length: int
    optimal_transfer_length: int
    max_prefetch_length: int
    max_unmap_lba_count: int
    max_unmap_block_descriptor_count: int
    optimal_unmap_granularity: int
    unmap_granularity_alignment_valid: bool
    unmap_granularity_alignment: int
    max_write_same_length: int

    @property
    def unmap_supported(self) -> bool:
        """A device that takes UNMAP reports a non-zero maximum unmap LBA count."""
        return self.max_unmap_lba_count != 0


def parse_block_limits(data: bytes) -> BlockLimits:
    """VPD page 0xb0: transfer and unmap limits (both the 0x0c and the 0x3c page length)."""
    body = _vpd_body(data, VPD_BLOCK_LIMITS, "block limits")
    if len(body) < BLOCK_LIMITS_MIN_PAGE_LEN:
        raise ScsiParseError(
            f"VPD page 0xb0 (block limits): page length {len(body)}, "
            f"at least {BLOCK_LIMITS_MIN_PAGE_LEN} expected")
    page = bytes(4) + body + bytes(max(0, 40 - len(body)))  # absent SBC-3 fields read as 0

    return BlockLimits(
        write_same_non_zero=bool(page[4] & 0x01),
        max_compare_and_write_length=page[5],
        optimal_transfer_length_granularity=_be(page, 6, 2),
        max_transfer_length=_be(page, 8, 4),
        optimal_transfer_length=_be(page, 12, 4),
        max_prefetch_length=_be(page, 16, 4),
        max_unmap_lba_count=_be(page, 20, 4),
        max_unmap_block_descriptor_count=_be(page, 24, 4),
        optimal_unmap_granularity=_be(page, 28, 4),
        unmap_granularity_alignment_valid=bool(page[32] & 0x80),
        unmap_granularity_alignment=_be(page, 32, 4) & 0x7FFFFFFF,
        max_write_same_length=_be(page, 36, 8),
    )


# --- READ CAPACITY ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Capacity:
    """Size and geometry of a logical unit, from READ CAPACITY (16) or (10)."""

    last_lba: int
    logical_block_size: int
    physical_block_exponent: int = 0
    lowest_aligned_lba: int = 0
    provisioning_enabled: bool = False  # LBPME: the LU is thin provisioned
    provisioning_read_zeros: bool = False  # LBPRZ: unmapped blocks read as zeros

    @property
    def block_count(self) -> int:
        return self.last_lba + 1

    @property
    def capacity_bytes(self) -> int:
        return self.block_count * self.logical_block_size

    @property
    def physical_block_size(self) -> int:
        """Logical block size times 2**(logical blocks per physical block exponent)."""
        return self.logical_block_size << self.physical_block_exponent


def parse_read_capacity16(data: bytes) -> Capacity:
    """READ CAPACITY (16) parameter data (SBC-3)."""
    if len(data) < READ_CAPACITY16_MIN_LEN:
        raise ScsiParseError(
            f"READ CAPACITY(16) data truncated: {len(data)} bytes, at least "
            f"{READ_CAPACITY16_MIN_LEN} needed")
    block_size = _be(data, 8, 4)
    if block_size == 0:
        raise ScsiParseError("READ CAPACITY(16): logical block length is 0")
    return Capacity(
        last_lba=_be(data, 0, 8),
        logical_block_size=block_size,
        physical_block_exponent=data[13] & 0x0F if len(data) > 13 else 0,
        lowest_aligned_lba=_be(data, 14, 2) & 0x3FFF if len(data) > 15 else 0,
        provisioning_enabled=bool(data[14] & 0x80) if len(data) > 14 else False,
        provisioning_read_zeros=bool(data[14] & 0x40) if len(data) > 14 else False,
    )


def parse_read_capacity10(data: bytes) -> Capacity:
    """READ CAPACITY (10) data; last LBA 0xffffffff means "too large, ask with (16)"."""
    if len(data) < READ_CAPACITY10_LEN:
        raise ScsiParseError(
            f"READ CAPACITY(10) data truncated: {len(data)} bytes, {READ_CAPACITY10_LEN} needed")
    block_size = _be(data, 4, 4)
    if block_size == 0:
        raise ScsiParseError("READ CAPACITY(10): logical block length is 0")
    return Capacity(last_lba=_be(data, 0, 4), logical_block_size=block_size)


def discard_max_bytes(limits: BlockLimits | None, capacity: Capacity) -> int:
    """What oVirt reports as ``discard_max_bytes``: max unmap LBA count * logical block size.

    0 when the device does not take UNMAP: no block limits page, a zero maximum unmap LBA
    count, or logical block provisioning not enabled (LBPME clear in READ CAPACITY(16)).
    """
    if limits is None or not limits.unmap_supported or not capacity.provisioning_enabled:
        return 0
    return limits.max_unmap_lba_count * capacity.logical_block_size


# --- REPORT LUNS and LUN addressing -----------------------------------------------------------


def decode_lun(entry: bytes) -> int:
    """The LUN number of an 8-byte SAM LUN structure (first level only).

    Peripheral addressing (method 00b, bus 0) and flat space addressing (01b) both give the
    plain number, so LUN 300 is 300 however the target encodes it. Other methods keep the raw
    16-bit first level, which is unambiguous but not a small number.
    """
    if len(entry) < 2:
        raise ScsiParseError(f"LUN structure truncated: {len(entry)} bytes")
    method = entry[0] >> 6
    if method == 0b01 or (method == 0b00 and entry[0] & 0x3F == 0):
        return ((entry[0] & 0x3F) << 8) | entry[1]
    return (entry[0] << 8) | entry[1]


def encode_lun(lun: int) -> int:
    """The 16-bit first level of a LUN for the wire: peripheral up to 255, flat above."""
    if lun < 0 or lun > 0xFFFF:
        raise ValueError(f"LUN {lun} out of range")
    if lun <= 0xFF or lun > 0x3FFF:
        return lun  # small LUNs, or a raw first level from decode_lun() kept as is
    return 0x4000 | lun


def report_luns_length(data: bytes) -> int:
    """Total size of REPORT LUNS data as its header announces (to re-ask with enough room)."""
    if len(data) < 8:
        raise ScsiParseError(f"REPORT LUNS data: {len(data)} bytes, the header needs 8")
    return 8 + _be(data, 0, 4)


def parse_report_luns(data: bytes) -> tuple[int, ...]:
    """REPORT LUNS parameter data: the LUN numbers, in the order the target lists them."""
    end = report_luns_length(data)
    if len(data) < end:
        raise ScsiParseError(f"REPORT LUNS data truncated: {len(data)} of {end} bytes")
    if (end - 8) % 8:
        raise ScsiParseError(f"REPORT LUNS list length {end - 8} is not a multiple of 8")
    return tuple(decode_lun(data[i:i + 8]) for i in range(8, end, 8))


# --- WWID as udev's scsi_id builds it ---------------------------------------------------------

# scsi_id's search order (systemd src/udev/scsi_id/scsi_serial.c, id_search_list): the first
# (type, NAA, code set) rule any logical-unit designator matches wins; within a rule, the
# device's own order decides. NAA 6 beats NAA 5, but every other NAA value (2, 3, reserved
# ones) shares one rule, so between those the designator listed first wins.
_ANY = None
_SEARCH_ORDER: tuple[tuple[int, int | None, int], ...] = (
    (DesignatorType.NAA, Naa.IEEE_REGISTERED_EXTENDED, CodeSet.BINARY),
    (DesignatorType.NAA, Naa.IEEE_REGISTERED_EXTENDED, CodeSet.ASCII),
    (DesignatorType.NAA, Naa.IEEE_REGISTERED, CodeSet.BINARY),
    (DesignatorType.NAA, Naa.IEEE_REGISTERED, CodeSet.ASCII),
    (DesignatorType.NAA, _ANY, CodeSet.BINARY),
    (DesignatorType.NAA, _ANY, CodeSet.ASCII),
    (DesignatorType.EUI64, _ANY, CodeSet.BINARY),
    (DesignatorType.EUI64, _ANY, CodeSet.ASCII),
    (DesignatorType.T10_VENDOR_ID, _ANY, CodeSet.BINARY),
    (DesignatorType.T10_VENDOR_ID, _ANY, CodeSet.ASCII),
    (DesignatorType.VENDOR_SPECIFIC, _ANY, CodeSet.BINARY),
    (DesignatorType.VENDOR_SPECIFIC, _ANY, CodeSet.ASCII),
)
_MAX_SERIAL_LEN = 256  # scsi_id's buffer, NUL included; longer identifiers are skipped
_SCSI_INQ_BUFF_LEN = 254  # scsi_id asks for (and therefore sees) this much of page 0x83
_VENDOR_LEN = 8
_PRODUCT_LEN = 16
_UDEV_SAFE = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#+-.:=@_")
_C_SPACE = frozenset(b" \t\n\v\f\r")


def _udev_clean(serial: bytes) -> str:
    """scsi_id --export's ``util_replace_whitespace`` + ``util_replace_chars`` on ID_SERIAL.

    Leading " \\t\\n\\r" and all trailing whitespace go, each inner run of whitespace becomes
    one ``_``; bytes outside udev's safe set become ``_`` except ``\\x`` escapes and valid
    multi-byte UTF-8.
    """
    serial = serial.split(b"\0", 1)[0][:_MAX_SERIAL_LEN - 1]
    squeezed = bytearray()
    pending_space = False
    for byte in serial[len(serial) - len(serial.lstrip(b" \t\n\r")):]:
        if byte in _C_SPACE:
            pending_space = True
            continue
        if pending_space:
            squeezed.append(ord("_"))
            pending_space = False
        squeezed.append(byte)
    out = bytearray()
    i = 0
    while i < len(squeezed):
        byte = squeezed[i]
        if byte in _UDEV_SAFE:
            out.append(byte)
            i += 1
            continue
        if byte == ord("\\") and squeezed[i + 1:i + 2] == b"x":
            out += b"\\x"
            i += 2
            continue
        width = _utf8_sequence_length(squeezed, i)
        if width > 1:
            out += squeezed[i:i + width]
            i += width
            continue
        out.append(ord("_"))
        i += 1
    return out.decode("utf-8")


def _utf8_sequence_length(data: bytes | bytearray, start: int) -> int:
    """Length of the valid multi-byte UTF-8 character at ``start`` as udev judges it, else 0.

    udev also refuses surrogates and the non-characters U+FDD0..U+FDEF and U+xxFFFE/U+xxFFFF.
    """
    lead = data[start]
    width = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else (
        4 if 0xF0 <= lead <= 0xF4 else 0)
    if width == 0:
        return 0
    try:
        char = bytes(data[start:start + width]).decode("utf-8")
    except UnicodeDecodeError:
        return 0
    code = ord(char)
    if 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE:
        return 0
    return width


def _serial_for(designator: Designator, vendor_raw: bytes, product_raw: bytes) -> bytes | None:
    """scsi_id's serial for one matching designator, or None when scsi_id would skip it."""
    binary = designator.code_set == CodeSet.BINARY
    needed = len(designator.value) * (2 if binary else 1) + 2
    prefix = b"%x" % designator.designator_type
    if designator.designator_type == DesignatorType.VENDOR_SPECIFIC:
        needed += _VENDOR_LEN + _PRODUCT_LEN
        if len(vendor_raw) != _VENDOR_LEN or len(product_raw) != _PRODUCT_LEN \
                or b"\0" in vendor_raw or b"\0" in product_raw:
            return None  # scsi_id needs the full, unterminated vendor and model fields
        prefix += vendor_raw + product_raw
    if needed > _MAX_SERIAL_LEN:
        return None
    value = designator.value.hex().encode() if binary else designator.value
    return prefix + value


def wwid(designators: Sequence[Designator], inquiry: StandardInquiry | None = None) -> str:
    """The WWID (udev ``ID_SERIAL``) of a LUN from its page 0x83 designators; "" if none fits.

    Only designators associated with the logical unit count. For NAA this is ``3`` followed
    by the designator in lower-case hex (NAA 6 before NAA 5 before the rest), then EUI-64
    (``2``+hex), T10 vendor ID (``1``+vendor+id) and vendor specific (``0``+vendor+model+id,
    which needs ``inquiry``). scsi_id ignores SCSI name strings and UTF-8 designators; when
    nothing else is there we fall back to ``8``+name, as sg3_utils' udev rules do.
    """
    vendor_raw = inquiry.vendor_raw if inquiry is not None else b""
    product_raw = inquiry.product_raw if inquiry is not None else b""
    lu_designators = [d for d in designators if d.association == Association.LOGICAL_UNIT]
    for designator_type, naa, code_set in _SEARCH_ORDER:
        for designator in lu_designators:
            if designator.designator_type != designator_type or designator.code_set != code_set:
                continue
            if naa is not None and (not designator.value or designator.value[0] >> 4 != naa):
                continue
            serial = _serial_for(designator, vendor_raw, product_raw)
            if serial is not None:
                return _udev_clean(serial)
    for designator in lu_designators:
        if designator.designator_type == DesignatorType.SCSI_NAME_STRING and designator.value:
            return _udev_clean(b"8" + designator.value)
    return ""


def wwid_from_page83(data: bytes, inquiry: StandardInquiry | None = None) -> str:
    """:func:`wwid` from raw VPD page 0x83, with scsi_id's handling of odd pages.

    scsi_id reads only the first 254 bytes, skips a designator cut off there, and treats a
    page whose byte 6 is non-zero as an old SCSI-2 (pre-SPC-3) page: ``3`` + hex of the bytes
    after the header (EMC Symmetrix). Raises :class:`ScsiParseError` if it is not page 0x83.
    """
    if len(data) < 4 or data[1] != VPD_DEVICE_IDENTIFICATION:
        raise ScsiParseError("not a VPD page 0x83")
    seen = bytes(data[:_SCSI_INQ_BUFF_LEN])
    if len(seen) > 6 and seen[6] != 0:
        # scsi_id's buffer is zeroed first and it stops after 126 bytes (252 hex digits).
        padded = seen.ljust(_SCSI_INQ_BUFF_LEN, b"\0")
        length = min(seen[3], (_MAX_SERIAL_LEN - 4) // 2)
        return _udev_clean(b"3" + padded[4:4 + length].hex().encode())
    body = seen[4:vpd_page_length(seen)]
    return wwid(_parse_designators(body, strict=False), inquiry)
