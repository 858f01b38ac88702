"""A thin typed wrapper over open-iscsi's ``iscsiadm``: the kernel initiator's only control tool.

Why a wrapper: ``iscsiadm`` reports everything through an exit code (open-iscsi's
``include/iscsi_err.h``) plus free text on stderr, and half of its sub-commands print a format
that callers must parse. Here every sub-command the host agent uses is one method that
returns typed values (:class:`~virtyard.host.storage.initiator.DiscoveredTarget`,
:class:`SessionInfo`, :class:`SessionDetails`, :class:`Iface`) or raises a typed
:class:`IscsiadmError` whose ``kind`` (the same :class:`~virtyard.host.storage.libiscsi.ErrorKind`
the user-space initiator uses) lets the storage verbs map both transports to one set of API
error codes.

Rules kept throughout:

* Every call is bounded by a timeout (``iscsiadm`` can block for minutes on an unreachable
  portal); a spent budget raises :class:`IscsiadmTimeoutError` without running anything.
* CHAP passwords only ever travel as ``-v`` values marked secret: they are masked in every
  exception, log line and argv kept for diagnostics. ``-S`` (show secrets) is never passed.
* The command runner is injectable (:class:`Runner`), so tests feed recorded output.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from virtyard.common.process import CommandError, MissingPackageError, mask
from virtyard.common.process import run as process_run
from virtyard.host.storage.initiator import Chap, DiscoveredTarget, Portal
from virtyard.host.storage.libiscsi import ErrorKind

log = logging.getLogger(__name__)

DEFAULT_IFACE = "default"
DEFAULT_TIMEOUT = 30.0
SENDTARGETS = "sendtargets"
# iscsiadm refuses to create or delete these (they are built in, not stored in /etc/iscsi/ifaces).
RESERVED_IFACES = frozenset({"default", "iser", "tcp"})


class ExitCode(enum.IntEnum):
    """``iscsiadm`` exit statuses, as defined in open-iscsi's ``include/iscsi_err.h``."""

    ISCSI_SUCCESS = 0
    ISCSI_ERR = 1
    ISCSI_ERR_SESS_NOT_FOUND = 2
    ISCSI_ERR_NOMEM = 3
    ISCSI_ERR_TRANS = 4
    ISCSI_ERR_LOGIN = 5
    ISCSI_ERR_IDBM = 6
    ISCSI_ERR_INVAL = 7
    ISCSI_ERR_TRANS_TIMEOUT = 8
    ISCSI_ERR_INTERNAL = 9
    ISCSI_ERR_LOGOUT = 10
    ISCSI_ERR_PDU_TIMEOUT = 11
    ISCSI_ERR_TRANS_NOT_FOUND = 12
    ISCSI_ERR_ACCESS = 13
    ISCSI_ERR_TRANS_CAPS = 14
    ISCSI_ERR_SESS_EXISTS = 15
    ISCSI_ERR_INVALID_MGMT_REQ = 16
    ISCSI_ERR_ISNS_UNAVAILABLE = 17
    ISCSI_ERR_ISCSID_COMM_ERR = 18
    ISCSI_ERR_FATAL_LOGIN = 19
    ISCSI_ERR_ISCSID_NOTCONN = 20
    ISCSI_ERR_NO_OBJS_FOUND = 21
    ISCSI_ERR_SYSFS_LOOKUP = 22
    ISCSI_ERR_HOST_NOT_FOUND = 23
    ISCSI_ERR_LOGIN_AUTH_FAILED = 24
    ISCSI_ERR_ISNS_QUERY = 25
    ISCSI_ERR_ISNS_REG_FAILED = 26
    ISCSI_ERR_OP_NOT_SUPP = 27
    ISCSI_ERR_BUSY = 28
    ISCSI_ERR_AGAIN = 29
    ISCSI_ERR_UNKNOWN_DISCOVERY_TYPE = 30
    ISCSI_ERR_CHILD_TERMINATED = 31


def code_name(returncode: int) -> str:
    """``ISCSI_ERR_…`` name of an exit status (``"exit N"`` for one open-iscsi does not define)."""
    try:
        return ExitCode(returncode).name
    except ValueError:
        return f"exit {returncode}"


# --- running the tool ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    """What one finished command printed and how it exited."""

    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """Runs ``argv`` to completion within ``timeout`` seconds.

    Raises :class:`ToolTimeoutError` when the time is up and :class:`ToolNotFoundError` when the
    program is not installed; any exit status is returned, never raised. ``secrets`` are values
    in ``argv`` that an implementation must never log or show.
    """

    def __call__(self, argv: Sequence[str], *, timeout: float,
                 secrets: tuple[str, ...] = ()) -> CommandResult: ...


class ToolTimeoutError(Exception):
    """A command did not finish in time (``argv`` is already masked)."""

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        super().__init__(f"{' '.join(argv)} timed out after {timeout:g} s")
        self.argv = list(argv)
        self.timeout = timeout


class ToolNotFoundError(Exception):
    """The program is not installed on this host."""

    def __init__(self, program: str, package: str) -> None:
        super().__init__(f"{program} not found (Debian package {package})")
        self.program = program
        self.package = package


_PACKAGES = {"iscsiadm": "open-iscsi", "multipathd": "multipath-tools", "dmsetup": "dmsetup"}


def system_runner(argv: Sequence[str], *, timeout: float,
                  secrets: tuple[str, ...] = ()) -> CommandResult:
    """The real :class:`Runner`: :func:`virtyard.common.process.run`, not raising on exit
    status."""
    try:
        proc = process_run(list(argv), timeout=timeout, check=False, secrets=secrets)
    except MissingPackageError as e:
        raise ToolNotFoundError(e.program, _PACKAGES.get(e.program, e.package)) from None
    except CommandError as e:
        if e.returncode == -1:
            # ``from None``: the underlying TimeoutExpired carries the unmasked argv.
            raise ToolTimeoutError(mask(list(argv), secrets), timeout) from None
        raise
    return CommandResult(proc.returncode, proc.stdout, proc.stderr)


def mask_text(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every (non-empty) secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


# --- errors --------------------------------------------------------------------------------------


class IscsiadmError(Exception):
    """``iscsiadm`` failed. ``argv`` and ``stderr`` are masked; ``kind`` says why, coarsely.

    ``detail`` is iscsiadm's own explanation: its ``iscsiadm:``/``iscsid:`` lines joined, without
    the noise of unrelated helpers (systemd, libkmod).
    """

    kind = ErrorKind.SESSION

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str = "",
                 stdout: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.stdout = stdout
        self.code = code_name(returncode)
        self.detail = error_detail(stderr, stdout)
        super().__init__(f"{' '.join(self.argv)} failed with {returncode} ({self.code}): "
                         f"{self.detail}")


class IscsiadmTimeoutError(IscsiadmError):
    """``iscsiadm`` did not finish within the time allowed (or no time was left to run it)."""

    kind = ErrorKind.TIMEOUT

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        super().__init__(argv, -1, f"iscsiadm: timed out after {timeout:g} s")
        self.timeout = timeout


class IscsiToolMissingError(IscsiadmError):
    """``iscsiadm`` is not installed (Debian package ``open-iscsi``)."""

    kind = ErrorKind.UNAVAILABLE

    def __init__(self, argv: Sequence[str]) -> None:
        super().__init__(argv, -1, "iscsiadm: not found; install the Debian package open-iscsi")


class IscsiTransportUnavailableError(IscsiadmError):
    """The kernel transport (``iscsi_tcp``) is missing: no kernel initiator on this host."""

    kind = ErrorKind.UNAVAILABLE


class IscsidUnavailableError(IscsiadmError):
    """``iscsid`` is not running or does not answer (needed for login, logout and rescans)."""

    kind = ErrorKind.UNAVAILABLE


class IscsiConnectionError(IscsiadmError):
    """The portal could not be reached, or the connection timed out (transport errors)."""

    kind = ErrorKind.CONNECT


class IscsiLoginError(IscsiadmError):
    """The target refused the login (generic or fatal login failure)."""

    kind = ErrorKind.LOGIN


class IscsiAuthenticationError(IscsiLoginError):
    """CHAP failed (``ISCSI_ERR_LOGIN_AUTH_FAILED``)."""

    kind = ErrorKind.AUTHENTICATION


class IscsiNotFoundError(IscsiadmError):
    """No record, session or portal matched (``ISCSI_ERR_NO_OBJS_FOUND`` and friends)."""


class IscsiSessionExistsError(IscsiadmError):
    """A session for this node is already logged in (``ISCSI_ERR_SESS_EXISTS``)."""


class IscsiInterfaceNotFoundError(IscsiadmError):
    """The iSCSI interface (``-I``) named does not exist."""


class IscsiDatabaseError(IscsiadmError):
    """open-iscsi's record database refused the operation (``ISCSI_ERR_IDBM``)."""


class IscsiInvalidArgumentError(IscsiadmError):
    """iscsiadm rejected an argument, e.g. an unknown record key (``ISCSI_ERR_INVAL``)."""


class IscsiadmParseError(ValueError):
    """iscsiadm printed something this module cannot parse; the message quotes the line."""


_CODE_ERRORS: dict[int, type[IscsiadmError]] = {
    ExitCode.ISCSI_ERR_SESS_NOT_FOUND: IscsiNotFoundError,
    ExitCode.ISCSI_ERR_TRANS: IscsiConnectionError,
    ExitCode.ISCSI_ERR_LOGIN: IscsiLoginError,
    ExitCode.ISCSI_ERR_IDBM: IscsiDatabaseError,
    ExitCode.ISCSI_ERR_INVAL: IscsiInvalidArgumentError,
    ExitCode.ISCSI_ERR_TRANS_TIMEOUT: IscsiConnectionError,
    ExitCode.ISCSI_ERR_PDU_TIMEOUT: IscsiConnectionError,
    ExitCode.ISCSI_ERR_TRANS_NOT_FOUND: IscsiTransportUnavailableError,
    ExitCode.ISCSI_ERR_SESS_EXISTS: IscsiSessionExistsError,
    ExitCode.ISCSI_ERR_ISCSID_COMM_ERR: IscsidUnavailableError,
    ExitCode.ISCSI_ERR_FATAL_LOGIN: IscsiLoginError,
    ExitCode.ISCSI_ERR_ISCSID_NOTCONN: IscsidUnavailableError,
    ExitCode.ISCSI_ERR_NO_OBJS_FOUND: IscsiNotFoundError,
    ExitCode.ISCSI_ERR_SYSFS_LOOKUP: IscsiNotFoundError,
    ExitCode.ISCSI_ERR_LOGIN_AUTH_FAILED: IscsiAuthenticationError,
}

# Text that means more than the exit status. Without iscsi_tcp, discovery exits with
# NO_OBJS_FOUND ("Dropping interface default": no usable interface is left), not
# TRANS_NOT_FOUND; "Cound" is iscsiadm's own spelling.
_TRANSPORT_MISSING = re.compile(
    r"Could not load transport|Cound not locate transport|Could not locate transport"
    r"|can not create NETLINK_ISCSI socket")
_IFACE_MISSING = re.compile(r"Could not read iface info for")


def classify(argv: Sequence[str], returncode: int, stderr: str,
             stdout: str = "") -> IscsiadmError:
    """The typed error for a failed iscsiadm run (``argv``/``stderr`` must already be masked)."""
    if _TRANSPORT_MISSING.search(stderr):
        return IscsiTransportUnavailableError(argv, returncode, stderr, stdout)
    if _IFACE_MISSING.search(stderr):
        return IscsiInterfaceNotFoundError(argv, returncode, stderr, stdout)
    cls = _CODE_ERRORS.get(returncode, IscsiadmError)
    return cls(argv, returncode, stderr, stdout)


def error_detail(stderr: str, stdout: str = "") -> str:
    """iscsiadm's own words about a failure, one line, for exception messages."""
    own = [line.split(":", 1)[1].strip() for line in stderr.splitlines()
           if line.startswith(("iscsiadm:", "iscsid:"))]
    lines = list(dict.fromkeys(line for line in own if line))
    if lines:
        return "; ".join(lines)
    for text in (stderr, stdout):
        rest = [line.strip() for line in text.splitlines() if line.strip()]
        if rest:
            return rest[-1]
    return "no error output"


# --- parsed values -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Iface:
    """One line of ``iscsiadm -m iface``; ``None`` where iscsiadm prints ``<empty>``."""

    name: str
    transport: str
    hwaddress: str | None = None
    ipaddress: str | None = None
    net_ifacename: str | None = None
    initiatorname: str | None = None


@dataclass(frozen=True)
class SessionInfo:
    """One line of ``iscsiadm -m session``: a logged-in session and its persistent portal."""

    transport: str
    sid: int
    portal: Portal
    tpgt: int
    iqn: str
    flash: bool | None = None  # "(flash)"/"(non-flash)" suffix of open-iscsi >= 2.0-874


@dataclass(frozen=True)
class AttachedDevice:
    """A SCSI device of a session (``-P 3``); ``disk`` is its block device when it has one."""

    host: int
    channel: int
    target: int
    lun: int
    disk: str | None = None
    state: str | None = None


@dataclass
class SessionDetails:
    """One session of ``iscsiadm -m session -P 3`` (CHAP values are never kept)."""

    iqn: str
    current_portal: Portal
    persistent_portal: Portal
    tpgt: int
    sid: int = -1
    iface_name: str | None = None
    iface_transport: str | None = None
    initiator_name: str | None = None
    iface_ipaddress: str | None = None
    connection_state: str | None = None
    session_state: str | None = None
    internal_state: str | None = None
    host_number: int | None = None
    host_state: str | None = None
    devices: list[AttachedDevice] = field(default_factory=list)


# --- parsers -------------------------------------------------------------------------------------


def _empty(value: str) -> str | None:
    return None if value in ("<empty>", "") else value


def parse_portal(text: str) -> tuple[Portal, int]:
    """``"10.0.0.1:3260,1"``, ``"[fe80::1]:3260,1"`` or ``"host:3260,1"`` -> (portal, tpgt)."""
    rest, sep, tpgt = text.strip().rpartition(",")
    host, colon, port = rest.rpartition(":")
    if not sep or not colon or not host:
        raise IscsiadmParseError(f"not a portal 'address:port,tpgt': {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return Portal(host, int(port)), int(tpgt)
    except ValueError:
        raise IscsiadmParseError(f"not a portal 'address:port,tpgt': {text!r}") from None


def parse_iface_list(text: str) -> list[Iface]:
    """``iscsiadm -m iface``: ``name transport,hwaddress,ipaddress,net_ifacename,initiatorname``."""
    ifaces = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, rest = line.strip().partition(" ")
        values = rest.split(",")
        if not rest or len(values) > 5:
            raise IscsiadmParseError(f"unexpected iscsiadm -m iface line: {line!r}")
        values += [""] * (5 - len(values))
        ifaces.append(Iface(name, values[0], *(_empty(v.strip()) for v in values[1:])))
    return ifaces


def parse_discovery(text: str) -> list[DiscoveredTarget]:
    """SendTargets answers, one ``address:port,tpgt iqn`` per line (``--discover`` output)."""
    found = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise IscsiadmParseError(f"unexpected discovery line: {line!r}")
        portal, tpgt = parse_portal(parts[0])
        found.append(DiscoveredTarget(portal, tpgt, parts[1]))
    return found


_SESSION_LINE = re.compile(
    r"^(?P<transport>[^:\s]+): \[(?P<sid>\d+)\] (?P<portal>\S+,-?\d+) (?P<iqn>\S+)"
    r"(?: \((?P<flash>non-flash|flash)\))?$")


def parse_session_list(text: str) -> list[SessionInfo]:
    """``iscsiadm -m session``: ``tcp: [SID] address:port,tpgt iqn [(non-flash)]`` per line."""
    sessions = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _SESSION_LINE.match(line.strip())
        if match is None:
            raise IscsiadmParseError(f"unexpected iscsiadm -m session line: {line!r}")
        portal, tpgt = parse_portal(match["portal"])
        flash = None if match["flash"] is None else match["flash"] == "flash"
        sessions.append(SessionInfo(match["transport"], int(match["sid"]), portal, tpgt,
                                    match["iqn"], flash))
    return sessions


_TARGET_SUFFIX = re.compile(r"\s+\((?:non-flash|flash)\)$")
_SCSI_DEVICE = re.compile(r"^scsi(\d+) Channel (\d+) Id (\d+) Lun: (\d+)$")
_ATTACHED_DISK = re.compile(r"^Attached scsi disk (\S+)(?:\s+State: (.*))?$")
_HOST_NUMBER = re.compile(r"^Host Number: (\d+)(?:\s+State: (.*))?$")
_SESSION_FIELDS = {
    "Iface Name": "iface_name",
    "Iface Transport": "iface_transport",
    "Iface Initiatorname": "initiator_name",
    "Iface IPaddress": "iface_ipaddress",
    "iSCSI Connection State": "connection_state",
    "iSCSI Session State": "session_state",
    "Internal iscsid Session State": "internal_state",
}


def parse_session_details(text: str) -> list[SessionDetails]:
    """``iscsiadm -m session -P 3`` (also ``-P 1``/``-P 2``): one :class:`SessionDetails` each.

    The tree prints ``Target:`` once for all its sessions and ``Current Portal:`` once per
    portal (open-iscsi ``usr/session_info.c``), so a session starts at its ``Interface:``
    header and inherits the target and portals printed above it.
    """
    sessions: list[SessionDetails] = []
    target: str | None = None
    current: tuple[Portal, int] | None = None
    persistent: tuple[Portal, int] | None = None
    session: SessionDetails | None = None

    def start() -> SessionDetails:
        if target is None or current is None:
            raise IscsiadmParseError("session block before its Target/Current Portal lines")
        new = SessionDetails(iqn=target, current_portal=current[0],
                             persistent_portal=(persistent or current)[0],
                             tpgt=(persistent or current)[1])
        sessions.append(new)
        return new

    for raw in text.splitlines():
        line = raw.strip()
        if not line or set(line) == {"*"}:
            continue
        key, colon, value = line.partition(":")
        value = value.strip()
        if line.startswith("Target:"):
            target = _TARGET_SUFFIX.sub("", value)
            current = persistent = None
            session = None
        elif line.startswith("Current Portal:"):
            current = parse_portal(value)
            session = None
        elif line.startswith("Persistent Portal:"):
            persistent = parse_portal(value)
        elif line == "Interface:":
            session = start()
        elif key == "SID" and colon:
            if session is None:  # no "Interface:" header before it
                session = start()
            session.sid = int(value)
        elif session is None:
            continue  # header lines ("iSCSI Transport Class version …", "version …")
        elif key in _SESSION_FIELDS and colon:
            setattr(session, _SESSION_FIELDS[key], _empty(value))
        elif m := _HOST_NUMBER.match(line):
            session.host_number = int(m[1])
            session.host_state = m[2].strip() if m[2] else None
        elif m := _SCSI_DEVICE.match(line):
            session.devices.append(AttachedDevice(int(m[1]), int(m[2]), int(m[3]), int(m[4])))
        elif m := _ATTACHED_DISK.match(line):
            if not session.devices:
                raise IscsiadmParseError(f"attached disk before its SCSI device line: {line!r}")
            last = session.devices[-1]
            session.devices[-1] = AttachedDevice(last.host, last.channel, last.target, last.lun,
                                                 m[1], m[2].strip() if m[2] else None)
        # Everything else (timeouts, CHAP, negotiated parameters) is not kept on purpose.
    return sessions


# --- the tool ------------------------------------------------------------------------------------


def _portal_arg(portal: Portal, tpgt: int | None = None) -> str:
    return str(portal) if tpgt is None else f"{portal},{tpgt}"


class Iscsiadm:
    """Typed ``iscsiadm`` sub-commands. Each takes ``timeout`` (seconds) and raises
    :class:`IscsiadmError` subclasses; "nothing there" outcomes are return values, not errors.
    """

    def __init__(self, runner: Runner = system_runner, program: str = "iscsiadm") -> None:
        self._runner = runner
        self.program = program

    def _run(self, args: Sequence[str], *, timeout: float,
             secrets: tuple[str, ...] = ()) -> CommandResult:
        argv = [self.program, *args]
        shown = mask(argv, secrets)
        if timeout <= 0:
            raise IscsiadmTimeoutError(shown, timeout)
        log.debug("running %s", " ".join(shown))
        try:
            result = self._runner(argv, timeout=timeout, secrets=secrets)
        except ToolTimeoutError:
            raise IscsiadmTimeoutError(shown, timeout) from None
        except ToolNotFoundError:
            raise IscsiToolMissingError(shown) from None
        return CommandResult(result.returncode, mask_text(result.stdout, secrets),
                             mask_text(result.stderr, secrets))

    def _check(self, args: Sequence[str], *, timeout: float,
               secrets: tuple[str, ...] = ()) -> CommandResult:
        result = self._run(args, timeout=timeout, secrets=secrets)
        if result.returncode != 0:
            raise classify(mask([self.program, *args], secrets), result.returncode,
                           result.stderr, result.stdout)
        return result

    # interfaces -----------------------------------------------------------------------------

    def iface_list(self, *, timeout: float = DEFAULT_TIMEOUT) -> list[Iface]:
        """``iscsiadm -m iface``."""
        return parse_iface_list(self._check(["-m", "iface"], timeout=timeout).stdout)

    def iface_new(self, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Create interface ``name`` (an existing one is left as it is: iscsiadm says "added")."""
        if name in RESERVED_IFACES:
            raise ValueError(f"iSCSI interface name {name!r} is reserved")
        self._check(["-m", "iface", "-I", name, "--op=new"], timeout=timeout)

    def iface_update(self, name: str, key: str, value: str, *,
                     timeout: float = DEFAULT_TIMEOUT) -> None:
        """Set ``key`` (e.g. ``iface.initiatorname``) of interface ``name``."""
        self._check(["-m", "iface", "-I", name, "-n", key, "-v", value, "--op=update"],
                    timeout=timeout)

    def iface_delete(self, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Delete interface ``name``; ``False`` when there was none."""
        if name in RESERVED_IFACES:
            raise ValueError(f"iSCSI interface name {name!r} is reserved")
        args = ["-m", "iface", "-I", name, "--op=delete"]
        result = self._run(args, timeout=timeout)
        if result.returncode == 0:
            return True
        if "Could not read iface info" in result.stderr:
            return False
        raise classify([self.program, *args], result.returncode, result.stderr, result.stdout)

    # discovery ------------------------------------------------------------------------------

    def _discoverydb(self, portal: Portal, iface: str) -> list[str]:
        return ["-m", "discoverydb", "-t", SENDTARGETS, "-I", iface, "-p", _portal_arg(portal)]

    def discoverydb_new(self, portal: Portal, *, iface: str = DEFAULT_IFACE,
                        timeout: float = DEFAULT_TIMEOUT) -> None:
        """Create (or reset) the SendTargets discovery record of ``portal``."""
        self._check([*self._discoverydb(portal, iface), "--op=new"], timeout=timeout)

    def discoverydb_update(self, portal: Portal, key: str, value: str, *,
                           iface: str = DEFAULT_IFACE, timeout: float = DEFAULT_TIMEOUT,
                           secret: bool = False) -> None:
        """Set ``key`` of the discovery record; ``secret`` masks ``value`` everywhere."""
        self._check([*self._discoverydb(portal, iface), "-n", key, "-v", value, "--op=update"],
                    timeout=timeout, secrets=(value,) if secret else ())

    def discoverydb_set_chap(self, portal: Portal, chap: Chap, *, iface: str = DEFAULT_IFACE,
                             timeout: float = DEFAULT_TIMEOUT) -> None:
        """Use CHAP with ``chap``'s credentials for discovery at ``portal``."""
        prefix = "discovery.sendtargets.auth."
        self.discoverydb_update(portal, prefix + "authmethod", "CHAP", iface=iface,
                                timeout=timeout)
        self.discoverydb_update(portal, prefix + "username", chap.username, iface=iface,
                                timeout=timeout)
        self.discoverydb_update(portal, prefix + "password", str(chap.password), iface=iface,
                                timeout=timeout, secret=True)

    def discoverydb_discover(self, portal: Portal, *, iface: str = DEFAULT_IFACE,
                             timeout: float = DEFAULT_TIMEOUT) -> list[DiscoveredTarget]:
        """Run SendTargets discovery with the record of ``portal``."""
        result = self._check([*self._discoverydb(portal, iface), "--discover"], timeout=timeout)
        return parse_discovery(result.stdout)

    def discoverydb_delete(self, portal: Portal, *, iface: str = DEFAULT_IFACE,
                           timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Delete the discovery record of ``portal``; ``False`` when there was none."""
        args = [*self._discoverydb(portal, iface), "--op=delete"]
        result = self._run(args, timeout=timeout)
        if result.returncode == 0:
            return True
        if result.returncode == ExitCode.ISCSI_ERR_IDBM and "not found" in result.stderr:
            return False
        raise classify([self.program, *args], result.returncode, result.stderr, result.stdout)

    # nodes ----------------------------------------------------------------------------------

    def _node(self, portal: Portal, iqn: str, tpgt: int | None, iface: str) -> list[str]:
        return ["-m", "node", "-T", iqn, "-I", iface, "-p", _portal_arg(portal, tpgt)]

    def node_new(self, portal: Portal, iqn: str, tpgt: int | None = None, *,
                 iface: str = DEFAULT_IFACE, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Create (or reset to defaults) the node record of ``iqn`` at ``portal``."""
        self._check([*self._node(portal, iqn, tpgt, iface), "--op=new"], timeout=timeout)

    def node_update(self, portal: Portal, iqn: str, tpgt: int | None, key: str, value: str, *,
                    iface: str = DEFAULT_IFACE, timeout: float = DEFAULT_TIMEOUT,
                    secret: bool = False) -> None:
        """Set ``key`` of the node record; ``secret`` masks ``value`` everywhere."""
        self._check([*self._node(portal, iqn, tpgt, iface), "-n", key, "-v", value,
                     "--op=update"], timeout=timeout, secrets=(value,) if secret else ())

    def node_set_chap(self, portal: Portal, iqn: str, tpgt: int | None, chap: Chap | None, *,
                      iface: str = DEFAULT_IFACE, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Log in with CHAP (``chap``) or without authentication (``None``)."""
        prefix = "node.session.auth."
        if chap is None:
            self.node_update(portal, iqn, tpgt, prefix + "authmethod", "None", iface=iface,
                             timeout=timeout)
            return
        self.node_update(portal, iqn, tpgt, prefix + "authmethod", "CHAP", iface=iface,
                         timeout=timeout)
        self.node_update(portal, iqn, tpgt, prefix + "username", chap.username, iface=iface,
                         timeout=timeout)
        self.node_update(portal, iqn, tpgt, prefix + "password", str(chap.password),
                         iface=iface, timeout=timeout, secret=True)

    def node_login(self, portal: Portal, iqn: str, tpgt: int | None = None, *,
                   iface: str = DEFAULT_IFACE, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Log in; ``False`` when a session already existed (``ISCSI_ERR_SESS_EXISTS``).

        Session-exists is success: with duplicate portals (same address, port and interface)
        only one node can hold the session and the others get this code (oVirt bz 2097614).
        """
        args = [*self._node(portal, iqn, tpgt, iface), "-l"]
        result = self._run(args, timeout=timeout)
        if result.returncode == ExitCode.ISCSI_ERR_SESS_EXISTS:
            log.warning("already logged in to %s at %s (iface %s): %s", iqn,
                        _portal_arg(portal, tpgt), iface, error_detail(result.stderr))
            return False
        if result.returncode != 0:
            raise classify([self.program, *args], result.returncode, result.stderr,
                           result.stdout)
        return True

    def node_logout(self, portal: Portal, iqn: str, tpgt: int | None = None, *,
                    iface: str = DEFAULT_IFACE, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Log out of the node's sessions; ``False`` when there was none."""
        return self._node_op([*self._node(portal, iqn, tpgt, iface), "-u"], timeout)

    def node_delete(self, portal: Portal, iqn: str, tpgt: int | None = None, *,
                    iface: str = DEFAULT_IFACE, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Delete the node record; ``False`` when there was none."""
        return self._node_op([*self._node(portal, iqn, tpgt, iface), "--op=delete"], timeout)

    def _node_op(self, args: list[str], timeout: float) -> bool:
        """Run a node operation: ``True`` done, ``False`` nothing to do, else a typed error."""
        result = self._run(args, timeout=timeout)
        if result.returncode == 0:
            return True
        if result.returncode == ExitCode.ISCSI_ERR_NO_OBJS_FOUND:
            return False
        raise classify([self.program, *args], result.returncode, result.stderr, result.stdout)

    # sessions -------------------------------------------------------------------------------

    def session_list(self, *, timeout: float = DEFAULT_TIMEOUT) -> list[SessionInfo]:
        """``iscsiadm -m session``; no sessions is an empty list."""
        result = self._run(["-m", "session"], timeout=timeout)
        if result.returncode == ExitCode.ISCSI_ERR_NO_OBJS_FOUND:
            return []
        if result.returncode != 0:
            raise classify([self.program, "-m", "session"], result.returncode, result.stderr,
                           result.stdout)
        return parse_session_list(result.stdout)

    def session_details(self, *, timeout: float = DEFAULT_TIMEOUT) -> list[SessionDetails]:
        """``iscsiadm -m session -P 3``; no sessions is an empty list."""
        args = ["-m", "session", "-P", "3"]
        result = self._run(args, timeout=timeout)
        if result.returncode == ExitCode.ISCSI_ERR_NO_OBJS_FOUND:
            return []
        if result.returncode != 0:
            raise classify([self.program, *args], result.returncode, result.stderr,
                           result.stdout)
        return parse_session_details(result.stdout)

    def session_rescan(self, sid: int | None = None, *,
                       timeout: float = DEFAULT_TIMEOUT) -> None:
        """Rescan one session (``sid``) or all of them for new LUNs and capacity changes.

        Without ``sid``, having no session at all is not an error (it is the normal state
        before the first connection); a named session that is gone raises
        :class:`IscsiNotFoundError`.
        """
        args = ["-m", "session", "-R"] if sid is None else ["-m", "session", "-r", str(sid), "-R"]
        result = self._run(args, timeout=timeout)
        if result.returncode == 0:
            return
        if sid is None and result.returncode == ExitCode.ISCSI_ERR_NO_OBJS_FOUND:
            log.debug("no iSCSI session to rescan")
            return
        raise classify([self.program, *args], result.returncode, result.stderr, result.stdout)

    def session_logout(self, sid: int, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Log out of session ``sid``; ``False`` when that session does not exist."""
        args = ["-m", "session", "-r", str(sid), "-u"]
        result = self._run(args, timeout=timeout)
        if result.returncode == 0:
            return True
        if result.returncode in (ExitCode.ISCSI_ERR_SESS_NOT_FOUND,
                                 ExitCode.ISCSI_ERR_NO_OBJS_FOUND,
                                 ExitCode.ISCSI_ERR_SYSFS_LOOKUP):
            return False
        raise classify([self.program, *args], result.returncode, result.stderr, result.stdout)
