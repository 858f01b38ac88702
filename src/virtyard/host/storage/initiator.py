"""One interface for iSCSI initiators, with one class per transport behind it.

The host agent's storage verbs speak only to :class:`Initiator`. Two implementations exist:
the user-space initiator (libiscsi, what QEMU itself uses; works without kernel modules) and
the kernel initiator (open-iscsi + multipath, what production hosts run). Which one a host uses
is configuration, with auto-detection as the default (:func:`choose_initiator_kind`).
"""

from __future__ import annotations

import abc
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Literal

InitiatorKind = Literal["userspace", "kernel"]


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
class Chap:
    """CHAP credentials for discovery or login."""

    username: str
    password: Secret

    def __repr__(self) -> str:
        return f"Chap(username={self.username!r}, password='***')"


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
class PathInfo:
    """One path to a LUN: the session it goes through and its state."""

    connection: Connection
    lun: int
    state: Literal["active", "failed"] = "active"
    physdev: str = ""


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
        each LUN for signature probing.
        """

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
