"""After an engine crash: settle every flow that was in progress, then make hosts agree.

A flow row left in the database means the engine died between its two transactions. For each
one the hosts are asked what really happened — does the VM run, and where; does the disk sit
in the VM — and the database takes the hosts' answer: a run that created the VM completes, one
that did not is undone; a stop completes (destroying again is harmless); a migration ends where
the VM runs once the source's agent says no migration of it runs (any more, or at all: the
engine may have died before or after asking for it, the agent may have restarted since); a plug
or unplug takes the state the VM's device list shows. A host that cannot be asked leaves its
flow for the next round, never a guess. Each settled flow sets its VM's connection pins from
the settled state in the same transaction and reconciles the hosts whose pins changed at once,
so a flow that waits for a host holds up no other VM. Once none is left, every VM's pins are
recomputed (the safety net) and every Up host is reconciled, so no connection stays that
nothing needs and none is missing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio.to_thread
from sqlalchemy import delete, select

from virtyard.engine import audit, recovery_storage
from virtyard.engine.commands.flow import flow_data
from virtyard.engine.commands.run_vm import ACTIVE
from virtyard.engine.commands.stop_vm import mark_down
from virtyard.engine.commands.storage_domains import pin_domains
from virtyard.engine.db.models import Flow, Host, HostConnectionPin, VmDevice, VmDynamic, utcnow
from virtyard.engine.hosts import connections as conns
from virtyard.engine.hosts import vm_spec
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostUnreachableError

log = logging.getLogger("virtyard.engine.recovery")

NO_SUCH_VM = 1
NO_MIGRATION = 12  # the agent's migrateErr from VM.migrateStatus: no migration of it is known
RETRY = 3.0


class UnsureError(Exception):
    """A host that must answer did not: leave the flow for the next round."""


class Recovery:
    """See the module docstring; ``run()`` loops until no flow is left."""

    def __init__(self, services: Any) -> None:
        self.services = services
        self.db = services.db
        self.pool = services.pool

    async def run(self) -> None:
        while True:
            try:
                left = await self.round()
            except Exception:
                log.exception("recovery round failed")
                left = 1
            if not left:
                await self.reconcile_all()
                return
            await asyncio.sleep(RETRY)

    async def round(self) -> int:
        """Settle what can be settled; the number of flows still open."""
        flows = await anyio.to_thread.run_sync(self._flows)
        left = 0
        for flow in flows:
            try:
                touched = await self.settle(flow)
            except UnsureError as exc:
                log.info("flow %s (%s of VM %s) waits: %s", flow.id, flow.kind, flow.vm_id, exc)
                left += 1
                continue
            await self._reconcile(touched)
        return left

    def _flows(self) -> list[Flow]:
        with self.db.read() as tx:
            return list(tx.scalars(select(Flow).order_by(Flow.started_at)))

    def _hosts(self, ids: list[str]) -> dict[str, HostAddress]:
        with self.db.read() as tx:
            return {h.id: HostAddress(h.id, h.address, h.port)
                    for h in tx.scalars(select(Host).where(Host.id.in_(ids)))}

    async def _runs_on(self, host: HostAddress, vm_id: str) -> bool:
        try:
            stats = await self.pool.call(host, "VM.getStats", {"vmID": vm_id}, timeout=10)
        except HostCallError as exc:
            if exc.code == NO_SUCH_VM:
                return False
            raise UnsureError(f"{host.address}: {exc}") from exc
        except HostUnreachableError as exc:
            raise UnsureError(f"{host.address}: {exc}") from exc
        status = str(stats[0].get("status", "")).lower() if stats else "down"
        return status not in ("down", "")

    async def settle(self, flow: Flow) -> list[str]:
        """Settle one flow from what the hosts say; the hosts whose pins changed."""
        data = flow_data(flow)
        vm_id = flow.vm_id or ""
        if flow.kind == "run_vm":
            hosts = self._hosts(list(data.get("candidates", [])))
            running = [h for h in hosts.values() if await self._runs_on(h, vm_id)]
            return await anyio.to_thread.run_sync(self._settle_run, flow, running)
        if flow.kind == "stop_vm":
            host = self._hosts([flow.host_id or ""]).get(flow.host_id or "")
            if host is not None and await self._runs_on(host, vm_id):
                try:
                    await self.pool.call(host, "VM.destroy", {"vmID": vm_id})
                except HostCallError as exc:
                    if exc.code != NO_SUCH_VM:
                        raise UnsureError(str(exc)) from exc
                except HostUnreachableError as exc:
                    raise UnsureError(str(exc)) from exc
            return await anyio.to_thread.run_sync(self._settle_stop, flow)
        if flow.kind == "migrate_vm":
            return await self._settle_migration(flow)
        if flow.kind == "plug_disk":
            return await self._settle_plug(flow, bool(data.get("plug", True)))
        settle_storage = recovery_storage.SETTLERS.get(flow.kind)
        if settle_storage is not None:
            try:
                return await settle_storage(self, flow)
            except recovery_storage.HostUnsureError as exc:
                raise UnsureError(str(exc)) from exc
        log.warning("flow %s of unknown kind %s dropped", flow.id, flow.kind)
        await anyio.to_thread.run_sync(self._drop, flow)
        return []

    def _drop(self, flow: Flow) -> None:
        with self.db.transaction() as tx:
            tx.execute(delete(Flow).where(Flow.id == flow.id))

    def _event(self, tx: Any, flow: Flow, text: str) -> None:
        audit.record(tx, audit.FLOW_RECOVERED, audit.Ids(vm_id=flow.vm_id),
                     correlation_id=flow.correlation_id, flow=flow.kind, outcome=text)

    def _pin(self, tx: Any, vm_id: str) -> list[str]:
        """The VM's pins from its settled state — what its plugged disks need, on the host it
        runs on, nothing elsewhere (as ``finish``/``undo`` leave them); the hosts whose pins
        changed. Safe while the flow's row still locks the VM."""
        owner = conns.vm_owner(vm_id)
        before = {(row.host_id, row.connection_id) for row in tx.execute(
            select(HostConnectionPin.host_id, HostConnectionPin.connection_id)
            .where(HostConnectionPin.owner == owner))}
        dynamic = tx.get(VmDynamic, vm_id)
        host_id = dynamic.run_on_host_id if dynamic is not None \
            and dynamic.status in ACTIVE else None
        conns.drop_owner(tx, owner, except_host=host_id)
        after: set[tuple[str, str]] = set()
        if host_id:
            wanted = conns.lun_connection_ids(tx, conns.vm_lun_ids(tx, vm_id))
            conns.set_pins(tx, host_id, owner, wanted)
            after = {(host_id, c) for c in wanted}
        return sorted({h for h, _c in before ^ after})

    async def _reconcile(self, host_ids: list[str]) -> None:
        if not host_ids:
            return
        hosts = await anyio.to_thread.run_sync(self._hosts, host_ids)
        await asyncio.gather(*(self.services.connections.reconcile_quietly(h)
                               for h in hosts.values()))

    def _settle_run(self, flow: Flow, running: list[HostAddress]) -> list[str]:
        vm_id = flow.vm_id or ""
        with self.db.transaction() as tx:
            dynamic = tx.get(VmDynamic, vm_id)
            if running and dynamic is not None:
                host = running[0]
                dynamic.status = "up"
                dynamic.run_on_host_id = host.host_id
                dynamic.exit_reason = ""
                dynamic.status_changed_at = utcnow()
                self._event(tx, flow, f"the VM runs on {host.address}: run completed")
            else:
                mark_down(tx, vm_id, "the engine stopped while starting it")
                self._event(tx, flow, "the VM did not start: run undone")
            touched = self._pin(tx, vm_id)
            tx.execute(delete(Flow).where(Flow.id == flow.id))
        return touched

    def _settle_stop(self, flow: Flow) -> list[str]:
        with self.db.transaction() as tx:
            mark_down(tx, flow.vm_id or "", "stopped")
            self._event(tx, flow, "the VM is down: stop completed")
            touched = self._pin(tx, flow.vm_id or "")
            tx.execute(delete(Flow).where(Flow.id == flow.id))
        return touched

    async def _settle_migration(self, flow: Flow) -> list[str]:
        vm_id = flow.vm_id or ""
        hosts = self._hosts([flow.host_id or "", flow.target_host_id or ""])
        source = hosts.get(flow.host_id or "")
        target = hosts.get(flow.target_host_id or "")
        if source is None or target is None:
            raise UnsureError("a host of the migration is gone")
        # Whatever the step: the engine may have died between VM.migrate and recording it.
        try:
            state = await self.pool.call(source, "VM.migrateStatus", {"vmID": vm_id})
        except HostCallError as exc:
            if exc.code != NO_MIGRATION:  # else: never started, or the agent restarted
                raise UnsureError(str(exc)) from exc
            state = {}
        except HostUnreachableError as exc:
            raise UnsureError(str(exc)) from exc
        if str(state.get("status", "")) in ("starting", "running"):
            raise UnsureError("the migration still runs")
        on_target = await self._runs_on(target, vm_id)
        on_source = await self._runs_on(source, vm_id)
        return await anyio.to_thread.run_sync(self._end_migration, flow, source, target,
                                              on_source, on_target)

    def _end_migration(self, flow: Flow, source: HostAddress, target: HostAddress,
                       on_source: bool, on_target: bool) -> list[str]:
        vm_id = flow.vm_id or ""
        with self.db.transaction() as tx:
            dynamic = tx.get(VmDynamic, vm_id)
            if dynamic is not None:
                dynamic.migrating_to_host_id = None
                dynamic.devices_hash = ""
                dynamic.status_changed_at = utcnow()
                if on_target and not on_source:
                    dynamic.status, dynamic.run_on_host_id = "up", target.host_id
                    self._event(tx, flow, f"the VM runs on {target.address}: migration done")
                elif on_source:
                    dynamic.status, dynamic.run_on_host_id = "up", source.host_id
                    self._event(tx, flow, f"the VM runs on {source.address}: migration undone")
                else:
                    mark_down(tx, vm_id, "down after an interrupted migration")
                    self._event(tx, flow, "the VM runs nowhere: marked down")
            touched = self._pin(tx, vm_id)
            tx.execute(delete(Flow).where(Flow.id == flow.id))
        return touched

    async def _settle_plug(self, flow: Flow, plug: bool) -> list[str]:
        vm_id = flow.vm_id or ""
        host = self._hosts([flow.host_id or ""]).get(flow.host_id or "")
        present = False
        if host is not None:
            try:
                vms = await self.pool.call(host, "Host.getVMFullList", {"vmList": [vm_id]})
            except (HostCallError, HostUnreachableError) as exc:
                raise UnsureError(str(exc)) from exc
            for vm in vms if isinstance(vms, list) else []:
                for dev in vm.get("devices", []) if isinstance(vm, dict) else []:
                    if isinstance(dev, dict) and dev.get("diskId") == flow.disk_id:
                        present = True
        return await anyio.to_thread.run_sync(self._end_plug, flow, plug,
                                              present if host is not None else None)

    def _end_plug(self, flow: Flow, plug: bool, present: bool | None) -> list[str]:
        """``present``: whether the guest has the disk (``None``: no host was called)."""
        vm_id = flow.vm_id or ""
        with self.db.transaction() as tx:
            device = tx.get(VmDevice, (flow.disk_id or "", vm_id))
            if device is not None and present is not None:
                device.is_plugged = present
                if not present:
                    device.logical_name = ""
            plugged = device is not None and device.is_plugged
            self._event(tx, flow, "the disk is " + ("plugged" if plugged else "unplugged")
                        + (" (done)" if plugged == plug else " (undone)"))
            touched = self._pin(tx, vm_id)
            tx.execute(delete(Flow).where(Flow.id == flow.id))
        return touched

    def repin(self) -> list[str]:
        """Every VM's pins from the settled state; the hosts whose pins changed."""
        touched: set[str] = set()
        with self.db.transaction() as tx:
            if tx.scalar(select(Flow.id).limit(1)) is not None:
                return []  # a flow started meanwhile owns its pins
            running = {d.vm_id: d for d in tx.scalars(
                select(VmDynamic).where(VmDynamic.status.in_(ACTIVE)))}
            pins = list(tx.scalars(select(HostConnectionPin)
                                   .where(HostConnectionPin.owner.like("vm:%"))))
            by_owner: dict[str, set[tuple[str, str]]] = {}
            for pin in pins:
                by_owner.setdefault(pin.owner, set()).add((pin.host_id, pin.connection_id))
            for vm_id, dynamic in running.items():
                owner = conns.vm_owner(vm_id)
                hosts = {h for h in (dynamic.run_on_host_id, dynamic.migrating_to_host_id) if h}
                wanted = conns.lun_connection_ids(tx, [d.lun.lun_id for d in
                                                       vm_spec.vm_disks(tx, vm_id)])
                want = {(h, c) for h in hosts for c in wanted}
                have = by_owner.pop(owner, set())
                if want != have:
                    touched |= {h for h, _c in want ^ have}
                    for host_id in {h for h, _c in want | have}:
                        conns.set_pins(tx, host_id, owner, {c for h, c in want if h == host_id})
            for owner, stale in by_owner.items():  # VMs that run nowhere
                touched |= {h for h, _c in stale}
                conns.drop_owner(tx, owner)
            touched |= set(pin_domains(tx))
        return sorted(touched)

    async def reconcile_all(self) -> None:
        await anyio.to_thread.run_sync(self.repin)
        with self.db.read() as tx:
            hosts = [HostAddress(h.id, h.address, h.port) for h in tx.scalars(
                select(Host).where(Host.status == "up"))]
        await asyncio.gather(*(self.services.connections.reconcile_quietly(h) for h in hosts))
