"""iSCSI discovery and login from a chosen host (``hosts/{id}/iscsidiscover``,
``discoveriscsi``, ``iscsilogin``).

A login stores the connection once per distinct target details (the database's unique
constraint; the same details again reuse the row, a new CHAP password replaces the old) and
pins it to the host as ``login``; the reconciler then connects the host. A login that fails
leaves no pin, so nothing keeps retrying it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Command, Context, record_event
from virtyard.engine.commands.flow import HostCommand
from virtyard.engine.commands.hosts import get_host, valid_address
from virtyard.engine.db.models import HostConnectionPin, StorageServerConnection
from virtyard.engine.hosts import connections as conns
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostUnreachableError

IQN_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[^\s]{1,200}|eui\.[0-9A-Fa-f]{16}"
                    r"|naa\.[0-9A-Fa-f]{16,32})$")
DEFAULT_PORT = 3260
CHAP_FAILED = 476


@dataclass(frozen=True)
class Portal:
    """A target as a user names it: address, port, IQN, portal group, CHAP."""

    address: str
    port: int = DEFAULT_PORT
    target: str = ""
    portal: str = "1"
    user: str = ""
    password: str = ""

    def __repr__(self) -> str:  # never show the password
        return f"Portal({self.address}:{self.port} {self.target} user={self.user!r})"


def check_portal(command: Command[Any], portal: Portal, *, need_target: bool) -> None:
    if not portal.address or (need_target and not portal.target):
        raise command.fail(errors.ISCSI_MISSING_PARAMS)
    if not valid_address(portal.address):
        raise command.fail(errors.HOST_ADDRESS_INVALID, address=portal.address[:255])
    if not 1 <= portal.port <= 65535:
        raise command.fail(errors.PORT_INVALID, port=portal.port)
    if portal.target and not IQN_RE.match(portal.target):
        raise command.fail(errors.ISCSI_TARGET_INVALID, target=portal.target[:255])
    if len(portal.user) > 255 or len(portal.password) > 255 or not portal.portal.isdigit():
        raise command.fail(errors.ISCSI_MISSING_PARAMS)


def find_or_add_connection(tx: Session, portal: Portal) -> StorageServerConnection:
    """The connection row for these details: found, or added (race-safe)."""
    details = (StorageServerConnection.storage_type == "iscsi",
               StorageServerConnection.connection == portal.address,
               StorageServerConnection.port == portal.port,
               StorageServerConnection.iqn == portal.target,
               StorageServerConnection.portal == portal.portal,
               StorageServerConnection.user_name == portal.user)
    found = tx.scalars(select(StorageServerConnection).where(*details)).first()
    if found is None:
        try:
            with tx.begin_nested():
                found = StorageServerConnection(
                    storage_type="iscsi", connection=portal.address, port=portal.port,
                    iqn=portal.target, portal=portal.portal, user_name=portal.user,
                    password=portal.password)
                tx.add(found)
        except IntegrityError:  # another request added it just now
            found = tx.scalars(select(StorageServerConnection).where(*details)).one()
    if portal.password and found.password != portal.password:
        found.password = portal.password
    return found


@dataclass
class DiscoverTargets(HostCommand[list[dict[str, Any]]]):
    """SendTargets discovery through a host: every target at a portal."""

    action: ClassVar[str] = "discover targets on"
    entity: ClassVar[str] = "Host"

    host_id: str
    portal: Portal
    host: HostAddress | None = None

    def validate(self, tx: Session, ctx: Context) -> None:
        check_portal(self, self.portal, need_target=False)
        host = get_host(self, tx, self.host_id, for_update=False)
        if host.status != "up":
            raise self.fail(errors.HOST_STATUS_ILLEGAL, name=host.name, status=host.status)
        self.host = HostAddress(host.id, host.address, host.port)

    def perform(self, ctx: Context) -> list[dict[str, Any]]:
        assert self.host is not None
        params: dict[str, Any] = {"host": self.portal.address, "port": self.portal.port}
        if self.portal.user:
            params.update(user=self.portal.user, password=self.portal.password)
        try:
            found = ctx.services.pool.call_sync(self.host, "ISCSIConnection.discoverSendTargets",
                                                params)
        except (HostCallError, HostUnreachableError) as exc:
            raise self.fail(errors.ISCSI_DISCOVERY_FAILED,
                            portal=f"{self.portal.address}:{self.portal.port}",
                            why=str(exc)[:300]) from exc
        return [parse_send_target(str(line)) for line in found if isinstance(line, str)]

    def record(self, tx: Session, ctx: Context, found: Any) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = found
        return targets

    def events(self, tx: Session, ctx: Context, result: list[dict[str, Any]]) -> None:
        record_event(tx, ctx, audit.ISCSI_DISCOVERED, audit.Ids(host_id=self.host_id),
                     portal=f"{self.portal.address}:{self.portal.port}", count=len(result))


def parse_send_target(line: str) -> dict[str, Any]:
    """``"127.0.0.1:3260,1 iqn.…"`` → address, port, portal (group), target."""
    where, _, iqn = line.partition(" ")
    hostport, _, tpgt = where.partition(",")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    return {"address": host, "port": int(port) if port.isdigit() else DEFAULT_PORT,
            "portal": tpgt or "1", "target": iqn.strip()}


@dataclass
class IscsiLogin(HostCommand[StorageServerConnection]):
    """Log a host in to a target and keep it logged in (pinned as ``login``)."""

    action: ClassVar[str] = "log in to a target from"
    entity: ClassVar[str] = "Host"

    host_id: str
    portal: Portal
    host: HostAddress | None = None
    host_name: str = ""

    def validate(self, tx: Session, ctx: Context) -> None:
        check_portal(self, self.portal, need_target=True)
        host = get_host(self, tx, self.host_id, for_update=False)
        if host.status != "up":
            raise self.fail(errors.HOST_STATUS_ILLEGAL, name=host.name, status=host.status)
        self.host = HostAddress(host.id, host.address, host.port)
        self.host_name = host.name

    def perform(self, ctx: Context) -> str:
        assert self.host is not None
        with ctx.db.transaction() as tx:
            conn = find_or_add_connection(tx, self.portal)
            if tx.get(HostConnectionPin, (self.host_id, conn.id, conns.LOGIN)) is None:
                tx.add(HostConnectionPin(host_id=self.host_id, connection_id=conn.id,
                                         owner=conns.LOGIN))
            conn_id = conn.id
        result = ctx.services.connections.reconcile_sync(self.host)
        if conn_id in result.failed:
            with ctx.db.transaction() as tx:
                tx.execute(delete(HostConnectionPin).where(
                    HostConnectionPin.host_id == self.host_id,
                    HostConnectionPin.connection_id == conn_id,
                    HostConnectionPin.owner == conns.LOGIN))
            why = result.failed[conn_id]
            key = errors.ISCSI_CHAP_FAILED if str(CHAP_FAILED) in why \
                else errors.ISCSI_LOGIN_FAILED
            raise self.fail(key, target=self.portal.target, why=why)
        return conn_id

    def record(self, tx: Session, ctx: Context, found: Any) -> StorageServerConnection:
        conn = tx.get(StorageServerConnection, found)
        assert conn is not None
        return conn

    def events(self, tx: Session, ctx: Context, result: StorageServerConnection) -> None:
        record_event(tx, ctx, audit.ISCSI_LOGGED_IN, audit.Ids(host_id=self.host_id),
                     host=self.host_name, target=result.iqn,
                     portal=f"{result.connection}:{result.port}")
