"""Block storage domains: add one on a free LUN, attach it to the data center, put it in
maintenance, activate, detach, remove.

A domain is an LVM volume group on one LUN, made by a host agent (``StorageDomain.create``).
The database reserves the LUN first (``luns.storage_domain_id``, in the same transaction that
checks nobody uses it), so a disk and a domain can never race for one LUN. An *active* domain
is reached by every Up host of its data center: each keeps the domain's connections pinned
(owner ``sd:<id>``, :func:`pin_domains`), level-triggered like the VMs' pins, so a host that
comes up later, or an engine that restarts, converges to the same state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Command, Context, locked, record_event
from virtyard.engine.commands.errors import CommandError
from virtyard.engine.commands.flow import FlowCommand, HostCommand
from virtyard.engine.commands.hosts import check_name
from virtyard.engine.commands.run_vm import Candidate, prove_sync, release_hosts
from virtyard.engine.commands.storage import Portal, check_portal, find_or_add_connection
from virtyard.engine.db.models import (
    BaseDisk,
    Cluster,
    DataCenter,
    Flow,
    Host,
    HostConnectionPin,
    Lun,
    LunConnection,
    StorageDomain,
    Vm,
    VmDynamic,
)
from virtyard.engine.hosts import connections as conns
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostUnreachableError

WWID_RE = re.compile(r"^[0-9A-Za-z_.:-]{4,255}$")
AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,50}$")
# The agent's refusals when the LUN holds something (a domain's tag, data, no probe).
LUN_NOT_FREE = {515: "it holds a storage domain already", 601: "it holds data or cannot "
                "be initialized", 365: "the domain exists already"}
NO_SUCH_DOMAIN = 358


def domain_connections(tx: Session, domain_id: str) -> set[str]:
    """The connections that reach the domain's LUN(s)."""
    luns = tx.scalars(select(Lun.lun_id).where(Lun.storage_domain_id == domain_id))
    return conns.lun_connection_ids(tx, luns)


def domain_wwids(tx: Session, domain_id: str) -> list[str]:
    return sorted(tx.scalars(select(Lun.lun_id).where(Lun.storage_domain_id == domain_id)))


def up_hosts_of(tx: Session, data_center_id: str) -> list[Host]:
    return list(tx.scalars(select(Host).join(Cluster, Cluster.id == Host.cluster_id).where(
        Cluster.data_center_id == data_center_id, Host.status == "up")))


def pin_domains(tx: Session, host_id: str | None = None) -> list[str]:
    """Every active domain's connections pinned on every Up host of its data center (or only
    on ``host_id``); pins of domains that are not active dropped. The hosts whose pins
    changed."""
    touched: set[str] = set()
    wanted: dict[str, set[tuple[str, str]]] = {}
    for domain in tx.scalars(select(StorageDomain).where(StorageDomain.status == "active")):
        if domain.data_center_id is None:
            continue
        ids = domain_connections(tx, domain.id)
        wanted[conns.domain_owner(domain.id)] = {
            (h.id, c) for h in up_hosts_of(tx, domain.data_center_id)
            if host_id in (None, h.id) for c in ids}
    stmt = select(HostConnectionPin).where(HostConnectionPin.owner.like("sd:%"))
    if host_id is not None:
        stmt = stmt.where(HostConnectionPin.host_id == host_id)
    have: dict[str, set[tuple[str, str]]] = {}
    for pin in tx.scalars(stmt):
        have.setdefault(pin.owner, set()).add((pin.host_id, pin.connection_id))
    for owner in set(wanted) | set(have):
        want, got = wanted.get(owner, set()), have.get(owner, set())
        if want == got:
            continue
        changed = {h for h, _c in want ^ got}
        touched |= changed
        for h in changed:
            conns.set_pins(tx, h, owner, {c for hh, c in want if hh == h})
    return sorted(touched)


def get_domain(command: Command[Any], tx: Session, domain_id: str) -> StorageDomain:
    domain = locked(command, tx, StorageDomain, domain_id, errors.STORAGE_DOMAIN_NOT_FOUND)
    return domain


def cd_users(tx: Session, domain_id: str) -> list[str]:
    """VMs whose CD (now, or for the next run) is an ISO disk of the domain."""
    isos = select(BaseDisk.id).where(BaseDisk.storage_domain_id == domain_id)
    running = tx.scalars(select(Vm.name).join(VmDynamic, VmDynamic.vm_id == Vm.id).where(
        VmDynamic.current_cd.in_(isos), VmDynamic.status != "down"))
    next_run = tx.scalars(select(Vm.name).where(Vm.iso_path.in_(isos)))
    return sorted(set(running) | set(next_run))


def up_host(command: Command[Any], tx: Session, ref: str | None,
            data_center_id: str | None = None) -> Host:
    """The host a user named (id or name), or any Up one; it must be Up."""
    if ref:
        host = tx.scalars(select(Host).where(or_(Host.id == ref, Host.name == ref))).first()
        if host is None:
            raise command.fail(errors.HOST_NOT_FOUND)
    else:
        stmt = select(Host).where(Host.status == "up").order_by(Host.name)
        if data_center_id is not None:
            stmt = stmt.join(Cluster, Cluster.id == Host.cluster_id).where(
                Cluster.data_center_id == data_center_id)
        host = tx.scalars(stmt).first()
        if host is None:
            raise command.fail(errors.NO_UP_HOST)
    if host.status != "up":
        raise command.fail(errors.HOST_STATUS_ILLEGAL, name=host.name, status=host.status)
    return host


def _call_failed(command: Command[Any], host: str, exc: BaseException) -> Exception:
    if isinstance(exc, HostCallError) and exc.code in LUN_NOT_FREE:
        return command.fail(errors.STORAGE_DOMAIN_LUN_NOT_FREE, why=LUN_NOT_FREE[exc.code])
    return command.fail(errors.HOST_CALL_FAILED, name=host, why=str(exc)[:300])


@dataclass
class AddStorageDomain(FlowCommand[str]):
    """``POST storagedomains``: a block domain on one free LUN, made by ``host``."""

    action: ClassVar[str] = "add"
    entity: ClassVar[str] = "Storage Domain"
    kind: ClassVar[str] = "add_storage_domain"
    conflicts: ClassVar = {("storage_domains", ("name",)): errors.NAME_ALREADY_USED}

    name: str
    wwids: list[str]
    portals: list[Portal] = field(default_factory=list)
    host_ref: str | None = None
    description: str = ""
    domain_type: str = "data"
    storage_type: str = "iscsi"
    domain_id: str = ""
    host: Candidate | None = None

    def validate(self, tx: Session, ctx: Context) -> None:
        check_name(self, self.name)
        if self.domain_type != "data":
            raise self.fail(errors.STORAGE_DOMAIN_TYPE_UNSUPPORTED, type=self.domain_type)
        if self.storage_type != "iscsi":
            raise self.fail(errors.STORAGE_TYPE_UNSUPPORTED, type=self.storage_type)
        if len(self.wwids) != 1:
            raise self.fail(errors.STORAGE_DOMAIN_ONE_LUN, count=len(self.wwids))
        if not WWID_RE.match(self.wwids[0]):
            raise self.fail(errors.LUN_ID_INVALID)
        for portal in self.portals:
            check_portal(self, portal, need_target=True)
        if tx.scalar(select(StorageDomain.id).where(StorageDomain.name == self.name)):
            raise self.fail(errors.NAME_ALREADY_USED, name=self.name)
        lun = tx.get(Lun, self.wwids[0])
        if lun is not None and lun.disk_id:
            raise self.fail(errors.LUNS_USED_BY_DISKS, luns=self.wwids[0])
        if lun is not None and lun.storage_domain_id:
            raise self.fail(errors.LUN_USED_BY_STORAGE_DOMAIN, wwid=self.wwids[0])
        if not self.portals and not tx.scalar(select(LunConnection.connection_id).where(
                LunConnection.lun_id == self.wwids[0]).limit(1)):
            raise self.fail(errors.ISCSI_MISSING_PARAMS)
        host = up_host(self, tx, self.host_ref)
        self.host = Candidate(host.id, host.name, HostAddress(host.id, host.address, host.port))

    def begin(self, tx: Session, ctx: Context) -> Flow:
        assert self.host is not None
        domain = StorageDomain(name=self.name, description=self.description, status="locked",
                               domain_type=self.domain_type, storage_type=self.storage_type)
        tx.add(domain)
        tx.flush()
        domain.storage = domain.id
        self.domain_id = domain.id
        wwid = self.wwids[0]
        lun = tx.get(Lun, wwid)
        if lun is None:
            lun = Lun(lun_id=wwid)
            tx.add(lun)
        lun.storage_domain_id = domain.id
        lun.volume_group_id = domain.id
        for portal in self.portals:
            conn = find_or_add_connection(tx, portal)
            if tx.get(LunConnection, (wwid, conn.id)) is None:
                tx.add(LunConnection(lun_id=wwid, connection_id=conn.id))
        tx.flush()
        conns.set_pins(tx, self.host.host_id, conns.domain_work_owner(domain.id),
                       domain_connections(tx, domain.id))
        return self.new_flow(None, ctx, host_id=self.host.host_id,
                             data={"domain": domain.id, "wwid": wwid})

    def perform(self, ctx: Context, flow: Flow) -> str:
        assert self.host is not None
        why = prove_sync(ctx, self.host, self.wwids)
        if why:
            raise self.fail(errors.LUN_NOT_VISIBLE_ON_HOST, wwid=self.wwids[0],
                            host=self.host.name, why=why)
        self.step(ctx, flow, "proven")
        params = {"domainID": self.domain_id, "guid": self.wwids[0],
                  "name": self.name if AGENT_NAME_RE.match(self.name) else ""}
        try:
            ctx.services.pool.call_sync(self.host.address, "StorageDomain.create", params,
                                        timeout=120)
        except (HostCallError, HostUnreachableError) as exc:
            raise _call_failed(self, self.host.name, exc) from exc
        self.step(ctx, flow, "created")
        return self.domain_id

    def finish(self, tx: Session, ctx: Context, flow: Flow, result: str) -> None:
        assert self.host is not None
        domain = tx.get(StorageDomain, result)
        assert domain is not None
        domain.status = "unattached"
        self.released = conns.drop_owner(tx, conns.domain_work_owner(result))
        record_event(tx, ctx, audit.STORAGE_DOMAIN_ADDED,
                     audit.Ids(storage_domain_id=result, host_id=self.host.host_id),
                     domain=self.name, wwid=self.wwids[0], host=self.host.name)

    def after_commit(self, ctx: Context, result: str) -> None:
        release_hosts(ctx, getattr(self, "released", []))

    def undo(self, ctx: Context, flow: Flow, error: BaseException) -> None:
        with ctx.db.transaction() as tx:
            hosts = forget_domain(tx, self.domain_id)
        release_hosts(ctx, hosts)
        if isinstance(error, CommandError) or not isinstance(error, Exception):
            return
        raise self.fail(errors.HOST_CALL_FAILED, name=self.host.name if self.host else "?",
                        why=str(error)[:300]) from error

    def failed_event(self, tx: Session, ctx: Context, flow: Flow,
                     error: BaseException) -> None:
        record_event(tx, ctx, audit.STORAGE_DOMAIN_ADD_FAILED, audit.Ids(),
                     domain=self.name, why=str(error)[:500])


def forget_domain(tx: Session, domain_id: str) -> list[str]:
    """Remove a domain's rows (its LUN becomes unknown again, its ISO disks go); the hosts
    that lost pins."""
    hosts = sorted({*conns.drop_owner(tx, conns.domain_owner(domain_id)),
                    *conns.drop_owner(tx, conns.domain_work_owner(domain_id))})
    tx.execute(delete(BaseDisk).where(BaseDisk.storage_domain_id == domain_id))
    for lun in tx.scalars(select(Lun).where(Lun.storage_domain_id == domain_id)):
        tx.delete(lun)
    tx.execute(delete(StorageDomain).where(StorageDomain.id == domain_id))
    return hosts


@dataclass
class AttachStorageDomain(Command[StorageDomain]):
    """``POST datacenters/{id}/storagedomains``: the domain joins the data center, active."""

    action: ClassVar[str] = "attach"
    entity: ClassVar[str] = "Storage Domain"

    data_center_id: str
    domain_ref: str
    touched: list[str] = field(default_factory=list)

    def validate(self, tx: Session, ctx: Context) -> None:
        if tx.get(DataCenter, self.data_center_id) is None:
            raise self.fail(errors.DATA_CENTER_NOT_FOUND)
        domain = tx.scalars(select(StorageDomain).where(or_(
            StorageDomain.id == self.domain_ref, StorageDomain.name == self.domain_ref))
            .with_for_update()).first()
        if domain is None:
            raise self.fail(errors.STORAGE_DOMAIN_NOT_FOUND)
        if domain.status != "unattached":
            raise self.fail(errors.STORAGE_DOMAIN_STATUS_ILLEGAL, name=domain.name,
                            status=domain.status)
        self.domain_ref = domain.id

    def execute(self, tx: Session, ctx: Context) -> StorageDomain:
        domain = tx.get(StorageDomain, self.domain_ref)
        assert domain is not None
        domain.data_center_id = self.data_center_id
        domain.status = "active"
        tx.flush()
        self.touched = pin_domains(tx)
        return domain

    def events(self, tx: Session, ctx: Context, result: StorageDomain) -> None:
        record_event(tx, ctx, audit.STORAGE_DOMAIN_ATTACHED,
                     audit.Ids(storage_domain_id=result.id), domain=result.name)

    def after_commit(self, ctx: Context, result: StorageDomain) -> None:
        release_hosts(ctx, self.touched)


@dataclass
class SetDomainState(Command[StorageDomain]):
    """Activate (``maintenance`` → ``active``), deactivate (``active`` → ``maintenance``) or
    detach (``maintenance`` → ``unattached``) an attached domain; hosts follow its pins."""

    entity: ClassVar[str] = "Storage Domain"
    MOVES: ClassVar[dict[str, tuple[str, str, Any]]] = {
        "activate": ("maintenance", "active", audit.STORAGE_DOMAIN_ACTIVATED),
        "deactivate": ("active", "maintenance", audit.STORAGE_DOMAIN_DEACTIVATED),
        "detach": ("maintenance", "unattached", audit.STORAGE_DOMAIN_DETACHED),
    }

    data_center_id: str
    domain_id: str
    move: str
    touched: list[str] = field(default_factory=list)

    @property
    def action(self) -> str:  # type: ignore[override]
        return self.move

    def validate(self, tx: Session, ctx: Context) -> None:
        domain = get_domain(self, tx, self.domain_id)
        if domain.data_center_id != self.data_center_id:
            raise self.fail(errors.STORAGE_DOMAIN_NOT_FOUND)
        start, _end, _event = self.MOVES[self.move]
        if domain.status != start:
            raise self.fail(errors.STORAGE_DOMAIN_STATUS_ILLEGAL, name=domain.name,
                            status=domain.status)
        if self.move == "deactivate":
            users = cd_users(tx, domain.id)
            if users:
                raise self.fail(errors.STORAGE_DOMAIN_USED_BY_VMS, vms=", ".join(users[:10]))

    def execute(self, tx: Session, ctx: Context) -> StorageDomain:
        domain = tx.get(StorageDomain, self.domain_id)
        assert domain is not None
        domain.status = self.MOVES[self.move][1]
        if domain.status == "unattached":
            domain.data_center_id = None
        tx.flush()
        self.touched = pin_domains(tx)
        return domain

    def events(self, tx: Session, ctx: Context, result: StorageDomain) -> None:
        record_event(tx, ctx, self.MOVES[self.move][2],
                     audit.Ids(storage_domain_id=result.id), domain=result.name)

    def after_commit(self, ctx: Context, result: StorageDomain) -> None:
        release_hosts(ctx, self.touched)


@dataclass
class RemoveStorageDomain(HostCommand[str]):
    """``DELETE storagedomains/{id}``: an unattached domain leaves the engine; with ``format``
    a host also removes the volume group (its LUN is free again), ``destroy`` only forgets."""

    action: ClassVar[str] = "remove"
    entity: ClassVar[str] = "Storage Domain"

    domain_id: str
    format: bool = False
    host_ref: str | None = None
    name: str = ""
    host: Candidate | None = None

    def validate(self, tx: Session, ctx: Context) -> None:
        domain = get_domain(self, tx, self.domain_id)
        self.name = domain.name
        if domain.status not in ("unattached", "maintenance"):
            raise self.fail(errors.STORAGE_DOMAIN_STATUS_ILLEGAL, name=domain.name,
                            status=domain.status)
        users = cd_users(tx, domain.id)
        if users:
            raise self.fail(errors.STORAGE_DOMAIN_USED_BY_VMS, vms=", ".join(users[:10]))
        busy = tx.scalar(select(Flow.id).where(Flow.kind == "add_storage_domain",
                                               Flow.data.like(f'%"{domain.id}"%')))
        if busy:
            raise self.fail(errors.STORAGE_DOMAIN_STATUS_ILLEGAL, name=domain.name,
                            status="locked")
        if self.format:
            host = up_host(self, tx, self.host_ref)
            self.host = Candidate(host.id, host.name,
                                  HostAddress(host.id, host.address, host.port))

    def perform(self, ctx: Context) -> str:
        if self.host is None:
            return ""
        try:
            return self._format(ctx, self.host)
        except BaseException:
            with ctx.db.transaction() as tx:  # the pin that let the host reach the LUN
                pinned = conns.drop_owner(tx, conns.domain_work_owner(self.domain_id))
            release_hosts(ctx, pinned)
            raise

    def _format(self, ctx: Context, host: Candidate) -> str:
        with ctx.db.transaction() as tx:
            conns.set_pins(tx, host.host_id, conns.domain_work_owner(self.domain_id),
                           domain_connections(tx, self.domain_id))
            wwids = domain_wwids(tx, self.domain_id)
        why = prove_sync(ctx, host, wwids)
        if why:
            raise self.fail(errors.LUN_NOT_VISIBLE_ON_HOST, wwid=", ".join(wwids),
                            host=host.name, why=why)
        try:
            ctx.services.pool.call_sync(host.address, "StorageDomain.remove",
                                        {"domainID": self.domain_id, "force": True},
                                        timeout=120)
        except HostCallError as exc:
            if exc.code != NO_SUCH_DOMAIN:
                raise _call_failed(self, host.name, exc) from exc
        except HostUnreachableError as exc:
            raise _call_failed(self, host.name, exc) from exc
        return host.host_id

    def record(self, tx: Session, ctx: Context, found: Any) -> str:
        self.released = forget_domain(tx, self.domain_id)
        return self.domain_id

    def events(self, tx: Session, ctx: Context, result: str) -> None:
        record_event(tx, ctx, audit.STORAGE_DOMAIN_REMOVED, audit.Ids(storage_domain_id=None),
                     domain=self.name, how="formatted" if self.format else "forgotten")

    def after_commit(self, ctx: Context, result: str) -> None:
        release_hosts(ctx, getattr(self, "released", []))
