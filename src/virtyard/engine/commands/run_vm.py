"""Run a VM on a host that has *proven* it sees every LUN of the VM.

oVirt connects the chosen host and assumes the others succeed once the first did. Here every
candidate host (the VM's placement hosts in order — the first is preferred — or, without a
list, the Up hosts of its cluster, least loaded first) is connected to the VM's storage at the
same time and then asked ``Host.getDevicesVisibility`` for every WWID. The VM starts on the
preferred host if it proves it; if not, at once on the next host that reported success. A host
that could not connect or see a LUN is not a failed run attempt; a host whose ``VM.create``
fails is, and the next proven host is tried. Afterwards only the chosen host keeps the VM's
connections: the others are released.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio.from_thread
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import cd_media, errors
from virtyard.engine.commands.base import Context, record_event
from virtyard.engine.commands.flow import FlowCommand, flow_data
from virtyard.engine.commands.vms import get_vm
from virtyard.engine.db.models import (
    Flow,
    Host,
    LunConnection,
    Vm,
    VmDevice,
    VmDynamic,
    VmPlacementHost,
    utcnow,
)
from virtyard.engine.hosts import connections as conns
from virtyard.engine.hosts import vm_spec
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostUnreachableError

log = logging.getLogger("virtyard.engine.run_vm")

ACTIVE = ("up", "powering_up", "powering_down", "migrating", "paused", "wait_for_launch",
          "reboot_in_progress", "not_responding", "unknown")


@dataclass
class Candidate:
    host_id: str
    name: str
    address: HostAddress


@dataclass
class Proof:
    """What one candidate host showed: connected and seeing every LUN, or why not."""

    candidate: Candidate
    ok: bool
    why: str = ""


@dataclass
class RunOutcome:
    host_id: str
    host_name: str
    tried: list[str] = field(default_factory=list)


class RunFailedError(Exception):
    """No host could run the VM; says why for each host."""


def candidates(tx: Session, vm: Vm, override: list[str] | None = None) -> list[Candidate]:
    """Placement hosts in order (Up ones), else the cluster's Up hosts, least loaded first.
    ``override``: the hosts of this run's ``placement_policy`` instead of the VM's."""
    placement = override or [row[0] for row in tx.execute(
        select(VmPlacementHost.host_id).where(VmPlacementHost.vm_id == vm.id)
        .order_by(VmPlacementHost.position))]
    up = {h.id: h for h in tx.scalars(select(Host).where(Host.status == "up",
                                                         Host.cluster_id == vm.cluster_id))}
    if placement:
        ordered = [up[h] for h in placement if h in up]
    else:
        load: dict[str | None, int] = {
            host_id: count for host_id, count in tx.execute(
                select(VmDynamic.run_on_host_id, func.count())
                .where(VmDynamic.status.in_(ACTIVE)).group_by(VmDynamic.run_on_host_id))}
        ordered = sorted(up.values(), key=lambda h: (load.get(h.id, 0), h.name))
    return [Candidate(h.id, h.name, HostAddress(h.id, h.address, h.port)) for h in ordered]


async def prove(ctx: Context, candidate: Candidate, wwids: list[str]) -> Proof:
    """Connect the host to the VM's storage, then make it show it sees every LUN."""
    services = ctx.services
    try:
        result = await services.connections.reconcile(candidate.address)
        if not result.ok:
            luns = f"LUN(s) {', '.join(wwids)}: " if wwids else ""
            return Proof(candidate, False, f"cannot reach {luns}connecting failed (" + ", ".join(
                f"connection {k}: {v}" for k, v in sorted(result.failed.items())) + ")")
        if wwids:
            seen = await services.pool.call(candidate.address, "Host.getDevicesVisibility",
                                            {"guidList": wwids})
            missing = [w for w in wwids if not (isinstance(seen, dict) and seen.get(w))]
            if missing:
                return Proof(candidate, False, "does not see " + ", ".join(missing))
    except (HostCallError, HostUnreachableError) as exc:
        return Proof(candidate, False, str(exc)[:300])
    return Proof(candidate, True)


def prove_sync(ctx: Context, candidate: Candidate, wwids: list[str]) -> str:
    """:func:`prove` from a flow's worker thread: '' when proven, else why not."""
    async def go() -> Proof:
        return await prove(ctx, candidate, wwids)
    proof = anyio.from_thread.run(go)
    return "" if proof.ok else proof.why


async def proven_in_order(ctx: Context, hosts: list[Candidate], wwids: list[str]
                          ) -> Any:
    """Yield proven hosts: the preferred one first if it proves, then others as they do."""
    tasks = {asyncio.create_task(prove(ctx, c, wwids)): c for c in hosts}
    by_host = {c.host_id: t for t, c in tasks.items()}
    failures: list[Proof] = []
    first = by_host[hosts[0].host_id]
    proof = await first
    if proof.ok:
        yield proof
    else:
        failures.append(proof)
    pending = [t for t in tasks if t is not first]
    for next_done in asyncio.as_completed(pending):
        proof = await next_done
        if proof.ok:
            yield proof
        else:
            failures.append(proof)
    yield failures  # the end: why the others could not


@dataclass
class RunVm(FlowCommand[RunOutcome]):
    """``POST vms/{id}/start``."""

    action: ClassVar[str] = "run"
    entity: ClassVar[str] = "VM"
    kind: ClassVar[str] = "run_vm"

    vm_id: str
    # This run's placement (host ids or names, in order), instead of the VM's own.
    prefer: list[str] = field(default_factory=list)
    hosts: list[Candidate] = field(default_factory=list)
    wwids: list[str] = field(default_factory=list)
    vm_name: str = ""
    iso: cd_media.Iso | None = None

    def validate(self, tx: Session, ctx: Context) -> None:
        vm = get_vm(self, tx, self.vm_id)
        self.vm_name = vm.name
        dynamic = tx.get(VmDynamic, vm.id)
        status = dynamic.status if dynamic else "down"
        if status != "down":
            raise self.fail(errors.VM_IS_RUNNING, name=vm.name, status=status)
        disks = vm_spec.vm_disks(tx, vm.id)
        self.iso = cd_media.iso_disk(self, tx, vm.iso_path) if vm.iso_path else None
        self.wwids = sorted({d.lun.lun_id for d in disks}
                            | ({self.iso.wwid} if self.iso and self.iso.wwid else set()))
        without = [d.disk.alias for d in disks if not tx.scalar(
            select(func.count()).where(LunConnection.lun_id == d.lun.lun_id))]
        if without:
            raise self.fail(errors.LUN_WITHOUT_CONNECTION, disks=", ".join(without))
        override = []
        for ref in self.prefer:
            host_id = tx.scalar(select(Host.id).where((Host.id == ref) | (Host.name == ref)))
            if host_id is None:
                raise self.fail(errors.PLACEMENT_HOST_NOT_FOUND, name=ref[:255])
            override.append(host_id)
        self.hosts = candidates(tx, vm, override)
        if not self.hosts:
            raise self.fail(errors.NO_HOST_TO_RUN, name=vm.name)

    def begin(self, tx: Session, ctx: Context) -> Flow:
        dynamic = tx.get(VmDynamic, self.vm_id)
        if dynamic is None:
            dynamic = VmDynamic(vm_id=self.vm_id)
            tx.add(dynamic)
        dynamic.status = "wait_for_launch"
        dynamic.status_changed_at = utcnow()
        needed = conns.lun_connection_ids(tx, self.wwids)
        for c in self.hosts:
            conns.set_pins(tx, c.host_id, conns.vm_owner(self.vm_id), needed)
        return self.new_flow(self.vm_id, ctx, data={
            "candidates": [c.host_id for c in self.hosts]})

    def perform(self, ctx: Context, flow: Flow) -> RunOutcome:
        with ctx.db.read() as tx:
            vm = tx.get(Vm, self.vm_id)
            assert vm is not None
            disks = vm_spec.vm_disks(tx, self.vm_id)
        places = vm_spec.place_disks(disks)
        with ctx.db.transaction() as tx:
            drive = cd_media.cd_place(tx, self.vm_id, {places[d.disk.id].index for d in disks
                                                   if d.iface == vm_spec.CD_IFACE})
        params = vm_spec.vm_params(vm, disks, places, vm_spec.cdrom_drive(
            drive, self.iso.pdiv if self.iso else None))

        async def go() -> RunOutcome:
            tried: list[str] = []
            why: list[str] = []
            proofs = proven_in_order(ctx, self.hosts, self.wwids)
            async for item in proofs:
                if isinstance(item, list):
                    why += [f"{p.candidate.name}: {p.why}" for p in item]
                    break
                host = item.candidate
                self.step(ctx, flow, "proven", host=host.host_id)
                try:
                    definition = await ctx.services.pool.call(host.address, "VM.create",
                                                              {"vmParams": params})
                except (HostCallError, HostUnreachableError) as exc:
                    tried.append(host.name)
                    why.append(f"{host.name}: VM.create failed: {str(exc)[:300]}")
                    continue
                self.step(ctx, flow, "created", host=host.host_id)
                self._store_places(ctx, places, definition)
                return RunOutcome(host.host_id, host.name, tried)
            raise RunFailedError("; ".join(why) or "no host could run it")

        return anyio.from_thread.run(go)

    def _store_places(self, ctx: Context, places: dict[str, vm_spec.DiskPlace],
                      definition: Any) -> None:
        reported = vm_spec.reported_addresses(definition)
        with ctx.db.transaction() as tx:
            for disk_id, place in places.items():
                device = tx.get(VmDevice, (disk_id, self.vm_id))
                if device is not None:
                    place.address = reported.get(disk_id, place.address)
                    device.address = place.dumps()

    def finish(self, tx: Session, ctx: Context, flow: Flow, result: RunOutcome) -> None:
        dynamic = tx.get(VmDynamic, self.vm_id)
        assert dynamic is not None
        dynamic.status = "up"
        dynamic.run_on_host_id = result.host_id
        dynamic.current_cd = self.iso.disk_id if self.iso else ""
        dynamic.exit_reason = ""
        dynamic.status_changed_at = utcnow()
        self.released = conns.drop_owner(tx, conns.vm_owner(self.vm_id),
                                         except_host=result.host_id)
        record_event(tx, ctx, audit.VM_STARTED, audit.Ids(vm_id=self.vm_id,
                                                          host_id=result.host_id),
                     vm=self.vm_name, host=result.host_name)

    def after_commit(self, ctx: Context, result: RunOutcome) -> None:
        release_hosts(ctx, getattr(self, "released", []))

    def undo(self, ctx: Context, flow: Flow, error: BaseException) -> None:
        with ctx.db.transaction() as tx:
            dynamic = tx.get(VmDynamic, self.vm_id)
            if dynamic is not None:
                dynamic.status = "down"
                dynamic.run_on_host_id = None
                dynamic.exit_reason = str(error)[:1000]
                dynamic.status_changed_at = utcnow()
            hosts = conns.drop_owner(tx, conns.vm_owner(self.vm_id))
        release_hosts(ctx, hosts)
        if isinstance(error, RunFailedError):
            raise self.fail(errors.RUN_FAILED, name=self.vm_name, why=str(error)) from error

    def failed_event(self, tx: Session, ctx: Context, flow: Flow,
                     error: BaseException) -> None:
        record_event(tx, ctx, audit.VM_START_FAILED, audit.Ids(vm_id=self.vm_id),
                     vm=self.vm_name, why=str(error)[:500])


def release_hosts(ctx: Context, host_ids: list[str]) -> None:
    """Reconcile hosts that lost pins (their connections are released), quietly."""
    if not host_ids or ctx.services is None:
        return
    with ctx.db.read() as tx:
        hosts = [HostAddress(h.id, h.address, h.port) for h in tx.scalars(
            select(Host).where(Host.id.in_(host_ids)))]

    async def go() -> None:
        await asyncio.gather(*(ctx.services.connections.reconcile_quietly(h) for h in hosts))

    anyio.from_thread.run(go)


__all__ = ["RunVm", "flow_data", "release_hosts"]
