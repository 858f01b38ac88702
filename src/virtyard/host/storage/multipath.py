"""What dm-multipath made of the kernel initiator's LUNs: maps, their paths and path states.

Three sources, each for what it alone knows:

* **sysfs** (:class:`Sysfs`) — the authoritative, cheap view: every ``dm-N`` with its map name,
  ``mpath-<WWID>`` uuid, size, queue limits and slave disks; every ``sdX`` with its SCSI inquiry
  strings, H:B:T:L and the iSCSI session (target, portal, tpgt) it arrived through. It takes a
  ``root`` so tests can read a prepared tree in a temporary directory.
* ``dmsetup status --target multipath`` (:func:`parse_dmsetup_status`) — the kernel's per-path
  state (``A`` active / ``F`` failed) and fail counts.
* ``multipathd show maps|paths format …`` (:class:`Multipathd`) — the daemon's view, which
  includes paths it has *not* (yet) put in a map, useful to explain why a LUN has no map.

Reading a device's serial (``scsi_id`` page 0x80) also lives here, as vdsm does it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from virtyard.host.storage.iscsiadm import (
    CommandResult,
    Runner,
    ToolNotFoundError,
    ToolTimeoutError,
    system_runner,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
MPATH_UUID_PREFIX = "mpath-"
SCSI_TYPE_DISK = 0
SECTOR = 512  # sysfs "size" is always in 512-byte units, whatever the logical block size


class MultipathError(Exception):
    """A multipath tool failed, timed out or is missing; the message says which and why."""


class MultipathParseError(ValueError):
    """dmsetup or multipathd printed something this module cannot parse (the line is quoted)."""


# --- dmsetup status --------------------------------------------------------------------------


@dataclass(frozen=True)
class DmPathStatus:
    """One path of a multipath map as the kernel sees it."""

    devnum: str  # "major:minor" of the path's block device
    active: bool  # "A" (active) or "F" (failed)
    fail_count: int

    @property
    def state(self) -> str:
        """``"active"`` or ``"failed"``, the words oVirt's ``pathstatus`` uses."""
        return "active" if self.active else "failed"


@dataclass(frozen=True)
class DmPathGroup:
    """A priority group: ``A`` (the active one), ``E`` (enabled) or ``D`` (disabled)."""

    state: str
    paths: tuple[DmPathStatus, ...]


@dataclass(frozen=True)
class DmMultipathStatus:
    """One ``multipath`` target line of ``dmsetup status``."""

    name: str
    start: int
    length: int  # sectors
    queue_io: tuple[str, ...]  # the feature (info) arguments, e.g. ("0", "1")
    next_group: int
    groups: tuple[DmPathGroup, ...]

    def paths(self) -> Iterator[DmPathStatus]:
        for group in self.groups:
            yield from group.paths


class _Words:
    """A cursor over the words of one status line, with errors that quote the line."""

    def __init__(self, line: str, words: list[str]) -> None:
        self.line = line
        self.words = words
        self.pos = 0

    def take(self) -> str:
        if self.pos >= len(self.words):
            raise MultipathParseError(f"truncated multipath status: {self.line!r}")
        word = self.words[self.pos]
        self.pos += 1
        return word

    def number(self) -> int:
        word = self.take()
        if not word.isdigit():
            raise MultipathParseError(f"expected a number, got {word!r} in: {self.line!r}")
        return int(word)

    def skip(self, count: int) -> tuple[str, ...]:
        return tuple(self.take() for _ in range(count))


def _parse_multipath_args(name: str, start: int, length: int, line: str,
                          words: list[str]) -> DmMultipathStatus:
    # Layout of the kernel's multipath_status() (drivers/md/dm-mpath.c), STATUSTYPE_INFO:
    # <#features> <features…> <#hwhandler args> <args…> <#groups> <next group>
    # then per group: <A|E|D> <#selector status args> <args…> <#paths> <#selector info args>
    # then per path:  <major:minor> <A|F> <fail count> <selector info args…>
    cur = _Words(line, words)
    features = cur.skip(cur.number())
    cur.skip(cur.number())  # hardware handler status
    group_count = cur.number()
    next_group = cur.number()
    groups = []
    for _ in range(group_count):
        state = cur.take()
        if state not in ("A", "E", "D"):
            raise MultipathParseError(f"bad path group state {state!r} in: {line!r}")
        cur.skip(cur.number())  # path selector status
        path_count = cur.number()
        info_args = cur.number()
        paths = []
        for _ in range(path_count):
            devnum = cur.take()
            flag = cur.take()
            if not re.fullmatch(r"\d+:\d+", devnum) or flag not in ("A", "F"):
                raise MultipathParseError(f"bad path {devnum} {flag} in: {line!r}")
            paths.append(DmPathStatus(devnum, flag == "A", cur.number()))
            cur.skip(info_args)
        groups.append(DmPathGroup(state, tuple(paths)))
    if cur.pos != len(words):
        raise MultipathParseError(f"trailing words in multipath status: {line!r}")
    return DmMultipathStatus(name, start, length, features, next_group, tuple(groups))


def parse_dmsetup_status(text: str) -> dict[str, DmMultipathStatus]:
    """The ``multipath`` targets of ``dmsetup status [--target multipath]``, by map name.

    Lines of other targets (``linear``, ``thin``, …) are skipped; ``No devices found`` is an
    empty result.
    """
    maps: dict[str, DmMultipathStatus] = {}
    for line in text.splitlines():
        if not line.strip() or line.strip() == "No devices found":
            continue
        name, sep, rest = line.partition(": ")
        words = rest.split()
        if not sep or len(words) < 3:
            raise MultipathParseError(f"unexpected dmsetup status line: {line!r}")
        if words[2] != "multipath":
            continue
        if not (words[0].isdigit() and words[1].isdigit()):
            raise MultipathParseError(f"unexpected dmsetup status line: {line!r}")
        maps[name] = _parse_multipath_args(name, int(words[0]), int(words[1]), line, words[3:])
    return maps


def path_states(statuses: Mapping[str, DmMultipathStatus]) -> dict[str, str]:
    """``"major:minor"`` -> ``"active"``/``"failed"`` for every path of every map."""
    return {p.devnum: p.state for status in statuses.values() for p in status.paths()}


def dmsetup_status(runner: Runner = system_runner, *,
                   timeout: float = DEFAULT_TIMEOUT) -> dict[str, DmMultipathStatus]:
    """Run ``dmsetup status --target multipath`` and parse it."""
    argv = ["dmsetup", "status", "--target", "multipath"]
    result = _run(runner, argv, timeout)
    if result.returncode != 0:
        raise MultipathError(f"{' '.join(argv)} failed with {result.returncode}: "
                             f"{_detail(result)}")
    return parse_dmsetup_status(result.stdout)


def _detail(result: CommandResult, limit: int = 500) -> str:
    """All the tool said (dmsetup's last line alone is just "Command failed.")."""
    lines = [line.strip() for line in (result.stderr or result.stdout).splitlines()
             if line.strip()]
    text = "; ".join(lines) or "no error output"
    return text if len(text) <= limit else text[:limit] + "…"


def _run(runner: Runner, argv: list[str], timeout: float) -> CommandResult:
    if timeout <= 0:
        raise MultipathError(f"{' '.join(argv)}: no time left to run it")
    try:
        return runner(argv, timeout=timeout)
    except ToolTimeoutError:
        raise MultipathError(f"{' '.join(argv)} timed out after {timeout:g} s") from None
    except ToolNotFoundError as e:
        raise MultipathError(str(e)) from None


# --- multipathd show … format ------------------------------------------------------------------

# Column headers multipathd prints for each wildcard (multipath-tools libmultipath/print.c).
MAP_HEADERS: dict[str, str] = {
    "n": "name", "w": "uuid", "d": "sysfs", "F": "failback", "Q": "queueing", "N": "paths",
    "t": "dm-st", "S": "size", "f": "features", "h": "hwhandler",
}
PATH_HEADERS: dict[str, str] = {
    "w": "uuid", "i": "hcil", "d": "dev", "D": "dev_t", "t": "dm_st", "o": "dev_st",
    "T": "chk_st", "s": "vend/prod/rev", "c": "checker", "C": "next_check", "p": "pri",
    "S": "size", "z": "serial", "m": "multipath",
}


def _wildcards(fmt: str, headers: Mapping[str, str]) -> list[str]:
    tokens = fmt.split(" ")
    if any(len(t) != 2 or t[0] != "%" or t[1] not in headers for t in tokens):
        raise ValueError(f"format must be known %-wildcards separated by single spaces: {fmt!r}")
    return [t[1] for t in tokens]


def parse_multipathd_table(text: str, fmt: str,
                           headers: Mapping[str, str]) -> list[dict[str, str]]:
    """Rows of ``multipathd show maps|paths [raw] format FMT``, keyed by wildcard letter.

    The pretty form prints a header line and pads every column to its widest value, so
    columns are cut at the header words' offsets (values may hold spaces: ``i/o pending``).
    The ``raw`` form has neither; there every column but the last must be space-free.
    """
    letters = _wildcards(fmt, headers)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    names = [headers[letter] for letter in letters]
    rows = []
    if lines[0].split() == names:
        starts, pos = [], 0
        for name in names:
            pos = lines[0].index(name, pos)
            starts.append(pos)
            pos += len(name)
        ends: list[int | None] = [*starts[1:], None]
        for line in lines[1:]:
            rows.append({letter: line[s:e].strip()
                         for letter, s, e in zip(letters, starts, ends, strict=True)})
        return rows
    for line in lines:
        values = line.split(" ", len(letters) - 1)
        if len(values) != len(letters):
            raise MultipathParseError(f"expected {len(letters)} columns ({fmt}): {line!r}")
        rows.append(dict(zip(letters, (v.strip() for v in values), strict=True)))
    return rows


@dataclass(frozen=True)
class MultipathdMap:
    """A map multipathd manages."""

    wwid: str
    sysfs: str  # "dm-N"
    paths: int  # active paths


@dataclass(frozen=True)
class MultipathdPath:
    """A path multipathd knows, in a map or not (``multipath`` is ``[orphan]`` then)."""

    wwid: str
    dev: str
    dev_t: str
    hcil: str
    dm_state: str  # active / failed / undef
    dev_state: str  # running / offline / …
    checker_state: str  # ready / faulty / ghost / i/o pending / …


class Multipathd:
    """``multipathd show …`` queries through an injectable runner."""

    MAPS_FORMAT = "%w %d %N"
    PATHS_FORMAT = "%w %d %D %i %t %o %T"

    def __init__(self, runner: Runner = system_runner, program: str = "multipathd") -> None:
        self._runner = runner
        self.program = program

    def _show(self, what: str, fmt: str, headers: Mapping[str, str],
              timeout: float) -> list[dict[str, str]]:
        argv = [self.program, "show", what, "format", fmt]
        result = _run(self._runner, argv, timeout)
        if result.returncode != 0:
            # multipath-tools 0.9.4 exits 1 without a word when the daemon is not running.
            said = (result.stderr + result.stdout).strip()
            why = _detail(result) if said else "no answer (is multipathd running?)"
            raise MultipathError(f"{' '.join(argv)} failed with {result.returncode}: {why}")
        return parse_multipathd_table(result.stdout, fmt, headers)

    def show_maps(self, *, timeout: float = DEFAULT_TIMEOUT) -> list[MultipathdMap]:
        rows = self._show("maps", self.MAPS_FORMAT, MAP_HEADERS, timeout)
        return [MultipathdMap(r["w"], r["d"], int(r["N"]) if r["N"].isdigit() else 0)
                for r in rows]

    def show_paths(self, *, timeout: float = DEFAULT_TIMEOUT) -> list[MultipathdPath]:
        rows = self._show("paths", self.PATHS_FORMAT, PATH_HEADERS, timeout)
        return [MultipathdPath(r["w"], r["d"], r["D"], r["i"], r["t"], r["o"], r["T"])
                for r in rows]


# --- scsi_id -----------------------------------------------------------------------------------

SCSI_ID_CANDIDATES = ("/usr/lib/udev/scsi_id", "/lib/udev/scsi_id")


def scsi_id_program() -> str:
    """Where udev's ``scsi_id`` lives (it is not on ``PATH``)."""
    for path in SCSI_ID_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return "scsi_id"


def parse_scsi_id_export(text: str) -> dict[str, str]:
    """``scsi_id --export`` output: ``KEY=value`` lines."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    return values


def scsi_serial(device: str, runner: Runner = system_runner, *,
                timeout: float = DEFAULT_TIMEOUT, program: str | None = None) -> str:
    """The unit serial (VPD page 0x80) udev reports for ``device``, or ``""`` if it has none.

    As in oVirt, a failing ``scsi_id`` means "no serial", not an error: the serial is
    informative and a device without one is still usable.
    """
    argv = [program or scsi_id_program(), "--page=0x80", "--whitelisted", "--export",
            "--replace-whitespace", f"--device={device}"]
    try:
        result = _run(runner, argv, timeout)
    except MultipathError as e:
        log.warning("no serial for %s: %s", device, e)
        return ""
    if result.returncode != 0:
        log.warning("no serial for %s: scsi_id exited with %d", device, result.returncode)
        return ""
    return parse_scsi_id_export(result.stdout).get("ID_SERIAL", "")


# --- sysfs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hbtl:
    """SCSI address host:bus(channel):target:lun."""

    host: int
    bus: int
    target: int
    lun: int

    @classmethod
    def parse(cls, text: str) -> Hbtl | None:
        m = re.fullmatch(r"(\d+):(\d+):(\d+):(\d+)", text)
        return cls(*(int(g) for g in m.groups())) if m else None

    def __str__(self) -> str:
        return f"{self.host}:{self.bus}:{self.target}:{self.lun}"


@dataclass(frozen=True)
class IscsiSession:
    """A kernel iSCSI session (``/sys/class/iscsi_session/sessionN`` and its connection)."""

    sid: int
    targetname: str
    tpgt: int
    persistent_address: str
    persistent_port: int
    ifacename: str | None = None
    # LOGGED_IN, FAILED (the connection dropped; the kernel is reconnecting) or FREE.
    state: str | None = None


@dataclass(frozen=True)
class BlockDisk:
    """A SCSI disk (``sdX``) as sysfs describes it."""

    name: str
    devnum: str
    vendor: str
    model: str
    rev: str
    scsi_type: int | None
    hbtl: Hbtl | None
    sectors: int
    logical_block_size: int
    physical_block_size: int
    discard_max_bytes: int
    sid: int | None  # the iSCSI session it came through; None for other transports


@dataclass(frozen=True)
class DmMap:
    """A dm-multipath map (``/sys/block/dm-N`` whose uuid is ``mpath-<WWID>``)."""

    dm: str
    name: str
    wwid: str
    devnum: str
    slaves: tuple[str, ...]
    sectors: int
    logical_block_size: int
    physical_block_size: int
    discard_max_bytes: int

    @property
    def capacity(self) -> int:
        return self.sectors * SECTOR


@dataclass(frozen=True)
class ScsiDevice:
    """A SCSI device under an iSCSI session; ``block`` is its ``sdX`` when it has one."""

    hbtl: Hbtl
    scsi_type: int | None
    block: str | None


_SESSION_DIR = re.compile(r"session(\d+)")


class Sysfs:
    """Reads the sysfs tree under ``root`` (``/`` on a real host)."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        self.sys = root / "sys"

    @staticmethod
    def _read(path: Path) -> str | None:
        try:
            return path.read_text(errors="replace").rstrip("\n")
        except OSError:  # gone, or a device going away mid-read: same as absent
            return None

    def _int(self, path: Path, default: int = 0) -> int:
        text = self._read(path)
        try:
            return int(text.strip()) if text is not None else default
        except ValueError:
            return default

    def _listdir(self, path: Path) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except OSError:
            return []

    def multipath_maps(self) -> list[DmMap]:
        """Every dm-multipath map, by dm number order."""
        maps = []
        block = self.sys / "block"
        names = [n for n in self._listdir(block) if n.startswith("dm-")]
        for dm in sorted(names, key=lambda n: int(n[3:]) if n[3:].isdigit() else -1):
            base = block / dm
            uuid = self._read(base / "dm" / "uuid")
            if uuid is None or not uuid.startswith(MPATH_UUID_PREFIX):
                continue  # LVM, kpartx partitions ("part1-mpath-…"), crypt, …
            queue = base / "queue"
            maps.append(DmMap(
                dm=dm,
                name=(self._read(base / "dm" / "name") or "").strip(),
                wwid=uuid[len(MPATH_UUID_PREFIX):].strip(),
                devnum=(self._read(base / "dev") or "").strip(),
                slaves=tuple(self._listdir(base / "slaves")),
                sectors=self._int(base / "size"),
                logical_block_size=self._int(queue / "logical_block_size", 512),
                physical_block_size=self._int(queue / "physical_block_size", 512),
                discard_max_bytes=self._int(queue / "discard_max_bytes"),
            ))
        return maps

    def disk(self, name: str) -> BlockDisk | None:
        """The SCSI disk ``name`` (``sdb``), or ``None`` if sysfs has no such block device."""
        base = self.sys / "block" / name
        if not base.exists():
            return None
        device = base / "device"
        hbtl = None
        for entry in self._listdir(device / "scsi_disk"):
            hbtl = Hbtl.parse(entry)
            if hbtl is not None:
                break
        if hbtl is None:  # the scsi_device directory itself is named H:B:T:L
            hbtl = Hbtl.parse(os.path.basename(os.path.realpath(device)))
        scsi_type = self._read(device / "type")
        queue = base / "queue"
        return BlockDisk(
            name=name,
            devnum=(self._read(base / "dev") or "").strip(),
            vendor=(self._read(device / "vendor") or "").strip(),
            model=(self._read(device / "model") or "").strip(),
            rev=(self._read(device / "rev") or "").strip(),
            scsi_type=int(scsi_type) if scsi_type and scsi_type.strip().isdigit() else None,
            hbtl=hbtl,
            sectors=self._int(base / "size"),
            logical_block_size=self._int(queue / "logical_block_size", 512),
            physical_block_size=self._int(queue / "physical_block_size", 512),
            discard_max_bytes=self._int(queue / "discard_max_bytes"),
            sid=self._session_of(device),
        )

    def _session_of(self, device: Path) -> int | None:
        # An iSCSI disk's device lives under …/hostH/sessionN/targetH:0:0/H:0:0:L.
        real = Path(os.path.realpath(device))
        for part in reversed(real.parts):
            m = _SESSION_DIR.fullmatch(part)
            if m is not None:
                return int(m[1])
        return None

    def iscsi_sessions(self) -> list[IscsiSession]:
        """Every kernel iSCSI session. (The session's ``password`` attribute is never read.)"""
        sessions = []
        for entry in self._listdir(self.sys / "class" / "iscsi_session"):
            m = _SESSION_DIR.fullmatch(entry)
            if m is not None:
                session = self.iscsi_session(int(m[1]))
                if session is not None:
                    sessions.append(session)
        return sorted(sessions, key=lambda s: s.sid)

    def iscsi_session(self, sid: int) -> IscsiSession | None:
        """Session ``sid``; ``None`` when it is gone or has no connection yet."""
        sdir = self.sys / "class" / "iscsi_session" / f"session{sid}"
        targetname = self._read(sdir / "targetname")
        if targetname is None:
            return None
        conns = [c for c in self._listdir(self.sys / "class" / "iscsi_connection")
                 if c.startswith(f"connection{sid}:")]
        if not conns:
            return None
        conn = self.sys / "class" / "iscsi_connection" / conns[0]
        address = self._read(conn / "persistent_address")
        port = self._read(conn / "persistent_port")
        if address is None or port is None or not port.strip().isdigit():
            return None
        iface = self._read(sdir / "ifacename")
        state = self._read(sdir / "state")
        return IscsiSession(sid, targetname.strip(), self._int(sdir / "tpgt", -1),
                            address.strip(), int(port.strip()),
                            iface.strip() if iface is not None else None,
                            state.strip() if state is not None else None)

    def session_scsi_devices(self, sid: int) -> list[ScsiDevice]:
        """The SCSI devices (LUNs) the kernel found behind session ``sid``."""
        session_dir = Path(os.path.realpath(
            self.sys / "class" / "iscsi_session" / f"session{sid}" / "device"))
        devices = []
        for target in self._listdir(session_dir):
            if not target.startswith("target"):
                continue
            for entry in self._listdir(session_dir / target):
                hbtl = Hbtl.parse(entry)
                if hbtl is None:
                    continue
                sdev = session_dir / target / entry
                scsi_type = self._read(sdev / "type")
                blocks = self._listdir(sdev / "block")
                devices.append(ScsiDevice(
                    hbtl,
                    int(scsi_type) if scsi_type and scsi_type.strip().isdigit() else None,
                    blocks[0] if blocks else None))
        return sorted(devices, key=lambda d: (d.hbtl.host, d.hbtl.bus, d.hbtl.target,
                                              d.hbtl.lun))


def holders_of(maps: Sequence[DmMap]) -> dict[str, DmMap]:
    """``sdX`` -> the multipath map it is a path of."""
    return {slave: m for m in maps for slave in m.slaves}
