"""The user-space iSCSI initiator: libiscsi, the initiator QEMU itself uses.

No kernel module and no local block device: "logging in" proves the target is reachable with
these credentials and records the connection; VMs reach the LUN through QEMU's own iSCSI driver.
Device listing opens one session per target (in parallel across targets) and pipelines the
SCSI commands for all its LUNs, so a listing costs about one round trip per target. Reads past
the head for signature probing are batched the same way (:meth:`UserspaceInitiator.read_many`).
Those listing and probing logins give up on a portal that does not answer after
:data:`PROBE_LOGIN_TIMEOUT`, so a dead target costs a listing a few seconds at most; the
listing itself (:meth:`~virtyard.host.storage.initiator.Initiator.scan`) lists each target on
its own, so a dead one never fails the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final, TypeVar

from virtyard.host.storage import libiscsi, scsi
from virtyard.host.storage.initiator import (
    Chap,
    Connection,
    Device,
    DiscoveredTarget,
    Initiator,
    InitiatorAuthError,
    InitiatorError,
    InitiatorReadError,
    PathInfo,
    Portal,
    merge_devices,
)

T = TypeVar("T")

# Listing and probing log in to every target anew: a live portal answers a login in
# milliseconds, so a dead or unreachable one (no answer to the TCP connect or to the login) is
# given up after this many seconds, whatever the caller's overall budget. Explicit logins
# (connectStorageServer) keep the full login timeout.
PROBE_LOGIN_TIMEOUT: Final = 5.0


@dataclass
class _ReadGroup:
    """The reads of :meth:`UserspaceInitiator.read_many` that go through one session."""

    connection: Connection
    wanted: dict[libiscsi.ByteRange, list[int]] = field(default_factory=dict)  # -> indices
    capacities: dict[int, scsi.Capacity] = field(default_factory=dict)


def _initiator_error(exc: libiscsi.IscsiError) -> InitiatorError:
    """One libiscsi error as the initiator-neutral :class:`InitiatorError`."""
    kind = InitiatorAuthError if isinstance(exc, libiscsi.IscsiAuthenticationError) \
        else InitiatorError
    # libiscsi's own text when it gave one, else ours (a timeout of ours has no libiscsi text)
    return kind(exc.kind.value, exc.detail or exc.message, portal=exc.portal or "",
                target=exc.target or "")


@contextmanager
def _translated() -> Iterator[None]:
    """libiscsi's errors as the initiator-neutral :class:`InitiatorError`."""
    try:
        yield
    except libiscsi.IscsiError as exc:
        raise _initiator_error(exc) from None


def _call(fn: Callable[[], T]) -> T:
    with _translated():
        return fn()


def _left(deadline: float) -> float:
    """Seconds until ``deadline`` (a sliver when it passed: the command then times out)."""
    return max(deadline - time.monotonic(), 0.001)


class UserspaceInitiator(Initiator):
    """:class:`Initiator` over libiscsi."""

    kind = "userspace"

    def __init__(self, initiator_name: str, *,
                 probe_login_timeout: float = PROBE_LOGIN_TIMEOUT) -> None:
        self.initiator_name = initiator_name
        self.probe_login_timeout = probe_login_timeout

    def discover(self, portal: Portal, chap: Chap | None, *,
                 timeout: float) -> list[DiscoveredTarget]:
        found = _call(lambda: libiscsi.discover(
            portal.host, portal.port, initiator_name=self.initiator_name, chap=chap,
            timeout=timeout))
        out = []
        for target in found:
            for p in target.portals:
                out.append(DiscoveredTarget(Portal(p.address, p.port),
                                            p.tpgt if p.tpgt is not None else 1, target.iqn))
        return out

    def _session(self, connection: Connection, timeout: float) -> libiscsi.Session:
        return libiscsi.Session.login(
            connection.portal.host, connection.portal.port, connection.iqn,
            initiator_name=connection.initiator_name or self.initiator_name,
            chap=connection.chap, timeout=timeout)

    def login(self, connection: Connection, *, timeout: float) -> None:
        with _translated(), self._session(connection, timeout):
            pass

    def logout(self, connection: Connection, *, timeout: float) -> None:
        """Nothing stays logged in between calls in user space."""

    def devices(self, connections: list[Connection], *, guids: frozenset[str] | None,
                read_head: int, timeout: float) -> list[Device]:
        """One session per target (targets in parallel threads); the first target that fails
        fails the call (:meth:`~Initiator.scan` lists each target on its own)."""
        by_session: dict[tuple[str, int, str, int], Connection] = {}
        for connection in connections:
            by_session.setdefault(connection.session_key(), connection)
        if not by_session:
            return []
        if len(by_session) == 1:
            [connection] = by_session.values()
            per_target = [self._target_devices(connection, read_head, timeout)]
        else:
            with ThreadPoolExecutor(max_workers=min(16, len(by_session))) as pool:
                per_target = list(pool.map(
                    lambda c: self._target_devices(c, read_head, timeout),
                    by_session.values()))
        return merge_devices([d for d in devices if guids is None or d.guid in guids]
                             for devices in per_target)

    def _target_devices(self, connection: Connection, read_head: int,
                        timeout: float) -> list[Device]:
        """One target's LUNs; ``timeout`` bounds it all, the login at most
        :attr:`probe_login_timeout` of it (an unreachable portal costs no more than that)."""
        deadline = time.monotonic() + timeout
        with _translated(), self._session(connection, min(timeout, self.probe_login_timeout)
                                          ) as session:
            luns = session.report_luns(timeout=_left(deadline))
            probes = libiscsi.probe_luns(session, luns, read_bytes=read_head,
                                         timeout=_left(deadline))
        devices = []
        for _, probe in sorted(probes.items()):
            device = device_from_probe(probe, connection)
            if device is not None:
                devices.append(device)
        return devices

    def read(self, device: Device, offset: int, length: int, *, timeout: float) -> bytes:
        path = device.paths[0]
        deadline = time.monotonic() + timeout
        with _translated(), self._session(path.connection,
                                          min(timeout, self.probe_login_timeout)) as session:
            return session.read(path.lun, offset, length, timeout=_left(deadline))

    def write(self, device: Device, offset: int, data: bytes, *, timeout: float) -> bool:
        """WRITE(16) and SYNCHRONIZE CACHE on one session of the device's first path."""
        if not device.paths:
            raise InitiatorError("not-found", f"{device.guid} has no path")
        path = device.paths[0]
        deadline = time.monotonic() + timeout
        with _translated(), self._session(path.connection,
                                          min(timeout, self.probe_login_timeout)) as session:
            session.write(path.lun, offset, data, block_size=device.logical_block_size or None,
                          timeout=_left(deadline))
        return True

    def read_many(self, requests: list[tuple[Device, int, int]], *,
                  timeout: float) -> list[bytes]:
        """Every request's bytes, with one session per target and all its reads pipelined.

        Requests are grouped by their device's first path's session; each target gets one
        login and one :func:`libiscsi.read_ranges` (targets in parallel threads), ``timeout``
        bounding login and reads together. Bytes past the end of a device are clipped. Failures
        (a target that refuses the login, a LUN that fails a READ) are per request:
        :class:`InitiatorReadError` carries the bytes of the others.
        """
        results: list[bytes | None] = [None] * len(requests)
        errors: dict[int, InitiatorError] = {}
        groups: dict[tuple[str, int, str, int], _ReadGroup] = {}
        for index, (device, offset, length) in enumerate(requests):
            if not device.paths:
                errors[index] = InitiatorError("not-found", f"{device.guid} has no path")
                continue
            path = device.paths[0]
            group = groups.setdefault(path.connection.session_key(),
                                      _ReadGroup(path.connection))
            key = (path.lun, offset, length)
            group.wanted.setdefault(key, []).append(index)
            if device.logical_block_size > 0 and device.capacity > 0:
                group.capacities[path.lun] = scsi.Capacity(
                    device.capacity // device.logical_block_size - 1, device.logical_block_size)
        if groups:
            with ThreadPoolExecutor(max_workers=min(16, len(groups))) as pool:
                done = list(pool.map(lambda g: self._read_group(g, timeout), groups.values()))
            for group, (got, failed) in zip(groups.values(), done, strict=True):
                for key, indices in group.wanted.items():
                    for index in indices:
                        if key in got:
                            results[index] = got[key]
                        else:
                            errors[index] = failed.get(key) or InitiatorError(
                                "session", f"LUN {key[0]}: not read", target=group.connection.iqn)
        if errors:
            raise InitiatorReadError(results, errors)
        return [data if data is not None else b"" for data in results]

    def _read_group(self, group: _ReadGroup, timeout: float
                    ) -> tuple[dict[libiscsi.ByteRange, bytes],
                               dict[libiscsi.ByteRange, InitiatorError]]:
        """One target's reads: what was read, and each range that was not with its error."""
        deadline = time.monotonic() + timeout
        ranges = list(group.wanted)
        try:
            with _translated(), self._session(
                    group.connection, min(timeout, self.probe_login_timeout)) as session:
                try:
                    return libiscsi.read_ranges(session, ranges, timeout=_left(deadline),
                                                capacities=group.capacities), {}
                except libiscsi.IscsiPartialReadError as exc:
                    return exc.results, {key: _initiator_error(error)
                                         for key, error in exc.failures.items()}
        except InitiatorError as exc:  # no session (login refused, portal down)
            return {}, dict.fromkeys(ranges, exc)

    def device_path(self, guid: str) -> str | None:
        return None


def device_from_probe(probe: libiscsi.LunProbe, connection: Connection) -> Device | None:
    """A :class:`Device` from one LUN's raw answers; ``None`` for what is not a disk LUN
    (array controllers such as tgt's LUN 0, absent LUNs, LUNs that did not answer)."""
    if probe.inquiry is None:
        return None
    inquiry = scsi.parse_standard_inquiry(probe.inquiry)
    if not inquiry.connected or not inquiry.is_disk:
        return None
    page83 = probe.vpd.get(0x83)
    guid = scsi.wwid_from_page83(page83, inquiry) if page83 else ""
    capacity = probe.capacity()
    if not guid or capacity is None:
        return None
    serial = scsi.parse_unit_serial_number(probe.vpd[0x80]) if 0x80 in probe.vpd else ""
    limits = scsi.parse_block_limits(probe.vpd[0xB0]) if 0xB0 in probe.vpd else None
    return Device(
        guid=guid,
        vendor_id=inquiry.vendor,
        product_id=inquiry.product,
        fwrev=inquiry.revision,
        serial=serial,
        capacity=capacity.capacity_bytes,
        logical_block_size=capacity.logical_block_size,
        physical_block_size=capacity.physical_block_size,
        discard_max_bytes=scsi.discard_max_bytes(limits, capacity),
        paths=[PathInfo(connection=connection, lun=probe.lun)],
        head=probe.data,
    )
