"""Live-migrate a running VM to a host that has first proven it sees every LUN of the VM.

The destination is connected to the VM's storage and asked ``getDevicesVisibility`` before
anything moves; the source's agent runs the migration (and its destination re-checks every LUN
itself); the engine follows ``VM.migrateStatus`` and, once done, releases the source's
connections. On any failure the VM stays where it was and the destination's are released.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import cd_media, errors
from virtyard.engine.commands.base import Context, record_event
from virtyard.engine.commands.flow import FlowCommand
from virtyard.engine.commands.run_vm import ACTIVE, Candidate, prove_sync, release_hosts
from virtyard.engine.commands.vms import get_vm
from virtyard.engine.db.models import Flow, Host, VmDynamic, VmPlacementHost, utcnow
from virtyard.engine.hosts import connections as conns
from virtyard.engine.hosts import vm_spec
from virtyard.engine.hosts.pool import HostAddress

POLL = 0.25


class MigrationFailedError(Exception):
    pass


@dataclass
class MigrateVm(FlowCommand[str]):
    """``POST vms/{id}/migrate`` (``host`` optional)."""

    action: ClassVar[str] = "migrate"
    entity: ClassVar[str] = "VM"
    kind: ClassVar[str] = "migrate_vm"

    vm_id: str
    host_id: str | None = None
    host_name: str | None = None
    timeout: float = 600.0
    vm_name: str = ""
    source: Candidate | None = None
    target: Candidate | None = None
    wwids: tuple[str, ...] = ()

    def validate(self, tx: Session, ctx: Context) -> None:
        vm = get_vm(self, tx, self.vm_id)
        self.vm_name = vm.name
        dynamic = tx.get(VmDynamic, vm.id)
        if dynamic is None or dynamic.status != "up" or not dynamic.run_on_host_id:
            raise self.fail(errors.VM_NOT_RUNNING, name=vm.name)
        src = tx.get(Host, dynamic.run_on_host_id)
        assert src is not None
        self.source = Candidate(src.id, src.name, HostAddress(src.id, src.address, src.port))
        dst = self._destination(tx, vm.cluster_id, src.id)
        self.target = Candidate(dst.id, dst.name, HostAddress(dst.id, dst.address, dst.port))
        self.wwids = tuple(sorted({d.lun.lun_id for d in vm_spec.vm_disks(tx, vm.id)}
                                  | set(cd_media.cd_wwids(tx, vm.id))))

    def _destination(self, tx: Session, cluster_id: str, source_id: str) -> Host:
        if self.host_id or self.host_name:
            stmt = select(Host).where(Host.id == self.host_id) if self.host_id \
                else select(Host).where(Host.name == self.host_name)
            dst = tx.scalars(stmt).first()
            if dst is None:
                raise self.fail(errors.HOST_INVALID_ID)
            if dst.id == source_id:
                raise self.fail(errors.MIGRATION_TO_SAME_HOST)
            if dst.status != "up":
                raise self.fail(errors.HOST_STATUS_ILLEGAL, name=dst.name, status=dst.status)
            if dst.cluster_id != cluster_id:
                raise self.fail(errors.DESTINATION_OTHER_CLUSTER, name=dst.name)
            return dst
        placement = [r[0] for r in tx.execute(
            select(VmPlacementHost.host_id).where(VmPlacementHost.vm_id == self.vm_id)
            .order_by(VmPlacementHost.position))]
        up = {h.id: h for h in tx.scalars(select(Host).where(
            Host.status == "up", Host.cluster_id == cluster_id, Host.id != source_id))}
        ordered = [up[h] for h in placement if h in up]
        if not ordered:
            load = dict(tx.execute(select(VmDynamic.run_on_host_id, func.count())
                                   .where(VmDynamic.status.in_(ACTIVE))
                                   .group_by(VmDynamic.run_on_host_id)).tuples().all())
            ordered = sorted(up.values(), key=lambda h: (load.get(h.id, 0), h.name))
        if not ordered:
            raise self.fail(errors.NO_HOST_TO_MIGRATE, name=self.vm_name)
        return ordered[0]

    def begin(self, tx: Session, ctx: Context) -> Flow:
        assert self.source is not None and self.target is not None
        dynamic = tx.get(VmDynamic, self.vm_id)
        assert dynamic is not None
        dynamic.status = "migrating"
        dynamic.migrating_to_host_id = self.target.host_id
        conns.set_pins(tx, self.target.host_id, conns.vm_owner(self.vm_id),
                       conns.lun_connection_ids(tx, self.wwids))
        return self.new_flow(self.vm_id, ctx, host_id=self.source.host_id,
                             target_host_id=self.target.host_id)

    def perform(self, ctx: Context, flow: Flow) -> str:
        assert self.source is not None and self.target is not None
        target = self.target

        why = prove_sync(ctx, target, list(self.wwids))
        if why:
            raise self.fail(errors.MIGRATION_DEST_NOT_PROVEN, host=target.name, why=why)
        self.step(ctx, flow, "proven")
        pool = ctx.services.pool
        dst = f"{target.address.address}:{target.address.port}"
        pool.call_sync(self.source.address, "VM.migrate",
                       {"vmID": self.vm_id, "params": {"dst": dst}})
        self.step(ctx, flow, "started")
        deadline = time.monotonic() + self.timeout
        while True:
            state = pool.call_sync(self.source.address, "VM.migrateStatus", {"vmID": self.vm_id})
            status = str(state.get("status", ""))
            if status == "done":
                break
            if status == "failed":
                raise MigrationFailedError(str(state.get("message", ""))[:500] or "failed")
            if time.monotonic() > deadline:
                raise MigrationFailedError(f"not done within {self.timeout:g} s")
            time.sleep(POLL)
        self.step(ctx, flow, "done")
        return target.host_id

    def finish(self, tx: Session, ctx: Context, flow: Flow, result: str) -> None:
        assert self.source is not None and self.target is not None
        dynamic = tx.get(VmDynamic, self.vm_id)
        assert dynamic is not None
        dynamic.status = "up"
        dynamic.run_on_host_id = result
        dynamic.migrating_to_host_id = None
        dynamic.devices_hash = ""
        dynamic.status_changed_at = utcnow()
        self.released = conns.drop_owner(tx, conns.vm_owner(self.vm_id), except_host=result)
        record_event(tx, ctx, audit.VM_MIGRATED, audit.Ids(vm_id=self.vm_id, host_id=result),
                     vm=self.vm_name, source=self.source.name, destination=self.target.name)

    def after_commit(self, ctx: Context, result: str) -> None:
        release_hosts(ctx, getattr(self, "released", []))

    def undo(self, ctx: Context, flow: Flow, error: BaseException) -> None:
        assert self.source is not None and self.target is not None
        with ctx.db.transaction() as tx:
            dynamic = tx.get(VmDynamic, self.vm_id)
            if dynamic is not None:
                dynamic.status = "up"
                dynamic.migrating_to_host_id = None
            released = conns.drop_owner(tx, conns.vm_owner(self.vm_id),
                                        except_host=self.source.host_id)
        release_hosts(ctx, released)
        if isinstance(error, MigrationFailedError):
            raise self.fail(errors.MIGRATION_FAILED, name=self.vm_name, host=self.target.name,
                            why=str(error)) from error

    def failed_event(self, tx: Session, ctx: Context, flow: Flow,
                     error: BaseException) -> None:
        record_event(tx, ctx, audit.VM_MIGRATION_FAILED, audit.Ids(vm_id=self.vm_id),
                     vm=self.vm_name, why=str(error)[:500])
