"""Many commands at once on one session: the fast path for listing and probing LUNs.

Listing hundreds of LUNs must take milliseconds, not a round trip per command: every command for
every LUN is queued at once with libiscsi's asynchronous API and the replies are handled as they
come, each completion continuing with what it needs next (a larger INQUIRY, READ CAPACITY(10)
when (16) is refused, the READ after the capacity). :func:`probe_luns` lists LUNs,
:func:`read_ranges` reads many byte ranges of many LUNs, keeping each range's own failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from virtyard.host.storage import scsi
from virtyard.host.storage.libiscsi._ffi import SESSION_STATUSES
from virtyard.host.storage.libiscsi.context import Context, Op
from virtyard.host.storage.libiscsi.errors import (
    IscsiError,
    IscsiPartialReadError,
    IscsiSessionError,
    IscsiTimeoutError,
    ScsiCheckConditionError,
)
from virtyard.host.storage.libiscsi.session import (
    INQUIRY_ALLOC,
    MAX_READ_CHUNK,
    Session,
    full_length,
)
from virtyard.host.storage.libiscsi.values import ByteRange

DEFAULT_VPD_PAGES: Final = (scsi.VPD_UNIT_SERIAL_NUMBER, scsi.VPD_DEVICE_IDENTIFICATION,
                            scsi.VPD_BLOCK_LIMITS)


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


class _Pipeline:
    """Commands queued together on one context, each with a continuation for its completion.

    Completions of commands queued by an earlier pipeline on the same session (one that failed
    and was abandoned) are dropped by ``owner``; unit attentions and busy statuses are retried.
    """

    def __init__(self, context: Context) -> None:
        self.context = context
        self.pending = 0

    def _submit(self, name: str, lun: int, queue: Callable[[int], int | None],
                on_done: Callable[[Op], None]) -> None:
        self.pending += 1
        self.context.submit(name, lun, queue, on_done, owner=self)

    def finish(self, op: Op) -> None:
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
            context.wait(context.has_completions, deadline, what)
            for op in context.drain():
                self.finish(op)


class _Probe(_Pipeline):
    """State of one :func:`probe_luns` run: what each completed command triggers next."""

    def __init__(self, context: Context, luns: Iterable[int], *, vpd_pages: Sequence[int],
                 read_bytes: int) -> None:
        super().__init__(context)
        self.read_bytes = read_bytes
        self.results = {lun: LunProbe(lun) for lun in luns}
        for lun in self.results:
            wire = scsi.encode_lun(lun)
            self._submit("inquiry", lun, context.q_inquiry(wire, None, INQUIRY_ALLOC),
                         self._inquiry_done(lun, None, INQUIRY_ALLOC))
            for page in vpd_pages:
                self._submit(f"inquiry vpd 0x{page:02x}", lun,
                             context.q_inquiry(wire, page, INQUIRY_ALLOC),
                             self._inquiry_done(lun, page, INQUIRY_ALLOC))
            self._submit("read capacity(16)", lun, context.q_readcapacity16(wire),
                         self._capacity_done)

    def _failed(self, op: Op) -> bool:
        error = self.context.check(op)
        if error is None:
            return False
        if isinstance(error, (IscsiTimeoutError, IscsiSessionError)):
            raise error  # the session itself is in trouble: stop the whole probe
        self.results[op.lun].errors[op.name] = error
        return True

    def _inquiry_done(self, lun: int, page: int | None, alloc: int) -> Callable[[Op], None]:
        def done(op: Op) -> None:
            if self._failed(op):
                return
            needed = full_length(op.data, page)
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

    def _capacity_done(self, op: Op) -> None:
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

    def _read_done(self, op: Op) -> None:
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
    if not 0 <= read_bytes <= MAX_READ_CHUNK:
        raise ValueError(f"read_bytes must be between 0 and {MAX_READ_CHUNK}")
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

    def __init__(self, context: Context, capacities: Mapping[int, scsi.Capacity]) -> None:
        super().__init__(context)
        self.capacities = dict(capacities)
        self.results: dict[ByteRange, bytes] = {}
        self.failures: dict[ByteRange, IscsiError] = {}
        self.session_error: IscsiError | None = None

    def _fail(self, op: Op, error: IscsiError, keys: Iterable[ByteRange]) -> None:
        for key in keys:
            self.failures[key] = error
        if op.status in SESSION_STATUSES and self.session_error is None:
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

    def _capacity_done(self, keys: list[ByteRange]) -> Callable[[Op], None]:
        def done(op: Op) -> None:
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
        chunk_blocks = max(1, MAX_READ_CHUNK // block)
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
                   chunk: int) -> Callable[[Op], None]:
        def done(op: Op) -> None:
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
