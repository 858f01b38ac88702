"""virtyard guest agent: tell the host what name the guest gave each disk.

This one file is copied alone into guests and run by any Python 3.9+ with the standard library
only, so it imports nothing from ``virtyard`` and nothing outside the standard library.

It reads the disks from sysfs (``/sys/block``: the virtio ``serial``, the SCSI VPD pages 0x80
and 0x83 the kernel cached at scan time, ``device/wwid``) and ``/dev/disk/by-id``, and writes
newline-delimited JSON objects named by ``__name__`` (oVirt's guest agent protocol) to the
virtio-serial port ``org.virtyard.guest_agent.0``:

* ``disks-usage`` with ``mapping`` ``{serial: {"name": "/dev/sdb"}}`` (and oVirt's ``disks``:
  usage of the mounted block-device file systems): at start, whenever the host connects, within
  a fraction of a second of a disk appearing or going (kernel/udev uevents over netlink, plus a
  cheap poll of ``/sys/block`` as a safety net), periodically, and when the host sends
  ``{"__name__": "refresh"}``;
* ``heartbeat`` every few seconds, so the host can tell a live agent from a silent one.

The serials are the ones qemu-guest-agent reports (udev's ``ID_SERIAL``, computed here from sysfs
the way udev's rules and ``scsi_id`` do, so a guest without udev still gets them): virtio ``S``
(the guest sees at most 20 characters), SCSI ``0QEMU_QEMU_HARDDISK_S``, a passthrough LUN
``3<NAA WWID>``. A SCSI disk is also listed under its bare VPD 0x80 unit serial ``S``, which is
what the host gave it; a key two disks would share is left out rather than guessed.

The agent must never block forever and must outlive the host: every descriptor is non-blocking,
the loop always polls with a timeout, output that the host does not read is bounded and dropped
(the next message is a full state anyway), and the port is kept open while the host is away
(closing it would make QEMU report a port state change to libvirt each time) and reopened, with
a backoff, only after a real error such as the port being unplugged.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence
    from typing import Any

PORT_PATH = "/dev/virtio-ports/org.virtyard.guest_agent.0"
API_VERSION = 1

HEARTBEAT_SECONDS = 5.0  # oVirt's guest agent heartbeat period
REFRESH_SECONDS = 60.0  # full disks-usage message even when nothing changed
POLL_SECONDS = 0.25  # /sys/block and /dev/disk/by-id are looked at this often
RESCAN_AFTER_EVENT = (0.0, 0.3, 1.0)  # udev may still be making links after the kernel event
HOST_AWAY_RECHECK = (0.05, 0.5)  # first and longest wait before re-checking an absent host
REOPEN_BACKOFF = (0.2, 5.0)  # first and longest wait before reopening the port after an error

MAX_REQUEST_LINE = 4096  # longer lines from the host are discarded
MAX_PENDING_OUTPUT = 256 * 1024  # unread output beyond this is dropped
MAX_MESSAGE = 60 * 1024  # the host refuses lines over 64 KiB
MAX_USAGE_ENTRIES = 64

NETLINK_KOBJECT_UEVENT = 15
UEVENT_GROUPS = 1 | 2  # the kernel's raw events and udev's after it made the /dev links

# Link prefixes under /dev/disk/by-id that name a whole disk by its ID_SERIAL (udev rules).
BY_ID_BUSES = ("scsi", "virtio", "ata", "nvme", "usb", "mmc", "memstick", "cciss", "ieee1394")
SKIPPED_BLOCK_PREFIXES = ("loop", "ram", "zram")

# --- udev's character rules -------------------------------------------------------------------

_UDEV_SAFE = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#+-.:=@_")
_INPUT_EXTRA = frozenset(b"/ $%?,")  # UDEV_ALLOWED_CHARS_INPUT: what $attr{} keeps
_WHITESPACE = frozenset(b" \t\n\v\f\r")


def _utf8_width(data: bytes, start: int) -> int:
    """Length of a valid multi-byte UTF-8 character at ``start`` (udev keeps those), else 0."""
    lead = data[start]
    width = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else (
        4 if 0xF0 <= lead <= 0xF4 else 0)
    if not width:
        return 0
    try:
        code = ord(data[start:start + width].decode("utf-8"))
    except (UnicodeDecodeError, TypeError):
        return 0
    if 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE:
        return 0
    return width


def udev_replace_chars(data: bytes, extra: frozenset[int] = frozenset()) -> str:
    """udev's ``replace_chars``: unsafe bytes become ``_``, ``\\x`` escapes and UTF-8 stay.

    With ``extra`` containing a space (``$attr{}`` substitution), whitespace becomes a space.
    """
    out = bytearray()
    i = 0
    while i < len(data):
        byte = data[i]
        if byte in _UDEV_SAFE or byte in extra:
            out.append(byte)
            i += 1
        elif byte == 0x5C and data[i + 1:i + 2] == b"x":
            out += b"\\x"
            i += 2
        elif _utf8_width(data, i) > 1:
            width = _utf8_width(data, i)
            out += data[i:i + width]
            i += width
        else:
            out.append(0x20 if byte in _WHITESPACE and 0x20 in extra else 0x5F)
            i += 1
    return out.decode("utf-8", errors="replace")


def udev_clean_serial(raw: bytes) -> str:
    """``scsi_id --export``'s ID_SERIAL text: whitespace runs become one ``_``, then unsafe
    characters ``_`` (leading and trailing whitespace go)."""
    raw = raw.split(b"\0", 1)[0][:255]
    return udev_replace_chars(b"_".join(raw.split()))


def virtio_id_serial(raw: bytes) -> str:
    """ID_SERIAL of a virtio disk: udev's ``$attr{serial}`` (trailing whitespace stripped)."""
    return udev_replace_chars(raw.split(b"\0", 1)[0].rstrip(), _INPUT_EXTRA)


# --- SCSI identification, as udev's scsi_id ----------------------------------------------------

_CODE_BINARY, _CODE_ASCII = 1, 2
_TYPE_VENDOR_SPECIFIC, _TYPE_T10, _TYPE_EUI64, _TYPE_NAA, _TYPE_NAME = 0, 1, 2, 3, 8
# scsi_id's id_search_list: (designator type, NAA value or None for any, code set).
_SEARCH_ORDER = (
    (_TYPE_NAA, 6, _CODE_BINARY), (_TYPE_NAA, 6, _CODE_ASCII),
    (_TYPE_NAA, 5, _CODE_BINARY), (_TYPE_NAA, 5, _CODE_ASCII),
    (_TYPE_NAA, None, _CODE_BINARY), (_TYPE_NAA, None, _CODE_ASCII),
    (_TYPE_EUI64, None, _CODE_BINARY), (_TYPE_EUI64, None, _CODE_ASCII),
    (_TYPE_T10, None, _CODE_BINARY), (_TYPE_T10, None, _CODE_ASCII),
    (_TYPE_VENDOR_SPECIFIC, None, _CODE_BINARY), (_TYPE_VENDOR_SPECIFIC, None, _CODE_ASCII),
)
_SCSI_INQ_BUFF_LEN = 254  # what scsi_id reads of page 0x83
_MAX_SERIAL_LEN = 256


def _designators(page: bytes) -> list[tuple[int, int, int, bytes]]:
    """(code set, association, type, value) of each complete designator of page 0x83."""
    end = min(len(page), 4 + ((page[2] << 8) | page[3]))
    found = []
    offset = 4
    while offset + 4 <= end:
        length = page[offset + 3]
        if offset + 4 + length > end:
            break
        found.append((page[offset] & 0x0F, (page[offset + 1] >> 4) & 0x3,
                      page[offset + 1] & 0x0F, bytes(page[offset + 4:offset + 4 + length])))
        offset += 4 + length
    return found


def scsi_id_serial(page83: bytes | None, page80: bytes | None, vendor: bytes,
                   model: bytes) -> str:
    """The ID_SERIAL udev's ``scsi_id --whitelisted`` gives a SCSI device, "" if none.

    Page 0x83 first: the first logical-unit designator matching scsi_id's search order (NAA 6,
    NAA 5, other NAA, EUI-64, T10 vendor ID, vendor specific) as type digit + value (hex for
    binary ones; vendor + model before a vendor-specific one); else page 0x80 as ``S`` + vendor
    + model + serial. ``vendor`` and ``model`` are the raw 8- and 16-byte inquiry fields.
    """
    if page83 is not None and len(page83) >= 4 and page83[1] == 0x83:
        page = page83[:_SCSI_INQ_BUFF_LEN]
        if len(page) > 6 and page[6] != 0:  # a pre-SPC-3 page: scsi_id takes it whole
            padded = page.ljust(_SCSI_INQ_BUFF_LEN, b"\0")
            length = min(page[3], (_MAX_SERIAL_LEN - 4) // 2)
            return udev_clean_serial(b"3" + padded[4:4 + length].hex().encode())
        units = [d for d in _designators(page) if d[1] == 0]
        for dtype, naa, code_set in _SEARCH_ORDER:
            for d_code, _assoc, d_type, value in units:
                if d_type != dtype or d_code != code_set:
                    continue
                if naa is not None and (not value or value[0] >> 4 != naa):
                    continue
                serial = _designator_serial(d_type, d_code, value, vendor, model)
                if serial is not None:
                    return udev_clean_serial(serial)
        for _code, _assoc, d_type, value in units:
            if d_type == _TYPE_NAME and value:
                return udev_clean_serial(b"8" + value)
    if page80 is not None and len(page80) >= 4 and page80[1] == 0x80:
        serial = page80[4:4 + page80[3]]
        if serial.strip(b" \0"):
            return udev_clean_serial(b"S" + vendor + model + serial)
    return ""


def _designator_serial(d_type: int, code_set: int, value: bytes, vendor: bytes,
                       model: bytes) -> bytes | None:
    binary = code_set == _CODE_BINARY
    needed = len(value) * (2 if binary else 1) + 2
    prefix = b"%x" % d_type
    if d_type == _TYPE_VENDOR_SPECIFIC:
        if len(vendor) != 8 or len(model) != 16:
            return None  # scsi_id needs the full inquiry fields
        needed += 24
        prefix += vendor + model
    if needed > _MAX_SERIAL_LEN:
        return None
    return prefix + (value.hex().encode() if binary else value)


def unit_serial(page80: bytes | None) -> str:
    """The bare unit serial number of VPD page 0x80 (what ``<serial>`` gave a SCSI disk)."""
    if page80 is None or len(page80) < 4 or page80[1] != 0x80:
        return ""
    raw = page80[4:4 + page80[3]].split(b"\0", 1)[0].strip()
    if not raw or any(b < 0x20 or b == 0x7F for b in raw):
        return ""
    return raw.decode("utf-8", errors="replace")


def kernel_wwid_serial(wwid: str) -> str:
    """The kernel's ``device/wwid`` (``naa.6…``, ``eui.…``, ``t10.…``) as an ID_SERIAL."""
    kind, _, value = wwid.strip().partition(".")
    prefix = {"naa": "3", "eui": "2", "t10": "1"}.get(kind)
    if prefix is None or not value:
        return ""
    if kind in ("naa", "eui"):
        return prefix + value.lower()
    return udev_clean_serial((prefix + value).encode())


# --- reading the disks -------------------------------------------------------------------------


def _read(path: str, limit: int = 4096) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


def _text(path: str) -> str:
    data = _read(path)
    return "" if data is None else data.decode("utf-8", errors="replace").strip()


def _field(path: str) -> bytes:
    """A sysfs inquiry field (``vendor``, ``model``) with its padding but without the newline."""
    data = _read(path) or b""
    return data[:-1] if data.endswith(b"\n") else data


class GuestDisk:
    """One whole disk: its ``/dev`` name and the identifiers it is known by, best first."""

    __slots__ = ("aliases", "bus", "kernel_name", "serial")

    def __init__(self, kernel_name: str, bus: str, serial: str, aliases: Sequence[str]) -> None:
        self.kernel_name = kernel_name
        self.bus = bus
        self.serial = serial  # udev's ID_SERIAL, as qemu-guest-agent reports it ("" if none)
        self.aliases = tuple(a for a in aliases if a and a != serial)

    @property
    def name(self) -> str:
        return "/dev/" + self.kernel_name.replace("!", "/")

    def __repr__(self) -> str:
        return f"GuestDisk({self.name!r}, {self.bus!r}, {self.serial!r}, {self.aliases!r})"


def by_id_links(root: str = "/") -> dict[str, list[str]]:
    """``/dev/disk/by-id`` link names per kernel disk name (partition links left out)."""
    directory = os.path.join(root, "dev/disk/by-id")
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return {}
    links: dict[str, list[str]] = {}
    for entry in entries:
        base = entry.rsplit("-part", 1)
        if len(base) == 2 and base[1].isdigit():
            continue
        try:
            target = os.readlink(os.path.join(directory, entry))
        except OSError:
            continue
        links.setdefault(target.rsplit("/", 1)[-1], []).append(entry)
    return links


def _id_serial_from_links(links: Iterable[str], only: str | None = None) -> str:
    """The ID_SERIAL in a disk's ``<bus>-<ID_SERIAL>`` link (of bus ``only``, if given)."""
    for link in links:
        bus, sep, rest = link.partition("-")
        if sep and rest and bus in BY_ID_BUSES and only in (None, bus):
            return rest
    return ""


def ata_id_serial(model: bytes, page80: bytes | None) -> str:
    """udev's ata_id ID_SERIAL (``<model>_<serial>``) from what libata shows in sysfs: its
    VPD page 0x80 is the ATA serial number. sysfs keeps 16 of the model's 40 characters, so
    this stands in only where udev's own link is missing."""
    serial = unit_serial(page80)
    if not serial:
        return ""
    return udev_clean_serial(model) + "_" + udev_clean_serial(serial.encode())


class SerialCache:
    """Virtio serials by disk instance: reading one is a request to the device, so each disk
    (``diskseq``, or its sysfs path on kernels without it) is asked once."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], bytes | None] = {}

    def virtio_serial(self, block_dir: str) -> bytes | None:
        seq = _text(os.path.join(block_dir, "diskseq")) or os.path.realpath(block_dir)
        key = (block_dir, seq)
        if key not in self._known:
            raw = _read(os.path.join(block_dir, "serial"))
            if raw is None:
                raw = _read(os.path.join(block_dir, "device/serial"))
            self._known[key] = raw
        return self._known[key]

    def forget(self, keep: Iterable[str]) -> None:
        """Drop entries of disks that are gone."""
        alive = set(keep)
        self._known = {k: v for k, v in self._known.items() if k[0] in alive}

    def clear(self) -> None:
        self._known.clear()


def scan_disks(root: str = "/", cache: SerialCache | None = None) -> list[GuestDisk]:
    """Every whole disk under ``root`` that has an identifier, in kernel name order."""
    cache = cache if cache is not None else SerialCache()
    sys_block = os.path.join(root, "sys/block")
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return []
    links = by_id_links(root)
    disks: list[GuestDisk] = []
    for kname in names:
        if kname.startswith(SKIPPED_BLOCK_PREFIXES):
            continue
        block = os.path.join(sys_block, kname)
        device = os.path.join(block, "device")
        bus = _text(os.path.join(device, "modalias")).partition(":")[0]
        serial = ""
        aliases: list[str] = []
        if bus == "virtio" or kname.startswith("vd"):
            raw = cache.virtio_serial(block)
            if raw:
                serial = virtio_id_serial(raw)
        elif bus == "scsi" or os.path.exists(os.path.join(device, "vpd_pg83")):
            page80 = _read(os.path.join(device, "vpd_pg80"))
            vendor = _field(os.path.join(device, "vendor"))
            model = _field(os.path.join(device, "model"))
            # scsi_id's order: page 0x83, then 0x80. The kernel's wwid (its own reading of
            # page 0x83) stands in for a page 0x83 that sysfs does not show.
            serial = scsi_id_serial(_read(os.path.join(device, "vpd_pg83")), None, vendor,
                                    model)
            if not serial:
                serial = kernel_wwid_serial(_text(os.path.join(device, "wwid")))
            if not serial:
                serial = scsi_id_serial(None, page80, vendor, model)
            aliases.append(unit_serial(page80))
            if vendor.rstrip() == b"ATA":  # libata: udev names it with ata_id, not scsi_id
                aliases.append(serial)
                serial = _id_serial_from_links(links.get(kname, ()), "ata") or (
                    ata_id_serial(model, page80))
        if not serial:  # no sysfs identity we understand (ATA, NVMe, an empty CD-ROM…)
            serial = _id_serial_from_links(links.get(kname, ()))
        if serial or any(aliases):
            disks.append(GuestDisk(kname, bus or "unknown", serial, aliases))
    cache.forget(os.path.join(sys_block, n) for n in names)
    return disks


def disk_mapping(disks: Sequence[GuestDisk], *, aliases: bool = True) -> dict[str, dict[str, str]]:
    """``{serial: {"name": devname}}``. Every disk's ID_SERIAL first; then aliases (bare SCSI
    serials) where no other disk has that key. A key two disks claim is left out."""
    mapping: dict[str, dict[str, str]] = {}
    ambiguous: set[str] = set()
    for disk in disks:
        if not disk.serial:
            continue
        if disk.serial in mapping and mapping[disk.serial]["name"] != disk.name:
            ambiguous.add(disk.serial)
        mapping[disk.serial] = {"name": disk.name}
    if aliases:
        claimed: dict[str, str] = {}
        for disk in disks:
            for alias in disk.aliases:
                if alias in claimed and claimed[alias] != disk.name:
                    ambiguous.add(alias)
                claimed[alias] = disk.name
        for alias, name in claimed.items():
            if alias not in mapping:
                mapping[alias] = {"name": name}
    for key in ambiguous:
        mapping.pop(key, None)
    return mapping


def _unescape_mount_field(field: str) -> str:
    """``/proc/mounts`` writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def filesystem_usage(root: str = "/") -> list[dict[str, Any]]:
    """oVirt's ``disks`` list: usage of file systems mounted from block devices."""
    data = _read(os.path.join(root, "proc/self/mounts"), 1 << 20)
    if not data:
        return []
    usage: list[dict[str, Any]] = []
    seen: set[str] = set()
    for line in data.decode("utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].startswith("/dev/"):
            continue
        path = _unescape_mount_field(parts[1])
        if path in seen or len(usage) >= MAX_USAGE_ENTRIES:
            continue
        seen.add(path)
        try:
            st = os.statvfs(path)
        except OSError:
            continue
        total = st.f_blocks * st.f_frsize
        usage.append({"path": path, "fs": parts[2], "total": total,
                      "used": total - st.f_bfree * st.f_frsize})
    return usage


def disks_usage_message(disks: Sequence[GuestDisk], usage: list[dict[str, Any]]
                        ) -> dict[str, Any]:
    """The ``disks-usage`` message; usage, then aliases are left out if it would be too big."""
    message: dict[str, Any] = {"__name__": "disks-usage", "apiVersion": API_VERSION,
                               "disks": usage, "mapping": disk_mapping(disks)}
    if len(encode(message)) > MAX_MESSAGE:
        message["disks"] = []
    if len(encode(message)) > MAX_MESSAGE:
        message["mapping"] = disk_mapping(disks, aliases=False)
    return message


def encode(message: dict[str, Any]) -> bytes:
    """One protocol line: compact ASCII JSON and a newline (JSON escapes control characters)."""
    return (json.dumps(message, sort_keys=True, separators=(",", ":")) + "\n").encode("ascii")


# --- noticing disk changes ---------------------------------------------------------------------


class DiskWatcher:
    """Says when the disks may have changed: uevents over netlink, else a cheap poll."""

    def __init__(self, root: str = "/", *, use_netlink: bool = True) -> None:
        self.root = root
        self.sock: socket.socket | None = None
        self._signature: tuple[object, ...] | None = None
        if use_netlink:
            self.sock = _uevent_socket()

    def fileno(self) -> int:
        return -1 if self.sock is None else self.sock.fileno()

    def drain(self) -> bool:
        """Read every pending uevent; True when one was about a block device."""
        if self.sock is None:
            return False
        relevant = False
        for _ in range(1000):
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # events were lost: look at everything
                    relevant = True
                    continue
                log(f"uevent socket failed ({exc}); polling only")
                self.sock.close()
                self.sock = None
                return True
            if b"SUBSYSTEM=block" in data:
                relevant = True
        return relevant

    def changed(self) -> bool:
        """True when ``/sys/block`` or ``/dev/disk/by-id`` looks different since last time."""
        try:
            names: object = tuple(sorted(os.listdir(os.path.join(self.root, "sys/block"))))
        except OSError:
            names = None
        try:
            by_id: object = os.stat(os.path.join(self.root, "dev/disk/by-id")).st_mtime_ns
        except OSError:
            by_id = None
        signature = (names, by_id)
        changed = signature != self._signature
        self._signature = signature
        return changed

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _uevent_socket() -> socket.socket | None:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
    except (OSError, AttributeError) as exc:
        log(f"no uevent socket ({exc}); polling /sys/block")
        return None
    sock.setblocking(False)
    for groups in (UEVENT_GROUPS, 1):
        try:
            sock.bind((0, groups))
            return sock
        except OSError as exc:
            error = exc
    log(f"cannot listen to uevents ({error}); polling /sys/block")
    sock.close()
    return None


# --- the port to the host ----------------------------------------------------------------------


class Port:
    """The guest end of the virtio-serial port, non-blocking, with bounded output.

    ``host_connected`` follows the port's POLLHUP: the kernel reports a hang-up (and EOF on
    read) while nobody holds the host end open.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.host_connected = False
        self.out = bytearray()
        self._in = bytearray()
        self._discarding = False
        self.retry_at = 0.0
        self._backoff = REOPEN_BACKOFF[0]
        self._last_error = ""

    def open(self, now: float) -> bool:
        if self.fd >= 0:
            return True
        if now < self.retry_at:
            return False
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            self._failed(now, f"cannot open {self.path}: {exc.strerror}")
            return False
        log(f"opened {self.path}")
        self._backoff = REOPEN_BACKOFF[0]
        self._last_error = ""
        self.host_connected = False
        self._in.clear()
        self._discarding = False
        return True

    def _failed(self, now: float, message: str) -> None:
        if message != self._last_error:  # one line per new problem, not one per retry
            log(message)
            self._last_error = message
        self.retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, REOPEN_BACKOFF[1])

    def same_device(self) -> bool:
        """Whether the path still names the device we hold open."""
        try:
            return os.stat(self.path).st_rdev == os.fstat(self.fd).st_rdev
        except OSError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
        self.host_connected = False
        self.out.clear()

    def error(self, now: float, exc: OSError) -> None:
        """A real error on the port (unplugged, I/O error): close it and reopen later."""
        self.close()
        self._failed(now, f"{self.path}: {exc.strerror or exc}; reopening")

    def send(self, data: bytes) -> None:
        """Queue ``data``; what the host has not taken beyond the bound is dropped. A newline
        then ends whatever half line the host may already have."""
        if len(self.out) + len(data) > MAX_PENDING_OUTPUT:
            self.out = bytearray(b"\n")
        self.out += data

    def flush(self, now: float) -> None:
        while self.out and self.fd >= 0:
            try:
                written = os.write(self.fd, self.out[:32768])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return
                self.error(now, exc)
                return
            del self.out[:written]

    def read_lines(self, now: float) -> tuple[list[bytes], bool]:
        """Complete request lines read now, and whether the host end is gone (EOF)."""
        lines: list[bytes] = []
        for _ in range(16):  # bounded work per wake-up
            try:
                chunk = os.read(self.fd, 4096)
            except (BlockingIOError, InterruptedError):
                return lines, False
            except OSError as exc:
                self.error(now, exc)
                return lines, True
            if not chunk:
                return lines, True
            self._in += chunk
            while True:
                end = self._in.find(b"\n")
                if end < 0:
                    break
                line = bytes(self._in[:end])
                del self._in[:end + 1]
                if self._discarding:
                    self._discarding = False
                elif len(line) <= MAX_REQUEST_LINE:
                    lines.append(line)
            if len(self._in) > MAX_REQUEST_LINE:
                self._in.clear()
                self._discarding = True
        return lines, False


# --- the agent ---------------------------------------------------------------------------------


def log(message: str) -> None:
    try:
        sys.stderr.write(time.strftime("%H:%M:%S ") + "virtyard-guest-agent: " + message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class Agent:
    """The main loop: watch disks, keep the port, answer the host. ``run`` never returns
    unless ``stop`` is set; each pass waits in ``poll`` for at most ``POLL_SECONDS``."""

    def __init__(self, port_path: str = PORT_PATH, root: str = "/", *,
                 heartbeat: float = HEARTBEAT_SECONDS, refresh: float = REFRESH_SECONDS,
                 use_netlink: bool = True) -> None:
        self.port = Port(port_path)
        self.root = root
        self.heartbeat = heartbeat
        self.refresh = refresh
        self.watcher = DiskWatcher(root, use_netlink=use_netlink)
        self.cache = SerialCache()
        self.stop = False
        self._mapping: dict[str, dict[str, str]] | None = None
        self._disks: list[GuestDisk] = []
        self._scanned_at = -1.0
        self._rescans: list[float] = []
        self._next_heartbeat = 0.0
        self._next_refresh = 0.0
        self._host_check = 0.0
        self._host_wait = HOST_AWAY_RECHECK[0]
        self._send_state = True

    def _state_message(self, now: float) -> bytes:
        disks = self._disks if self._scanned_at == now else scan_disks(self.root, self.cache)
        message = disks_usage_message(disks, filesystem_usage(self.root))
        self._mapping = message["mapping"]
        self._next_refresh = now + self.refresh
        return encode(message)

    def _rescan(self, now: float) -> None:
        self._disks = scan_disks(self.root, self.cache)
        self._scanned_at = now
        if disk_mapping(self._disks) != self._mapping:
            self._send_state = True

    def _schedule_rescans(self, now: float) -> None:
        """Rescans soon after a uevent; times are kept to 0.1 s, so an event storm costs at
        most about ten rescans a second."""
        due = {round(now + delay, 1) for delay in RESCAN_AFTER_EVENT}
        self._rescans = sorted(due.union(self._rescans))

    def _handle_request(self, line: bytes) -> None:
        try:
            request = json.loads(line.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            log("ignored a request that is not JSON")
            return
        name = request.get("__name__") if isinstance(request, dict) else None
        if name == "refresh":
            self._send_state = True
        elif name is not None:
            log(f"ignored request {str(name)[:40]!r}")

    def _check_host(self, now: float) -> None:
        """Whether the host end is open: POLLHUP (or EOF) means nobody is there."""
        if self.port.fd < 0 or now < self._host_check:
            return
        poller = select.poll()
        poller.register(self.port.fd, select.POLLIN | select.POLLHUP)
        events = dict(poller.poll(0)).get(self.port.fd, 0)
        if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            self._host_away(now)
            if not self.port.same_device():  # the port was unplugged (and maybe replugged)
                self.port.error(now, OSError(errno.ENODEV, "port device gone"))
        elif not self.port.host_connected:
            log("host connected")
            self.port.host_connected = True
            self.port.out.clear()
            # A newline first ends any half line left in the channel before this connection.
            self.port.send(b"\n")
            self._send_state = True
            self._next_heartbeat = now

    def _host_away(self, now: float) -> None:
        """Nobody holds the host end (a hang-up or EOF was seen): drop output, look again
        soon, then less and less often while the host stays away."""
        if self.port.host_connected:
            log("host disconnected")
            self._host_wait = HOST_AWAY_RECHECK[0]
        self.port.host_connected = False
        self.port.out.clear()
        self._host_check = now + self._host_wait
        self._host_wait = min(self._host_wait * 2, HOST_AWAY_RECHECK[1])

    def step(self, now: float) -> float:
        """One pass of housekeeping; returns how long ``poll`` may wait."""
        if self.port.fd < 0 and self.port.open(now):
            self._host_check = now
        self._check_host(now)
        looks_changed = self.watcher.changed()  # always: it keeps its last look current
        if looks_changed or any(t <= now for t in self._rescans):
            self._rescans = [t for t in self._rescans if t > now]
            self._rescan(now)
        if now >= self._next_refresh:
            self.cache.clear()  # re-read every serial now and then, whatever diskseq says
            self._send_state = True
            self._next_refresh = now + self.refresh
        if self.port.host_connected:
            if self._send_state:
                self._send_state = False
                self.port.send(self._state_message(now))
            if now >= self._next_heartbeat:
                self.port.send(encode({"__name__": "heartbeat", "apiVersion": API_VERSION}))
                self._next_heartbeat = now + self.heartbeat
            self.port.flush(now)
        deadlines = [now + POLL_SECONDS, self._next_refresh, *self._rescans]
        if self.port.host_connected:
            deadlines.append(self._next_heartbeat)
        elif self.port.fd >= 0:
            deadlines.append(self._host_check)
        else:
            deadlines.append(self.port.retry_at)
        return max(0.0, min(deadlines) - now)

    def run(self) -> None:
        log(f"started (python {sys.version.split()[0]}, port {self.port.path})")
        while not self.stop:
            now = time.monotonic()
            timeout = self.step(now)
            poller = select.poll()
            if self.watcher.fileno() >= 0:
                poller.register(self.watcher.fileno(), select.POLLIN)
            if self.port.fd >= 0 and self.port.host_connected:
                poller.register(self.port.fd, select.POLLIN | (
                    select.POLLOUT if self.port.out else 0))
            try:
                events = poller.poll(int(timeout * 1000) + 1)
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd, mask in events:
                if fd == self.watcher.fileno():
                    if self.watcher.drain():
                        self._schedule_rescans(now)
                elif fd == self.port.fd:
                    self._port_events(now, mask)
        self.watcher.close()
        self.port.close()

    def _port_events(self, now: float, mask: int) -> None:
        gone = False
        if mask & select.POLLIN:
            lines, gone = self.port.read_lines(now)
            for line in lines:
                self._handle_request(line)
        if mask & select.POLLNVAL:
            self.port.error(now, OSError(errno.EBADF, "port descriptor invalid"))
            return
        if (gone or mask & (select.POLLHUP | select.POLLERR)) and self.port.fd >= 0:
            # The host closed its end, perhaps to reopen it at once: take it as a new
            # connection either way, so the host gets the whole state again.
            self._host_away(now)
            return
        if mask & select.POLLOUT:
            self.port.flush(now)


def iter_args(argv: Sequence[str]) -> Iterator[tuple[str, str]]:
    """``--name value`` / ``--name=value`` pairs (getopt-free, so nothing more is imported)."""
    flags = ("--once", "--no-netlink", "--help")
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in flags:
            yield arg, ""
        elif arg.startswith("--") and "=" in arg:
            name, _, value = arg.partition("=")
            yield name, value
        elif arg.startswith("--") and args:
            yield arg, args.pop(0)
        else:
            raise ValueError(f"unexpected argument {arg!r}")


USAGE = """usage: virtyard-guest-agent [--port PATH] [--root DIR] [--heartbeat S] [--refresh S]
                            [--no-netlink] [--once]
--once prints one disks-usage message to stdout and exits."""


def main(argv: Sequence[str] | None = None) -> int:
    options = {"--port": PORT_PATH, "--root": "/", "--heartbeat": str(HEARTBEAT_SECONDS),
               "--refresh": str(REFRESH_SECONDS)}
    try:
        for name, value in iter_args(sys.argv[1:] if argv is None else argv):
            if name not in options and name not in ("--once", "--no-netlink", "--help"):
                raise ValueError(f"unknown option {name}")
            options[name] = value
        heartbeat = float(options["--heartbeat"])
        refresh = float(options["--refresh"])
    except ValueError as exc:
        sys.stderr.write(f"{exc}\n{USAGE}\n")
        return 2
    if "--help" in options:
        sys.stdout.write(USAGE + "\n")
        return 0
    root = options["--root"]
    if "--once" in options:
        message = disks_usage_message(scan_disks(root), filesystem_usage(root))
        sys.stdout.write(encode(message).decode("ascii"))
        return 0
    agent = Agent(options["--port"], root, heartbeat=max(0.1, heartbeat),
                  refresh=max(1.0, refresh), use_netlink="--no-netlink" not in options)
    try:
        agent.run()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
