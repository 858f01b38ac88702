"""A thin typed ctypes binding of libiscsi (``libiscsi.so.7``), the user-space iSCSI initiator.

Why our own: hosts here have no kernel iSCSI initiator, and there is no maintained Python binding
of libiscsi (the old ``python-libiscsi`` SWIG module is neither packaged nor kept up), while the C
library itself is a Debian package (``libiscsi7``) that QEMU already depends on. Only the shared
library is needed at run time, not its headers.

What it offers:

* :func:`discover` — SendTargets discovery: target IQNs with their portals and portal groups.
* :class:`Session` — one logged-in normal session to one target, with synchronous helpers
  (REPORT LUNS, INQUIRY, READ CAPACITY, READ of a byte range).
* :func:`probe_luns` — the fast path: every command for every LUN is queued at once with
  libiscsi's asynchronous API and the replies are collected as they come (one session, one
  login, no per-command round trip), because listing hundreds of LUNs must take milliseconds.
* :func:`read_ranges` — the same for many byte ranges of many LUNs (signature probing past the
  first bytes); a range that fails is reported with its own error
  (:class:`IscsiPartialReadError`) without losing the others.

Every wait is bounded by our own deadline (libiscsi's synchronous calls can block forever on an
unreachable portal), automatic reconnection is turned off (libiscsi would otherwise retry a lost
session forever, inside a call), and failures are typed exceptions carrying libiscsi's own error
text. CHAP passwords never appear in messages, logs or reprs.

Parsing of the returned bytes lives in :mod:`virtyard.host.storage.scsi`. A :class:`Session` is
not thread-safe; use one per thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import math
import re
import select
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from virtyard.host.storage import scsi

LIBRARY_NAME: Final = "libiscsi.so.7"
DEFAULT_PORT: Final = 3260
DEFAULT_INITIATOR_NAME: Final = "iqn.2026-11.org.virtyard:initiator"
DEFAULT_VPD_PAGES: Final = (scsi.VPD_UNIT_SERIAL_NUMBER, scsi.VPD_DEVICE_IDENTIFICATION,
                            scsi.VPD_BLOCK_LIMITS)

# libiscsi enums (iscsi.h / scsi-lowlevel.h, API version 20170105).
_SESSION_DISCOVERY: Final = 1
_SESSION_NORMAL: Final = 2
_HEADER_DIGEST_NONE: Final = 0
_STATUS_GOOD: Final = 0
_STATUS_CHECK_CONDITION: Final = 2
_STATUS_BUSY: Final = 0x08
_STATUS_TASK_SET_FULL: Final = 0x28
_STATUS_REDIRECT: Final = 0x101
_STATUS_CANCELLED: Final = 0x0F000000
_STATUS_ERROR: Final = 0x0F000001
_STATUS_TIMEOUT: Final = 0x0F000002
_SESSION_STATUSES: Final = (_STATUS_CANCELLED, _STATUS_ERROR, _STATUS_TIMEOUT)  # libiscsi's own
_SENSE_UNIT_ATTENTION: Final = 0x06
_SENSE_ILLEGAL_REQUEST: Final = 0x05

_INQUIRY_ALLOC: Final = 255  # what every device accepts; re-asked larger when a page is longer
_REPORT_LUNS_ALLOC: Final = 4096
_MAX_READ_CHUNK: Final = 1 << 20
_RETRIES: Final = 5  # unit attentions (first command after login) and busy statuses
_POLL_SLICE: Final = 0.5  # also lets libiscsi scan for its own PDU timeouts
_LOGOUT_TIMEOUT: Final = 2.0


# --- errors -----------------------------------------------------------------------------------


class ErrorKind(enum.Enum):
    """Why an iSCSI operation failed, for callers that map failures to API error codes."""

    UNAVAILABLE = "unavailable"  # libiscsi.so.7 is not installed
    CONNECT = "connect"  # the portal cannot be reached (refused, no route, no answer in time)
    AUTHENTICATION = "authentication"  # CHAP failed (login status 0x0201)
    AUTHORIZATION = "authorization"  # the initiator is not allowed on the target (0x0202)
    TARGET_NOT_FOUND = "target-not-found"  # no such IQN behind the portal (0x0203, 0x0204)
    LOGIN = "login"  # any other login rejection
    TIMEOUT = "timeout"  # our deadline passed after the connection was made
    CHECK_CONDITION = "check-condition"  # the LU answered CHECK CONDITION (see sense data)
    SESSION = "session"  # lost connection, protocol error, failed command


class IscsiError(Exception):
    """Base of every failure of this module: a kind, libiscsi's error text and where it happened.

    ``detail`` is libiscsi's own message (``iscsi_get_error``), with any CHAP secret masked.
    """

    kind = ErrorKind.SESSION

    def __init__(self, message: str, *, detail: str = "", portal: str = "",
                 target: str = "") -> None:
        full = message if not detail else f"{message}: {detail}"
        super().__init__(full)
        self.message = full
        self.detail = detail
        self.portal = portal
        self.target = target


class IscsiUnavailableError(IscsiError):
    """libiscsi is not installed (Debian package ``libiscsi7``)."""

    kind = ErrorKind.UNAVAILABLE


class IscsiConnectError(IscsiError):
    """The TCP connection to the portal failed or did not complete in time."""

    kind = ErrorKind.CONNECT


class IscsiLoginError(IscsiError):
    """The target refused the login; subclasses say why when the target told us."""

    kind = ErrorKind.LOGIN


class IscsiAuthenticationError(IscsiLoginError):
    """CHAP failed: wrong or missing user name/password (libiscsi: "Authentication failure")."""

    kind = ErrorKind.AUTHENTICATION


class IscsiAuthorizationError(IscsiLoginError):
    """The target does not let this initiator log in ("Authorization failure")."""

    kind = ErrorKind.AUTHORIZATION


class IscsiTargetNotFoundError(IscsiLoginError):
    """The portal has no target with this IQN ("Target not found" / "Target removed")."""

    kind = ErrorKind.TARGET_NOT_FOUND


class IscsiTimeoutError(IscsiError):
    """Our deadline passed while waiting for the target."""

    kind = ErrorKind.TIMEOUT


class IscsiSessionError(IscsiError):
    """The session failed: connection lost, protocol error, or a command libiscsi gave up on."""

    kind = ErrorKind.SESSION


class ScsiCheckConditionError(IscsiError):
    """A command ended in CHECK CONDITION; sense key, ASC and ASCQ say why."""

    kind = ErrorKind.CHECK_CONDITION

    def __init__(self, command: str, lun: int, sense_key: int, asc: int, ascq: int, *,
                 portal: str = "", target: str = "") -> None:
        super().__init__(
            f"{command} on LUN {lun}: CHECK CONDITION, sense key 0x{sense_key:x} "
            f"ASC 0x{asc:02x} ASCQ 0x{ascq:02x}", portal=portal, target=target)
        self.command = command
        self.lun = lun
        self.sense_key = sense_key
        self.asc = asc
        self.ascq = ascq

    @property
    def illegal_request(self) -> bool:
        """ILLEGAL REQUEST: the LU does not support this command or page (not a fault)."""
        return self.sense_key == _SENSE_ILLEGAL_REQUEST


ByteRange = tuple[int, int, int]
"""``(lun, byte offset, length)``: one range of :func:`read_ranges`."""


class IscsiPartialReadError(IscsiError):
    """:func:`read_ranges` could not read some ranges; the others were read.

    ``results`` holds every range that was read, exactly as :func:`read_ranges` would have
    returned it. ``failures`` maps each range that was not to its own error: typically a
    :class:`ScsiCheckConditionError` (a medium error, a LUN that is not there or does not
    answer READ CAPACITY). ``session_error`` is set when the session itself is in trouble: the
    connection was lost, ``timeout`` passed, or libiscsi cancelled or timed out a command (an
    :class:`IscsiSessionError` or :class:`IscsiTimeoutError`, also the error of every range
    still unanswered then); the session should then be closed. ``kind`` is the session error's
    kind, else the first failed range's, so callers mapping kinds to error codes need no
    special case.
    """

    def __init__(self, results: dict[ByteRange, bytes], failures: dict[ByteRange, IscsiError],
                 session_error: IscsiError | None = None, *, portal: str = "",
                 target: str = "") -> None:
        first = session_error or failures[min(failures)]
        super().__init__(f"{len(failures)} of {len(results) + len(failures)} ranges not read",
                         detail=first.message, portal=portal, target=target)
        self.kind = first.kind
        self.results = results
        self.failures = failures
        self.session_error = session_error


# Login status (class << 8 | detail) in libiscsi's "Failed to log in to target. Status: X(N)".
_LOGIN_STATUS = re.compile(r"Status: [^(]*\((\d+)\)")
_LOGIN_ERRORS: dict[int, type[IscsiLoginError]] = {
    0x0201: IscsiAuthenticationError,
    0x0202: IscsiAuthorizationError,
    0x0203: IscsiTargetNotFoundError,
    0x0204: IscsiTargetNotFoundError,
}


def _login_error(detail: str) -> type[IscsiLoginError]:
    match = _LOGIN_STATUS.search(detail)
    if match is not None:
        return _LOGIN_ERRORS.get(int(match.group(1)), IscsiLoginError)
    if "CHAP" in detail or "Authentication" in detail:
        return IscsiAuthenticationError  # e.g. the target's CHAP response did not verify
    return IscsiLoginError


# --- public value types -----------------------------------------------------------------------


@dataclass(frozen=True)
class Chap:
    """CHAP credentials the initiator presents. The password never shows in a repr."""

    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Chap(username={self.username!r}, password='***')"


@dataclass(frozen=True)
class Portal:
    """A network portal of a target, with its target portal group tag when discovery gave it."""

    address: str
    port: int
    tpgt: int | None = None

    def __str__(self) -> str:
        return _portal_string(self.address, self.port)


@dataclass(frozen=True)
class DiscoveredTarget:
    """One SendTargets answer: a target IQN and the portals it can be reached at."""

    iqn: str
    portals: tuple[Portal, ...]


@dataclass
class LunProbe:
    """Raw answers of one LUN to :func:`probe_luns`; parse them with :mod:`.scsi`.

    ``vpd`` holds the pages the LU returned; a page it does not support is absent and its
    ILLEGAL REQUEST is in ``errors`` (keyed by command, e.g. ``"inquiry vpd 0xb0"``), with any
    other per-command failure. ``capacity10`` is only fetched when READ CAPACITY(16) is not
    supported. ``data`` is the first ``read_bytes`` of the LU (less if the LU is smaller).
    """

    lun: int
    inquiry: bytes | None = None
    vpd: dict[int, bytes] = field(default_factory=dict)
    capacity16: bytes | None = None
    capacity10: bytes | None = None
    data: bytes | None = None
    errors: dict[str, IscsiError] = field(default_factory=dict)

    def capacity(self) -> scsi.Capacity | None:
        """The parsed capacity from whichever READ CAPACITY answered, if any."""
        if self.capacity16 is not None:
            return scsi.parse_read_capacity16(self.capacity16)
        if self.capacity10 is not None:
            return scsi.parse_read_capacity10(self.capacity10)
        return None


def _portal_string(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _parse_portal(text: str) -> Portal:
    """libiscsi's discovered portal, ``addr:port,tpgt`` or ``[v6addr]:port,tpgt``."""
    where, _, tag = text.partition(",")
    if where.startswith("["):
        address, _, rest = where[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        address, _, port_text = where.rpartition(":")
        if not address:
            address, port_text = where, ""
    port = int(port_text) if port_text.isdigit() else DEFAULT_PORT
    return Portal(address, port, int(tag) if tag.strip().isdigit() else None)


# --- the C library ----------------------------------------------------------------------------


class _ScsiSense(ctypes.Structure):
    # GCC packs the three 1-bit fields and bit_pointer into bytes 12 and 13; ctypes would not,
    # so the bitfield byte is declared as a plain byte.
    _fields_ = [
        ("error_type", ctypes.c_ubyte),
        ("key", ctypes.c_int),
        ("ascq", ctypes.c_int),  # ASC << 8 | ASCQ
        ("flags", ctypes.c_ubyte),
        ("bit_pointer", ctypes.c_ubyte),
        ("field_pointer", ctypes.c_uint16),
    ]


class _ScsiData(ctypes.Structure):
    _fields_ = [("size", ctypes.c_int), ("data", ctypes.c_void_p)]


class _ScsiIovector(ctypes.Structure):
    _fields_ = [
        ("iov", ctypes.c_void_p),
        ("niov", ctypes.c_int),
        ("nalloc", ctypes.c_int),
        ("offset", ctypes.c_size_t),
        ("consumed", ctypes.c_int),
    ]


class _ScsiTask(ctypes.Structure):
    """``struct scsi_task`` (scsi-lowlevel.h); we only read status, sense and datain."""

    _fields_ = [
        ("status", ctypes.c_int),
        ("cdb_size", ctypes.c_int),
        ("xfer_dir", ctypes.c_int),
        ("expxferlen", ctypes.c_int),
        ("cdb", ctypes.c_ubyte * 16),
        ("residual_status", ctypes.c_int),
        ("residual", ctypes.c_size_t),
        ("sense", _ScsiSense),
        ("datain", _ScsiData),
        ("mem", ctypes.c_void_p),
        ("ptr", ctypes.c_void_p),
        ("itt", ctypes.c_uint32),
        ("cmdsn", ctypes.c_uint32),
        ("lun", ctypes.c_uint32),
        ("iovector_in", _ScsiIovector),
        ("iovector_out", _ScsiIovector),
    ]


class _TargetPortal(ctypes.Structure):
    pass


_TargetPortal._fields_ = [
    ("next", ctypes.POINTER(_TargetPortal)),
    ("portal", ctypes.c_char_p),
]


class _DiscoveryAddress(ctypes.Structure):
    pass


_DiscoveryAddress._fields_ = [
    ("next", ctypes.POINTER(_DiscoveryAddress)),
    ("target_name", ctypes.c_char_p),
    ("portals", ctypes.POINTER(_TargetPortal)),
]

# void (*iscsi_command_cb)(struct iscsi_context *, int status, void *command_data, void *priv)
_COMMAND_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                               ctypes.c_void_p)

_ctx = ctypes.c_void_p
_task = ctypes.c_void_p
_int = ctypes.c_int
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64
_str = ctypes.c_char_p


def _declare(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Callable[..., Any]:
    function = lib[name]
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


class _Lib:
    """The libiscsi functions we use, each declared with its exact C signature."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        d = _declare
        self.create_context = d(lib, "iscsi_create_context", _ctx, _str)
        self.destroy_context = d(lib, "iscsi_destroy_context", _int, _ctx)
        self.get_error = d(lib, "iscsi_get_error", _str, _ctx)
        self.set_session_type = d(lib, "iscsi_set_session_type", _int, _ctx, _int)
        self.set_header_digest = d(lib, "iscsi_set_header_digest", _int, _ctx, _int)
        self.set_targetname = d(lib, "iscsi_set_targetname", _int, _ctx, _str)
        self.set_initiator_username_pwd = d(lib, "iscsi_set_initiator_username_pwd", _int,
                                            _ctx, _str, _str)
        self.set_timeout = d(lib, "iscsi_set_timeout", _int, _ctx, _int)
        self.set_noautoreconnect = d(lib, "iscsi_set_noautoreconnect", None, _ctx, _int)
        self.get_fd = d(lib, "iscsi_get_fd", _int, _ctx)
        self.which_events = d(lib, "iscsi_which_events", _int, _ctx)
        self.service = d(lib, "iscsi_service", _int, _ctx, _int)
        self.connect_async = d(lib, "iscsi_connect_async", _int, _ctx, _str, _COMMAND_CB,
                               ctypes.c_void_p)
        self.login_async = d(lib, "iscsi_login_async", _int, _ctx, _COMMAND_CB, ctypes.c_void_p)
        self.logout_async = d(lib, "iscsi_logout_async", _int, _ctx, _COMMAND_CB,
                              ctypes.c_void_p)
        self.disconnect = d(lib, "iscsi_disconnect", _int, _ctx)
        self.is_logged_in = d(lib, "iscsi_is_logged_in", _int, _ctx)
        self.get_target_address = d(lib, "iscsi_get_target_address", _str, _ctx)
        self.discovery_async = d(lib, "iscsi_discovery_async", _int, _ctx, _COMMAND_CB,
                                 ctypes.c_void_p)
        self.reportluns_task = d(lib, "iscsi_reportluns_task", _task, _ctx, _int, _int,
                                 _COMMAND_CB, ctypes.c_void_p)
        self.inquiry_task = d(lib, "iscsi_inquiry_task", _task, _ctx, _int, _int, _int, _int,
                              _COMMAND_CB, ctypes.c_void_p)
        self.readcapacity10_task = d(lib, "iscsi_readcapacity10_task", _task, _ctx, _int, _int,
                                     _int, _COMMAND_CB, ctypes.c_void_p)
        self.readcapacity16_task = d(lib, "iscsi_readcapacity16_task", _task, _ctx, _int,
                                     _COMMAND_CB, ctypes.c_void_p)
        # lun, lba, datalen, blocksize, rdprotect, dpo, fua, fua_nv, group_number, cb, private
        self.read10_task = d(lib, "iscsi_read10_task", _task, _ctx, _int, _u32, _u32, _int,
                             _int, _int, _int, _int, _int, _COMMAND_CB, ctypes.c_void_p)
        self.read16_task = d(lib, "iscsi_read16_task", _task, _ctx, _int, _u64, _u32, _int,
                             _int, _int, _int, _int, _int, _COMMAND_CB, ctypes.c_void_p)
        # lun, lba, data, datalen, blocksize, wrprotect, dpo, fua, fua_nv, group_number, cb,
        # private (libiscsi sends from ``data`` without copying it: kept alive by the op)
        self.write16_task = d(lib, "iscsi_write16_task", _task, _ctx, _int, _u64,
                              ctypes.c_void_p, _u32, _int, _int, _int, _int, _int, _int,
                              _COMMAND_CB, ctypes.c_void_p)
        # lun, lba, num_blocks (0: all), syncnv, immed, cb, private
        self.synchronizecache10_task = d(lib, "iscsi_synchronizecache10_task", _task, _ctx,
                                         _int, _int, _int, _int, _int, _COMMAND_CB,
                                         ctypes.c_void_p)
        self.free_scsi_task = d(lib, "scsi_free_scsi_task", None, _task)

    def error_text(self, ctx: int) -> str:
        raw = self.get_error(ctx)
        return raw.decode("utf-8", errors="replace").strip() if isinstance(raw, bytes) else ""


# struct layout as GCC lays it out on x86-64 (offsetof() against the libiscsi-dev 1.19 headers):
# checked once at load so a mistake in the mirror above can never read the wrong bytes.
_LP64_LAYOUT: Final = {"sense": 48, "datain": 64, "size": 176}

_lib_instance: _Lib | None = None


def _library() -> _Lib:
    """Load libiscsi once, on first use, so importing this module never needs it."""
    global _lib_instance  # noqa: PLW0603 - one process-wide handle to the shared library
    if _lib_instance is None:
        try:
            lib = ctypes.CDLL(LIBRARY_NAME)
        except OSError as e:
            raise IscsiUnavailableError(
                f"cannot load {LIBRARY_NAME} (install the Debian package libiscsi7)",
                detail=str(e)) from e
        if ctypes.sizeof(ctypes.c_void_p) == 8:
            layout = {"sense": _ScsiTask.sense.offset, "datain": _ScsiTask.datain.offset,
                      "size": ctypes.sizeof(_ScsiTask)}
            if layout != _LP64_LAYOUT or ctypes.sizeof(_ScsiSense) != 16:
                raise IscsiUnavailableError(f"struct scsi_task mirror is wrong: {layout}")
        _lib_instance = _Lib(lib)
    return _lib_instance


# --- one libiscsi context and its event loop --------------------------------------------------


@dataclass(slots=True)
class _Op:
    """One asynchronous libiscsi call in flight; the callback only records its outcome."""

    name: str
    lun: int = -1
    queue: Callable[[int], int | None] | None = None  # (re)queues the command: see submit()
    attempt: int = 0
    done: bool = False
    status: int = -1
    data: bytes = b""
    sense_key: int = 0
    sense_ascq: int = 0
    targets: list[DiscoveredTarget] | None = None
    on_done: Callable[[_Op], None] | None = None
    task: int = 0  # the struct scsi_task * of a SCSI command, until its callback frees it
    failure: str = ""  # a bug while recording the outcome (should never happen)
    error: str = ""  # libiscsi's error text when the operation failed
    owner: object = None  # the probe that queued it; stragglers of an abandoned one are dropped


class _Handle:
    """Owns the C context and the callback thunk; destroying it is idempotent.

    Kept apart from :class:`_Context` so a ``weakref.finalize`` can free the C context of a
    session that was never closed, without keeping the session alive.
    """

    def __init__(self, lib: _Lib, ctx: int, callback: Any) -> None:
        self.lib = lib
        self.ctx: int | None = ctx
        self.callback = callback  # libiscsi calls it up to and during destroy: keep it alive

    def destroy(self) -> None:
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            self.lib.destroy_context(ctx)


class _Context:
    """A libiscsi context: connect + login with deadlines, queued commands, and the poll loop."""

    def __init__(self, *, initiator_name: str, session_type: int, target_iqn: str | None,
                 chap: Chap | None, portal: str) -> None:
        self._lib = _library()
        self.portal = portal
        self.target = target_iqn or ""
        self._secret = chap.password if chap is not None else ""
        ctx = self._lib.create_context(initiator_name.encode())
        if not ctx:
            raise IscsiSessionError("iscsi_create_context failed", portal=portal,
                                    target=self.target)
        # The thunk must not hold the context strongly, or the finalizer below (which keeps
        # the thunk alive until libiscsi is done with it) would keep the context alive forever.
        this = weakref.ref(self)

        def trampoline(_ctx: int | None, status: int, command_data: int | None,
                       private: int | None) -> None:
            context = this()
            if context is not None:
                context._on_callback(status, command_data, private)

        self._callback = _COMMAND_CB(trampoline)
        self._handle = _Handle(self._lib, ctx, self._callback)
        self._finalizer = weakref.finalize(self, self._handle.destroy)
        self.ctx: int = ctx
        self._ops: dict[int, _Op] = {}
        self._completed: list[_Op] = []
        self._orphans: list[int] = []  # tasks whose callback came without them (timeout, cancel)
        self._next_token = 1
        self._poller = select.poll()
        self._polled: tuple[int, int] = (-1, 0)
        lib = self._lib
        lib.set_noautoreconnect(ctx, 1)
        lib.set_session_type(ctx, session_type)
        lib.set_header_digest(ctx, _HEADER_DIGEST_NONE)
        if target_iqn is not None and lib.set_targetname(ctx, target_iqn.encode()) != 0:
            detail = self._error_text()
            self.close()
            raise IscsiSessionError(f"invalid target name {target_iqn!r}", detail=detail,
                                    portal=portal)
        if chap is not None and lib.set_initiator_username_pwd(
                ctx, chap.username.encode(), chap.password.encode()) != 0:
            self.close()
            raise IscsiSessionError("cannot set CHAP credentials", portal=portal,
                                    target=self.target)

    # -- plumbing --

    def _error_text(self) -> str:
        """libiscsi's last error for this context, CHAP secret masked (should it ever appear)."""
        if self.closed:
            return ""
        text = self._lib.error_text(self.ctx)
        return text.replace(self._secret, "***") if self._secret else text

    def _on_callback(self, status: int, command_data: int | None, private: int | None) -> None:
        # Runs inside iscsi_service() or iscsi_destroy_context(): only record, never raise.
        op = self._ops.pop(private or 0, None)
        if op is None:
            return  # e.g. the connect callback libiscsi repeats when the connection goes
        try:
            op.status = status
            if status != _STATUS_GOOD:
                # Now, before libiscsi overwrites it (e.g. "Can not reconnect right now").
                op.error = self._error_text()
            if op.targets is not None:
                if status == _STATUS_GOOD and command_data:
                    op.targets.extend(_copy_discovery(command_data))
            elif op.task and command_data:
                task = _ScsiTask.from_address(command_data)
                if status == _STATUS_GOOD:
                    datain = task.datain
                    if datain.data and datain.size > 0:
                        op.data = ctypes.string_at(datain.data, datain.size)
                elif status == _STATUS_CHECK_CONDITION:
                    op.sense_key = task.sense.key
                    op.sense_ascq = task.sense.ascq
                self._lib.free_scsi_task(command_data)
            elif op.task:
                # Timed out or cancelled: libiscsi passes no task and frees only its PDU.
                self._orphans.append(op.task)
        except BaseException as e:  # pragma: no cover - must not unwind through C
            op.status = _STATUS_ERROR
            op.failure = repr(e)
        op.done = True
        self._completed.append(op)

    def _free_orphans(self) -> None:
        while self._orphans:
            self._lib.free_scsi_task(self._orphans.pop())

    def _token(self, op: _Op) -> int:
        token = self._next_token
        self._next_token += 1
        self._ops[token] = op
        return token

    def close(self) -> None:
        """Free the C context; libiscsi cancels pending commands (their tasks are freed)."""
        self._handle.destroy()
        self._finalizer.detach()
        self._free_orphans()
        self._ops.clear()

    def set_pdu_timeout(self, seconds: float) -> None:
        """libiscsi's own per-command timeout, for commands queued from now on.

        A second above our deadline: ours should fire first (with a clearer error); libiscsi's
        (whole seconds, checked only when we service the socket) is the backstop.
        """
        self._lib.set_timeout(self.ctx, math.ceil(seconds) + 1)

    @property
    def closed(self) -> bool:
        return self._handle.ctx is None

    def _wait(self, finished: Callable[[], bool], deadline: float, what: str) -> None:
        """Drive libiscsi until ``finished()``, failing past ``deadline`` or on a socket error."""
        lib, ctx = self._lib, self.ctx
        while not finished():
            if self._completed:
                return  # let the caller look at completions (retries, follow-ups) first
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise IscsiTimeoutError(f"{what}: no answer in time", portal=self.portal,
                                        target=self.target)
            fd = lib.get_fd(ctx)
            if fd < 0:
                raise IscsiSessionError(f"{what}: not connected", detail=self._error_text(),
                                        portal=self.portal, target=self.target)
            events = lib.which_events(ctx)
            if (fd, events) != self._polled:
                if self._polled[0] not in (-1, fd):
                    self._poller.unregister(self._polled[0])  # libiscsi reconnected: new fd
                self._poller.register(fd, events)
                self._polled = (fd, events)
            ready = self._poller.poll(max(1, math.ceil(min(remaining, _POLL_SLICE) * 1000)))
            revents = ready[0][1] if ready else 0
            failed = lib.service(ctx, revents) < 0
            if self._orphans:
                self._free_orphans()
            if failed:
                if self._completed or finished():
                    return  # the callback already carries the failure
                raise IscsiSessionError(f"{what}: connection failed", detail=self._error_text(),
                                        portal=self.portal, target=self.target)

    def drain(self) -> list[_Op]:
        done, self._completed = self._completed, []
        return done

    def run(self, op: _Op, deadline: float) -> _Op:
        """Wait for one queued operation (used for connect, login, logout, sync commands)."""
        while not op.done:
            self._wait(lambda: op.done, deadline, op.name)
            self.drain()  # others (e.g. further chunks of a read) are looked at via their op
        return op

    # -- session setup --

    def connect_and_login(self, address: str, port: int, timeout: float) -> None:
        """TCP connect then login, each failure typed; follows one login redirect."""
        lib, ctx = self._lib, self.ctx
        deadline = time.monotonic() + timeout
        self.set_pdu_timeout(timeout)
        portal = _portal_string(address, port)
        for _hop in range(3):
            op = _Op("connect")
            if lib.connect_async(ctx, portal.encode(), self._callback, self._token(op)) != 0:
                raise IscsiConnectError(f"cannot connect to {portal}", detail=self._error_text(),
                                        portal=portal, target=self.target)
            try:
                self.run(op, deadline)
            except IscsiTimeoutError as e:
                raise IscsiConnectError(f"cannot connect to {portal} within {timeout:g} s",
                                        portal=portal, target=self.target) from e
            except IscsiSessionError as e:
                raise IscsiConnectError(f"cannot connect to {portal}", detail=e.detail,
                                        portal=portal, target=self.target) from e
            if op.status != _STATUS_GOOD:
                raise IscsiConnectError(f"cannot connect to {portal}",
                                        detail=op.error or self._error_text(), portal=portal,
                                        target=self.target)
            op = _Op("login")
            if lib.login_async(ctx, self._callback, self._token(op)) != 0:
                raise IscsiLoginError(f"login to {self.target or portal} failed",
                                      detail=self._error_text(), portal=portal,
                                      target=self.target)
            late = IscsiTimeoutError(
                f"login to {self.target or portal}: no answer within {timeout:g} s",
                portal=portal, target=self.target)
            try:
                self.run(op, deadline)
            except IscsiTimeoutError as e:
                raise late from e
            except IscsiSessionError as e:  # libiscsi gives no login callback for this
                raise IscsiLoginError(
                    f"login to {self.target or portal} failed: the portal dropped the connection",
                    detail=e.detail, portal=portal, target=self.target) from e
            if op.status == _STATUS_GOOD:
                self.portal = portal
                return
            if op.status == _STATUS_TIMEOUT:  # libiscsi's own timer went off first
                raise late
            detail = op.error or self._error_text()
            if op.status != _STATUS_REDIRECT:
                raise _login_error(detail)(f"login to {self.target or portal} failed",
                                           detail=detail, portal=portal, target=self.target)
            redirect = lib.get_target_address(ctx)
            lib.disconnect(ctx)
            if not redirect:
                raise IscsiLoginError("target redirected the login without an address",
                                      detail=detail, portal=portal, target=self.target)
            redirected = _parse_portal(redirect.decode())
            portal = _portal_string(redirected.address, redirected.port)
        raise IscsiLoginError("too many login redirects", portal=portal, target=self.target)

    def logout(self) -> None:
        """Log out politely (bounded), then drop the connection; errors are ignored."""
        if self.closed:
            return
        lib, ctx = self._lib, self.ctx
        if lib.is_logged_in(ctx):
            op = _Op("logout")
            if lib.logout_async(ctx, self._callback, self._token(op)) == 0:
                with contextlib.suppress(IscsiError):
                    self.run(op, time.monotonic() + _LOGOUT_TIMEOUT)
        lib.disconnect(ctx)

    # -- commands --

    def discovery(self, deadline: float) -> list[DiscoveredTarget]:
        op = _Op("SendTargets discovery", targets=[])
        if self._lib.discovery_async(self.ctx, self._callback, self._token(op)) != 0:
            raise IscsiSessionError("cannot send SendTargets", detail=self._error_text(),
                                    portal=self.portal)
        self.run(op, deadline)
        if op.status != _STATUS_GOOD:
            raise IscsiSessionError("SendTargets discovery failed",
                                    detail=op.error or self._error_text(), portal=self.portal)
        # libiscsi prepends each target it parses; restore the order the target sent.
        return list(reversed(op.targets or []))

    def submit(self, name: str, lun: int, queue: Callable[[int], int | None],
               on_done: Callable[[_Op], None] | None = None, owner: object = None) -> _Op:
        """Queue one SCSI command; ``queue(token)`` calls the libiscsi ``*_task`` function."""
        op = _Op(name, lun, queue, on_done=on_done, owner=owner)
        task = queue(self._token(op))
        if not task:
            raise IscsiSessionError(f"cannot queue {name} for LUN {lun}",
                                    detail=self._error_text(), portal=self.portal,
                                    target=self.target)
        op.task = task
        return op

    def check(self, op: _Op) -> ScsiCheckConditionError | IscsiError | None:
        """None if ``op`` succeeded, else the error it ended with (not raised)."""
        if op.failure:
            return IscsiSessionError(f"{op.name} on LUN {op.lun}: {op.failure}",
                                     portal=self.portal, target=self.target)
        if op.status == _STATUS_GOOD:
            return None
        if op.status == _STATUS_CHECK_CONDITION:
            return ScsiCheckConditionError(op.name, op.lun, op.sense_key, op.sense_ascq >> 8,
                                           op.sense_ascq & 0xFF, portal=self.portal,
                                           target=self.target)
        if op.status == _STATUS_TIMEOUT:
            return IscsiTimeoutError(f"{op.name} on LUN {op.lun}: timed out",
                                     portal=self.portal, target=self.target)
        reason = {_STATUS_CANCELLED: "cancelled (session lost)", _STATUS_ERROR: "failed"}.get(
            op.status, f"SCSI status 0x{op.status:x}")
        return IscsiSessionError(f"{op.name} on LUN {op.lun}: {reason}",
                                 detail=op.error or self._error_text(), portal=self.portal,
                                 target=self.target)

    @staticmethod
    def retryable(op: _Op) -> bool:
        """Unit attention (e.g. power on/reset after login) or a busy LU: send it again."""
        if op.attempt >= _RETRIES:
            return False
        if op.status == _STATUS_CHECK_CONDITION:
            return op.sense_key == _SENSE_UNIT_ATTENTION
        return op.status in (_STATUS_BUSY, _STATUS_TASK_SET_FULL)

    def retry(self, op: _Op) -> _Op:
        assert op.queue is not None
        again = self.submit(op.name, op.lun, op.queue, op.on_done, op.owner)
        again.attempt = op.attempt + 1
        return again

    # -- libiscsi task constructors (lun is already in wire encoding) --

    def q_inquiry(self, wire_lun: int, page: int | None, alloc: int) -> Callable[[int], int | None]:
        evpd, code = (0, 0) if page is None else (1, page)
        return lambda token: self._lib.inquiry_task(
            self.ctx, wire_lun, evpd, code, alloc, self._callback, token)

    def q_readcapacity16(self, wire_lun: int) -> Callable[[int], int | None]:
        return lambda token: self._lib.readcapacity16_task(
            self.ctx, wire_lun, self._callback, token)

    def q_readcapacity10(self, wire_lun: int) -> Callable[[int], int | None]:
        return lambda token: self._lib.readcapacity10_task(
            self.ctx, wire_lun, 0, 0, self._callback, token)

    def q_reportluns(self, alloc: int) -> Callable[[int], int | None]:
        return lambda token: self._lib.reportluns_task(
            self.ctx, 0, alloc, self._callback, token)

    def q_read(self, wire_lun: int, lba: int, length: int,
               block_size: int) -> Callable[[int], int | None]:
        blocks = length // block_size
        if lba + blocks <= 0xFFFFFFFF and blocks <= 0xFFFF:
            return lambda token: self._lib.read10_task(
                self.ctx, wire_lun, lba, length, block_size, 0, 0, 0, 0, 0, self._callback,
                token)
        return lambda token: self._lib.read16_task(
            self.ctx, wire_lun, lba, length, block_size, 0, 0, 0, 0, 0, self._callback, token)


    def q_write(self, wire_lun: int, lba: int, buffer: ctypes.Array[ctypes.c_ubyte],
                block_size: int) -> Callable[[int], int | None]:
        # The closure holds ``buffer`` for as long as the op (and any retry) may send it.
        return lambda token: self._lib.write16_task(
            self.ctx, wire_lun, lba, ctypes.addressof(buffer), len(buffer), block_size, 0, 0,
            0, 0, 0, self._callback, token)

    def q_sync(self, wire_lun: int) -> Callable[[int], int | None]:
        return lambda token: self._lib.synchronizecache10_task(
            self.ctx, wire_lun, 0, 0, 0, 0, self._callback, token)


def _copy_discovery(address: int) -> list[DiscoveredTarget]:
    """Copy libiscsi's SendTargets list; it is freed as soon as the callback returns."""
    targets: list[DiscoveredTarget] = []
    entry = ctypes.cast(ctypes.c_void_p(address), ctypes.POINTER(_DiscoveryAddress))
    while entry:
        name = entry.contents.target_name
        portals: list[Portal] = []
        portal = entry.contents.portals
        while portal:
            if portal.contents.portal:
                portals.append(_parse_portal(portal.contents.portal.decode()))
            portal = portal.contents.next
        if name:
            targets.append(DiscoveredTarget(name.decode(), tuple(reversed(portals))))
        entry = entry.contents.next
    return targets


# --- public API -------------------------------------------------------------------------------


def discover(address: str, port: int = DEFAULT_PORT, *,
             initiator_name: str = DEFAULT_INITIATOR_NAME, chap: Chap | None = None,
             timeout: float = 5.0) -> list[DiscoveredTarget]:
    """SendTargets discovery on one portal: every target it offers, with portals and tags.

    Raises :class:`IscsiConnectError` for an unreachable portal, a login error subclass when
    the discovery login is refused (e.g. CHAP), :class:`IscsiTimeoutError` past ``timeout``.
    """
    portal = _portal_string(address, port)
    context = _Context(initiator_name=initiator_name, session_type=_SESSION_DISCOVERY,
                       target_iqn=None, chap=chap, portal=portal)
    try:
        deadline = time.monotonic() + timeout
        context.connect_and_login(address, port, timeout)
        targets = context.discovery(deadline)
        context.logout()
        return targets
    finally:
        context.close()


class Session:
    """One logged-in normal session to one target; use as a context manager.

    LUN numbers are plain numbers (LUN 300 is 300); the wire encoding (peripheral or flat
    addressing) is handled here.
    """

    def __init__(self, context: _Context, address: str, port: int, target_iqn: str,
                 timeout: float) -> None:
        self._context = context
        self.address = address
        self.port = port
        self.target_iqn = target_iqn
        self.timeout = timeout

    @classmethod
    def login(cls, address: str, port: int, target_iqn: str, *,
              initiator_name: str = DEFAULT_INITIATOR_NAME, chap: Chap | None = None,
              timeout: float = 5.0) -> Session:
        """Connect and log in (each bounded by ``timeout`` seconds) to ``target_iqn``.

        Errors: :class:`IscsiConnectError` (portal unreachable), :class:`IscsiAuthenticationError`
        (CHAP), :class:`IscsiTargetNotFoundError` (no such IQN), :class:`IscsiLoginError`.
        """
        portal = _portal_string(address, port)
        context = _Context(initiator_name=initiator_name, session_type=_SESSION_NORMAL,
                           target_iqn=target_iqn, chap=chap, portal=portal)
        try:
            context.connect_and_login(address, port, timeout)
        except BaseException:
            context.close()
            raise
        return cls(context, address, port, target_iqn, timeout)

    def __repr__(self) -> str:
        state = "closed" if self._context.closed else "open"
        return f"<Session {self.target_iqn} at {self.portal} ({state})>"

    @property
    def portal(self) -> str:
        return _portal_string(self.address, self.port)

    @property
    def closed(self) -> bool:
        return self._context.closed

    def close(self) -> None:
        """Log out (bounded) and free the connection; safe to call twice."""
        if not self._context.closed:
            try:
                self._context.logout()
            finally:
                self._context.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _live(self) -> _Context:
        if self._context.closed:
            raise IscsiSessionError("session is closed", portal=self.portal,
                                    target=self.target_iqn)
        return self._context

    def _command(self, name: str, lun: int, queue: Callable[[int], int | None],
                 timeout: float | None) -> bytes:
        """Run one command synchronously, retrying unit attentions; its data-in bytes."""
        context = self._live()
        deadline = self._deadline(timeout)
        op = context.run(context.submit(name, lun, queue), deadline)
        while context.retryable(op):
            op = context.run(context.retry(op), deadline)
        error = context.check(op)
        if error is not None:
            raise error
        return op.data

    def report_luns(self, *, timeout: float | None = None) -> tuple[int, ...]:
        """REPORT LUNS (select report 0): the LUN numbers the target exposes to us."""
        context = self._live()
        alloc = _REPORT_LUNS_ALLOC
        while True:
            data = self._command("report luns", 0, context.q_reportluns(alloc), timeout)
            needed = scsi.report_luns_length(data)
            if needed <= len(data) or alloc >= needed:
                return scsi.parse_report_luns(data)
            alloc = needed

    def inquiry(self, lun: int, page: int | None = None, *,
                timeout: float | None = None) -> bytes:
        """Standard INQUIRY data (``page=None``) or the VPD page ``page``, complete."""
        context = self._live()
        wire = scsi.encode_lun(lun)
        name = "inquiry" if page is None else f"inquiry vpd 0x{page:02x}"
        alloc = _INQUIRY_ALLOC
        while True:
            data = self._command(name, lun, context.q_inquiry(wire, page, alloc), timeout)
            needed = _full_length(data, page)
            if needed <= len(data) or needed <= alloc or alloc >= 0xFFFF:
                return data
            alloc = min(needed, 0xFFFF)

    def read_capacity16(self, lun: int, *, timeout: float | None = None) -> bytes:
        """Raw READ CAPACITY(16) data (parse with :func:`.scsi.parse_read_capacity16`)."""
        context = self._live()
        return self._command("read capacity(16)", lun,
                             context.q_readcapacity16(scsi.encode_lun(lun)), timeout)

    def read_capacity10(self, lun: int, *, timeout: float | None = None) -> bytes:
        """Raw READ CAPACITY(10) data, for the rare LU without READ CAPACITY(16)."""
        context = self._live()
        return self._command("read capacity(10)", lun,
                             context.q_readcapacity10(scsi.encode_lun(lun)), timeout)

    def capacity(self, lun: int, *, timeout: float | None = None) -> scsi.Capacity:
        """Parsed capacity: READ CAPACITY(16), or (10) when the LU rejects (16)."""
        try:
            return scsi.parse_read_capacity16(self.read_capacity16(lun, timeout=timeout))
        except ScsiCheckConditionError as e:
            if not e.illegal_request:
                raise
        return scsi.parse_read_capacity10(self.read_capacity10(lun, timeout=timeout))

    def read(self, lun: int, offset: int, length: int, *, block_size: int | None = None,
             timeout: float | None = None) -> bytes:
        """``length`` bytes at byte ``offset`` of the LU (READ(10), or READ(16) when needed).

        The reads are whole blocks, queued together in chunks of at most 1 MiB; the block size
        comes from READ CAPACITY unless given.
        """
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        if length == 0:
            return b""
        context = self._live()
        if block_size is None:
            block_size = self.capacity(lun, timeout=timeout).logical_block_size
        first = offset // block_size
        end = -(-(offset + length) // block_size)
        chunk_blocks = max(1, _MAX_READ_CHUNK // block_size)
        wire = scsi.encode_lun(lun)
        deadline = self._deadline(timeout)
        ops = [context.submit("read", lun, context.q_read(
                   wire, lba, min(chunk_blocks, end - lba) * block_size, block_size))
               for lba in range(first, end, chunk_blocks)]
        parts: list[bytes] = []
        for op in ops:
            done = context.run(op, deadline)
            while context.retryable(done):
                done = context.run(context.retry(done), deadline)
            error = context.check(done)
            if error is not None:
                raise error
            parts.append(done.data)
        data = b"".join(parts)
        skip = offset - first * block_size
        return data[skip:skip + length]


    def write(self, lun: int, offset: int, data: bytes, *, block_size: int | None = None,
              timeout: float | None = None) -> None:
        """Write ``data`` (whole blocks) at byte ``offset`` (a block boundary) of the LU:
        WRITE(16) in chunks of at most 1 MiB queued together, then SYNCHRONIZE CACHE, so the
        bytes are durable when it returns."""
        if offset < 0:
            raise ValueError("offset must not be negative")
        if not data:
            return
        context = self._live()
        if block_size is None:
            block_size = self.capacity(lun, timeout=timeout).logical_block_size
        if offset % block_size or len(data) % block_size:
            raise ValueError(f"writes are whole {block_size}-byte blocks")
        step = max(1, _MAX_READ_CHUNK // block_size) * block_size
        wire = scsi.encode_lun(lun)
        deadline = self._deadline(timeout)
        view = memoryview(data)
        ops = []
        for start in range(0, len(data), step):
            piece = view[start:start + step]
            buffer = (ctypes.c_ubyte * len(piece)).from_buffer_copy(piece)
            ops.append(context.submit("write", lun, context.q_write(
                wire, (offset + start) // block_size, buffer, block_size)))
        ops.append(context.submit("synchronize cache", lun, context.q_sync(wire)))
        for op in ops:
            done = context.run(op, deadline)
            while context.retryable(done):
                done = context.run(context.retry(done), deadline)
            error = context.check(done)
            if error is not None:
                raise error


def _full_length(data: bytes, page: int | None) -> int:
    """Size the INQUIRY answer says it has: additional length (standard) or page length."""
    if page is None:
        return 5 + data[4] if len(data) > 4 else len(data)
    return scsi.vpd_page_length(data) if len(data) >= 4 else len(data)


class _Pipeline:
    """Commands queued together on one context, each with a continuation for its completion.

    Completions of commands queued by an earlier pipeline on the same session (one that failed
    and was abandoned) are dropped by ``owner``; unit attentions and busy statuses are retried.
    """

    def __init__(self, context: _Context) -> None:
        self.context = context
        self.pending = 0

    def _submit(self, name: str, lun: int, queue: Callable[[int], int | None],
                on_done: Callable[[_Op], None]) -> None:
        self.pending += 1
        self.context.submit(name, lun, queue, on_done, owner=self)

    def finish(self, op: _Op) -> None:
        """Account for a completed command: retry it, or hand it to its continuation."""
        if op.owner is not self:
            return  # left over from a probe that failed earlier on this session
        self.pending -= 1
        if self.context.retryable(op):
            self.pending += 1
            self.context.retry(op)
            return
        if op.on_done is not None:
            op.on_done(op)

    def run(self, deadline: float, what: str) -> None:
        """Drive the session until every command (and every follow-up) has completed."""
        context = self.context
        while self.pending:
            context._wait(lambda: bool(context._completed), deadline, what)
            for op in context.drain():
                self.finish(op)


class _Probe(_Pipeline):
    """State of one :func:`probe_luns` run: what each completed command triggers next."""

    def __init__(self, context: _Context, luns: Iterable[int], *, vpd_pages: Sequence[int],
                 read_bytes: int) -> None:
        super().__init__(context)
        self.read_bytes = read_bytes
        self.results = {lun: LunProbe(lun) for lun in luns}
        for lun in self.results:
            wire = scsi.encode_lun(lun)
            self._submit("inquiry", lun, context.q_inquiry(wire, None, _INQUIRY_ALLOC),
                         self._inquiry_done(lun, None, _INQUIRY_ALLOC))
            for page in vpd_pages:
                self._submit(f"inquiry vpd 0x{page:02x}", lun,
                             context.q_inquiry(wire, page, _INQUIRY_ALLOC),
                             self._inquiry_done(lun, page, _INQUIRY_ALLOC))
            self._submit("read capacity(16)", lun, context.q_readcapacity16(wire),
                         self._capacity_done)

    def _failed(self, op: _Op) -> bool:
        error = self.context.check(op)
        if error is None:
            return False
        if isinstance(error, (IscsiTimeoutError, IscsiSessionError)):
            raise error  # the session itself is in trouble: stop the whole probe
        self.results[op.lun].errors[op.name] = error
        return True

    def _inquiry_done(self, lun: int, page: int | None, alloc: int) -> Callable[[_Op], None]:
        def done(op: _Op) -> None:
            if self._failed(op):
                return
            needed = _full_length(op.data, page)
            if needed > len(op.data) and needed > alloc and alloc < 0xFFFF:
                bigger = min(needed, 0xFFFF)
                self._submit(op.name, lun, self.context.q_inquiry(
                    scsi.encode_lun(lun), page, bigger), self._inquiry_done(lun, page, bigger))
                return
            result = self.results[lun]
            if page is None:
                result.inquiry = op.data
            else:
                result.vpd[page] = op.data

        return done

    def _capacity_done(self, op: _Op) -> None:
        result = self.results[op.lun]
        wire = scsi.encode_lun(op.lun)
        if self._failed(op):
            error = result.errors[op.name]
            if op.name == "read capacity(16)" and isinstance(error, ScsiCheckConditionError) \
                    and error.illegal_request:
                self._submit("read capacity(10)", op.lun, self.context.q_readcapacity10(wire),
                             self._capacity_done)
            return
        try:
            if op.name == "read capacity(16)":
                result.capacity16 = op.data
                capacity = scsi.parse_read_capacity16(op.data)
            else:
                result.capacity10 = op.data
                capacity = scsi.parse_read_capacity10(op.data)
        except scsi.ScsiParseError as e:
            result.errors[op.name] = IscsiSessionError(str(e), portal=self.context.portal,
                                                       target=self.context.target)
            return
        if self.read_bytes <= 0 or capacity.capacity_bytes == 0:
            return
        block = capacity.logical_block_size
        length = min(-(-self.read_bytes // block), capacity.block_count) * block
        self._submit("read", op.lun, self.context.q_read(wire, 0, length, block), self._read_done)

    def _read_done(self, op: _Op) -> None:
        if not self._failed(op):
            self.results[op.lun].data = op.data[:self.read_bytes]


def probe_luns(session: Session, luns: Iterable[int], *, vpd: bool = True,
               vpd_pages: Sequence[int] = DEFAULT_VPD_PAGES, read_bytes: int = 0,
               timeout: float = 30.0) -> dict[int, LunProbe]:
    """Fetch standard INQUIRY, VPD pages and capacity of many LUNs at once, pipelined.

    All commands are queued together on the one session and answered as the target gets to
    them; a READ of the first ``read_bytes`` (for signature probing) follows each LU's READ
    CAPACITY (at most 1 MiB: enough for every signature blkid knows but a few). Per-LUN
    failures (e.g. a page the LU lacks) land in :attr:`LunProbe.errors`; a session failure or
    passing ``timeout`` raises, and the session should then be closed.
    """
    if not 0 <= read_bytes <= _MAX_READ_CHUNK:
        raise ValueError(f"read_bytes must be between 0 and {_MAX_READ_CHUNK}")
    context = session._live()
    deadline = time.monotonic() + timeout
    context.set_pdu_timeout(timeout)
    probe = _Probe(context, luns, vpd_pages=tuple(vpd_pages) if vpd else (),
                   read_bytes=read_bytes)
    try:
        probe.run(deadline, "probing LUNs")
    finally:
        context.set_pdu_timeout(session.timeout)
    return probe.results


@dataclass(slots=True)
class _PendingRange:
    """One range of :func:`read_ranges` whose READs (one per 1 MiB chunk) are in flight."""

    key: ByteRange
    skip: int  # bytes of the first block before the range's offset
    length: int  # bytes wanted, after clipping at the end of the LU
    parts: list[bytes]  # each chunk's data, in order, as they come
    left: int  # READs still in flight
    cut: int  # chunks usable: those before and including the first the target answered short


class _RangeReads(_Pipeline):
    """State of one :func:`read_ranges` run: READ CAPACITY where needed, then the READs."""

    def __init__(self, context: _Context, capacities: Mapping[int, scsi.Capacity]) -> None:
        super().__init__(context)
        self.capacities = dict(capacities)
        self.results: dict[ByteRange, bytes] = {}
        self.failures: dict[ByteRange, IscsiError] = {}
        self.session_error: IscsiError | None = None

    def _fail(self, op: _Op, error: IscsiError, keys: Iterable[ByteRange]) -> None:
        for key in keys:
            self.failures[key] = error
        if op.status in _SESSION_STATUSES and self.session_error is None:
            self.session_error = error  # cancelled or timed out: the session is in trouble

    def start(self, by_lun: Mapping[int, list[ByteRange]]) -> None:
        for lun, keys in by_lun.items():
            capacity = self.capacities.get(lun)
            if capacity is not None:
                self._queue_reads(lun, capacity, keys)
            else:
                self._submit("read capacity(16)", lun,
                             self.context.q_readcapacity16(scsi.encode_lun(lun)),
                             self._capacity_done(keys))

    def _capacity_done(self, keys: list[ByteRange]) -> Callable[[_Op], None]:
        def done(op: _Op) -> None:
            error = self.context.check(op)
            if error is None:
                try:
                    capacity = (scsi.parse_read_capacity16(op.data)
                                if op.name == "read capacity(16)"
                                else scsi.parse_read_capacity10(op.data))
                except scsi.ScsiParseError as e:
                    error = IscsiSessionError(f"{op.name} on LUN {op.lun}: {e}",
                                              portal=self.context.portal,
                                              target=self.context.target)
                else:
                    self._queue_reads(op.lun, capacity, keys)
                    return
            if op.name == "read capacity(16)" and isinstance(error, ScsiCheckConditionError) \
                    and error.illegal_request:
                self._submit("read capacity(10)", op.lun,
                             self.context.q_readcapacity10(scsi.encode_lun(op.lun)), done)
                return
            self._fail(op, error, keys)

        return done

    def _queue_reads(self, lun: int, capacity: scsi.Capacity, keys: list[ByteRange]) -> None:
        block = capacity.logical_block_size
        size = capacity.capacity_bytes
        chunk_blocks = max(1, _MAX_READ_CHUNK // block)
        wire = scsi.encode_lun(lun)
        for key in keys:
            _, offset, length = key
            end = min(offset + length, size)
            if offset >= end:
                self.results[key] = b""  # wholly past the end of the LU
                continue
            first = offset // block
            last = -(-end // block)
            lbas = range(first, last, chunk_blocks)
            state = _PendingRange(key, offset - first * block, end - offset,
                                  [b""] * len(lbas), len(lbas), len(lbas))
            for index, lba in enumerate(lbas):
                chunk = min(chunk_blocks, last - lba) * block
                self._submit("read", lun, self.context.q_read(wire, lba, chunk, block),
                             self._read_done(state, index, chunk))

    def _read_done(self, state: _PendingRange, index: int,
                   chunk: int) -> Callable[[_Op], None]:
        def done(op: _Op) -> None:
            if state.key in self.failures:
                return  # another chunk of this range already failed
            error = self.context.check(op)
            if error is not None:
                self._fail(op, error, [state.key])
                return
            state.parts[index] = op.data
            if len(op.data) < chunk:  # should not happen once clipped; the data ends there
                state.cut = min(state.cut, index + 1)
            state.left -= 1
            if state.left == 0:
                parts = state.parts[:state.cut]
                data = b"".join(parts) if len(parts) > 1 else parts[0]
                if state.skip or len(data) > state.length:
                    data = data[state.skip:state.skip + state.length]
                self.results[state.key] = data
                state.parts = []

        return done


def read_ranges(session: Session, ranges: Sequence[ByteRange], *, timeout: float = 30.0,
                capacities: Mapping[int, scsi.Capacity] | None = None,
                ) -> dict[ByteRange, bytes]:
    """Read many ``(lun, byte offset, length)`` ranges at once, pipelined on the one session.

    Returns each range's bytes keyed by the range itself (duplicates are read once). Every
    command is queued together, as in :func:`probe_luns`: a READ CAPACITY per LUN (for its block
    size and end; skipped for the LUNs in ``capacities``, e.g. from an earlier listing), each
    followed as soon as it answers by the READs of that LUN's ranges. A range not aligned to
    the LU's logical block size is read as whole blocks and trimmed back; a range reaching past
    the end of the LU is clipped there (one wholly past it reads as ``b""``); a range longer
    than 1 MiB is read as several commands. Unit attentions and busy statuses are retried.

    A range that cannot be read does not lose the others: when any failed, all the others are
    still read and :class:`IscsiPartialReadError` is raised carrying both the ranges that were
    read (``results``) and each failure with its own error (``failures``). That includes the
    session failing or ``timeout`` passing (``session_error`` is then set, and the session should
    be closed). Negative offsets or lengths raise :class:`ValueError` before anything is sent.
    """
    by_lun: dict[int, list[ByteRange]] = {}
    empty: list[ByteRange] = []
    for key in dict.fromkeys(ranges):
        lun, offset, length = key
        if offset < 0 or length < 0 or lun < 0:
            raise ValueError(f"bad range {key}: LUN, offset and length must not be negative")
        if length == 0:
            empty.append(key)
        else:
            by_lun.setdefault(lun, []).append(key)
    context = session._live()
    deadline = time.monotonic() + timeout
    reads = _RangeReads(context, capacities or {})
    reads.results.update((key, b"") for key in empty)
    context.set_pdu_timeout(timeout)
    try:
        reads.start(by_lun)
        reads.run(deadline, "reading ranges")
    except (IscsiTimeoutError, IscsiSessionError) as e:
        reads.session_error = e
        for keys in by_lun.values():
            for key in keys:
                if key not in reads.results and key not in reads.failures:
                    reads.failures[key] = e
    finally:
        if not context.closed:
            context.set_pdu_timeout(session.timeout)
    if reads.failures:
        raise IscsiPartialReadError(reads.results, reads.failures, reads.session_error,
                                    portal=context.portal, target=context.target)
    return reads.results
