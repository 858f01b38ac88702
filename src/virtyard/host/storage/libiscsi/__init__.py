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

The package follows the binding's seams: :mod:`._ffi` (the C ABI: enums, struct mirrors,
signatures, loading), :mod:`.errors`, :mod:`.values`, :mod:`.context` (one libiscsi context and
its poll loop), :mod:`.session` (discovery and the synchronous helpers) and :mod:`.pipelines`
(many commands at once). Import the names below from here. Parsing of the returned bytes lives
in :mod:`virtyard.host.storage.scsi`. A :class:`Session` is not thread-safe; use one per thread.
"""

from __future__ import annotations

from virtyard.host.storage.libiscsi._ffi import LIBRARY_NAME
from virtyard.host.storage.libiscsi.errors import (
    ErrorKind,
    IscsiAuthenticationError,
    IscsiAuthorizationError,
    IscsiConnectError,
    IscsiError,
    IscsiLoginError,
    IscsiPartialReadError,
    IscsiSessionError,
    IscsiTargetNotFoundError,
    IscsiTimeoutError,
    IscsiUnavailableError,
    ScsiCheckConditionError,
)
from virtyard.host.storage.libiscsi.pipelines import (
    DEFAULT_VPD_PAGES,
    LunProbe,
    probe_luns,
    read_ranges,
)
from virtyard.host.storage.libiscsi.session import DEFAULT_INITIATOR_NAME, Session, discover
from virtyard.host.storage.libiscsi.values import (
    DEFAULT_PORT,
    ByteRange,
    Chap,
    DiscoveredTarget,
    Portal,
)

__all__ = [
    "DEFAULT_INITIATOR_NAME",
    "DEFAULT_PORT",
    "DEFAULT_VPD_PAGES",
    "LIBRARY_NAME",
    "ByteRange",
    "Chap",
    "DiscoveredTarget",
    "ErrorKind",
    "IscsiAuthenticationError",
    "IscsiAuthorizationError",
    "IscsiConnectError",
    "IscsiError",
    "IscsiLoginError",
    "IscsiPartialReadError",
    "IscsiSessionError",
    "IscsiTargetNotFoundError",
    "IscsiTimeoutError",
    "IscsiUnavailableError",
    "LunProbe",
    "Portal",
    "ScsiCheckConditionError",
    "Session",
    "discover",
    "probe_luns",
    "read_ranges",
]
