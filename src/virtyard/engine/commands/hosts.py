"""Host commands: add, remove, move to maintenance (deactivate), activate."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Command, Context, locked, record_event
from virtyard.engine.db.models import DEFAULT_CLUSTER_ID, Cluster, Host, VmDynamic

NAME_RE = re.compile(r"^[\w.-]{1,255}$")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})"
                         r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")
DEFAULT_AGENT_PORT = 54321
# VM statuses that mean "QEMU may be running there".
VM_ACTIVE = ("up", "powering_up", "powering_down", "migrating", "paused", "wait_for_launch",
             "reboot_in_progress", "not_responding", "unknown")


def check_name(command: Command[Any], name: str) -> None:
    if not name.strip():
        raise command.fail(errors.NAME_EMPTY)
    if not NAME_RE.match(name):
        raise command.fail(errors.NAME_INVALID, max=255)


def valid_address(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return bool(HOSTNAME_RE.match(address))


def get_host(command: Command[Any], tx: Session, host_id: str, *,
             for_update: bool = True) -> Host:
    """The host, locked for this transaction."""
    return locked(command, tx, Host, host_id, errors.HOST_NOT_FOUND, for_update=for_update)


@dataclass
class AddHost(Command[Host]):
    """Register a host by its agent's address; the heartbeat makes first contact."""

    action: ClassVar[str] = "add"
    entity: ClassVar[str] = "Host"
    conflicts: ClassVar = {
        ("hosts", ("name",)): errors.NAME_ALREADY_USED,
        ("hosts", ("address", "port")): errors.HOST_SAME_ADDRESS,
    }

    name: str
    address: str
    port: int = DEFAULT_AGENT_PORT
    cluster_id: str | None = None
    cluster_name: str | None = None
    description: str = ""
    comment: str = ""

    def validate(self, tx: Session, ctx: Context) -> None:
        check_name(self, self.name)
        if not valid_address(self.address):
            raise self.fail(errors.HOST_ADDRESS_INVALID, address=self.address[:255])
        if not 1 <= self.port <= 65535:
            raise self.fail(errors.PORT_INVALID, port=self.port)
        if tx.scalar(select(func.count()).where(Host.name == self.name)):
            raise self.fail(errors.NAME_ALREADY_USED, name=self.name)
        if tx.scalar(select(func.count()).where(Host.address == self.address,
                                                Host.port == self.port)):
            raise self.fail(errors.HOST_SAME_ADDRESS, address=self.address, port=self.port)
        self.cluster_id = self._cluster(tx)

    def _cluster(self, tx: Session) -> str:
        if self.cluster_id:
            found = tx.get(Cluster, self.cluster_id)
            if found is None:
                raise self.fail(errors.CLUSTER_NOT_FOUND, name=self.cluster_id[:64])
            return found.id
        if self.cluster_name:
            named = tx.scalars(select(Cluster).where(Cluster.name == self.cluster_name)).first()
            if named is None:
                raise self.fail(errors.CLUSTER_NOT_FOUND, name=self.cluster_name[:255])
            return named.id
        return DEFAULT_CLUSTER_ID

    def execute(self, tx: Session, ctx: Context) -> Host:
        host = Host(name=self.name, address=self.address, port=self.port,
                    cluster_id=self.cluster_id or DEFAULT_CLUSTER_ID,
                    description=self.description, comment=self.comment, status="installing")
        tx.add(host)
        return host

    def events(self, tx: Session, ctx: Context, result: Host) -> None:
        record_event(tx, ctx, audit.HOST_ADDED, audit.Ids(host_id=result.id), host=result.name)

    def after_commit(self, ctx: Context, result: Host) -> None:
        if ctx.services is not None:
            ctx.services.heartbeat.kick()


def running_vms(tx: Session, host_id: str) -> int:
    return int(tx.scalar(select(func.count()).where(
        VmDynamic.run_on_host_id == host_id, VmDynamic.status.in_(VM_ACTIVE))) or 0)


@dataclass
class RemoveHost(Command[str]):
    """Forget a host. Only from maintenance (as oVirt), and never while it runs VMs."""

    action: ClassVar[str] = "remove"
    entity: ClassVar[str] = "Host"

    host_id: str

    def validate(self, tx: Session, ctx: Context) -> None:
        host = get_host(self, tx, self.host_id)
        if host.status not in ("maintenance", "installing", "install_failed"):
            raise self.fail(errors.HOST_REMOVE_STATUS, name=host.name, status=host.status)
        if running_vms(tx, host.id):
            raise self.fail(errors.HOST_REMOVE_HAS_VMS, name=host.name)

    def execute(self, tx: Session, ctx: Context) -> str:
        host = get_host(self, tx, self.host_id)
        name = host.name
        tx.delete(host)
        return name

    def events(self, tx: Session, ctx: Context, result: str) -> None:
        record_event(tx, ctx, audit.HOST_REMOVED, audit.Ids(host_id=self.host_id), host=result)


@dataclass
class DeactivateHost(Command[Host]):
    """Move a host to maintenance: the engine starts nothing there until it is activated."""

    action: ClassVar[str] = "switch to maintenance"
    entity: ClassVar[str] = "Host"

    host_id: str

    def validate(self, tx: Session, ctx: Context) -> None:
        host = get_host(self, tx, self.host_id)
        if host.status == "maintenance":
            raise self.fail(errors.HOST_ALREADY_MAINTENANCE, name=host.name)
        count = running_vms(tx, host.id)
        if count:
            raise self.fail(errors.HOST_MAINTENANCE_RUNNING_VMS, name=host.name, count=count)

    def execute(self, tx: Session, ctx: Context) -> Host:
        host = get_host(self, tx, self.host_id)
        host.status = "maintenance"
        host.status_detail = ""
        return host

    def events(self, tx: Session, ctx: Context, result: Host) -> None:
        record_event(tx, ctx, audit.HOST_MAINTENANCE, audit.Ids(host_id=result.id),
                     host=result.name)


@dataclass
class ActivateHost(Command[Host]):
    """Bring a host back from maintenance; it is ``up`` once its agent answers."""

    action: ClassVar[str] = "activate"
    entity: ClassVar[str] = "Host"

    host_id: str

    def validate(self, tx: Session, ctx: Context) -> None:
        host = get_host(self, tx, self.host_id)
        if host.status == "up":
            raise self.fail(errors.HOST_ALREADY_UP, name=host.name)

    def execute(self, tx: Session, ctx: Context) -> Host:
        host = get_host(self, tx, self.host_id)
        host.status = "connecting"
        host.status_detail = ""
        return host

    def events(self, tx: Session, ctx: Context, result: Host) -> None:
        record_event(tx, ctx, audit.HOST_ACTIVATED, audit.Ids(host_id=result.id),
                     host=result.name)

    def after_commit(self, ctx: Context, result: Host) -> None:
        if ctx.services is not None:
            ctx.services.heartbeat.kick()
