"""The host's view of its SAN LUNs: listing, status probing, the cache, visibility.

A listing asks the initiator for every disk LUN behind the connected targets. With status
checking, the first bytes of each LUN come back in the same pipelined pass and are probed for
signatures (libblkid, LVM label); further bytes are read only where a probe needs them: LVM
metadata past the head, and libblkid's second look at a LUN whose head shows nothing (ISO 9660,
btrfs, ZFS, md keep their signatures further in or at the end). The last listing is cached:
``refresh=False`` answers from it, and connecting or disconnecting a target updates it, so it
stays current without a rescan.

Reads past the heads are batched in rounds (:meth:`DeviceService._probe_all`): every LUN is
probed from the bytes fetched so far; the ranges the probes missed, across all LUNs, are fetched
with one :meth:`Initiator.read_many` (the user-space initiator pipelines them on one session per
target), and the LUNs that missed are probed again. A LUN whose reads fail is reported without a
status (``usage`` ``None``: "unknown", never "free") instead of failing the whole listing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from virtyard.host.storage import blkid, signatures
from virtyard.host.storage.connections import ConnectionRegistry
from virtyard.host.storage.initiator import (
    Connection,
    Device,
    Initiator,
    InitiatorError,
    InitiatorReadError,
)

log = logging.getLogger("virtyard.host.storage.devices")

# Batched read rounds; a probe still wanting more after them (only damaged or unusual LVM
# metadata can ask for more than three reads in a row) is finished alone, one read at a time.
PROBE_ROUNDS: Final = 4


@dataclass
class DeviceEntry:
    """A LUN and, when it was probed, what is on it."""

    device: Device
    usage: signatures.Usage | None = None


class DeviceService:
    """Lists, probes and caches the LUNs reachable through the registry's connections."""

    def __init__(self, initiator: Initiator, connections: ConnectionRegistry, *,
                 probe_bytes: int, timeout: float) -> None:
        self.initiator = initiator
        self.connections = connections
        self.probe_bytes = probe_bytes
        self.timeout = timeout
        self._lock = threading.Lock()
        self._cache: dict[str, DeviceEntry] = {}

    def listing(self, *, guids: frozenset[str] | None, check_status: bool,
                refresh: bool) -> list[DeviceEntry]:
        """Disk LUNs (filtered by ``guids``), probed for signatures when ``check_status``."""
        if refresh or not self._cache:
            entries = self._scan(self.connections.all(), guids=guids, check_status=check_status)
            with self._lock:
                if guids is None:
                    self._cache = {e.device.guid: e for e in entries}
                else:
                    self._cache.update({e.device.guid: e for e in entries})
            return entries
        with self._lock:
            cached = [e for g, e in sorted(self._cache.items()) if guids is None or g in guids]
        if check_status:
            unprobed = [e for e in cached if e.usage is None and e.device.head is not None]
            for entry, usage in zip(unprobed, self._probe_all([e.device for e in unprobed]),
                                    strict=True):
                entry.usage = usage
        return cached

    def connected(self, connection: Connection) -> None:
        """A new connection is up: add its LUNs to the cache (no full rescan)."""
        entries = self._scan([connection], guids=None, check_status=False)
        with self._lock:
            for entry in entries:
                known = self._cache.get(entry.device.guid)
                if known is None:
                    self._cache[entry.device.guid] = entry
                else:
                    keys = {(p.connection.session_key(), p.lun) for p in known.device.paths}
                    known.device.paths.extend(
                        p for p in entry.device.paths
                        if (p.connection.session_key(), p.lun) not in keys)

    def disconnected(self, connection: Connection) -> None:
        """A session is gone: drop its paths, and the LUNs left with none."""
        key = connection.session_key()
        with self._lock:
            for guid in list(self._cache):
                device = self._cache[guid].device
                device.paths = [p for p in device.paths if p.connection.session_key() != key]
                if not device.paths:
                    del self._cache[guid]

    def visibility(self, guids: list[str]) -> dict[str, bool]:
        """Whether this host sees each LUN; an unknown one triggers one rescan before 'no'."""
        with self._lock:
            seen = {g: g in self._cache for g in guids}
        if not all(seen.values()):
            entries = self._scan(self.connections.all(), guids=None, check_status=False)
            with self._lock:
                self._cache = {e.device.guid: e for e in entries}
                seen = {g: g in self._cache for g in guids}
        return seen

    def _scan(self, connections: list[Connection], *, guids: frozenset[str] | None,
              check_status: bool) -> list[DeviceEntry]:
        devices = self.initiator.devices(
            connections, guids=guids, read_head=self.probe_bytes if check_status else 0,
            timeout=self.timeout)
        if not check_status:
            return [DeviceEntry(d) for d in devices]
        return [DeviceEntry(d, usage)
                for d, usage in zip(devices, self._probe_all(devices), strict=True)]

    def _probe_all(self, devices: Sequence[Device]) -> list[signatures.Usage | None]:
        """:func:`signatures.probe` of every device, its reads past the head batched in rounds.

        Each round probes the LUNs still undecided from their prefetched bytes; a probe that
        wants bytes not fetched yet stops (:class:`_NotFetchedError`) and leaves the range it
        wanted. All those ranges go to one :meth:`Initiator.read_many`, and the next round
        probes those LUNs again. Results are exactly what probing with direct reads gives,
        since a probe only ever sees real bytes. ``None`` for a LUN whose reads failed.
        """
        luns = [_Prefetched(device) for device in devices]
        usages: list[signatures.Usage | None] = [None] * len(luns)
        todo = list(range(len(luns)))
        for round_number in range(PROBE_ROUNDS + 1):
            missed = []
            for index in todo:
                try:
                    usages[index] = luns[index].probe()
                except _NotFetchedError:
                    missed.append(index)
                else:
                    luns[index].pieces.clear()  # decided: free its bytes now
            todo = missed
            if not todo or round_number == PROBE_ROUNDS:
                break
            todo = self._fetch([luns[index] for index in todo], todo)
        for index in todo:  # still wanting more: finish alone, reading as it asks
            lun = luns[index]
            try:
                usages[index] = lun.probe(self._reader(lun.device))
            except InitiatorError as exc:
                log.warning("cannot probe %s for signatures: %s", lun.device.guid, exc)
        return usages

    def _fetch(self, luns: list[_Prefetched], indices: list[int]) -> list[int]:
        """Read what ``luns`` missed with one ``read_many``; the indices of those that got it."""
        requests = [(lun.device, offset, length) for lun in luns for offset, length in lun.wanted]
        try:
            got: list[bytes | None] = list(self.initiator.read_many(requests,
                                                                    timeout=self.timeout))
        except InitiatorReadError as exc:
            got = exc.results
            failures = exc.errors
        else:
            failures = {}
        position = 0
        kept = []
        for lun, index in zip(luns, indices, strict=True):
            count = len(lun.wanted)
            error = next((failures[n] for n in range(position, position + count)
                          if n in failures), None)
            if error is None:
                for (offset, length), data in zip(lun.wanted, got[position:position + count],
                                                  strict=True):
                    lun.pieces.append((offset, length, data or b""))
                kept.append(index)
            else:
                log.warning("cannot probe %s for signatures: %s", lun.device.guid, error)
                lun.pieces.clear()
            lun.wanted = []
            position += count
        return kept

    def _reader(self, device: Device) -> Callable[[int, int], bytes]:
        def read(offset: int, length: int) -> bytes:
            return self.initiator.read_many([(device, offset, length)], timeout=self.timeout)[0]

        return read


class _NotFetchedError(Exception):
    """A probe wanted bytes that were not fetched yet (it is probed again once they are)."""


class _Prefetched:
    """One LUN's bytes fetched so far for :func:`signatures.probe`, and what it missed."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.head = device.head or b""
        self.pieces: list[tuple[int, int, bytes]] = []  # (offset, length asked, bytes read)
        self.wanted: list[tuple[int, int]] = []
        # The "second look" (signatures' _read_regions: where libblkid looks, minus the head).
        # Its reads do not depend on each other, so the first miss among them fetches them
        # all. Only a read-ahead: were it to drift from signatures, just more rounds follow.
        size = device.capacity if device.capacity > 0 else len(self.head)
        seen = min(len(self.head), size)
        self.second_look = [(max(offset, seen), offset + length - max(offset, seen))
                            for offset, length in blkid.regions(size) if offset + length > seen]

    def probe(self, read: Callable[[int, int], bytes] | None = None) -> signatures.Usage:
        """Probe from the bytes at hand; a miss raises :class:`_NotFetchedError`, or is read
        with ``read`` when given (and kept)."""

        def read_more(offset: int, length: int) -> bytes:
            data = self._cached(offset, length)
            if data is not None:
                return data
            if read is not None:
                data = read(offset, length)
                self.pieces.append((offset, length, data))
                return data
            if (offset, length) in self.second_look:
                self.wanted = [r for r in self.second_look if self._cached(*r) is None]
            else:
                self.wanted = [(offset, length)]
            raise _NotFetchedError

        sector = self.device.logical_block_size or 512
        return signatures.probe(self.head, self.device.capacity, read_more, sector_size=sector)

    def _cached(self, offset: int, length: int) -> bytes | None:
        for start, asked, data in self.pieces:
            if start <= offset and offset + length <= start + asked:
                skip = offset - start
                return data if skip == 0 and length >= len(data) else data[skip:skip + length]
        return None
