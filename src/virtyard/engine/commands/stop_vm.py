"""Stop (power off) or shut down (ask the guest) a VM, then release its connections there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Context, record_event
from virtyard.engine.commands.errors import CommandError
from virtyard.engine.commands.flow import FlowCommand
from virtyard.engine.commands.run_vm import release_hosts
from virtyard.engine.commands.vms import get_vm
from virtyard.engine.db.models import Flow, Host, VmDynamic, utcnow
from virtyard.engine.hosts import connections as conns
from virtyard.engine.hosts.pool import HostAddress, HostCallError

NO_SUCH_VM = 1  # the agent's noVM: the VM is not there (already down)


class StillRunningError(Exception):
    """The guest did not shut down in time."""


@dataclass
class StopVm(FlowCommand[str]):
    """``POST vms/{id}/stop`` (``graceful=False``) and ``POST vms/{id}/shutdown``."""

    action: ClassVar[str] = "stop"
    entity: ClassVar[str] = "VM"
    kind: ClassVar[str] = "stop_vm"

    vm_id: str
    graceful: bool = False
    timeout: float = 60.0
    vm_name: str = ""
    host: HostAddress | None = None
    host_name: str = ""
    previous: str = "up"

    def validate(self, tx: Session, ctx: Context) -> None:
        vm = get_vm(self, tx, self.vm_id)
        self.vm_name = vm.name
        dynamic = tx.get(VmDynamic, vm.id)
        if dynamic is None or dynamic.status == "down":
            raise self.fail(errors.VM_NOT_RUNNING, name=vm.name)
        self.previous = dynamic.status
        if dynamic.run_on_host_id:
            host = tx.get(Host, dynamic.run_on_host_id)
            if host is not None:
                self.host = HostAddress(host.id, host.address, host.port)
                self.host_name = host.name

    def begin(self, tx: Session, ctx: Context) -> Flow:
        dynamic = tx.get(VmDynamic, self.vm_id)
        assert dynamic is not None
        dynamic.status = "powering_down"
        return self.new_flow(self.vm_id, ctx, host_id=self.host.host_id if self.host else None,
                             data={"graceful": self.graceful})

    def perform(self, ctx: Context, flow: Flow) -> str:
        if self.host is None:
            return "down"
        pool = ctx.services.pool
        try:
            if self.graceful:
                answer = pool.call_sync(self.host, "VM.shutdown",
                                        {"vmID": self.vm_id, "timeout": self.timeout},
                                        timeout=self.timeout + 30)
                if str(answer.get("status", "")).lower() != "down":
                    raise StillRunningError(
                        f"the guest did not shut down within {self.timeout:g} s")
            else:
                pool.call_sync(self.host, "VM.destroy", {"vmID": self.vm_id})
        except HostCallError as exc:
            if exc.code != NO_SUCH_VM:
                raise
        self.step(ctx, flow, "stopped")
        return "down"

    def finish(self, tx: Session, ctx: Context, flow: Flow, result: str) -> None:
        mark_down(tx, self.vm_id, "stopped by " + (ctx.principal.name or "the engine"))
        self.released = conns.drop_owner(tx, conns.vm_owner(self.vm_id))
        kind = audit.VM_SHUT_DOWN if self.graceful else audit.VM_STOPPED
        record_event(tx, ctx, kind, audit.Ids(vm_id=self.vm_id,
                                              host_id=self.host.host_id if self.host else None),
                     vm=self.vm_name)

    def after_commit(self, ctx: Context, result: str) -> None:
        release_hosts(ctx, getattr(self, "released", []))

    def undo(self, ctx: Context, flow: Flow, error: BaseException) -> None:
        with ctx.db.transaction() as tx:
            dynamic = tx.get(VmDynamic, self.vm_id)
            if dynamic is not None and dynamic.status == "powering_down":
                dynamic.status = self.previous
        if isinstance(error, CommandError):
            return
        if isinstance(error, StillRunningError):
            raise self.fail(errors.VM_SHUTDOWN_TIMEOUT, name=self.vm_name,
                            why=str(error)) from error
        raise self.fail(errors.HOST_CALL_FAILED, name=self.host_name or "?",
                        why=str(error)[:300]) from error


def mark_down(tx: Session, vm_id: str, reason: str) -> None:
    dynamic = tx.get(VmDynamic, vm_id)
    if dynamic is None:
        return
    dynamic.status = "down"
    dynamic.run_on_host_id = None
    dynamic.migrating_to_host_id = None
    dynamic.exit_reason = reason[:1000]
    dynamic.devices_hash = ""
    dynamic.current_cd = ""
    dynamic.status_changed_at = utcnow()


__all__ = ["StopVm", "mark_down", "select"]
