"""Discovery and one logged-in session: the synchronous helpers most callers need.

:func:`discover` (SendTargets) and :class:`Session` (REPORT LUNS, INQUIRY, READ CAPACITY, READ
and WRITE of byte ranges), each command one round trip bounded by the session's deadline, unit
attentions retried. Listing many LUNs at once goes through :mod:`.pipelines` instead.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from typing import Final

from virtyard.host.storage import scsi
from virtyard.host.storage.libiscsi._ffi import SESSION_DISCOVERY, SESSION_NORMAL
from virtyard.host.storage.libiscsi.context import Context
from virtyard.host.storage.libiscsi.errors import IscsiSessionError, ScsiCheckConditionError
from virtyard.host.storage.libiscsi.values import (
    DEFAULT_PORT,
    Chap,
    DiscoveredTarget,
    portal_string,
)

DEFAULT_INITIATOR_NAME: Final = "iqn.2026-11.org.virtyard:initiator"
INQUIRY_ALLOC: Final = 255  # what every device accepts; re-asked larger when a page is longer
REPORT_LUNS_ALLOC: Final = 4096
MAX_READ_CHUNK: Final = 1 << 20


def discover(address: str, port: int = DEFAULT_PORT, *,
             initiator_name: str = DEFAULT_INITIATOR_NAME, chap: Chap | None = None,
             timeout: float = 5.0) -> list[DiscoveredTarget]:
    """SendTargets discovery on one portal: every target it offers, with portals and tags.

    Raises :class:`IscsiConnectError` for an unreachable portal, a login error subclass when
    the discovery login is refused (e.g. CHAP), :class:`IscsiTimeoutError` past ``timeout``.
    """
    portal = portal_string(address, port)
    context = Context(initiator_name=initiator_name, session_type=SESSION_DISCOVERY,
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

    def __init__(self, context: Context, address: str, port: int, target_iqn: str,
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
        portal = portal_string(address, port)
        context = Context(initiator_name=initiator_name, session_type=SESSION_NORMAL,
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
        return portal_string(self.address, self.port)

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

    def _live(self) -> Context:
        if self._context.closed:
            raise IscsiSessionError("session is closed", portal=self.portal,
                                    target=self.target_iqn)
        return self._context

    def _command(self, name: str, lun: int, queue: Callable[[int], int | None],
                 timeout: float | None) -> bytes:
        """Run one command synchronously, retrying unit attentions; its data-in bytes."""
        context = self._live()
        deadline = self._deadline(timeout)
        return context.finish(context.submit(name, lun, queue), deadline).data

    def report_luns(self, *, timeout: float | None = None) -> tuple[int, ...]:
        """REPORT LUNS (select report 0): the LUN numbers the target exposes to us."""
        context = self._live()
        alloc = REPORT_LUNS_ALLOC
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
        alloc = INQUIRY_ALLOC
        while True:
            data = self._command(name, lun, context.q_inquiry(wire, page, alloc), timeout)
            needed = full_length(data, page)
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
        chunk_blocks = max(1, MAX_READ_CHUNK // block_size)
        wire = scsi.encode_lun(lun)
        deadline = self._deadline(timeout)
        ops = [context.submit("read", lun, context.q_read(
                   wire, lba, min(chunk_blocks, end - lba) * block_size, block_size))
               for lba in range(first, end, chunk_blocks)]
        data = b"".join(context.finish(op, deadline).data for op in ops)
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
        step = max(1, MAX_READ_CHUNK // block_size) * block_size
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
            context.finish(op, deadline)


def full_length(data: bytes, page: int | None) -> int:
    """Size the INQUIRY answer says it has: additional length (standard) or page length."""
    if page is None:
        return 5 + data[4] if len(data) > 4 else len(data)
    return scsi.vpd_page_length(data) if len(data) >= 4 else len(data)


