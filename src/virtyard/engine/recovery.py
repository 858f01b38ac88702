"""After an engine crash: settle every flow that was in progress, then make hosts agree.

A flow row left in the database means the engine died between its two transactions. For each
one the hosts are asked what really happened — does the VM run, and where; does the disk sit
in the VM — and the database takes the hosts' answer: a run that created the VM completes, one
that did not is undone; a stop completes (destroying again is harmless); a migration ends where
the VM runs once the source's agent says it has finished; a plug or unplug takes the state the
VM's device list shows. A host that cannot be asked leaves its flow for the next round, never a
guess. Then every VM's connection pins are recomputed from the settled state and every Up
host is reconciled, so no connection stays that nothing needs and none is missing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio.to_thread
from sqlalchemy import delete, select

from virtyard.engine import audit
from virtyard.engine.commands.flow import flow_data
from virtyard.engine.commands.run_vm import ACTIVE
from virtyard.engine.commands.stop_vm import mark_down
from virtyard.engine.db.models import Flow, Host, HostConnectionPin, VmDevice, VmDynamic, utcnow
from virtyard.engine.hosts import connections as conns
from virtyard.engine.hosts import vm_spec
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostUnreachableError

log = logging.getLogger("virtyard.engine.recovery")

NO_SUCH_VM = 1
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
                await self.settle(flow)
            except UnsureError as exc:
                log.info("flow %s (%s of VM %s) waits: %s", flow.id, flow.kind, flow.vm_id, exc)
                left += 1
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

    async def settle(self, flow: Flow) -> None:
        data = flow_data(flow)
        vm_id = flow.vm_id or ""
        if flow.kind == "run_vm":
            hosts = self._hosts(list(data.get("candidates", [])))
            running = [h for h in hosts.values() if await self._runs_on(h, vm_id)]
            await anyio.to_thread.run_sync(self._settle_run, flow, running)
        elif flow.kind == "stop_vm":
            host = self._hosts([flow.host_id or ""]).get(flow.host_id or "")
            if host is not None and await self._runs_on(host, vm_id):
                try:
                    await self.pool.call(host, "VM.destroy", {"vmID": vm_id})
                except HostCallError as exc:
                    if exc.code != NO_SUCH_VM:
                        raise UnsureError(str(exc)) from exc
                except HostUnreachableError as exc:
                    raise UnsureError(str(exc)) from exc
            await anyio.to_thread.run_sync(self._settle_stop, flow)
        elif flow.kind == "migrate_vm":
            await self._settle_migration(flow)
        elif flow.kind in ("plug_disk",):
            await self._settle_plug(flow, bool(data.get("plug", True)))
        else:
            log.warning("flow %s of unknown kind %s dropped", flow.id, flow.kind)
            await anyio.to_thread.run_sync(self._drop, flow)

    def _drop(self, flow: Flow) -> None:
        with self.db.transaction() as tx:
            tx.execute(delete(Flow).where(Flow.id == flow.id))

    def _event(self, tx: Any, flow: Flow, text: str) -> None:
        audit.record(tx, audit.FLOW_RECOVERED, audit.Ids(vm_id=flow.vm_id),
                     correlation_id=flow.correlation_id, flow=flow.kind, outcome=text)

    def _settle_run(self, flow: Flow, running: list[HostAddress]) -> None:
        vm_id = flow.vm_id or ""
        with self.db.transaction() as tx:
            dynamic = tx.get(VmDynamic, vm_id)
            if running and dynamic is not None:
                host = running[0]
                dynamic.status = "up"
                dynamic.run_on_host_id = host.host_id
                dynamic.status_changed_at = utcnow()
                self._event(tx, flow, f"the VM runs on {host.address}: run completed")
            else:
                mark_down(tx, vm_id, "the engine stopped while starting it")
                self._event(tx, flow, "the VM did not start: run undone")
            tx.execute(delete(Flow).where(Flow.id == flow.id))

    def _settle_stop(self, flow: Flow) -> None:
        with self.db.transaction() as tx:
            mark_down(tx, flow.vm_id or "", "stopped")
            self._event(tx, flow, "the VM is down: stop completed")
            tx.execute(delete(Flow).where(Flow.id == flow.id))

    async def _settle_migration(self, flow: Flow) -> None:
        vm_id = flow.vm_id or ""
        hosts = self._hosts([flow.host_id or "", flow.target_host_id or ""])
        source = hosts.get(flow.host_id or "")
        target = hosts.get(flow.target_host_id or "")
        if source is None or target is None:
            raise UnsureError("a host of the migration is gone")
        if flow.step in ("started", "done"):
            try:
                state = await self.pool.call(source, "VM.migrateStatus", {"vmID": vm_id})
            except (HostCallError, HostUnreachableError) as exc:
                raise UnsureError(str(exc)) from exc
            if str(state.get("status", "")) in ("starting", "running"):
                raise UnsureError("the migration still runs")
        on_target = await self._runs_on(target, vm_id)
        on_source = await self._runs_on(source, vm_id)
        with self.db.transaction() as tx:
            dynamic = tx.get(VmDynamic, vm_id)
            if dynamic is not None:
                dynamic.migrating_to_host_id = None
                if on_target and not on_source:
                    dynamic.status, dynamic.run_on_host_id = "up", target.host_id
                    self._event(tx, flow, f"the VM runs on {target.address}: migration done")
                elif on_source:
                    dynamic.status, dynamic.run_on_host_id = "up", source.host_id
                    self._event(tx, flow, f"the VM runs on {source.address}: migration undone")
                else:
                    mark_down(tx, vm_id, "down after an interrupted migration")
                    self._event(tx, flow, "the VM runs nowhere: marked down")
            tx.execute(delete(Flow).where(Flow.id == flow.id))

    async def _settle_plug(self, flow: Flow, plug: bool) -> None:
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
        with self.db.transaction() as tx:
            device = tx.get(VmDevice, (flow.disk_id or "", vm_id))
            if device is not None and host is not None:
                device.is_plugged = present
                if not present:
                    device.logical_name = ""
            self._event(tx, flow, "the disk is " + ("plugged" if present else "unplugged")
                        + (" (done)" if present == plug else " (undone)"))
            tx.execute(delete(Flow).where(Flow.id == flow.id))

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
        return sorted(touched)

    async def reconcile_all(self) -> None:
        await anyio.to_thread.run_sync(self.repin)
        with self.db.read() as tx:
            hosts = [HostAddress(h.id, h.address, h.port) for h in tx.scalars(
                select(Host).where(Host.status == "up"))]
        await asyncio.gather(*(self.services.connections.reconcile_quietly(h) for h in hosts))
