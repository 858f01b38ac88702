"""Typed failures of the binding: one exception class per reason, each with a stable kind.

Callers (the initiators, the agent's verbs) map :class:`ErrorKind` to API error codes without
looking at message text; every exception carries libiscsi's own error text as ``detail`` (CHAP
secret masked), and the portal and target it concerns.
"""

from __future__ import annotations

import enum
import re
from typing import Final

from virtyard.host.storage.libiscsi.values import ByteRange

# SCSI sense keys (SPC-4) the binding acts on.
SENSE_UNIT_ATTENTION: Final = 0x06
SENSE_ILLEGAL_REQUEST: Final = 0x05


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
        return self.sense_key == SENSE_ILLEGAL_REQUEST


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


def login_error(detail: str) -> type[IscsiLoginError]:
    match = _LOGIN_STATUS.search(detail)
    if match is not None:
        return _LOGIN_ERRORS.get(int(match.group(1)), IscsiLoginError)
    if "CHAP" in detail or "Authentication" in detail:
        return IscsiAuthenticationError  # e.g. the target's CHAP response did not verify
    return IscsiLoginError

