"""Which storage server connections each host must keep, and making the hosts agree.

The database says why a host needs a connection (``host_connection_pins``: one row per owner,
``login`` or ``vm:<id>``); those rows are the reference counts. :class:`ConnectionReconciler`
compares them with what the host's agent really keeps (``StoragePool.getConnections``) and
connects what is missing and disconnects what nothing needs — level-triggered, like a
Kubernetes controller, so it is correct after any flow, any failed call and any crash, however
the two came to disagree. Connections the engine does not know (made by hand on the host) are
never touched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio.from_thread
import anyio.to_thread
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from virtyard.engine.db.database import Database
from virtyard.engine.db.models import (
    BaseDisk,
    DiskVmElement,
    HostConnectionPin,
    Lun,
    LunConnection,
    StorageServerConnection,
    VmDevice,
)
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostPool, HostUnreachableError

log = logging.getLogger("virtyard.engine.connections")

LOGIN = "login"
ISCSI_DOMAIN = 3


def vm_owner(vm_id: str) -> str:
    return f"vm:{vm_id}"


def domain_owner(domain_id: str) -> str:
    """The pins by which every Up host of its data center reaches an active storage domain
    (managed as a whole by ``pin_domains``)."""
    return f"sd:{domain_id}"


def domain_work_owner(domain_id: str) -> str:
    """The pin of one host while it makes or formats a domain's volume group: a flow's own,
    which ``pin_domains`` never touches (it would drop it: the domain is not active)."""
    return f"sd-work:{domain_id}"


def lun_connection_ids(tx: Session, lun_ids: Iterable[str]) -> set[str]:
    """The connections that reach these LUNs."""
    ids = list(set(lun_ids))
    if not ids:
        return set()
    return set(tx.scalars(select(LunConnection.connection_id)
                          .where(LunConnection.lun_id.in_(ids))))


def vm_lun_ids(tx: Session, vm_id: str, *, plugged_only: bool = True) -> list[str]:
    """The WWIDs of the VM's LUN disks (those plugged, by default)."""
    stmt = (select(Lun.lun_id)
            .join(BaseDisk, BaseDisk.id == Lun.disk_id)
            .join(DiskVmElement, DiskVmElement.disk_id == BaseDisk.id)
            .where(DiskVmElement.vm_id == vm_id))
    if plugged_only:
        stmt = stmt.join(VmDevice, (VmDevice.device_id == BaseDisk.id)
                         & (VmDevice.vm_id == vm_id)).where(VmDevice.is_plugged.is_(True))
    return sorted(set(tx.scalars(stmt)))


def set_pins(tx: Session, host_id: str, owner: str, connection_ids: Iterable[str]) -> None:
    """Make ``owner``'s pins on ``host_id`` exactly ``connection_ids``."""
    wanted = set(connection_ids)
    have = set(tx.scalars(select(HostConnectionPin.connection_id).where(
        HostConnectionPin.host_id == host_id, HostConnectionPin.owner == owner)))
    if have - wanted:
        tx.execute(delete(HostConnectionPin).where(
            HostConnectionPin.host_id == host_id, HostConnectionPin.owner == owner,
            HostConnectionPin.connection_id.in_(have - wanted)))
    for connection_id in sorted(wanted - have):
        tx.add(HostConnectionPin(host_id=host_id, connection_id=connection_id, owner=owner))


def drop_owner(tx: Session, owner: str, *, except_host: str | None = None) -> list[str]:
    """Remove every pin of ``owner`` (but on ``except_host``); the hosts that lost pins."""
    stmt = select(HostConnectionPin.host_id).where(HostConnectionPin.owner == owner)
    if except_host is not None:
        stmt = stmt.where(HostConnectionPin.host_id != except_host)
    hosts = sorted(set(tx.scalars(stmt)))
    if hosts:
        tx.execute(delete(HostConnectionPin).where(HostConnectionPin.owner == owner,
                                                   HostConnectionPin.host_id.in_(hosts)))
    return hosts


def agent_params(conn: StorageServerConnection, *, with_secret: bool = True) -> dict[str, Any]:
    """The agent's connectStorageServer parameters for a connection (the CHAP password goes
    only to the agent, over mutual TLS)."""
    params: dict[str, Any] = {"id": conn.id, "connection": conn.connection, "port": conn.port,
                              "iqn": conn.iqn, "user": conn.user_name}
    if conn.portal.isdigit():
        params["tpgt"] = int(conn.portal)
    if with_secret and conn.password:
        params["password"] = conn.password
    return params


@dataclass
class ReconcileResult:
    """What a reconcile did on one host, and which needed connections failed (id → why)."""

    connected: list[str] = field(default_factory=list)
    disconnected: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


class ConnectionReconciler:
    """Makes a host keep exactly the connections its pins ask for."""

    def __init__(self, db: Database, pool: HostPool) -> None:
        self.db = db
        self.pool = pool
        self._locks: dict[str, asyncio.Lock] = {}

    def _desired(self, host_id: str) -> tuple[dict[str, StorageServerConnection], set[str]]:
        with self.db.read() as tx:
            rows = tx.scalars(
                select(StorageServerConnection)
                .join(HostConnectionPin,
                      HostConnectionPin.connection_id == StorageServerConnection.id)
                .where(HostConnectionPin.host_id == host_id)).unique().all()
            known = set(tx.scalars(select(StorageServerConnection.id)))
        return {c.id: c for c in rows}, known

    async def reconcile(self, host: HostAddress) -> ReconcileResult:
        """Connect what the host's pins need, disconnect what no pin needs (ours only)."""
        lock = self._locks.setdefault(host.host_id, asyncio.Lock())
        async with lock:
            desired, known = await anyio.to_thread.run_sync(self._desired, host.host_id)
            kept = await self.pool.call(host, "StoragePool.getConnections")
            actual = {k["id"]: k for k in kept if isinstance(k, dict) and "id" in k}
            result = ReconcileResult()
            missing = [c for cid, c in desired.items() if cid not in actual]
            if missing:
                statuses = await self._connect(host, missing)
                for conn in missing:
                    status = statuses.get(conn.id, "no status")
                    if status == "0":
                        result.connected.append(conn.id)
                    else:
                        result.failed[conn.id] = status
            extra = [actual[cid] for cid in actual if cid in known and cid not in desired]
            for kept_conn in extra:
                refs = max(1, int(kept_conn.get("refs", 1)))
                params = {k: kept_conn[k] for k in ("id", "connection", "port", "iqn", "tpgt",
                                                    "user") if k in kept_conn}
                try:
                    for _ in range(refs):
                        await self.pool.call(host, "StoragePool.disconnectStorageServer",
                                             {"domainType": ISCSI_DOMAIN,
                                              "connectionParams": [params]})
                    result.disconnected.append(str(kept_conn["id"]))
                except HostCallError as exc:  # it stays; the next reconcile tries again
                    log.warning("host %s: disconnecting %s failed: %s", host.address,
                                kept_conn["id"], exc)
            if result.connected or result.disconnected or result.failed:
                log.info("host %s: connected %s, disconnected %s, failed %s", host.address,
                         result.connected, result.disconnected, list(result.failed))
            return result

    async def _connect(self, host: HostAddress,
                       conns: list[StorageServerConnection]) -> dict[str, str]:
        try:
            statuses = await self.pool.call(
                host, "StoragePool.connectStorageServer",
                {"domainType": ISCSI_DOMAIN,
                 "connectionParams": [agent_params(c) for c in conns]})
        except HostCallError as exc:
            return {c.id: f"{exc.code} {exc.message}" for c in conns}
        out: dict[str, str] = {}
        for entry in statuses if isinstance(statuses, list) else []:
            if isinstance(entry, dict) and "id" in entry:
                code = entry.get("status")
                out[str(entry["id"])] = "0" if code == 0 else f"status {code}"
        return out

    def reconcile_sync(self, host: HostAddress) -> ReconcileResult:
        """:meth:`reconcile` from a worker thread (commands, flows)."""
        async def go() -> ReconcileResult:
            return await self.reconcile(host)
        return anyio.from_thread.run(go)

    async def reconcile_quietly(self, host: HostAddress) -> ReconcileResult | None:
        """Reconcile, logging (not raising) when the host cannot be reached."""
        try:
            return await self.reconcile(host)
        except (HostUnreachableError, HostCallError) as exc:
            log.info("host %s: connections not reconciled now: %s", host.address, exc)
            return None
