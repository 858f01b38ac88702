"""The host heartbeat: every few seconds a cheap ``Host.ping`` to every host, concurrently.

It moves hosts between ``up`` and ``non_responsive`` (after ``misses`` failed pings in a row,
so one lost packet does not flap a host), reads a host's capabilities at first contact and
after every agent restart, notices agent restarts (``agentStartedAt``), and writes one event per
transition. Hosts in maintenance are pinged too (their details stay current) but keep their
status. A ``down`` host (fenced, or confirmed off by an administrator) or one activated from
maintenance returns to ``up`` only once every ``before_up`` hook agreed (HA destroys its stale
VM copies first); while silent a ``down`` host stays ``down``. Database writes happen only on
a change, in one transaction per cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from virtyard.engine import audit
from virtyard.engine.db.database import Database
from virtyard.engine.db.models import Host, utcnow
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostPool, HostUnreachableError
from virtyard.engine.monitoring.sync import mark_unknown

log = logging.getLogger("virtyard.engine.heartbeat")

# Statuses the heartbeat may change; any other belongs to a user's action.
MONITORED = ("installing", "connecting", "up", "non_responsive", "down")
# Statuses a host leaves for up only once every before_up hook agreed: fenced or confirmed off
# (down), or activated from maintenance (connecting), where it may have been down before.
GATED = ("down", "connecting")


@dataclass
class _Seen:
    misses: int = 0
    started_at: float = 0.0
    last_ok: float = 0.0


@dataclass
class Outcome:
    """What one ping (and maybe a capabilities read) found about one host."""

    host_id: str
    ok: bool
    detail: str = ""
    capabilities: dict[str, Any] | None = None
    restarted: bool = False
    cleared: bool = False  # a down host: every before_up hook agreed


@dataclass
class HeartbeatStats:
    cycles: int = 0
    last_cycle_seconds: float = 0.0
    pings: int = 0
    failures: int = 0
    transitions: int = 0
    recent: list[float] = field(default_factory=list)


class Heartbeat:
    """See the module docstring. ``run()`` is the loop; ``kick()`` asks for a cycle now."""

    def __init__(self, db: Database, pool: HostPool, *, interval: float = 3.0,
                 misses: int = 2, timeout: float = 5.0, concurrency: int = 64) -> None:
        self.db = db
        self.pool = pool
        self.interval = interval
        self.misses = misses
        self.timeout = timeout
        self._limit = asyncio.Semaphore(concurrency)
        self._seen: dict[str, _Seen] = {}
        self._wake = asyncio.Event()
        self.stats = HeartbeatStats()
        # Called for every host that came up (first contact, recovery, agent restart): the
        # connection reconciler makes it keep what it should.
        self.on_up: list[Callable[[HostAddress], Awaitable[object]]] = []
        # Asked before a down host may come back up (all must answer True).
        self.before_up: list[Callable[[HostAddress], Awaitable[bool]]] = []

    def kick(self) -> None:
        """Run a cycle at once (a host was added or activated). Safe from any thread."""
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            started = time.monotonic()
            try:
                await self.cycle()
            except Exception:
                log.exception("heartbeat cycle failed")
            self.stats.last_cycle_seconds = time.monotonic() - started
            self.stats.cycles += 1
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)

    async def cycle(self) -> list[Outcome]:
        hosts = await anyio.to_thread.run_sync(self._load)
        known = {h.host_id for h, _status in hosts}
        for gone in self.pool.known() - known:  # removed hosts: close their connections
            await self.pool.forget(gone)
        outcomes = await asyncio.gather(*(self._check(h, status) for h, status in hosts))
        changed = await anyio.to_thread.run_sync(self._store, outcomes)
        self.stats.transitions += changed
        came_up = [h for h, status in hosts
                   if any(o.host_id == h.host_id and o.ok and o.capabilities is not None
                          and (status not in GATED or o.cleared) for o in outcomes)]
        for host in came_up:
            for hook in self.on_up:
                await hook(host)
        return list(outcomes)

    def _load(self) -> list[tuple[HostAddress, str]]:
        with self.db.read() as tx:
            rows = tx.execute(select(Host.id, Host.address, Host.port, Host.status)).all()
        known = {row.id for row in rows}
        for host_id in list(self._seen):
            if host_id not in known:
                del self._seen[host_id]
        return [(HostAddress(row.id, row.address, row.port), row.status) for row in rows]

    async def _check(self, host: HostAddress, status: str) -> Outcome:
        seen = self._seen.setdefault(host.host_id, _Seen())
        async with self._limit:
            self.stats.pings += 1
            try:
                pong = await self.pool.call(host, "Host.ping", timeout=self.timeout)
                started_at = float(pong.get("agentStartedAt", 0.0))
                restarted = bool(seen.started_at) and started_at != seen.started_at
                capabilities = None
                if status != "up" or restarted or not seen.started_at:
                    capabilities = await self.pool.call(host, "Host.getCapabilities",
                                                        timeout=self.timeout * 4)
                    if not isinstance(capabilities, dict):
                        raise HostUnreachableError("capabilities are not an object")
            except (HostUnreachableError, HostCallError, ValueError, TypeError,
                    AttributeError) as exc:
                self.stats.failures += 1
                seen.misses += 1
                return Outcome(host.host_id, False, detail=str(exc)[:900])
        seen.misses = 0
        seen.started_at = started_at
        seen.last_ok = time.time()
        cleared = False
        if status in GATED:
            try:
                cleared = all([await hook(host) for hook in self.before_up])
            except Exception:
                log.exception("host %s: a before_up hook failed", host.address)
        return Outcome(host.host_id, True, capabilities=capabilities, restarted=restarted,
                       detail=f"agent {host.address}:{host.port}", cleared=cleared)

    def _store(self, outcomes: list[Outcome]) -> int:
        """Apply the transitions the outcomes call for; the number of hosts changed."""
        interesting = [o for o in outcomes if not o.ok or o.capabilities is not None
                       or o.restarted]
        if not interesting:
            return 0
        changed = 0
        with self.db.transaction() as tx:
            hosts = {h.id: h for h in tx.scalars(
                select(Host).where(Host.id.in_([o.host_id for o in interesting]))
                .order_by(Host.id).with_for_update())}
            for outcome in interesting:
                host = hosts.get(outcome.host_id)
                if host is None:
                    continue
                changed += self._apply(tx, host, outcome)
        return changed

    def _apply(self, tx: Any, host: Host, outcome: Outcome) -> int:
        ids = audit.Ids(host_id=host.id)
        if not outcome.ok:
            seen = self._seen.get(host.id, _Seen())
            if host.status in MONITORED and host.status not in ("non_responsive", "down") \
                    and seen.misses >= self.misses:
                host.status = "non_responsive"
                host.status_detail = outcome.detail
                audit.record(tx, audit.HOST_NOT_RESPONDING, ids, host=host.name,
                             detail=outcome.detail)
                mark_unknown(tx, host.id)
                return 1
            return 0
        if host.status in GATED and not outcome.cleared:
            return 0  # stays out of service until its stale VMs are gone
        if outcome.restarted:
            audit.record(tx, audit.HOST_AGENT_RESTARTED, ids, host=host.name)
        if outcome.capabilities is not None and \
                not self._take_capabilities(tx, host, outcome.capabilities):
            return 1
        host.last_seen = utcnow()
        if host.status in MONITORED and host.status != "up":
            host.status = "up"
            host.status_detail = ""
            audit.record(tx, audit.HOST_UP, ids, host=host.name, detail=outcome.detail)
            return 1
        return 0

    def _take_capabilities(self, tx: Any, host: Host, caps: dict[str, Any]) -> bool:
        """Store what the agent says of itself; False if its UUID belongs to another host."""
        host_uuid = str(caps.get("hostUUID") or "")[:64] or None
        if host_uuid and host_uuid != host.host_uuid:
            other = tx.scalars(select(Host).where(Host.host_uuid == host_uuid,
                                                  Host.id != host.id)).first()
            if other is not None:
                if host.status != "non_responsive":
                    host.status = "non_responsive"
                    host.status_detail = f"same hardware UUID as host {other.name}"
                    audit.record(tx, audit.HOST_UUID_CONFLICT, audit.Ids(host_id=host.id),
                                 host=host.name, other=other.name)
                return False
        host.host_uuid = host_uuid
        host.iscsi_initiator_name = str(caps.get("iscsiInitiatorName", ""))[:255]
        host.cpu_cores = _int(caps.get("cpuCores"))
        host.cpu_model = str(caps.get("cpuModel", ""))[:255]
        host.memory_bytes = _int(caps.get("memoryMiB")) << 20
        host.libvirt_version = str(caps.get("libvirtVersion", ""))[:64]
        host.agent_version = str(caps.get("agentVersion", ""))[:64]
        return True

    def last_ok(self, host_id: str) -> datetime.datetime | None:
        seen = self._seen.get(host_id)
        if seen is None or not seen.last_ok:
            return None
        return datetime.datetime.fromtimestamp(seen.last_ok, datetime.UTC)


def _int(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


__all__ = ["Heartbeat", "IntegrityError", "Outcome"]
