"""One interface for iSCSI initiators, with one class per transport behind it.

The host agent's storage verbs speak only to :class:`Initiator`. Two implementations exist:
the user-space initiator (libiscsi, what QEMU itself uses; works without kernel modules) and
the kernel initiator (open-iscsi + multipath, what production hosts run). Which one a host uses
is configuration, with auto-detection as the default (:func:`choose_initiator_kind`).
"""

from __future__ import annotations

import abc
import ipaddress
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

# CHAP credentials for discovery or login: the binding's one type (a plain value; importing it
# loads no library), handed through to libiscsi as it is and to iscsiadm by field.
from virtyard.host.storage.libiscsi.values import Chap as Chap  # noqa: PLC0414 (re-export)

InitiatorKind = Literal["userspace", "kernel"]

log = logging.getLogger(__name__)


class InitiatorError(Exception):
    """An initiator operation failed; ``kind`` says how (connect, login, timeout, …).

    Every initiator raises these (translating its own tool's errors), so the verbs map them to
    stable error codes without knowing the transport. Messages never carry a password.
    """

    def __init__(self, kind: str, detail: str, *, portal: str = "", target: str = "") -> None:
        self.kind = kind
        self.detail = detail
        self.portal = portal
        self.target = target
        where = " ".join(x for x in (portal, target) if x)
        super().__init__(f"{kind}: {detail}" + (f" ({where})" if where else ""))


class InitiatorAuthError(InitiatorError):
    """CHAP authentication failed."""


class InitiatorReadError(InitiatorError):
    """:meth:`Initiator.read_many` could not read some requests; the others were read.

    ``results[i]`` is the bytes of request ``i``, or ``None`` where it failed; ``errors`` maps the
    index of each failed request to its own :class:`InitiatorError`. ``kind``, ``portal`` and
    ``target`` are those of the first failure.
    """

    def __init__(self, results: list[bytes | None], errors: dict[int, InitiatorError]) -> None:
        first = errors[min(errors)]
        super().__init__(first.kind, f"{len(errors)} of {len(results)} reads failed, "
                         f"first: {first.detail}", portal=first.portal, target=first.target)
        self.results = results
        self.errors = errors


class Secret(str):
    """A string that never shows itself in ``repr`` (CHAP passwords in logs and tracebacks)."""

    def __repr__(self) -> str:
        return "'***'"


@dataclass(frozen=True)
class Portal:
    """An iSCSI portal: host name or address, and TCP port."""

    host: str
    port: int = 3260

    @property
    def is_ipv6(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).version == 6
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DiscoveredTarget:
    """One SendTargets answer: a target IQN reachable at a portal, with its portal group tag."""

    portal: Portal
    tpgt: int
    iqn: str

    def full(self) -> str:
        """oVirt's ``fullTargets`` string: ``"host:port,tpgt iqn"``."""
        return f"{self.portal},{self.tpgt} {self.iqn}"


@dataclass(frozen=True)
class Connection:
    """A login the engine asked for (``connectStorageServer``): one target at one portal."""

    id: str
    portal: Portal
    iqn: str
    tpgt: int = 1
    chap: Chap | None = None
    initiator_name: str | None = None

    def session_key(self) -> tuple[str, int, str, int]:
        """Connections with the same key share one session (and one reference count)."""
        return (self.portal.host, self.portal.port, self.iqn, self.tpgt)


@dataclass(frozen=True)
class ConnectionFailure:
    """A connection whose LUNs could not be listed, and why (``kind`` as in
    :class:`InitiatorError`: connect, target-not-found, login, timeout, session, …)."""

    connection: Connection
    kind: str
    detail: str

    @classmethod
    def of(cls, connection: Connection, exc: Exception) -> ConnectionFailure:
        if isinstance(exc, InitiatorError):
            return cls(connection, exc.kind, exc.detail)
        return cls(connection, "internal", f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class PathInfo:
    """One path to a LUN: the session it goes through and its state.

    ``failure`` says why a failed path is failed when its connection itself failed (the
    target could not be reached or its session is down); ``None`` otherwise.
    """

    connection: Connection
    lun: int
    state: Literal["active", "failed"] = "active"
    physdev: str = ""
    failure: ConnectionFailure | None = None


@dataclass
class Device:
    """A disk LUN as one host sees it (``Host.getDeviceList`` entry before status probing)."""

    guid: str
    vendor_id: str
    product_id: str
    fwrev: str
    serial: str
    capacity: int
    logical_block_size: int
    physical_block_size: int
    discard_max_bytes: int
    paths: list[PathInfo] = field(default_factory=list)
    # The first bytes of the LUN, read only when status probing was asked for.
    head: bytes | None = None


@dataclass
class DeviceScan:
    """What one listing found: the LUNs that answered, and the connections that did not.

    A failed connection never hides the others: its LUNs are simply missing from ``devices``
    (or, with the kernel initiator, present with failed paths) and it is in ``failures``.
    """

    devices: list[Device] = field(default_factory=list)
    failures: list[ConnectionFailure] = field(default_factory=list)


def merge_devices(found: Iterable[list[Device]]) -> list[Device]:
    """Devices from several listings merged by GUID (one more path per listing), sorted."""
    merged: dict[str, Device] = {}
    for devices in found:
        for device in devices:
            known = merged.get(device.guid)
            if known is None:
                merged[device.guid] = device
            else:  # the same LUN seen through another portal: one more path
                known.paths.extend(device.paths)
    return sorted(merged.values(), key=lambda d: d.guid)


class Initiator(abc.ABC):
    """What the storage verbs need from an iSCSI initiator, whatever the transport."""

    kind: InitiatorKind

    @abc.abstractmethod
    def discover(self, portal: Portal, chap: Chap | None, *,
                 timeout: float) -> list[DiscoveredTarget]:
        """SendTargets discovery at ``portal``."""

    @abc.abstractmethod
    def login(self, connection: Connection, *, timeout: float) -> None:
        """Log in to the connection's target (idempotent for an existing session)."""

    @abc.abstractmethod
    def logout(self, connection: Connection, *, timeout: float) -> None:
        """Log out of the connection's target (no session: nothing to do)."""

    @abc.abstractmethod
    def devices(self, connections: list[Connection], *, guids: frozenset[str] | None,
                read_head: int, timeout: float) -> list[Device]:
        """Disk LUNs reachable through ``connections`` (array controllers skipped).

        ``guids`` restricts the answer; ``read_head`` > 0 also reads that many first bytes of
        each LUN for signature probing. A target that cannot be listed may fail the whole call:
        listings that must survive a dead target use :meth:`scan`.
        """

    def scan(self, connections: list[Connection], *, guids: frozenset[str] | None,
             read_head: int, timeout: float) -> DeviceScan:
        """:meth:`devices`, but every session on its own: one that fails is reported in
        :attr:`DeviceScan.failures` (once per connection using it) instead of failing the call.

        This default lists each session with :meth:`devices` in parallel threads (so a dead
        target costs the listing at most its own bound, not its sum with the others);
        initiators that see all sessions in one pass override it.
        """
        groups: dict[tuple[str, int, str, int], list[Connection]] = {}
        for connection in connections:
            groups.setdefault(connection.session_key(), []).append(connection)
        if not groups:
            return DeviceScan()

        def one(group: list[Connection]) -> list[Device] | Exception:
            try:
                return self.devices(group[:1], guids=guids, read_head=read_head,
                                    timeout=timeout)
            except Exception as exc:  # one target must never fail the others
                if not isinstance(exc, InitiatorError):
                    log.exception("listing LUNs of %s at %s failed", group[0].iqn,
                                  group[0].portal)
                return exc

        with ThreadPoolExecutor(max_workers=min(16, len(groups))) as pool:
            answers = list(pool.map(one, groups.values()))
        scan = DeviceScan()
        found = []
        for group, answer in zip(groups.values(), answers, strict=True):
            if isinstance(answer, Exception):
                scan.failures.extend(ConnectionFailure.of(c, answer) for c in group)
            else:
                found.append(answer)
        scan.devices = merge_devices(found)
        return scan

    def read(self, device: Device, offset: int, length: int, *, timeout: float) -> bytes:
        """``length`` bytes of ``device`` at ``offset`` (signature probing past the head)."""
        raise NotImplementedError

    def read_many(self, requests: list[tuple[Device, int, int]], *,
                  timeout: float) -> list[bytes]:
        """The bytes of each ``(device, offset, length)`` request, in the order asked.

        Each answer is what :meth:`read` would return (fewer bytes at the end of the device).
        One failed request does not stop the others: all are tried, and if any failed,
        :class:`InitiatorReadError` is raised with the bytes of those that were read.

        This default reads one request after the other with :meth:`read` (``timeout`` bounds
        each); initiators that can batch override it (the user-space one queues every read of a
        target at once on one session, ``timeout`` bounding each target's share).
        """
        results: list[bytes | None] = []
        errors: dict[int, InitiatorError] = {}
        for index, (device, offset, length) in enumerate(requests):
            try:
                results.append(self.read(device, offset, length, timeout=timeout))
            except InitiatorError as exc:
                results.append(None)
                errors[index] = exc
        if errors:
            raise InitiatorReadError(results, errors)
        return [data or b"" for data in results]

    def write(self, device: Device, offset: int, data: bytes, *, timeout: float) -> bool:
        """Write ``data`` (whole logical blocks, at a block boundary) durably at ``offset`` of
        ``device`` over the initiator's own transport, when it has one that needs no local
        device: True when written, False when the caller must make a local device instead
        (the default)."""
        return False

    @abc.abstractmethod
    def device_path(self, guid: str) -> str | None:
        """A local block device path for ``guid`` when the transport gives one, else ``None``."""


def choose_initiator_kind(configured: str = "auto") -> InitiatorKind:
    """``configured`` if explicit; otherwise kernel when the kernel initiator can work here.

    The kernel initiator needs the ``iscsi_tcp`` module and device-mapper (for multipath);
    without either, the user-space initiator is the only one that can reach a LUN.
    """
    if configured in ("userspace", "kernel"):
        return configured  # type: ignore[return-value]
    if configured != "auto":
        raise ValueError(f"initiator must be auto, userspace or kernel, not {configured!r}")
    has_iscsi_tcp = os.path.exists("/sys/module/iscsi_tcp")
    has_dm = os.path.exists("/sys/module/dm_mod") or os.path.exists("/dev/mapper/control")
    return "kernel" if has_iscsi_tcp and has_dm else "userspace"
