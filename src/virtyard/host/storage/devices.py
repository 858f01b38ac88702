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

A dead or unreachable target never hides the others: every target is listed on its own
(:meth:`Initiator.scan`), and the LUNs the last listing saw through a connection that now fails
stay listed with those paths ``failed``, carrying the failure (:func:`merge_scan`); they are
not probed (status unknown) and not visible. Once the target answers again, the next listing
shows them as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Final

from virtyard.host.storage import blkid, signatures
from virtyard.host.storage.connections import ConnectionRegistry
from virtyard.host.storage.initiator import (
    Connection,
    Device,
    DeviceScan,
    Initiator,
    InitiatorError,
    InitiatorReadError,
    PathInfo,
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
        """Disk LUNs (filtered by ``guids``), probed for signatures when ``check_status``.

        A connection that cannot be listed does not fail the listing: the LUNs the last listing
        saw through it are kept, with those paths failed (see :func:`merge_scan`).
        """
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
        """A new connection is up: add its LUNs to the cache (no full rescan).

        Paths through its session replace those the cache had (failed ones included).
        """
        entries = self._scan([connection], guids=None, check_status=False)
        key = connection.session_key()
        with self._lock:
            for entry in entries:
                known = self._cache.get(entry.device.guid)
                if known is None:
                    self._cache[entry.device.guid] = entry
                    continue
                fresh = {(p.connection.session_key(), p.lun) for p in entry.device.paths}
                kept = [p for p in known.device.paths
                        if (p.connection.session_key(), p.lun) not in fresh
                        and not (p.connection.session_key() == key and p.state == "failed")]
                known.device.paths = _active_first(kept + entry.device.paths)

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
        """Whether this host sees each LUN: known, with at least one active path, as of the
        last listing (no I/O, as a multipath map that is still there). A LUN that is not
        triggers one rescan before 'no': a LUN whose every path failed is not visible."""
        with self._lock:
            seen = {g: _reachable(self._cache.get(g)) for g in guids}
        if not all(seen.values()):
            entries = self._scan(self.connections.all(), guids=None, check_status=False)
            with self._lock:
                for entry in entries:  # keep what probing found for LUNs still reachable
                    old = self._cache.get(entry.device.guid)
                    if old is not None and _reachable(entry):
                        entry.usage = old.usage
                self._cache = {e.device.guid: e for e in entries}
                seen = {g: _reachable(self._cache.get(g)) for g in guids}
        return seen

    def _scan(self, connections: list[Connection], *, guids: frozenset[str] | None,
              check_status: bool) -> list[DeviceEntry]:
        scan = self.initiator.scan(
            connections, guids=guids, read_head=self.probe_bytes if check_status else 0,
            timeout=self.timeout)
        for failure in scan.failures:
            log.warning("connection %s (%s at %s) cannot be listed, its paths are failed: "
                        "%s: %s", failure.connection.id, failure.connection.iqn,
                        failure.connection.portal, failure.kind, failure.detail)
        with self._lock:
            known = [e.device for e in self._cache.values()]
        devices = merge_scan(scan, known, guids=guids)
        if not check_status:
            return [DeviceEntry(d) for d in devices]
        # A LUN with no working path is not read (a dead target would only cost time).
        probed = [d for d in devices if _has_active_path(d)]
        usages = dict(zip((id(d) for d in probed), self._probe_all(probed), strict=True))
        return [DeviceEntry(d, usages.get(id(d))) for d in devices]

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


def merge_scan(scan: DeviceScan, known: Iterable[Device], *,
               guids: frozenset[str] | None = None) -> list[Device]:
    """The devices of ``scan``, plus what ``known`` (the last listing) saw through the
    connections that failed in it.

    For every failed connection, each LUN known through its session keeps those paths, marked
    ``failed`` with the connection's failure: added to the LUN when another connection still
    lists it (multipath), or as the LUN's only paths otherwise (without its first bytes, so it
    is never probed: its status is unknown). A path the scan itself reports is never doubled.
    Paths are ordered active first (readers use the first path). Sorted by GUID.
    """
    failed = {f.connection.session_key(): f for f in reversed(scan.failures)}
    devices = {d.guid: d for d in scan.devices}
    for old in known:
        if guids is not None and old.guid not in guids:
            continue
        carried = [replace(p, state="failed", failure=failed[key])
                   for p in old.paths if (key := p.connection.session_key()) in failed]
        if not carried:
            continue
        device = devices.get(old.guid)
        if device is None:
            devices[old.guid] = replace(old, paths=carried, head=None)
            continue
        listed = {(p.connection.session_key(), p.lun) for p in device.paths}
        device.paths.extend(p for p in carried
                            if (p.connection.session_key(), p.lun) not in listed)
        if not device.serial and not _has_active_path(device):
            device.serial = old.serial  # a map whose paths all failed cannot be asked
    for device in devices.values():
        device.paths = _active_first(device.paths)
    return sorted(devices.values(), key=lambda d: d.guid)


def _has_active_path(device: Device) -> bool:
    return any(p.state == "active" for p in device.paths)


def _reachable(entry: DeviceEntry | None) -> bool:
    return entry is not None and _has_active_path(entry.device)


def _active_first(paths: list[PathInfo]) -> list[PathInfo]:
    return sorted(paths, key=lambda p: p.state != "active")


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
