"""Host failure: a VM on a lost host is restarted elsewhere only once that host is known off.

A host that stops answering is ``non_responsive`` and its VMs ``unknown`` (heartbeat): they may
well still run and write their LUNs (a network partition looks exactly like a dead host), so
nothing is restarted on that alone. Certainty comes two ways:

- **power management**: after ``[ha] fence_after`` seconds of seeing the host non-responsive
  (counted from this engine run's own observation, so a freshly started engine does not fence
  on an old status), the engine powers it off through its fence agents and waits until an
  agent *reports* it off (``fencing.power``); then :func:`confirm_off`; then it may power the
  host back on;
- **manual confirmation** (``POST hosts/{id}/fence`` ``fence_type=manual``) for hosts without
  power management: an administrator says the host is off. Before that, nothing restarts (an
  alert event says so once per engine run).

:func:`confirm_off` is one transaction: the host becomes ``down``, its VMs ``down`` (the
database now says no copy runs), and each HA VM is owed a restart (``restart.py``). A ``down``
host that answers again is kept out of service (heartbeat ``before_up``) until
:func:`clear_stale` has destroyed every engine VM it still runs — copies that now run
elsewhere or nowhere — so a stale copy never touches its LUNs beside the real one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio.to_thread
from sqlalchemy import select
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands.run_vm import ACTIVE
from virtyard.engine.commands.stop_vm import mark_down
from virtyard.engine.config import HaConfig
from virtyard.engine.db.models import FenceAgent, HaRestart, Host, Vm, VmDynamic, utcnow
from virtyard.engine.fencing.agent import AgentSpec, parse_options
from virtyard.engine.fencing.power import PowerResult, power
from virtyard.engine.hosts import connections as conns
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostUnreachableError

log = logging.getLogger("virtyard.engine.ha")

NO_SUCH_VM = 1
FENCE_RETRY = 30.0  # after a failed automatic fence, try again this much later


def agent_specs(tx: Session, host_id: str) -> list[AgentSpec]:
    """The host's fence agents, in order, as drivers take them."""
    out = []
    for agent in tx.scalars(select(FenceAgent).where(FenceAgent.host_id == host_id)
                            .order_by(FenceAgent.position, FenceAgent.id)):
        try:
            options = parse_options(agent.options)
        except ValueError:
            options = {}
        out.append(AgentSpec(agent.type, agent.address, agent.port, agent.user_name,
                             agent.password, options))
    return out


def confirm_off(tx: Session, host: Host, how: str) -> list[str]:
    """The host is known to be off: it goes ``down``, its VMs ``down``, HA VMs owed a restart.
    Returns the names of the VMs that were on it."""
    host.status = "down"
    host.status_detail = how[:1000]
    names = []
    rows = tx.execute(select(VmDynamic, Vm).join(Vm, Vm.id == VmDynamic.vm_id)
                      .where(VmDynamic.run_on_host_id == host.id,
                             VmDynamic.status.in_(ACTIVE))).all()
    for dynamic, vm in rows:
        reason = f"its host {host.name} is off ({how})"
        mark_down(tx, dynamic.vm_id, reason)
        conns.drop_owner(tx, conns.vm_owner(dynamic.vm_id))
        names.append(vm.name)
        if vm.ha_enabled and tx.get(HaRestart, vm.id) is None:
            tx.add(HaRestart(vm_id=vm.id, reason=reason[:1000], host_id=None))
            audit.record(tx, audit.HA_VM_FAILED, audit.Ids(vm_id=vm.id, host_id=host.id),
                         vm=vm.name, reason=reason)
    for dynamic in tx.scalars(select(VmDynamic).where(VmDynamic.migrating_to_host_id == host.id)):
        dynamic.migrating_to_host_id = None
    audit.record(tx, audit.HOST_FENCED_OFF, audit.Ids(host_id=host.id), host=host.name, how=how,
                 vms=", ".join(sorted(names)) or "none")
    return names


@dataclass
class _Watch:
    since: float
    next_try: float = 0.0
    told: bool = False
    busy: bool = False


class Fencer:
    """Watches non-responsive hosts; fences those with power management (see the module)."""

    def __init__(self, services: object, config: HaConfig, *,
                 on_off: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.services = services
        self.db = services.db  # type: ignore[attr-defined]
        self.pool = services.pool  # type: ignore[attr-defined]
        self.config = config
        self.on_off = on_off
        self.clock = clock
        self._watch: dict[str, _Watch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("fencing check failed")
            await asyncio.sleep(min(1.0, self.config.interval))

    def _lost_hosts(self) -> list[tuple[str, str, bool, list[str]]]:
        with self.db.read() as tx:
            hosts = tx.execute(select(Host.id, Host.name, Host.pm_enabled)
                               .where(Host.status == "non_responsive")).all()
            out = []
            for host_id, name, pm in hosts:
                vms = list(tx.scalars(select(Vm.name).join(VmDynamic, VmDynamic.vm_id == Vm.id)
                                      .where(VmDynamic.run_on_host_id == host_id,
                                             VmDynamic.status.in_(ACTIVE))))
                out.append((host_id, name, bool(pm) and bool(agent_specs(tx, host_id)), vms))
            return out

    async def check(self) -> None:
        """One look at the non-responsive hosts: fence those whose time has come."""
        lost = await anyio.to_thread.run_sync(self._lost_hosts)
        now = self.clock()
        for gone in set(self._watch) - {h[0] for h in lost}:
            if not self._watch[gone].busy:
                del self._watch[gone]
        for host_id, name, has_pm, vms in lost:
            watch = self._watch.setdefault(host_id, _Watch(since=now))
            if watch.busy:
                continue
            if not has_pm:
                if vms and not watch.told:
                    watch.told = True
                    await anyio.to_thread.run_sync(self._tell_manual, host_id, name, vms)
                continue
            if now - watch.since < self.config.fence_after or now < watch.next_try:
                continue
            watch.busy = True
            task = asyncio.create_task(self._fence(host_id, name, watch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _tell_manual(self, host_id: str, name: str, vms: list[str]) -> None:
        with self.db.transaction() as tx:
            audit.record(tx, audit.HOST_NEEDS_MANUAL_FENCE, audit.Ids(host_id=host_id),
                         host=name, vms=", ".join(sorted(vms)))

    async def _fence(self, host_id: str, name: str, watch: _Watch) -> None:
        try:
            result = await anyio.to_thread.run_sync(self._fence_off, host_id, name)
            if not result.ok:
                watch.next_try = self.clock() + FENCE_RETRY
                return
            self.on_off()
            if self.config.power_on_after_fence:
                await anyio.to_thread.run_sync(self.power_action, host_id, "on", "")
        finally:
            watch.busy = False

    def _fence_off(self, host_id: str, name: str) -> PowerResult:
        with self.db.transaction() as tx:
            specs = agent_specs(tx, host_id)
            audit.record(tx, audit.HOST_FENCING, audit.Ids(host_id=host_id), host=name,
                         agents=", ".join(f"{s.type} at {s.address}" for s in specs))
        result = self.power(specs, "off")
        with self.db.transaction() as tx:
            host = tx.get(Host, host_id)
            if host is None:
                return result
            if not result.ok:
                audit.record(tx, audit.HOST_FENCE_FAILED, audit.Ids(host_id=host_id),
                             host=name, action="off", why=result.detail)
                return result
            confirm_off(tx, host, f"powered off by its fence agent {result.agent}")
        return result

    def power(self, specs: list[AgentSpec], action: str) -> PowerResult:
        return power(specs, action, dirs=list(self.config.fence_agent_dirs),
                     timeout=self.config.fence_timeout, poll=self.config.fence_poll)

    def power_action(self, host_id: str, action: str, user: str) -> PowerResult:
        """A power action on a host (API ``fence`` stop/start/restart/status, or after a fence):
        ``stop`` and ``restart`` confirm the host off once an agent shows it off."""
        with self.db.read() as tx:
            host = tx.get(Host, host_id)
            name = host.name if host is not None else "?"
            specs = agent_specs(tx, host_id)
        off_first = action in ("off", "restart")
        result = self.power(specs, "off" if off_first else action)
        if off_first and result.ok:
            with self.db.transaction() as tx:
                row = tx.get(Host, host_id)
                if row is not None:
                    confirm_off(tx, row, f"powered off by {user or 'the engine'} through "
                                         f"{result.agent}")
            self.on_off()
            if action == "restart":
                result = self.power(specs, "on")
        if action != "status":
            with self.db.transaction() as tx:
                if result.ok:
                    audit.record(tx, audit.HOST_POWER, audit.Ids(host_id=host_id), host=name,
                                 action=action, state=result.state, user_name=user)
                else:
                    audit.record(tx, audit.HOST_FENCE_FAILED, audit.Ids(host_id=host_id),
                                 host=name, action=action, why=result.detail)
        return result


async def clear_stale(services: object, host: HostAddress) -> bool:
    """Before a ``down`` (fenced or confirmed-off) host returns: destroy every engine VM it
    still runs (none of them is the real copy any more). True once none is left."""
    db = services.db  # type: ignore[attr-defined]
    pool = services.pool  # type: ignore[attr-defined]
    try:
        stats = await pool.call(host, "Host.getAllVmStats", timeout=30)
    except (HostCallError, HostUnreachableError) as exc:
        log.info("host %s is back but cannot list its VMs yet: %s", host.address, exc)
        return False
    running = [str(s.get("vmId", "")).lower() for s in stats if isinstance(s, dict)] \
        if isinstance(stats, list) else []

    def known() -> dict[str, tuple[str, str]]:
        with db.read() as tx:
            out = {}
            for vm, dynamic in tx.execute(select(Vm, VmDynamic)
                                          .join(VmDynamic, VmDynamic.vm_id == Vm.id,
                                                isouter=True).where(Vm.id.in_(running))):
                on = dynamic.run_on_host_id if dynamic is not None else None
                if on == host.host_id:
                    continue  # the database's copy: not stale
                where = "runs on another host" if on and on != host.host_id else "is down"
                out[vm.id] = (vm.name, where)
            return out

    stale = await anyio.to_thread.run_sync(known)
    ok = True
    for vm_id, (name, where) in stale.items():
        try:
            await pool.call(host, "VM.destroy", {"vmID": vm_id}, timeout=60)
        except HostCallError as exc:
            if exc.code != NO_SUCH_VM:
                ok = False
                log.warning("host %s: could not destroy stale VM %s: %s", host.address, name,
                            exc)
                continue
        except HostUnreachableError:
            return False

        def record(vm_id: str = vm_id, name: str = name, where: str = where) -> None:
            with db.transaction() as tx:
                row = tx.get(Host, host.host_id)
                audit.record(tx, audit.HOST_STALE_VM_DESTROYED,
                             audit.Ids(host_id=host.host_id, vm_id=vm_id),
                             host=row.name if row else host.address, vm=name, where=where)
        await anyio.to_thread.run_sync(record)
    return ok


__all__ = ["Fencer", "agent_specs", "clear_stale", "confirm_off", "utcnow"]
