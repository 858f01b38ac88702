"""What happens to this host's VMs, as numbered events for the engine's long-poll
(``Host.getEvents``): a bounded log and the watcher that fills it.

**The log.** Each event has a sequence number; the first one of an agent run is the run's start
time in microseconds plus one, so numbers grow across agent restarts. The log keeps the newest
:data:`EVENT_CAPACITY` events. A reader asks for the events after the last number it has; when
that number is not of this run, or older than the oldest event kept, or newer than the newest,
the answer is a *reset* (the reader missed something and must read every VM again). A reader
with nothing new waits on a condition, holding no VM or storage lock.

**Status changes: a cheap poll, woken by libvirt's lifecycle events.** One thread asks libvirt
every :data:`POLL_PERIOD` seconds for the state of every running domain in one call
(``getAllDomainStats`` with only the state group: no QEMU monitor, no XML, one round trip for
all VMs) and compares with what it saw last: a VM that appeared, changed state, disappeared or
runs again under a new run id becomes an event. The poll is the only source of truth and the
only writer of status events, so they are never out of order, and it works whatever happens to
libvirt's event delivery (a poll after libvirtd restarts reconnects and catches up).

On top of it the watcher keeps a second libvirt connection with libvirt's default event loop
(``virEventRegisterDefaultImpl``, one process-wide thread) and a lifecycle callback
(``domainEventRegisterAny``). The callback does two things only: it records *why* a VM stopped
(libvirt's detail: destroyed, the guest or the host shut it down, QEMU failed, migrated…),
which nothing else can tell once a transient domain is gone, and it wakes the poll at once, so
a VM that dies is reported within one libvirt round trip instead of up to a poll period. Why
both: the callback alone would lose VMs when the event connection drops (libvirtd restart) and
would need its own catch-up logic anyway; the poll alone would report every stop as
"unknown". If the event connection is down the watcher reconnects every few seconds and the
poll alone keeps reporting (within :data:`POLL_PERIOD`), with reason ``unknown``. While the
event connection is up, a VM the poll misses without a recorded reason is reported after a
short grace (:data:`MISSING_GRACE`), so the reason that is on its way is not lost (libvirt
stops listing a domain and sends its event within milliseconds; a busy host can delay the
event); the grace keeps a Down within poll period + grace < 1 s even when no reason comes.

Latency is from when libvirt stops listing the domain. libvirt does so once QEMU is *gone*: a
killed QEMU stays a zombie until its parent (PID 1: QEMU is daemonised) reaps it, and libvirt
waits for that. With systemd as PID 1 that is immediate; an init that reaps lazily delays
libvirt, and so these events, by as long.

**Device events.** The same connection carries libvirt's device-removed and
device-removal-failed events, handed to the hot-unplugs waiting for them
(:mod:`virtyard.host.virt.device_events`; no XML re-parsing loop), and qemu-guest-agent's
connected event, which asks the new agent for the guest's disk names at once.

**Device changes.** Every device change (hot-plug, unplug, a new guest disk name, a CD change)
writes our metadata with a new generation through :meth:`VmManager.write_metadata`, which tells
the watcher the VM's new ``hash``. The event is emitted only once the VM's lock is free again,
i.e. after the operation that wrote it finished (a hot-plug writes the metadata *before* it
attaches the disk, and rolls it back if libvirt refuses): a reader that reacts to the event by
reading the VM (``Host.getVMFullList``) sees the finished change, and a rolled-back change
emits nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import libvirt

from virtyard.host.virt.vms import VmManager, change_hash, status_of

log = logging.getLogger("virtyard.host.virt.events")

EVENT_CAPACITY = 4096
POLL_PERIOD = 0.2
MISSING_GRACE = 0.5  # wait this long for libvirt's reason when the poll misses a VM first
PENDING_RETRY = 0.02  # a device change waits for the VM's lock: look again this soon
RECONNECT_PERIOD = 2.0
REASON_TTL = 30.0  # a stop reason no poll claimed (a VM that lived between two polls)

Kind = Literal["status", "devices"]

# Why a VM went down (the ``reason`` of a "Down" status event).
REASON_DESTROYED = "destroyed"  # virDomainDestroy: VM.destroy, virsh destroy
REASON_SHUTDOWN_GUEST = "shutdown-guest"  # the guest powered off (VM.shutdown, from inside)
REASON_SHUTDOWN_HOST = "shutdown-host"  # QEMU was told to quit by a signal on the host
REASON_FAILED = "failed"  # QEMU ended without a shutdown: killed, crashed, failed to start
REASON_CRASHED = "crashed"  # the guest crashed (panic device) and the VM was stopped
REASON_MIGRATED = "migrated"  # it runs on another host now
REASON_SAVED = "saved"
REASON_FROM_SNAPSHOT = "from-snapshot"
REASON_UNKNOWN = "unknown"  # gone without a reason from libvirt (no event connection)

_STOP_REASONS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: REASON_DESTROYED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: REASON_CRASHED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: REASON_MIGRATED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: REASON_SAVED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: REASON_FAILED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: REASON_FROM_SNAPSHOT,
}


def stop_reason(detail: int, shutdown_detail: int | None) -> str:
    """Our reason for libvirt's STOPPED ``detail`` (and the SHUTDOWN detail before it)."""
    if detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN:
        if shutdown_detail == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_HOST:
            return REASON_SHUTDOWN_HOST
        return REASON_SHUTDOWN_GUEST
    return _STOP_REASONS.get(detail, REASON_UNKNOWN)


def sequence_base(started_at: float) -> int:
    """The sequence number before an agent run's first event: its start time in µs."""
    return int(started_at * 1_000_000)


# -- the log ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class VmEvent:
    """One thing that happened to a VM."""

    seq: int
    vm_id: str
    kind: Kind
    status: str  # as Host.getAllVmStats reports it: Up, Paused, Powering down, Down…
    hash: str  # as Host.getAllVmStats reports it (a Down VM: its last)
    reason: str = ""  # a Down VM: why (REASON_*); otherwise empty


@dataclass(frozen=True)
class EventBatch:
    """An answer to a reader: the newest sequence number, whether to start over, the events."""

    seq: int
    reset: bool
    events: list[VmEvent]


class EventLog:
    """The newest ``capacity`` events of one agent run, numbered from ``base + 1``."""

    def __init__(self, base: int, capacity: int = EVENT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.base = base
        self._events: deque[VmEvent] = deque(maxlen=capacity)
        self._newest = base
        self._cond = threading.Condition()
        self._closed = False
        self._listeners: list[Callable[[], None]] = []

    @property
    def newest(self) -> int:
        with self._cond:
            return self._newest

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every append (from the appending thread; keep it short)."""
        self._listeners.append(listener)

    def append(self, vm_id: str, kind: Kind, status: str, hash: str,
               reason: str = "") -> VmEvent:
        with self._cond:
            self._newest += 1
            event = VmEvent(self._newest, vm_id, kind, status, hash, reason)
            self._events.append(event)
            self._cond.notify_all()
        log.info("event %d: VM %s %s %s %s %s", event.seq, vm_id, kind, status, hash, reason)
        for listener in self._listeners:
            listener()
        return event

    def read(self, since: int, timeout: float = 0.0) -> EventBatch:
        """Every event after ``since`` at once; if there is none, wait up to ``timeout``
        seconds for the next. A reset (and no events) when ``since`` is not a number this log
        can continue from."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                batch = self._answer(since)
                if batch is not None:
                    return batch
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return EventBatch(self._newest, False, [])
                self._cond.wait(remaining)

    def read_now(self, since: int) -> EventBatch | None:
        """The answer if there is one now (events or a reset), else ``None``: never waits."""
        with self._cond:
            return self._answer(since)

    def close(self) -> None:
        """Wake every waiting reader (it answers what it has)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _answer(self, since: int) -> EventBatch | None:
        newest = self._newest
        first = self._events[0].seq if self._events else newest + 1
        if since < self.base or since > newest or since < first - 1:
            return EventBatch(newest, True, [])
        if since < newest:
            return EventBatch(newest, False,
                              list(itertools.islice(self._events, since - first + 1, None)))
        return None


# -- the watcher --------------------------------------------------------------------------------

@dataclass
class _Seen:
    run_id: int
    status: str
    hash: str


_event_loop_lock = threading.Lock()
_event_loop_running = False


def ensure_libvirt_event_loop() -> None:
    """libvirt's default event loop, once per process, run by one daemon thread. Connections
    opened after this deliver domain events (and keepalives) through it."""
    global _event_loop_running  # noqa: PLW0603 (process-wide, like libvirt's own)
    with _event_loop_lock:
        if _event_loop_running:
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_libvirt_event_loop, name="libvirt-events",
                         daemon=True).start()
        _event_loop_running = True


def _run_libvirt_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # one bad iteration must not end event delivery for good
            log.exception("libvirt event loop iteration failed")
            time.sleep(0.1)


RELEASE_LOCK_WAIT = 0.5  # seconds the poll waits for a busy VM's lock


class VmWatcher:
    """Follows this host's running domains and device changes into an :class:`EventLog`."""

    def __init__(self, vms: VmManager, events: EventLog, *, period: float = POLL_PERIOD,
                 libvirt_events: bool = True, grace: float = MISSING_GRACE) -> None:
        self.vms = vms
        self.events = events
        self.period = period
        self.grace = grace
        self.libvirt_events = libvirt_events
        self._seen: dict[str, _Seen] = {}  # the poll thread's own (no lock)
        self._missing: dict[str, float] = {}  # VM id -> when the poll first missed it
        self._lock = threading.Lock()  # guards what other threads hand in:
        self._pending: dict[str, str] = {}  # VM id -> hash written, not yet reported
        self._reasons: dict[str, tuple[str, float]] = {}  # VM id -> (stop reason, when)
        self._shutdown_detail: dict[str, int] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline = False
        self._poll_failing = False
        self._conn: libvirt.virConnect | None = None
        self._callback_ids: list[int] = []
        self._events_live = False
        self._next_connect = 0.0
        self._connect_failing = False

    # -- what other threads call ------------------------------------------------------------

    def metadata_written(self, vm_id: str, hash: str) -> None:
        """A device change wrote the VM's metadata (the VM's lock is held): report it once
        the lock is free again."""
        with self._lock:
            self._pending[vm_id] = hash
        self._wake.set()

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int,
                      _opaque: Any) -> None:
        """libvirt's event thread: remember why a VM stopped; wake the poll either way."""
        try:
            vm_id = dom.UUIDString()
            with self._lock:
                if event == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN:
                    self._shutdown_detail[vm_id] = detail
                elif event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
                    reason = stop_reason(detail, self._shutdown_detail.pop(vm_id, None))
                    self._reasons[vm_id] = (reason, time.monotonic())
        except Exception:  # never raise into libvirt's event loop
            log.exception("lifecycle event %s/%s not understood", event, detail)
        self._wake.set()

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        log.warning("libvirt event connection closed (reason %s); polling only until it is "
                    "back", reason)
        self._events_live = False
        self.vms.removals.live = False
        self._wake.set()

    def _on_device_removed(self, _conn: Any, dom: Any, alias: str, _opaque: Any) -> None:
        """libvirt's event thread: a device left a VM (a hot-unplug waits for this)."""
        try:
            vm_id = dom.UUIDString()
            log.info("VM %s: libvirt removed device %s", vm_id, alias)
            self.vms.removals.removed(vm_id, alias)
        except Exception:  # never raise into libvirt's event loop
            log.exception("device-removed event for %s not understood", alias)

    def _on_device_removal_failed(self, _conn: Any, dom: Any, alias: str,
                                  _opaque: Any) -> None:
        try:
            self.vms.removals.removal_failed(dom.UUIDString(), alias)
        except Exception:
            log.exception("device-removal-failed event for %s not understood", alias)

    def _on_guest_agent(self, _conn: Any, dom: Any, state: int, _reason: int,
                        _opaque: Any) -> None:
        """qemu-guest-agent connected in a guest: ask it for the guest's disk names now
        rather than at its next period."""
        try:
            if state == libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED:
                self.vms.devices_changed(dom.UUIDString())
        except Exception:
            log.exception("guest agent event not understood")

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Take the baseline (what runs now is no event) and follow from there."""
        if self._thread is not None:
            return
        if self.libvirt_events:
            self._connect_events()
        try:
            self.step()
        except Exception as exc:  # libvirt unreachable now: the thread takes the baseline later
            log.warning("VM watcher: first poll failed (%s); retrying", exc)
            self._poll_failing = True
        self._thread = threading.Thread(target=self._run, name="vm-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._disconnect_events()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.step()
                if self._poll_failing:
                    log.info("VM watcher: libvirt answers again")
                self._poll_failing = False
            except Exception as exc:  # libvirtd away: say so once, keep trying
                if not self._poll_failing:
                    log.warning("VM watcher: poll failed (%s); retrying", exc)
                self._poll_failing = True
            if self.libvirt_events and not self._events_live:
                self._connect_events()
            with self._lock:
                busy = bool(self._pending)
            self._wake.wait(PENDING_RETRY if busy or self._missing else self.period)

    # -- one round --------------------------------------------------------------------------

    def step(self) -> None:
        """One poll of every domain's state, then the device changes whose VM is free."""
        self._poll()
        self._flush_pending()

    def _poll(self) -> None:
        asked = time.monotonic()
        records = self.vms.libvirt.call(lambda c: c.getAllDomainStats(
            libvirt.VIR_DOMAIN_STATS_STATE, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE))
        now = time.monotonic()
        running: dict[str, tuple[Any, int, str]] = {}
        for dom, record in records:
            running[dom.UUIDString()] = (dom, dom.ID(),
                                         status_of(record.get("state.state", -1)))
        emit = self._baseline
        for vm_id, seen in list(self._seen.items()):
            now_running = running.get(vm_id)
            if now_running is not None and now_running[1] == seen.run_id:
                self._missing.pop(vm_id, None)
                if now_running[2] != seen.status:
                    seen.status = now_running[2]
                    self.events.append(vm_id, "status", seen.status, seen.hash)
                continue
            reason = self._take_reason(vm_id)
            if reason is None and now_running is None and self._events_live and emit:
                first = self._missing.setdefault(vm_id, now)
                if now - first < self.grace:
                    continue  # libvirt's reason may be on its way
            self._missing.pop(vm_id, None)
            del self._seen[vm_id]
            if emit:
                self._release_if_gone(vm_id)
                self.events.append(vm_id, "status", "Down", seen.hash, reason or REASON_UNKNOWN)
        for vm_id, (dom, run_id, status) in running.items():
            if vm_id in self._seen:
                continue
            try:
                hash = change_hash(run_id, self.vms.read_metadata(dom))
            except libvirt.libvirtError:
                continue  # gone between the two calls: never seen, never reported
            self._seen[vm_id] = _Seen(run_id, status, hash)
            with self._lock:  # a reason from before this run started is not this run's
                found = self._reasons.get(vm_id)
                if found is not None and found[1] < asked:
                    del self._reasons[vm_id]
            if emit:
                self.events.append(vm_id, "status", status, hash)
        self._baseline = True
        with self._lock:  # reasons of VMs no poll saw (they lived between two polls)
            for vm_id, (_reason, when) in list(self._reasons.items()):
                if now - when > REASON_TTL:
                    del self._reasons[vm_id]

    def _release_if_gone(self, vm_id: str) -> None:
        """A VM that stopped by itself (guest shutdown, QEMU crash, a destroy behind the
        agent's back) lets go of what it held — its CD's volume above all — now, not at the
        next agent start (oVirt's BZ1868643 leak), and before the engine hears it is down.
        Under the VM's lock and only while no new run of it exists; a VM someone is working
        on right now (a destroy, a create) is theirs to release."""
        try:
            with self.vms.locks.hold([vm_id], timeout=RELEASE_LOCK_WAIT):
                if self.vms.libvirt.lookup(vm_id) is None:
                    self.vms.release(vm_id)
        except TimeoutError:
            log.info("VM %s went down while another call held it: left to that call", vm_id)
        except Exception:  # the event still goes out; the next agent start cleans up
            log.exception("VM %s went down; releasing what it held failed", vm_id)

    def _take_reason(self, vm_id: str) -> str | None:
        with self._lock:
            found = self._reasons.pop(vm_id, None)
        return found[0] if found else None

    def _flush_pending(self) -> None:
        with self._lock:
            waiting = list(self._pending)
        for vm_id in waiting:
            try:
                with self.vms.locks.hold([vm_id], timeout=0):
                    with self._lock:
                        hash = self._pending.pop(vm_id, None)
                    seen = self._seen.get(vm_id)
                    if hash is None or seen is None or hash == seen.hash:
                        continue  # not running (the poll reports it) or nothing new
                    seen.hash = hash
                    self.events.append(vm_id, "devices", seen.status, hash)
            except TimeoutError:
                continue  # the operation is still under way: after it ends

    # -- libvirt's lifecycle events ---------------------------------------------------------

    def _connect_events(self) -> None:
        now = time.monotonic()
        if now < self._next_connect:
            return
        self._next_connect = now + RECONNECT_PERIOD
        self._disconnect_events()
        try:
            ensure_libvirt_event_loop()
            conn = libvirt.open(self.vms.libvirt.uri)
        except libvirt.libvirtError as exc:
            if not self._connect_failing:  # say it once per outage, not every few seconds
                log.warning("libvirt event connection to %s failed: %s; retrying",
                            self.vms.libvirt.uri, exc)
            self._connect_failing = True
            return
        try:
            with contextlib.suppress(libvirt.libvirtError):  # not every driver keeps alive
                conn.setKeepAlive(5, 3)
            for event_id, callback in (
                    (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
                    (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device_removed),
                    (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
                     self._on_device_removal_failed),
                    (libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, self._on_guest_agent)):
                self._callback_ids.append(
                    conn.domainEventRegisterAny(None, event_id, callback, None))
            conn.registerCloseCallback(self._on_close, None)
        except libvirt.libvirtError as exc:
            log.warning("libvirt domain events unavailable: %s", exc)
            self._conn = conn
            self._disconnect_events()
            return
        self._conn = conn
        self._events_live = True
        self._connect_failing = False
        self.vms.removals.live = True
        self._wake.set()  # catch up on whatever happened without events
        log.info("following libvirt domain events on %s", self.vms.libvirt.uri)

    def _disconnect_events(self) -> None:
        conn, self._conn = self._conn, None
        self._events_live = False
        self.vms.removals.live = False
        if conn is None:
            return
        for callback_id in self._callback_ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        self._callback_ids = []
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


class VmEvents:
    """The event log of one agent and the watcher that fills it."""

    def __init__(self, vms: VmManager, *, started_at: float, capacity: int = EVENT_CAPACITY,
                 period: float = POLL_PERIOD, libvirt_events: bool = True) -> None:
        self.log = EventLog(sequence_base(started_at), capacity)
        self.watcher = VmWatcher(vms, self.log, period=period, libvirt_events=libvirt_events)
        self._started = False
        self._start_lock = threading.Lock()
        vms.metadata_written = self.watcher.metadata_written

    def start(self) -> None:
        with self._start_lock:
            if not self._started:
                self.watcher.start()
                self._started = True

    def stop(self) -> None:
        self.watcher.stop()
        self.log.close()
