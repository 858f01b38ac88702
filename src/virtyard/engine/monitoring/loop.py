"""The engine's VM monitoring: one loop for all hosts, plus a push channel per host.

**Poll** (the safety net, every ``poll_interval``, all Up hosts concurrently with bounded
concurrency, on the pool's persistent connections): ``Host.getAllVmStats`` gives each VM's
status and device hash; only VMs whose hash differs from the one last stored get
``Host.getVMFullList``; the changes go to the database in one transaction per host
(``sync.py``). With nothing changing, a cycle reads no device list and writes nothing.

**Push** (for latency): per host one long-poll, ``Host.getEvents(since, timeout)``, over the
same mutual-TLS JSON-RPC channel. The agent answers as soon as a VM's status or device hash
changes; the engine applies that VM's change at once (a device change: one full list of that
VM). A long-poll, rather than the agent calling the engine, needs no listener or certificate on
the engine's side, passes any firewall the heartbeat passes, and gives natural back-pressure;
sequence numbers make a lost answer harmless (``reset`` → a full poll), and the poll catches
anything a push missed.

``naive=True`` is the behaviour the design page's hash exists to avoid (every VM's full list on
every cycle); it is kept for the benchmark that measures the difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from sqlalchemy import select

from virtyard.engine.db.models import Host, VmDynamic, utcnow
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostUnreachableError
from virtyard.engine.monitoring import sync

log = logging.getLogger("virtyard.engine.monitoring")

METHOD_NOT_FOUND = -32601
# A pushed event describes the moment it happened, a little before it arrives.
EVENT_AGE = datetime.timedelta(milliseconds=200)
# Worker threads the loop's database reads may hold at once (the REST API shares the pool).
DB_READERS = 4


@dataclass
class MonitorStats:
    cycles: int = 0
    last_cycle_seconds: float = 0.0
    stats_calls: int = 0
    full_list_calls: int = 0
    full_list_vms: int = 0
    pushes: int = 0
    changed_vms: int = 0
    changed_devices: int = 0
    went_down: int = 0
    dropped: int = 0


class Monitor:
    """See the module docstring. ``run()`` is the loop; ``poke()`` asks for a cycle now."""

    def __init__(self, services: Any, *, poll_interval: float = 15.0, push: bool = True,
                 long_poll: float = 25.0, concurrency: int = 64, naive: bool = False,
                 report_interval: float = 300.0) -> None:
        self.services = services
        self.db = services.db
        self.pool = services.pool
        self.poll_interval = poll_interval
        self.push = push
        self.long_poll = long_poll
        self.naive = naive
        self._limit = asyncio.Semaphore(concurrency)
        self._hashes: dict[str, str] = {}  # vm id → device hash last stored
        self._push_tasks: dict[str, asyncio.Task[None]] = {}
        self._host_locks: dict[str, asyncio.Lock] = {}
        self._wake = asyncio.Event()
        self._external: set[str] = set()
        self.stats = MonitorStats()
        self.report_interval = report_interval
        self._writer = asyncio.Lock()  # one monitoring write transaction at a time (_sync)
        self._readers = asyncio.Semaphore(DB_READERS)
        self._reported = MonitorStats()
        self._reported_at = time.monotonic()
        self._walls: list[float] = []
        # Told which VMs went down or were reported down with the host's reason (vm id,
        # reason or ""): HA looks at once, and learns a reason a poll could not give.
        self.on_down: list[Callable[[list[tuple[str, str]]], object]] = []

    def poke(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._hashes = await anyio.to_thread.run_sync(self._stored_hashes)
        try:
            while True:
                started = time.monotonic()
                try:
                    await self.cycle()
                except Exception:
                    log.exception("monitoring cycle failed")
                self.stats.last_cycle_seconds = time.monotonic() - started
                self.stats.cycles += 1
                self._report()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
        finally:
            for task in self._push_tasks.values():
                task.cancel()

    def _report(self) -> None:
        """Every ``report_interval`` seconds (0: never), one line of what the loop did since the
        last one: operators size the engine with it, and the benchmark reads it."""
        self._walls.append(self.stats.last_cycle_seconds)
        now = time.monotonic()
        if self.report_interval <= 0 or now - self._reported_at < self.report_interval:
            return
        counts = {f.name: getattr(self.stats, f.name) - getattr(self._reported, f.name)
                  for f in dataclasses.fields(MonitorStats) if f.name != "last_cycle_seconds"}
        walls = self._walls
        log.info("monitoring report: seconds=%.1f wall_mean=%.3f wall_max=%.3f %s",
                 now - self._reported_at, sum(walls) / len(walls), max(walls),
                 " ".join(f"{k}={v}" for k, v in counts.items()))
        self._reported = dataclasses.replace(self.stats)
        self._reported_at = now
        self._walls = []

    def _stored_hashes(self) -> dict[str, str]:
        with self.db.read() as tx:
            return {vm_id: h for vm_id, h in tx.execute(
                select(VmDynamic.vm_id, VmDynamic.devices_hash)
                .where(VmDynamic.devices_hash != ""))}

    def _up_hosts(self) -> list[HostAddress]:
        with self.db.read() as tx:
            return [HostAddress(h.id, h.address, h.port) for h in tx.scalars(
                select(Host).where(Host.status == "up"))]

    async def cycle(self) -> None:
        hosts = await anyio.to_thread.run_sync(self._up_hosts)
        self._supervise_pushes(hosts)
        await asyncio.gather(*(self._poll_quietly(h) for h in hosts))

    def _supervise_pushes(self, hosts: list[HostAddress]) -> None:
        if not self.push:
            return
        wanted = {h.host_id: h for h in hosts}
        for host_id in list(self._push_tasks):
            task = self._push_tasks[host_id]
            if host_id not in wanted or task.done():
                task.cancel()
                del self._push_tasks[host_id]
        for host_id, host in wanted.items():
            if host_id not in self._push_tasks:
                self._push_tasks[host_id] = asyncio.create_task(self._follow(host),
                                                                name=f"push-{host.address}")

    async def _poll_quietly(self, host: HostAddress) -> None:
        async with self._limit:
            try:
                await self.poll(host)
            except (HostCallError, HostUnreachableError) as exc:
                log.debug("host %s: not polled: %s", host.address, exc)

    async def poll(self, host: HostAddress, only: Iterable[str] | None = None) -> None:
        """One host: stats, full lists of the changed VMs, the database."""
        lock = self._host_locks.setdefault(host.host_id, asyncio.Lock())
        async with lock:
            self.stats.stats_calls += 1
            asked_at = utcnow()
            raw = await self.pool.call(host, "Host.getAllVmStats")
            reports, dropped = sync.parse_stats(raw)
            wanted = set(only) if only is not None else None
            changed = [r.vm_id for r in reports if r.status != "down" and (
                self.naive or self._hashes.get(r.vm_id) != r.hash
                or (wanted is not None and r.vm_id in wanted))]
            await self._store(host, reports, changed, complete=True, dropped=dropped,
                              asked_at=asked_at)

    async def _store(self, host: HostAddress, reports: list[sync.VmReport],
                     changed: list[str], *, complete: bool, dropped: int = 0,
                     asked_at: datetime.datetime | None = None) -> None:
        devices: list[sync.DeviceReport] = []
        if changed:
            self.stats.full_list_calls += 1
            self.stats.full_list_vms += len(changed)
            full = await self.pool.call(host, "Host.getVMFullList", {"vmList": changed})
            devices, more = sync.parse_full_list(full)
            dropped += more
        if dropped:
            self.stats.dropped += dropped
            log.warning("host %s: dropped %d malformed entries of its report", host.address,
                        dropped)
        result = await self._sync(host.host_id, reports, devices, complete, asked_at)
        applied = set(result.devices_applied)
        for report in devices:
            if report.vm_id in applied:
                self._hashes[report.vm_id] = report.hash
            else:  # skipped (in a flow, or older than the engine's change): read it again
                self._hashes.pop(report.vm_id, None)
        for vm_id, _name in result.went_down:
            self._hashes.pop(vm_id, None)
        new_external = set(result.external) - self._external
        if new_external:
            self._external |= new_external
            log.info("host %s runs %d VM(s) the engine does not manage (left alone): %s",
                     host.address, len(new_external), ", ".join(sorted(new_external)[:5]))
        self.stats.changed_vms += result.changed_vms
        self.stats.changed_devices += result.changed_devices
        self.stats.went_down += len(result.went_down)
        downs = [(r.vm_id, r.reason) for r in reports if r.status == "down" and r.reason]
        downs += [(vm_id, "") for vm_id, _name in result.went_down]
        if downs:
            for hook in self.on_down:
                hook(downs)
        if result.went_down:
            await self.services.connections.reconcile_quietly(host)

    async def _sync(self, host_id: str, reports: list[sync.VmReport],
                    devices: list[sync.DeviceReport], complete: bool,
                    asked_at: datetime.datetime | None) -> sync.SyncResult:
        """The database, in worker threads: a read first (most reports change nothing), a
        write only when needed, one at a time. SQLite runs writes one at a time anyway, and
        dozens of threads waiting for its lock in its busy handler (it sleeps up to 100 ms
        between tries) made pushes wait seconds behind the poll's writes."""
        async with self._readers:
            quiet = await anyio.to_thread.run_sync(self._unchanged, host_id, reports, devices,
                                                   complete, asked_at)
        if quiet is not None:
            return quiet
        async with self._writer:
            return await anyio.to_thread.run_sync(self._apply, host_id, reports, devices,
                                                  complete, asked_at)

    def _unchanged(self, host_id: str, reports: list[sync.VmReport],
                   devices: list[sync.DeviceReport], complete: bool,
                   asked_at: datetime.datetime | None) -> sync.SyncResult | None:
        with self.db.read() as tx:
            return sync.unchanged(tx, host_id, reports, devices, complete=complete,
                                  asked_at=asked_at)

    def _apply(self, host_id: str, reports: list[sync.VmReport],
               devices: list[sync.DeviceReport], complete: bool,
               asked_at: datetime.datetime | None) -> sync.SyncResult:
        with self.db.transaction() as tx:
            return sync.apply(tx, host_id, reports, devices, complete=complete,
                              asked_at=asked_at)

    async def _follow(self, host: HostAddress) -> None:
        """The push channel of one host: long-poll its events, apply them at once."""
        since = 0
        while True:
            try:
                answer = await self.pool.call(
                    host, "Host.getEvents", {"since": since, "timeout": self.long_poll},
                    timeout=self.long_poll + 15)
            except HostCallError as exc:
                if exc.code == METHOD_NOT_FOUND:
                    log.info("host %s has no push channel: polling only", host.address)
                    return
                await asyncio.sleep(2.0)
                continue
            except HostUnreachableError:
                await asyncio.sleep(2.0)
                continue
            if not isinstance(answer, dict):
                await asyncio.sleep(2.0)
                continue
            self.stats.pushes += 1
            seq = answer.get("seq")
            raw_events = answer.get("events")
            events: list[Any] = raw_events if isinstance(raw_events, list) else []
            if answer.get("reset") or since == 0:
                since = seq if isinstance(seq, int) else 0
                await self._poll_quietly(host)
                continue
            since = seq if isinstance(seq, int) else since
            try:
                await self._apply_events(host, events, utcnow() - EVENT_AGE)
            except (HostCallError, HostUnreachableError) as exc:
                log.debug("host %s: push not applied (the poll will): %s", host.address, exc)

    async def _apply_events(self, host: HostAddress, events: list[Any],
                            asked_at: datetime.datetime) -> None:
        latest: dict[str, dict[str, Any]] = {}
        for event in events:
            if isinstance(event, dict) and isinstance(event.get("vmId"), str):
                latest[event["vmId"].lower()] = event
        if not latest:
            return
        reports, dropped = sync.parse_stats(list(latest.values()))
        changed = [r.vm_id for r in reports
                   if r.status != "down" and self._hashes.get(r.vm_id) != r.hash]
        lock = self._host_locks.setdefault(host.host_id, asyncio.Lock())
        async with lock:
            await self._store(host, reports, changed, complete=False, dropped=dropped,
                              asked_at=asked_at)
