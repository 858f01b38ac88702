"""The engine's long-lived parts, built once at start and handed to every request and flow."""

from __future__ import annotations

import datetime
import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from sqlalchemy import func, select

from virtyard.engine import audit
from virtyard.engine.auth import Authenticator
from virtyard.engine.commands.base import ADMIN
from virtyard.engine.commands.storage_domains import pin_domains
from virtyard.engine.config import EngineConfig
from virtyard.engine.db.database import Database
from virtyard.engine.db.models import User
from virtyard.engine.hosts.connections import ConnectionReconciler
from virtyard.engine.hosts.heartbeat import Heartbeat
from virtyard.engine.hosts.pool import HostAddress, HostPool
from virtyard.host.client import ClientTls

log = logging.getLogger("virtyard.engine")

ADMIN_LOGIN = "admin@internal"


@dataclass
class Services:
    config: EngineConfig
    db: Database
    auth: Authenticator
    pool: HostPool
    heartbeat: Heartbeat
    connections: ConnectionReconciler
    monitor: Any = None  # monitoring.loop.Monitor, made on the event loop (server.py)
    extra: dict[str, Any] = field(default_factory=dict)

    def record_event(self, kind: audit.EventType, values: dict[str, object]) -> None:
        with self.db.transaction() as tx:
            audit.record(tx, kind, **values)  # type: ignore[arg-type]


def build_services(config: EngineConfig, db: Database) -> Services:
    auth = Authenticator(db, token_lifetime=datetime.timedelta(
        minutes=config.auth.token_lifetime_minutes))
    tls = ClientTls(cert=config.hosts.cert, key=config.hosts.key, ca=config.hosts.ca)
    pool = HostPool(tls, timeout=config.hosts.call_timeout,
                    connect_timeout=config.hosts.connect_timeout,
                    per_host=config.hosts.per_host_connections,
                    total=config.hosts.max_concurrent_calls)
    heartbeat = Heartbeat(db, pool, interval=config.heartbeat.interval,
                          misses=config.heartbeat.misses, timeout=config.heartbeat.timeout,
                          concurrency=config.heartbeat.concurrency)
    connections = ConnectionReconciler(db, pool)

    async def pin_active_domains(host: HostAddress) -> None:
        """A host that comes up keeps the active storage domains' connections too."""
        def pin() -> None:
            with db.transaction() as tx:
                pin_domains(tx, host.host_id)
        await anyio.to_thread.run_sync(pin)

    heartbeat.on_up.append(pin_active_domains)
    heartbeat.on_up.append(connections.reconcile_quietly)
    return Services(config, db, auth, pool, heartbeat, connections)


def ensure_admin(services: Services) -> None:
    """Create admin@internal at first start (see ``AuthConfig``); never log the password."""
    with services.db.read() as tx:
        if tx.scalar(select(func.count()).select_from(User)):
            return
    config = services.config
    password = os.environ.get("VIRTYARD_ENGINE_ADMIN_PASSWORD", "")
    if not password and config.auth.admin_password_file is not None:
        password = config.auth.admin_password_file.read_text().strip()
    if not password:
        password = secrets.token_urlsafe(18)
        path = config.state_dir / "admin-password"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        log.warning("created %s; its password is in %s (readable by root only)",
                    ADMIN_LOGIN, path)
    services.auth.add_user(ADMIN_LOGIN, password, ADMIN)
    with services.db.transaction() as tx:
        audit.record(tx, audit.USER_ADDED, name=ADMIN_LOGIN)
