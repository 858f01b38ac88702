"""Restarts owed to HA VMs: taken in, tried in priority order, retried with back-off.

A restart is owed (an ``ha_restarts`` row) when an HA VM went down for a crash — the host's
stop reason is one of ``[ha] crash_reasons``: QEMU killed or failed, a guest panic; never a
user's stop (``stopped by …``) or a guest shutdown (``shutdown-guest``) — or when its host was
proven off (``fencer.confirm_off`` writes the row in the same transaction). The row is written
before anything is tried, so an engine that dies loses no restart; the try itself is a normal
:class:`RunVm` flow (its journal row is the VM's lock, ``recovery.py`` settles it after a crash),
so a second copy cannot start: a VM that is not ``down`` is never run again.

Each try prefers the host the VM crashed on (if it still proves it sees every LUN), then the
others RunVm would pick. A VM that is busy (another flow, recovery) is not a failed try.
Failures back off (``backoff_initial`` doubling up to ``backoff_max``); after ``max_attempts``
the row turns ``failed`` with an error event. A row whose VM is running again, or is no longer
HA, goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import anyio.to_thread
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import ENGINE, Context, run
from virtyard.engine.commands.errors import CommandError
from virtyard.engine.commands.run_vm import RunVm, candidates
from virtyard.engine.config import HaConfig
from virtyard.engine.db.models import Event, Flow, HaRestart, Host, Vm, VmDynamic, utcnow

log = logging.getLogger("virtyard.engine.ha")

BUSY = (errors.VM_IS_LOCKED.key, errors.VM_IS_RUNNING.key)
# Monitoring's reason for a VM a complete poll no longer finds (the host's own may follow).
NO_REASON = "it no longer runs on its host"
HINT_TTL = 120.0
HINT_SKEW = 1.0  # a pushed reason may arrive a moment before the poll's "down" is written


@dataclass
class Due:
    vm_id: str
    name: str
    host_id: str | None
    attempts: int


def backoff(config: HaConfig, attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed try."""
    return float(min(config.backoff_max, config.backoff_initial * 2 ** max(0, attempts - 1)))


def take_in(tx: Session, config: HaConfig,
            hints: dict[str, tuple[str, datetime.datetime]] | None = None) -> list[str]:
    """Owe a restart to every HA VM that is down for a crash and owed none yet; the names.

    ``hints``: reasons hosts reported (vm id → reason, when) that may not be in the database
    yet: a VM a poll found gone is down with :data:`NO_REASON`; the host's own reason, pushed a
    moment later, is written here — only one of this stop (not older than the VM's going down,
    give or take :data:`HINT_SKEW`: a user's earlier stop says "destroyed"). Without one, such
    a VM counts as crashed after ``reason_grace``."""
    hints = hints or {}
    owed = select(HaRestart.vm_id)
    rows = tx.execute(select(Vm.id, Vm.name, VmDynamic)
                      .join(VmDynamic, VmDynamic.vm_id == Vm.id)
                      .where(Vm.ha_enabled, VmDynamic.status == "down",
                             VmDynamic.exit_reason.in_([*config.crash_reasons, NO_REASON]),
                             Vm.id.not_in(owed))).all()
    settled = utcnow() - datetime.timedelta(seconds=config.reason_grace)
    names = []
    for vm_id, name, dynamic in rows:
        if dynamic.exit_reason == NO_REASON:
            reason, said_at = hints.get(vm_id, ("", None))
            hint = reason if said_at is not None and said_at >= (
                dynamic.status_changed_at - datetime.timedelta(seconds=HINT_SKEW)) else ""
            if hint:
                dynamic.exit_reason = hint[:1000]
                if hint not in config.crash_reasons:
                    continue
            elif dynamic.status_changed_at > settled:
                continue  # the host's reason may still come
        host_id = tx.scalar(select(Event.host_id).where(Event.vm_id == vm_id,
                                                        Event.code == audit.VM_DOWN.code)
                            .order_by(Event.id.desc()).limit(1))
        tx.add(HaRestart(vm_id=vm_id, reason=dynamic.exit_reason, host_id=host_id))
        audit.record(tx, audit.HA_VM_FAILED, audit.Ids(vm_id=vm_id, host_id=host_id),
                     vm=name, reason=dynamic.exit_reason)
        names.append(name)
    return names


def settle(tx: Session) -> int:
    """Drop rows whose VM runs again (no flow holds it) or is no longer HA; how many."""
    rows = tx.execute(select(HaRestart.vm_id, VmDynamic.status, Vm.ha_enabled)
                      .join(Vm, Vm.id == HaRestart.vm_id)
                      .join(VmDynamic, VmDynamic.vm_id == Vm.id, isouter=True)).all()
    in_flow = set(tx.scalars(select(Flow.vm_id).where(Flow.vm_id.in_([r[0] for r in rows]))))
    gone = [vm_id for vm_id, status, ha in rows
            if not ha or (status not in (None, "down", "unknown") and vm_id not in in_flow)]
    if gone:
        tx.execute(delete(HaRestart).where(HaRestart.vm_id.in_(gone)))
    return len(gone)


def due(tx: Session, now: datetime.datetime) -> list[Due]:
    """Pending restarts whose time has come, highest priority first."""
    return [Due(vm_id, name, host_id, attempts) for vm_id, name, host_id, attempts in tx.execute(
        select(HaRestart.vm_id, Vm.name, HaRestart.host_id, HaRestart.attempts)
        .join(Vm, Vm.id == HaRestart.vm_id).join(VmDynamic, VmDynamic.vm_id == Vm.id)
        .where(HaRestart.state == "pending", HaRestart.next_try_at <= now,
               VmDynamic.status == "down")
        .order_by(Vm.ha_priority.desc(), HaRestart.created_at, Vm.name))]


class Restarter:
    """The HA loop: ``run()`` forever, ``wake()`` (from monitoring, fencing) for a pass now."""

    def __init__(self, services: object, config: HaConfig, *,
                 runner: Callable[[RunVm, Context], object] = run) -> None:
        self.services = services
        self.db = services.db  # type: ignore[attr-defined]
        self.config = config
        self.runner = runner
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hints: dict[str, tuple[str, datetime.datetime]] = {}
        self._hints_lock = threading.Lock()

    def wake(self, downs: list[tuple[str, str]] | None = None) -> None:
        """Look now (safe from any thread); ``downs``: VMs reported down, with the host's
        reason where it gave one."""
        now = utcnow()
        with self._hints_lock:
            for vm_id, reason in downs or []:
                if reason:
                    self._hints[vm_id] = (reason, now)
            old = now - datetime.timedelta(seconds=HINT_TTL)
            for vm_id in [v for v, (_r, at) in self._hints.items() if at < old]:
                del self._hints[vm_id]
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def hints(self) -> dict[str, tuple[str, datetime.datetime]]:
        with self._hints_lock:
            return dict(self._hints)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            try:
                await anyio.to_thread.run_sync(self.pass_once)
            except Exception:
                log.exception("HA pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.interval)

    def pass_once(self) -> list[str]:
        """Take in, settle, then try every due restart in priority order; the VMs restarted."""
        with self.db.transaction() as tx:
            settle(tx)
            take_in(tx, self.config, self.hints())
        with self.db.read() as tx:
            todo = due(tx, utcnow())
        return [item.name for item in todo if self.attempt(item)]

    def attempt(self, item: Due) -> bool:
        ctx = Context(self.db, ENGINE, self.services)
        attempt = item.attempts + 1
        with self.db.transaction() as tx:
            vm = tx.get(Vm, item.vm_id)
            if vm is None:
                return False
            hosts = [c.host_id for c in candidates(tx, vm)]
            if item.host_id in hosts:  # its own host first, if it still proves it
                hosts.remove(item.host_id)
                hosts.insert(0, item.host_id)
            audit.record(tx, audit.HA_VM_RESTART_TRY, audit.Ids(vm_id=item.vm_id), vm=item.name,
                         attempt=attempt, max=self.config.max_attempts)
        try:
            if not hosts:
                raise CommandError(errors.NO_HOST_TO_RUN, "run", "VM", name=item.name)
            self.runner(RunVm(item.vm_id, prefer=hosts), ctx)
        except CommandError as exc:
            if exc.key in BUSY:
                log.info("HA VM %s is busy (%s): later", item.name, exc.key)
                return False
            self._failed(item, attempt, exc.message)
            return False
        except Exception as exc:  # a host call gone wrong: a failed try, never a crash
            log.exception("HA restart of %s failed", item.name)
            self._failed(item, attempt, str(exc)[:300])
            return False
        with self.db.transaction() as tx:
            dynamic = tx.get(VmDynamic, item.vm_id)
            host = dynamic.run_on_host_id if dynamic is not None else None
            host_row = tx.get(Host, host) if host else None
            tx.execute(delete(HaRestart).where(HaRestart.vm_id == item.vm_id))
            audit.record(tx, audit.HA_VM_RESTARTED, audit.Ids(vm_id=item.vm_id, host_id=host),
                         vm=item.name, host=host_row.name if host_row else "?")
        return True

    def _failed(self, item: Due, attempt: int, why: str) -> None:
        with self.db.transaction() as tx:
            row = tx.get(HaRestart, item.vm_id)
            if row is None:
                return
            row.attempts = attempt
            if attempt >= self.config.max_attempts:
                row.state = "failed"
                audit.record(tx, audit.HA_VM_RESTART_FAILED, audit.Ids(vm_id=item.vm_id),
                             vm=item.name, attempt=attempt, why=why[:500])
                return
            delay = backoff(self.config, attempt)
            row.next_try_at = utcnow() + datetime.timedelta(seconds=delay)
            audit.record(tx, audit.HA_VM_RESTART_RETRY, audit.Ids(vm_id=item.vm_id),
                         vm=item.name, attempt=attempt, why=why[:300], delay=delay)


__all__ = ["Restarter", "backoff", "due", "settle", "take_in"]
