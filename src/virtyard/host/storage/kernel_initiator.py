"""The kernel iSCSI initiator: open-iscsi sessions and dm-multipath maps, as production hosts run.

Why it is built this way (after oVirt's vdsm, whose failure modes it avoids):

* **Actions go through iscsiadm, state comes from sysfs.** ``iscsiadm`` is the only supported
  way to create node records and log in or out; but which sessions exist, which disks they
  brought and which multipath map holds each disk are read from sysfs, which is cheap,
  authoritative and needs no parsing of human-oriented output.
* **Login waits for what it promised, with a bound, and never sleeps blindly.** After the
  login the session is rescanned (synchronous in the kernel: the SCSI devices exist when it
  returns) and sysfs is polled until the expected WWIDs — or, without a list, every disk LUN of
  the new session — appear as multipath maps. No ``udevadm settle``: it waits for unrelated
  events and cannot say what is missing. A time-out names the missing LUNs and what
  multipathd thinks of their paths.
* **Discovery leaves nothing behind**: the discovery record is deleted even when discovery
  fails, so CHAP settings of one call never leak into the next.
* **Passwords stay secret**: they are only passed to iscsiadm as masked ``-v`` values.

Without the ``iscsi_tcp`` module (like the lab machines) iscsiadm fails with
:class:`~virtyard.host.storage.iscsiadm.IscsiTransportUnavailableError`; use the user-space
initiator there (:func:`~virtyard.host.storage.initiator.choose_initiator_kind`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import logging
import mmap
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from virtyard.host.storage import multipath
from virtyard.host.storage.initiator import (
    Chap,
    Connection,
    ConnectionFailure,
    Device,
    DeviceScan,
    DiscoveredTarget,
    Initiator,
    InitiatorAuthError,
    InitiatorError,
    PathInfo,
    Portal,
)
from virtyard.host.storage.iscsiadm import (
    DEFAULT_IFACE,
    Iscsiadm,
    IscsiadmError,
    IscsiadmParseError,
    IscsiAuthenticationError,
    Runner,
    system_runner,
)
from virtyard.host.storage.libiscsi import ErrorKind
from virtyard.host.storage.multipath import (
    DmMap,
    IscsiSession,
    Multipathd,
    MultipathError,
    MultipathParseError,
    Sysfs,
)

log = logging.getLogger(__name__)

# Cleanup after a failure and diagnostics run even when the caller's budget is spent.
CLEANUP_TIMEOUT = 10.0
DIAGNOSTIC_TIMEOUT = 3.0
# One scsi_id or dmsetup call never gets more than this, whatever the overall budget.
PROBE_TIMEOUT = 10.0
MAX_POLL_INTERVAL = 1.0
HEAD_ALIGN = 4096  # O_DIRECT needs buffer, offset and length aligned to the logical block size
SESSION_LOGGED_IN = "LOGGED_IN"  # /sys/class/iscsi_session/sessionN/state of a working session

# Discovery records are per portal for the whole host, and node records per target/portal:
# serialise changes to them across threads (logins themselves run in parallel).
_DISCOVERY_LOCK = threading.Lock()
_NODE_LOCK = threading.Lock()


class KernelInitiatorError(InitiatorError):
    """A kernel-initiator step failed after iscsiadm itself succeeded."""


class SessionNotFoundError(KernelInitiatorError):
    """iscsiadm reported a successful login but no matching session is in sysfs."""

    def __init__(self, detail: str, *, portal: str = "", target: str = "") -> None:
        super().__init__(ErrorKind.SESSION.value, detail, portal=portal, target=target)


class DevicesNotReadyError(KernelInitiatorError):
    """The session is logged in, but its LUNs did not all become multipath maps in time.

    The session stays logged in: the caller decides whether to log out or to wait longer.
    ``pending`` lists the missing WWIDs (or the unmapped disks when no WWIDs were expected).
    """

    def __init__(self, detail: str, pending: list[str], *, portal: str = "",
                 target: str = "") -> None:
        super().__init__(ErrorKind.TIMEOUT.value, detail, portal=portal, target=target)
        self.pending = pending


@contextlib.contextmanager
def _translated(portal: Portal | None = None, target: str = "") -> Iterator[None]:
    """iscsiadm's typed errors as the initiator-neutral :class:`InitiatorError` (same ``kind``
    words as the user-space initiator's), so the verbs need not know the transport."""
    where = {"portal": str(portal) if portal else "", "target": target}
    try:
        yield
    except IscsiAuthenticationError as e:
        raise InitiatorAuthError(e.kind.value, str(e), **where) from None
    except IscsiadmError as e:
        raise InitiatorError(e.kind.value, str(e), **where) from None
    except (IscsiadmParseError, MultipathParseError) as e:
        raise InitiatorError("unexpected-output", str(e), **where) from None


T = TypeVar("T")


def _bounded(fn: Callable[[], T], timeout: float, what: str) -> T:
    """``fn()`` in a daemon thread, abandoned after ``timeout`` seconds.

    A read from a multipath map whose paths are all down queues (``queue_if_no_path``) and
    cannot be interrupted; the caller must still get its answer in time.
    """
    if timeout <= 0:
        raise InitiatorError(ErrorKind.TIMEOUT.value, f"{what}: no time left")
    results: list[T] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(fn())
        except BaseException as e:  # handed to the caller below
            errors.append(e)

    thread = threading.Thread(target=work, name=f"bounded {what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise InitiatorError(ErrorKind.TIMEOUT.value, f"{what}: no answer in {timeout:g} s")
    if errors:
        raise errors[0]
    return results[0]


# --- helpers -------------------------------------------------------------------------------------


def normalize_address(host: str) -> str:
    """Canonical text of an address (``[FE80:0::1]`` -> ``fe80::1``); names are lower-cased."""
    text = host.strip().strip("[]")
    addr, pct, zone = text.partition("%")
    try:
        return str(ipaddress.ip_address(addr)) + pct + zone
    except ValueError:
        return text.lower()


def resolve_addresses(host: str) -> frozenset[str]:
    """``host`` and, when it is a name, the addresses it resolves to (normalised).

    Sessions in sysfs carry the address iscsiadm connected to, which is the resolved one.
    """
    found = {normalize_address(host)}
    try:
        ipaddress.ip_address(host.strip().strip("[]").partition("%")[0])
        return frozenset(found)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return frozenset(found)
    found.update(normalize_address(str(info[4][0])) for info in infos)
    return frozenset(found)


def iface_name(initiator_name: str | None) -> str:
    """The iSCSI interface that logs in as ``initiator_name`` (``None``: the default one).

    Named after a hash of the initiator name, so that logout finds the interface login used.
    """
    if not initiator_name:
        return DEFAULT_IFACE
    return "vy-" + hashlib.sha256(initiator_name.encode()).hexdigest()[:12]


def read_initiator_name(path: Path) -> str | None:
    """The ``InitiatorName=`` of open-iscsi's ``initiatorname.iscsi``, if the file has one."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "InitiatorName" and value.strip():
            return value.strip()
    return None


def read_at(path: str | Path, offset: int, length: int, *, align: int = HEAD_ALIGN) -> bytes:
    """``length`` bytes of ``path`` at ``offset`` (fewer at end of file), around the page cache.

    Signature probing must see what is on the LUN now, not what this host cached before
    another host wrote a label: so the read uses ``O_DIRECT``, with a page-aligned buffer and
    the byte range widened to ``align`` boundaries. Where ``O_DIRECT`` is refused (``EINVAL``:
    tmpfs, some file systems), it falls back to a plain buffered read.
    """
    if length <= 0:
        return b""
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    start = offset - offset % align
    size = -(-(offset + length - start) // align) * align
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return _buffered_read(path, offset, length)
    try:
        buf = mmap.mmap(-1, size)  # anonymous mappings are page-aligned
        try:
            with memoryview(buf) as view:
                got = 0
                while got < size:
                    try:
                        n = os.preadv(fd, [view[got:size]], start + got)
                    except OSError as e:
                        if e.errno != errno.EINVAL or got:
                            raise
                        return _buffered_read(path, offset, length)
                    if n <= 0:
                        break
                    got += n
                    if got % align:
                        break  # a short read that is not block-sized: end of file
                skip = offset - start
                return bytes(view[skip:min(got, skip + length)])
        finally:
            buf.close()
    finally:
        os.close(fd)


def read_head(path: str | Path, length: int) -> bytes:
    """The first ``length`` bytes of ``path`` (see :func:`read_at`)."""
    return read_at(path, 0, length)


def _buffered_read(path: str | Path, offset: int, length: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        chunks, got = [], 0
        while got < length:
            chunk = f.read(length - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)


# --- the initiator -------------------------------------------------------------------------------


class KernelInitiator(Initiator):
    """:class:`Initiator` over open-iscsi (``iscsiadm``), sysfs and dm-multipath.

    ``initiator_name`` is the name this host presents to targets (the agent's configuration,
    the same one the user-space initiator uses, since targets' ACLs are keyed by it); a
    connection's own ``initiator_name`` overrides it. When it differs from open-iscsi's
    ``initiatorname.iscsi``, logins go through an interface of their own carrying it.

    Every collaborator is injectable for tests: the command ``runner`` (fed with recorded
    output), the ``sysfs_root`` and ``dev_root`` trees, the name ``resolver`` and the
    ``clock``/``sleep`` pair used while waiting for maps.
    """

    kind = "kernel"

    def __init__(self, initiator_name: str | None = None, *, runner: Runner = system_runner,
                 initiator_name_file: Path = Path("/etc/iscsi/initiatorname.iscsi"),
                 sysfs_root: Path = Path("/"),
                 dev_root: Path = Path("/dev"), poll_interval: float = 0.05,
                 resolver: Callable[[str], frozenset[str]] = resolve_addresses,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 scsi_id: str | None = None) -> None:
        self.initiator_name = initiator_name
        self._initiator_name_file = initiator_name_file
        self.runner = runner
        self.iscsiadm = Iscsiadm(runner)
        self.multipathd = Multipathd(runner)
        self.sysfs = Sysfs(sysfs_root)
        self.dev_root = dev_root
        self.poll_interval = poll_interval
        self._resolve = resolver
        self._clock = clock
        self._sleep = sleep
        self._scsi_id = scsi_id

    # time budget ------------------------------------------------------------------------------

    def _deadline(self, timeout: float) -> float:
        return self._clock() + timeout

    def _left(self, deadline: float) -> float:
        return deadline - self._clock()

    # discovery --------------------------------------------------------------------------------

    def discover(self, portal: Portal, chap: Chap | None, *,
                 timeout: float) -> list[DiscoveredTarget]:
        """SendTargets discovery through a temporary discovery record (deleted afterwards)."""
        deadline = self._deadline(timeout)
        with _translated(portal), _DISCOVERY_LOCK:
            self.iscsiadm.discoverydb_new(portal, timeout=self._left(deadline))
            try:
                if chap is not None:
                    self.iscsiadm.discoverydb_set_chap(portal, chap, timeout=self._left(deadline))
                return self.iscsiadm.discoverydb_discover(portal, timeout=self._left(deadline))
            finally:
                try:
                    self.iscsiadm.discoverydb_delete(portal, timeout=CLEANUP_TIMEOUT)
                except IscsiadmError as e:
                    log.warning("could not delete the discovery record of %s: %s", portal, e)

    # login / logout ---------------------------------------------------------------------------

    def _sessions(self, connection: Connection, iface: str) -> list[IscsiSession]:
        addresses = self._resolve(connection.portal.host)
        return [s for s in self.sysfs.iscsi_sessions()
                if s.targetname == connection.iqn and s.tpgt == connection.tpgt
                and s.persistent_port == connection.portal.port
                and normalize_address(s.persistent_address) in addresses
                and (s.ifacename is None or s.ifacename == iface)]

    def _initiator_name(self, connection: Connection) -> str | None:
        """The name to log in as; ``None`` when the default interface already carries it."""
        wanted = connection.initiator_name or self.initiator_name
        if not wanted or wanted == read_initiator_name(self._initiator_name_file):
            return None
        return wanted

    def _iface(self, connection: Connection) -> str:
        return iface_name(self._initiator_name(connection))

    def _ensure_iface(self, connection: Connection, deadline: float) -> str:
        wanted = self._initiator_name(connection)
        name = iface_name(wanted)
        if wanted is None:
            return name
        with _NODE_LOCK:
            known = {i.name for i in self.iscsiadm.iface_list(timeout=self._left(deadline))}
            if name not in known:
                self.iscsiadm.iface_new(name, timeout=self._left(deadline))
            self.iscsiadm.iface_update(name, "iface.initiatorname", wanted,
                                       timeout=self._left(deadline))
        return name

    def _node_settings(self, deadline: float) -> list[tuple[str, str]]:
        # Let iscsid itself give up within our budget (about login_timeout x retries), rather
        # than keep retrying in the background after we stopped waiting.
        login_timeout = max(1, min(15, int(self._left(deadline) / 3)))
        return [("node.startup", "manual"),
                ("node.conn[0].timeo.login_timeout", str(login_timeout)),
                ("node.session.initial_login_retry_max", "1")]

    def login(self, connection: Connection, *, timeout: float,
              wwids: Iterable[str] | None = None) -> None:
        """Log in (an existing session is fine), then wait for the LUNs' multipath maps.

        ``wwids``: the LUNs expected through this connection; without them, every disk LUN
        the session brings must get a map. Raises :class:`DevicesNotReadyError` (session left
        logged in) when the maps are not there by ``timeout``.
        """
        with _translated(connection.portal, connection.iqn):
            self._login(connection, timeout=timeout,
                        wwids=None if wwids is None else frozenset(wwids))

    def _login(self, connection: Connection, *, timeout: float,
               wwids: frozenset[str] | None) -> None:
        deadline = self._deadline(timeout)
        iface = self._ensure_iface(connection, deadline)
        portal, iqn, tpgt = connection.portal, connection.iqn, connection.tpgt
        existed = bool(self._sessions(connection, iface))
        try:
            with _NODE_LOCK:
                self.iscsiadm.node_new(portal, iqn, tpgt, iface=iface,
                                       timeout=self._left(deadline))
                for key, value in self._node_settings(deadline):
                    self.iscsiadm.node_update(portal, iqn, tpgt, key, value, iface=iface,
                                              timeout=self._left(deadline))
                self.iscsiadm.node_set_chap(portal, iqn, tpgt, connection.chap, iface=iface,
                                            timeout=self._left(deadline))
            self.iscsiadm.node_login(portal, iqn, tpgt, iface=iface,
                                     timeout=self._left(deadline))
        except IscsiadmError:
            if not existed:
                self._forget_node(connection, iface)
            raise
        sessions = self._sessions(connection, iface)
        if not sessions:
            raise SessionNotFoundError(
                f"iscsiadm logged in to {iqn} at {portal},{tpgt} (iface {iface}) but sysfs "
                "shows no such session", portal=str(portal), target=iqn)
        sid = sessions[0].sid
        self.iscsiadm.session_rescan(sid, timeout=self._left(deadline))
        self._wait_for_maps(connection, sid, wwids, deadline)

    def _forget_node(self, connection: Connection, iface: str) -> None:
        """Undo a failed login: cancel what iscsid may still be retrying, drop the record."""
        portal, iqn, tpgt = connection.portal, connection.iqn, connection.tpgt
        with _NODE_LOCK:
            for step in (self.iscsiadm.node_logout, self.iscsiadm.node_delete):
                try:
                    step(portal, iqn, tpgt, iface=iface, timeout=CLEANUP_TIMEOUT)
                except IscsiadmError as e:
                    log.warning("cleanup after failed login to %s at %s: %s", iqn, portal, e)

    def logout(self, connection: Connection, *, timeout: float) -> None:
        """Log out of the connection's session(s) and delete its node record (none: no-op)."""
        with _translated(connection.portal, connection.iqn):
            self._logout(connection, timeout=timeout)

    def _logout(self, connection: Connection, *, timeout: float) -> None:
        deadline = self._deadline(timeout)
        iface = self._iface(connection)
        portal, iqn, tpgt = connection.portal, connection.iqn, connection.tpgt
        sessions = self._sessions(connection, iface)
        served: set[str] = set()
        if sessions:
            disks = {d.block for s in sessions for d in self.sysfs.session_scsi_devices(s.sid)
                     if d.block}
            served = {m.name for m in self.sysfs.multipath_maps() if set(m.slaves) & disks}
            self.iscsiadm.node_logout(portal, iqn, tpgt, iface=iface,
                                      timeout=self._left(deadline))
            # Without a node record iscsiadm cannot match the node; go by session id.
            for session in self._sessions(connection, iface):
                self.iscsiadm.session_logout(session.sid, timeout=self._left(deadline))
        with _NODE_LOCK:
            self.iscsiadm.node_delete(portal, iqn, tpgt, iface=iface,
                                      timeout=self._left(deadline))
        self._flush_pathless(served, deadline)
        self._drop_stale_nodes(served, deadline)

    def _drop_stale_nodes(self, names: set[str], deadline: float) -> None:
        """Remove ``/dev/mapper`` nodes left by maps of ``names`` that are gone.

        udev removes a map's node when the map goes, but not always in time: seen for real in
        the storage host VM (the map gone, its node still there a minute later) — a stale
        device every later scan trips over. ``dmsetup mknodes NAME`` makes the node agree
        with the kernel: it removes it when no such map exists (and keeps it if a new login
        made the map again meanwhile).
        """
        live = {m.name for m in self.sysfs.multipath_maps()}
        for name in sorted(names - live):
            if not (self.dev_root / "mapper" / name).exists():
                continue
            argv = ["dmsetup", "mknodes", name]
            try:
                result = self.runner(argv, timeout=min(PROBE_TIMEOUT, max(self._left(deadline),
                                                                           1.0)))
            except (OSError, IscsiadmError) as e:
                log.warning("cannot remove the stale node of map %s: %s", name, e)
                continue
            if result.returncode != 0:
                log.warning("removing the stale node of map %s failed (%s): %s", name,
                            result.returncode, result.stderr.strip()[-300:])
            else:
                log.info("removed /dev/mapper/%s, left by a map that is gone", name)

    def _flush_pathless(self, names: set[str], deadline: float) -> None:
        """Remove the maps of ``names`` that the logout left without any path.

        multipathd removes a map when its last path goes, except when it does not: seen for
        real after a path failed and came back (queue_if_no_path set, ``flush_on_last_del``
        notwithstanding) — an empty map stays, a stale device every later scan trips over.
        """
        if not names:
            return
        for dm_map in self.sysfs.multipath_maps():
            if dm_map.name not in names or dm_map.slaves:
                continue
            argv = ["multipath", "-f", dm_map.name]
            try:
                result = self.runner(argv, timeout=min(PROBE_TIMEOUT, max(self._left(deadline),
                                                                           1.0)))
            except (OSError, IscsiadmError) as e:  # no multipath tool, or it timed out
                log.warning("cannot flush the empty map %s: %s", dm_map.name, e)
                continue
            if result.returncode != 0:
                log.warning("flushing the empty map %s failed (%s): %s", dm_map.name,
                            result.returncode, result.stderr.strip()[-300:])
            else:
                log.info("flushed multipath map %s left without paths", dm_map.name)

    # waiting for multipath --------------------------------------------------------------------

    def _pending(self, sid: int, wwids: frozenset[str] | None) -> list[str]:
        maps = self.sysfs.multipath_maps()
        if wwids is not None:
            return sorted(wwids - {m.wwid for m in maps})
        holders = multipath.holders_of(maps)
        pending = []
        for device in self.sysfs.session_scsi_devices(sid):
            if device.scsi_type != multipath.SCSI_TYPE_DISK:
                continue  # array controllers (tgt's LUN 0), enclosures, unknown
            if device.block is None:
                pending.append(f"{device.hbtl} (no block device yet)")
            elif device.block not in holders:
                pending.append(f"{device.block} ({device.hbtl})")
        return pending

    def _wait_for_maps(self, connection: Connection, sid: int, wwids: frozenset[str] | None,
                       deadline: float) -> None:
        interval = self.poll_interval
        while True:
            pending = self._pending(sid, wwids)
            if not pending:
                return
            left = self._left(deadline)
            if left <= 0:
                what = "LUN WWIDs not mapped" if wwids is not None else "disks without a map"
                raise DevicesNotReadyError(
                    f"session {sid}: {what} by multipath in time: {', '.join(pending)}; "
                    f"{self._multipathd_view(sid)}", pending,
                    portal=str(connection.portal), target=connection.iqn)
            self._sleep(min(interval, left))
            interval = min(interval * 2, MAX_POLL_INTERVAL)

    def _multipathd_view(self, sid: int) -> str:
        disks = {d.block for d in self.sysfs.session_scsi_devices(sid) if d.block}
        try:
            paths = self.multipathd.show_paths(timeout=DIAGNOSTIC_TIMEOUT)
        except (MultipathError, MultipathParseError) as e:
            return f"multipathd: {e}"
        seen = [f"{p.dev} uuid={p.wwid or '-'} dm_st={p.dm_state} chk_st={p.checker_state}"
                for p in paths if p.dev in disks]
        return "multipathd: " + ("; ".join(seen) if seen else "knows no path of this session")

    # devices ----------------------------------------------------------------------------------

    def _path_states(self, deadline: float) -> dict[str, str]:
        try:
            statuses = multipath.dmsetup_status(
                self.runner, timeout=min(PROBE_TIMEOUT, self._left(deadline)))
        except (MultipathError, MultipathParseError) as e:
            log.warning("no multipath path states (every path reported failed): %s", e)
            return {}
        return multipath.path_states(statuses)

    def devices(self, connections: list[Connection], *, guids: frozenset[str] | None,
                read_head: int, timeout: float) -> list[Device]:
        """Multipath maps with at least one path through ``connections``, sorted by GUID."""
        return self.scan(connections, guids=guids, read_head=read_head,
                         timeout=timeout).devices

    def scan(self, connections: list[Connection], *, guids: frozenset[str] | None,
             read_head: int, timeout: float) -> DeviceScan:
        """:meth:`devices` in one pass over sysfs, with the connections that are down.

        A dead target does not take its LUNs away here: the kernel keeps the session (state
        ``FAILED`` while it tries to reconnect) and multipath keeps the map, its paths failed.
        Such a connection (or one with no session at all) is in :attr:`DeviceScan.failures`
        and its paths carry that failure. A map with every path failed is not read (its I/O
        would queue until a path comes back): no head and no serial, so it costs nothing.
        """
        with _translated():
            return self._scan(connections, guids=guids, read_head=read_head, timeout=timeout)

    def _scan(self, connections: list[Connection], *, guids: frozenset[str] | None,
              read_head: int, timeout: float) -> DeviceScan:
        deadline = self._deadline(timeout)
        resolved = {c.portal.host: self._resolve(c.portal.host) for c in connections}
        index: dict[tuple[str, int, str, int], Connection] = {}
        for connection in connections:
            for address in resolved[connection.portal.host]:
                index.setdefault((address, connection.portal.port, connection.iqn,
                                  connection.tpgt), connection)
        if not index:
            return DeviceScan()
        failures = self._session_failures(connections, resolved)
        maps = [m for m in self.sysfs.multipath_maps() if guids is None or m.wwid in guids]
        states = self._path_states(deadline) if maps else {}
        sessions: dict[int, IscsiSession | None] = {}
        devices = []
        for dm_map in maps:
            device = self._device(dm_map, index=index, sessions=sessions, states=states,
                                  failures=failures, read_head_bytes=read_head,
                                  deadline=deadline)
            if device is not None:
                devices.append(device)
        return DeviceScan(sorted(devices, key=lambda d: d.guid), list(failures.values()))

    def _session_failures(self, connections: list[Connection],
                          resolved: dict[str, frozenset[str]]) -> dict[str, ConnectionFailure]:
        """Connection id -> why it is down: no session in sysfs, or none logged in."""
        sessions = self.sysfs.iscsi_sessions()
        failures: dict[str, ConnectionFailure] = {}
        for connection in connections:
            mine = [s for s in sessions
                    if s.targetname == connection.iqn and s.tpgt == connection.tpgt
                    and s.persistent_port == connection.portal.port
                    and normalize_address(s.persistent_address) in resolved[
                        connection.portal.host]]
            if not mine:
                failures[connection.id] = ConnectionFailure(
                    connection, ErrorKind.SESSION.value,
                    f"no iSCSI session to {connection.iqn} at {connection.portal}")
            elif not any(s.state in (None, SESSION_LOGGED_IN) for s in mine):
                states = ", ".join(f"session {s.sid} is {s.state}" for s in mine)
                failures[connection.id] = ConnectionFailure(
                    connection, ErrorKind.SESSION.value,
                    f"{states} (target {connection.iqn} at {connection.portal} unreachable)")
        return failures

    def _device(self, dm_map: DmMap, *, index: dict[tuple[str, int, str, int], Connection],
                sessions: dict[int, IscsiSession | None], states: dict[str, str],
                failures: dict[str, ConnectionFailure], read_head_bytes: int,
                deadline: float) -> Device | None:
        paths: list[PathInfo] = []
        first: multipath.BlockDisk | None = None
        known_failed = 0
        for slave in dm_map.slaves:
            disk = self.sysfs.disk(slave)
            if disk is None or disk.sid is None:
                continue  # gone meanwhile, or not iSCSI (FC, local)
            if disk.sid not in sessions:
                sessions[disk.sid] = self.sysfs.iscsi_session(disk.sid)
            session = sessions[disk.sid]
            if session is None:
                continue
            connection = index.get((normalize_address(session.persistent_address),
                                    session.persistent_port, session.targetname, session.tpgt))
            if connection is None:
                continue
            first = first or disk
            state = states.get(disk.devnum)
            known_failed += state == "failed"
            down = session.state not in (None, SESSION_LOGGED_IN)
            paths.append(PathInfo(connection=connection,
                                  lun=disk.hbtl.lun if disk.hbtl else 0,
                                  state="active" if state == "active" and not down
                                  else "failed",
                                  physdev=disk.name,
                                  failure=failures.get(connection.id) if down else None))
        if first is None:
            return None
        if first.scsi_type is not None and first.scsi_type != multipath.SCSI_TYPE_DISK:
            return None
        if known_failed == len(paths):
            log.info("%s: every path failed; not reading it (I/O would queue)", dm_map.wwid)
            serial, head = "", None
        else:
            serial, head = self._serial_and_head(dm_map, read_head_bytes, deadline)
        return Device(
            guid=dm_map.wwid,
            vendor_id=first.vendor,
            product_id=first.model,
            fwrev=first.rev,
            serial=serial,
            capacity=dm_map.capacity,
            logical_block_size=dm_map.logical_block_size,
            physical_block_size=dm_map.physical_block_size,
            discard_max_bytes=dm_map.discard_max_bytes,
            paths=paths,
            head=head,
        )

    def _serial_and_head(self, dm_map: DmMap, read_head_bytes: int,
                         deadline: float) -> tuple[str, bytes | None]:
        left = self._left(deadline)
        serial = (multipath.scsi_serial(str(self.dev_root / dm_map.dm), self.runner,
                                        timeout=min(PROBE_TIMEOUT, left), program=self._scsi_id)
                  if left > 0 else "")
        head = None
        if read_head_bytes > 0:
            path = self._map_path(dm_map)
            try:
                head = _bounded(lambda: read_head(path, read_head_bytes),
                                min(PROBE_TIMEOUT, self._left(deadline)), f"reading {path}")
            except (OSError, InitiatorError) as e:
                log.warning("cannot read the first bytes of %s: %s", path, e)
        return serial, head

    def read(self, device: Device, offset: int, length: int, *, timeout: float) -> bytes:
        """``length`` bytes of the LUN at ``offset``, read directly from its multipath map."""
        path = self.device_path(device.guid)
        if path is None:
            raise InitiatorError("not-found", f"no multipath device for {device.guid}")
        try:
            return _bounded(lambda: read_at(path, offset, length), timeout, f"reading {path}")
        except OSError as e:
            raise InitiatorError("io", f"reading {length} bytes at {offset} of {path}: {e}"
                                 ) from None

    def _map_path(self, dm_map: DmMap) -> Path:
        named = self.dev_root / "mapper" / dm_map.name
        return named if named.exists() else self.dev_root / dm_map.dm

    def device_path(self, guid: str) -> str | None:
        """``/dev/mapper/<guid>`` (or the map's friendly name for that WWID) if it exists,
        else the map's kernel node ``/dev/dm-N`` (udev has not made the link yet)."""
        direct = self.dev_root / "mapper" / guid
        if direct.exists():
            return str(direct)
        for dm_map in self.sysfs.multipath_maps():
            if dm_map.wwid == guid:
                with contextlib.suppress(OSError):
                    path = self._map_path(dm_map)
                    if path.exists():
                        return str(path)
        return None
