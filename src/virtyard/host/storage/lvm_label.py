"""Our own reader of the LVM2 on-disk label and metadata text, from bytes of a device.

Why our own: the LVM tools need a block device, and the LUNs a host lists are read over iSCSI by
a user-space initiator, so there is none; no Python library reads LVM metadata from bytes. The
format is small and stable (lvm2 ``lib/format_text/layout.h``, unchanged since LVM2 001):

* a 512-byte *label* in one of sectors 0-3: ``LABELONE``, its sector number, a CRC of the rest
  of the sector, the offset of the content, and the type ``LVM2 001``;
* the *PV header* that follows: the PV UUID (32 characters), the device size, then two lists of
  ``(offset, size)`` disk areas ended by a zero entry: data areas (``pe_start``), then metadata
  areas (MDAs);
* at the start of each MDA a 512-byte *MDA header*: CRC, magic ``b" LVM2 x[5A%r0N*>"``, version,
  its own start and size, and ``raw_locn`` slots ``(offset, size, checksum, flags)``; slot 0
  locates the committed metadata text in the MDA's circular buffer (it may wrap around to just
  after the header);
* the metadata *text*: LVM's config syntax (``name { key = value ... }``) with the VG.

All CRCs are LVM's: CRC-32 (the zlib polynomial) started at ``0xf597a6cf``, not inverted.

:func:`read_pv` is the entry point: it takes the bytes already read from the start of the device
and a ``read_more(offset, length)`` callback for anything further in, so that only PVs pay for a
second read, and it never raises on damaged content: it reports what it found and why it
stopped (:attr:`PvInfo.problem`). UUIDs are formatted the way LVM prints them.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Final

ReadMore = Callable[[int, int], bytes]

SECTOR: Final = 512
LABEL_SCAN_SECTORS: Final = 4
LABEL_ID: Final = b"LABELONE"
LABEL_TYPE: Final = b"LVM2 001"
MDA_MAGIC: Final = b" LVM2 x[5A%r0N*>"
MDA_HEADER_SIZE: Final = 512
FMTT_VERSION: Final = 1
INITIAL_CRC: Final = 0xF597A6CF
RAW_LOCN_IGNORED: Final = 0x1
ID_LEN: Final = 32
MAX_METADATA_TEXT: Final = 256 << 20  # far above any real VG; bounds what damage can ask for

_UUID_GROUPS: Final = (6, 4, 4, 4, 4, 4, 6)
_UUID_CHARS: Final = re.compile(rb"[0-9A-Za-z!#]{32}")
_LABEL_HEADER: Final = struct.Struct("<8sQII8s")  # id, sector_xl, crc_xl, offset_xl, type
_DISK_LOCN: Final = struct.Struct("<QQ")
_MDA_HEADER: Final = struct.Struct("<I16sIQQ")  # checksum, magic, version, start, size
_RAW_LOCN: Final = struct.Struct("<QQII")  # offset, size, checksum, flags
_MAX_NESTING: Final = 16


class LvmFormatError(ValueError):
    """The metadata text is not what LVM writes."""


@dataclass(frozen=True, slots=True)
class DiskArea:
    """A data or metadata area, in bytes from the start of the device; ``size`` 0 for a data
    area means "to the end of the device"."""

    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Stripe:
    """Where one stripe of a segment lies: on PV ``pv_uuid`` from extent ``start_extent``."""

    pv_uuid: str
    start_extent: int


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of an LV's extents. ``stripes`` is filled for ``striped`` segments only (a linear
    segment is a striped one with one stripe); other types (thin, raid, mirror...) keep just
    their type."""

    start_extent: int
    extent_count: int
    type: str
    stripes: tuple[Stripe, ...] = ()

    @property
    def linear(self) -> bool:
        return self.type == "striped" and len(self.stripes) == 1


@dataclass(frozen=True, slots=True)
class LogicalVolume:
    name: str
    uuid: str
    tags: tuple[str, ...] = ()
    status: tuple[str, ...] = ()
    segments: tuple[Segment, ...] = ()


@dataclass(frozen=True, slots=True)
class VgPv:
    """A PV as the VG metadata lists it; sizes in bytes. ``key`` is the metadata's own name
    (``pv0``...), ``device`` the path hint LVM recorded."""

    key: str
    uuid: str
    device: str
    dev_size: int
    pe_start: int
    pe_count: int


@dataclass(frozen=True, slots=True)
class VgMetadata:
    """The parts of a VG's metadata we use. ``extent_size`` in bytes; ``tags`` sorted, as
    ``vgs -o vg_tags`` prints them."""

    name: str
    uuid: str
    seqno: int
    extent_size: int
    tags: tuple[str, ...] = ()
    status: tuple[str, ...] = ()
    pvs: tuple[VgPv, ...] = ()
    lvs: tuple[LogicalVolume, ...] = ()

    def pv(self, pv_uuid: str) -> VgPv | None:
        return next((pv for pv in self.pvs if pv.uuid == pv_uuid), None)


@dataclass(frozen=True, slots=True)
class PvInfo:
    """What the device's own bytes say about it as an LVM PV.

    ``label_valid`` is false when sectors 0-3 hold only a damaged label (bad checksum, wrong
    sector, unknown type): LVM itself then ignores the device, and only ``problem`` is set.
    ``vg`` is ``None`` when the PV belongs to no VG (``orphan``) or when none of its metadata
    areas can be used (none, or damaged: see ``problem``). ``vg_from_ignored_mda`` says the
    VG was read from a metadata area LVM ignores (``pvchange --metadataignore y``): LVM stopped
    updating it, so name and tags may be stale; the UUID never changes.
    """

    pv_uuid: str = ""
    label_valid: bool = False
    device_size: int = 0
    label_sector: int = 0
    data_areas: tuple[DiskArea, ...] = ()
    metadata_areas: tuple[DiskArea, ...] = ()
    vg: VgMetadata | None = None
    orphan: bool = False
    vg_from_ignored_mda: bool = False
    problem: str = ""

    @property
    def pe_start(self) -> int:
        """Byte offset of the first extent: from the VG metadata, else from the PV header."""
        if self.vg is not None:
            entry = self.vg.pv(self.pv_uuid)
            if entry is not None:
                return entry.pe_start
        return self.data_areas[0].offset if self.data_areas else 0


def lvm_crc(data: bytes | memoryview, initial: int = INITIAL_CRC) -> int:
    """LVM's ``calc_crc``: zlib's CRC-32 without the pre- and post-inversion."""
    return zlib.crc32(data, initial ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def format_uuid(raw: bytes) -> str:
    """32 UUID characters as LVM prints them: 6-4-4-4-4-4-6 groups joined by dashes."""
    text = raw.decode("ascii", "replace")
    parts = []
    pos = 0
    for width in _UUID_GROUPS:
        parts.append(text[pos:pos + width])
        pos += width
    return "-".join(parts)


def read_pv(head: bytes, read_more: ReadMore) -> PvInfo | None:
    """Read the LVM label, PV header and current VG metadata of a device.

    ``head`` is the first bytes of the device (8 KiB covers the label and, for a fresh VG, the
    metadata); ``read_more(offset, length)`` returns other bytes of the device and is called
    only for what ``head`` lacks. Returns ``None`` when sectors 0-3 hold no ``LABELONE``;
    otherwise a :class:`PvInfo`, whose ``problem`` says why it is incomplete, if it is.
    Exceptions from ``read_more`` (I/O errors) propagate.
    """
    device = _Device(head, read_more)
    try:
        scan = device.read(0, LABEL_SCAN_SECTORS * SECTOR)
    except _ShortReadError:
        scan = head[:LABEL_SCAN_SECTORS * SECTOR]
    damaged = ""
    for sector in range(LABEL_SCAN_SECTORS):
        raw = scan[sector * SECTOR:(sector + 1) * SECTOR]
        if not raw.startswith(LABEL_ID):
            continue
        if len(raw) < SECTOR:
            damaged = damaged or f"LVM label in sector {sector} is cut short"
            continue
        _, sector_xl, crc_xl, offset_xl, label_type = _LABEL_HEADER.unpack_from(raw)
        if sector_xl != sector:
            damaged = damaged or f"LVM label in sector {sector} claims sector {sector_xl}"
            continue
        if lvm_crc(raw[20:]) != crc_xl:
            damaged = damaged or f"LVM label checksum mismatch in sector {sector}"
            continue
        if label_type != LABEL_TYPE:
            damaged = damaged or f"LVM label of unknown type {label_type!r}"
            continue
        return _read_pv_header(device, raw, sector, offset_xl)
    if damaged:
        return PvInfo(problem=damaged)
    return None


def parse_metadata(text: str) -> VgMetadata:
    """Parse a VG's metadata text (what ``vgcfgbackup`` writes, too) into :class:`VgMetadata`.

    Raises :class:`LvmFormatError` when it is not LVM metadata text.
    """
    root = _Parser(text).parse()
    vg_sections = [(name, sec) for name, sec in root.sections.items() if "seqno" in sec.values]
    if len(vg_sections) != 1:
        raise LvmFormatError("metadata text holds no single volume group section")
    name, sec = vg_sections[0]
    pvs_sec = sec.sections.get("physical_volumes", _Section())
    pvs = tuple(VgPv(key=key, uuid=_str(pv, "id"), device=_str(pv, "device", ""),
                     dev_size=_int(pv, "dev_size", 0) * SECTOR,
                     pe_start=_int(pv, "pe_start") * SECTOR, pe_count=_int(pv, "pe_count", 0))
                for key, pv in pvs_sec.sections.items())
    uuid_by_key = {pv.key: pv.uuid for pv in pvs}
    lvs_sec = sec.sections.get("logical_volumes", _Section())
    lvs = tuple(_logical_volume(lv_name, lv, uuid_by_key)
                for lv_name, lv in lvs_sec.sections.items())
    return VgMetadata(name=name, uuid=_str(sec, "id"), seqno=_int(sec, "seqno"),
                      extent_size=_int(sec, "extent_size") * SECTOR,
                      tags=tuple(sorted(_strings(sec, "tags"))),
                      status=tuple(_strings(sec, "status")), pvs=pvs, lvs=lvs)


# --- reading --------------------------------------------------------------------------------


class _ShortReadError(Exception):
    pass


class _Device:
    """The head we were given, and ``read_more`` for the rest."""

    def __init__(self, head: bytes, read_more: ReadMore) -> None:
        self.head = head
        self.read_more = read_more

    def read(self, offset: int, length: int) -> bytes:
        end = offset + length
        if end <= len(self.head):
            data = self.head[offset:end]
        elif offset < len(self.head):
            data = self.head[offset:] + self.read_more(len(self.head), end - len(self.head))
        else:
            data = self.read_more(offset, length)
        if len(data) < length:
            raise _ShortReadError(f"only {len(data)} of {length} bytes at offset {offset}")
        return data[:length]


def _read_pv_header(device: _Device, raw: bytes, sector: int, offset_xl: int) -> PvInfo:
    base = PvInfo(label_valid=True, label_sector=sector)
    if not _LABEL_HEADER.size <= offset_xl <= SECTOR - ID_LEN - 8:
        return replace(base, problem=f"PV header offset {offset_xl} is out of the label sector")
    uuid_raw = raw[offset_xl:offset_xl + ID_LEN]
    (device_size,) = struct.unpack_from("<Q", raw, offset_xl + ID_LEN)
    pos = offset_xl + ID_LEN + 8
    lists: list[tuple[DiskArea, ...]] = []
    for _ in range(2):  # data areas, then metadata areas
        areas: list[DiskArea] = []
        while True:
            if pos + _DISK_LOCN.size > SECTOR:
                return replace(base, pv_uuid=format_uuid(uuid_raw), device_size=device_size,
                                problem="PV header disk area list is not terminated")
            offset, size = _DISK_LOCN.unpack_from(raw, pos)
            pos += _DISK_LOCN.size
            if offset == 0:
                break
            areas.append(DiskArea(offset, size))
        lists.append(tuple(areas))
    info = replace(base, pv_uuid=format_uuid(uuid_raw), device_size=device_size,
                    data_areas=lists[0], metadata_areas=lists[1])
    if not _UUID_CHARS.fullmatch(uuid_raw):
        return replace(info, problem="PV UUID holds characters LVM never writes")
    return _read_vg(device, info)


def _read_vg(device: _Device, info: PvInfo) -> PvInfo:
    """Use the first metadata area that yields the VG (or is soundly empty: an orphan); a later
    one only when earlier ones fail, since the second MDA sits at the end of the device and costs
    another read. Text from an ignored area is used only when no other area has any."""
    problems: list[str] = []
    orphan = False
    ignored: list[str] = []
    fallback: VgMetadata | None = None
    for number, area in enumerate(info.metadata_areas, 1):
        try:
            text, is_ignored = _read_mda_text(device, area, info.device_size)
        except (_ShortReadError, LvmFormatError) as exc:
            problems.append(f"metadata area {number}: {exc}")
            continue
        if text is None:  # a sound, empty area: LVM wrote no VG here
            orphan = True
            break
        try:
            vg = parse_metadata(text)
        except LvmFormatError as exc:
            problems.append(f"metadata area {number}: {exc}")
            continue
        if vg.pv(info.pv_uuid) is None:
            problems.append(f"metadata area {number}: VG {vg.name} does not list this PV")
            continue
        if is_ignored:
            ignored.append(f"metadata area {number} is ignored")
            fallback = fallback or vg
            continue
        return replace(info, vg=vg)
    if fallback is not None:
        return replace(info, vg=fallback, vg_from_ignored_mda=True)
    if not info.metadata_areas:
        problems.append("this PV has no metadata area")
    if orphan and not problems:
        return replace(info, orphan=True)
    return replace(info, problem="; ".join(problems + ignored))


def _read_mda_text(device: _Device, area: DiskArea, device_size: int
                   ) -> tuple[str | None, bool]:
    """The committed metadata text of one MDA (``None``: the MDA holds none, an orphan PV) and
    whether LVM ignores this MDA."""
    if area.size < 2 * MDA_HEADER_SIZE or (device_size and area.offset + area.size > device_size):
        raise LvmFormatError(f"implausible area {area.offset}+{area.size}")
    header = device.read(area.offset, MDA_HEADER_SIZE)
    checksum, magic, version, start, size = _MDA_HEADER.unpack_from(header)
    if magic != MDA_MAGIC:
        raise LvmFormatError("no metadata area header (bad magic)")
    if lvm_crc(header[4:]) != checksum:
        raise LvmFormatError("metadata area header checksum mismatch")
    if version != FMTT_VERSION or start != area.offset or size != area.size:
        raise LvmFormatError(f"metadata area header of version {version} at {start}+{size} "
                             f"does not match the PV header")
    offset, length, text_crc, flags = _RAW_LOCN.unpack_from(header, _MDA_HEADER.size)
    ignored = bool(flags & RAW_LOCN_IGNORED)
    if offset == 0 or length == 0:
        return None, ignored
    if not MDA_HEADER_SIZE <= offset < size or length > min(size - MDA_HEADER_SIZE,
                                                              MAX_METADATA_TEXT):
        raise LvmFormatError(f"metadata text location {offset}+{length} is out of the area")
    first = min(length, size - offset)
    data = device.read(start + offset, first)
    if first < length:  # wrapped around the circular buffer
        data += device.read(start + MDA_HEADER_SIZE, length - first)
    if lvm_crc(data) != text_crc:
        raise LvmFormatError("metadata text checksum mismatch")
    return data.rstrip(b"\0").decode("utf-8", "replace"), ignored


# --- the metadata text ------------------------------------------------------------------------

Value = str | int | float | list["Value"]


@dataclass(slots=True)
class _Section:
    values: dict[str, Value] = field(default_factory=dict)
    sections: dict[str, _Section] = field(default_factory=dict)


_TOKEN: Final = re.compile(r"""
    (?P<skip>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<word>[A-Za-z0-9_.+\-]+)
  | (?P<punct>[{}\[\]=,])
  | (?P<error>.)
""", re.VERBOSE | re.DOTALL)
_NUMBER: Final = re.compile(r"[+-]?\d+(\.\d+)?")
_ESCAPE: Final = re.compile(r"\\(.)", re.DOTALL)


class _Parser:
    """LVM's config syntax: ``name { ... }`` sections and ``key = value`` with strings,
    numbers and ``[...]`` lists; ``#`` starts a comment."""

    def __init__(self, text: str) -> None:
        self.tokens = list(self._tokenize(text))
        self.pos = 0

    @staticmethod
    def _tokenize(text: str) -> Iterator[tuple[str, str]]:
        for match in _TOKEN.finditer(text):
            kind = match.lastgroup
            if kind == "error":
                raise LvmFormatError(f"unexpected character {match.group()!r} at offset "
                                     f"{match.start()}")
            if kind != "skip":
                yield kind or "", match.group()

    def parse(self) -> _Section:
        section = self._section_body(0)
        if self.pos != len(self.tokens):
            raise LvmFormatError("unbalanced '}'")
        return section

    def _next(self) -> tuple[str, str]:
        if self.pos >= len(self.tokens):
            raise LvmFormatError("metadata text ends early")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def _section_body(self, depth: int) -> _Section:
        if depth > _MAX_NESTING:
            raise LvmFormatError("sections nested too deep")
        section = _Section()
        while self.pos < len(self.tokens):
            kind, text = self.tokens[self.pos]
            if text == "}" and kind == "punct":
                if depth == 0:
                    raise LvmFormatError("unbalanced '}'")
                return section
            self.pos += 1
            if kind != "word":
                raise LvmFormatError(f"expected a name, got {text!r}")
            _, op = self._next()
            if op == "{":
                section.sections[text] = self._section_body(depth + 1)
                if self._next()[1] != "}":
                    raise LvmFormatError("expected '}'")
            elif op == "=":
                section.values[text] = self._value(depth)
            else:
                raise LvmFormatError(f"expected '=' or '{{' after {text!r}, got {op!r}")
        if depth > 0:
            raise LvmFormatError("metadata text ends inside a section")
        return section

    def _value(self, depth: int) -> Value:
        kind, text = self._next()
        if kind == "string":
            return _ESCAPE.sub(r"\1", text[1:-1])
        if kind == "word" and _NUMBER.fullmatch(text):
            return float(text) if "." in text else int(text)
        if text == "[" and depth <= _MAX_NESTING:
            items: list[Value] = []
            if self.tokens[self.pos:self.pos + 1] == [("punct", "]")]:
                self.pos += 1
                return items
            while True:
                items.append(self._value(depth + 1))
                _, sep = self._next()
                if sep == "]":
                    return items
                if sep != ",":
                    raise LvmFormatError(f"expected ',' or ']' in a list, got {sep!r}")
        raise LvmFormatError(f"unexpected value {text!r}")


def _str(section: _Section, key: str, default: str | None = None) -> str:
    value = section.values.get(key, default)
    if not isinstance(value, str):
        raise LvmFormatError(f"{key!r} is missing or not a string")
    return value


def _int(section: _Section, key: str, default: int | None = None) -> int:
    value = section.values.get(key, default)
    if not isinstance(value, int):
        raise LvmFormatError(f"{key!r} is missing or not an integer")
    return value


def _strings(section: _Section, key: str) -> list[str]:
    value = section.values.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise LvmFormatError(f"{key!r} is not a list of strings")
    return [item for item in value if isinstance(item, str)]


def _logical_volume(name: str, sec: _Section, uuid_by_key: dict[str, str]) -> LogicalVolume:
    segments = []
    for seg in sec.sections.values():
        seg_type = _str(seg, "type")
        stripes: tuple[Stripe, ...] = ()
        if seg_type == "striped":
            items = seg.values.get("stripes", [])
            if not isinstance(items, list) or len(items) % 2:
                raise LvmFormatError(f"LV {name}: 'stripes' is not a list of PV/extent pairs")
            pairs = []
            for pv_key, start in zip(items[::2], items[1::2], strict=True):
                if not isinstance(pv_key, str) or not isinstance(start, int):
                    raise LvmFormatError(f"LV {name}: bad stripe {pv_key!r}, {start!r}")
                pairs.append(Stripe(uuid_by_key.get(pv_key, ""), start))
            stripes = tuple(pairs)
        segments.append(Segment(start_extent=_int(seg, "start_extent"),
                                extent_count=_int(seg, "extent_count"), type=seg_type,
                                stripes=stripes))
    segments.sort(key=lambda s: s.start_extent)
    return LogicalVolume(name=name, uuid=_str(sec, "id"), tags=tuple(sorted(_strings(sec, "tags"))),
                         status=tuple(_strings(sec, "status")), segments=tuple(segments))
