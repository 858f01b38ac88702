"""The iSCSI connections the engine asked this host to keep, reference-counted and persisted.

``connectStorageServer`` with an id takes a reference; ``disconnectStorageServer`` drops one.
A session (target at a portal) is logged out only when no connection id uses it any more.
The registry is written to the agent's state directory (mode 0600: it holds CHAP passwords, the
way open-iscsi's node database does) so an agent restart neither forgets nor invents a user.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtyard.host.storage.initiator import Chap, Connection, Portal, Secret


@dataclass
class _Entry:
    connection: Connection
    refs: int


def _to_json(c: Connection) -> dict[str, Any]:
    return {"id": c.id, "host": c.portal.host, "port": c.portal.port, "iqn": c.iqn,
            "tpgt": c.tpgt, "initiator_name": c.initiator_name,
            "user": c.chap.username if c.chap else None,
            "password": str(c.chap.password) if c.chap else None}


def _from_json(raw: dict[str, Any]) -> Connection:
    chap = Chap(raw["user"], Secret(raw["password"])) if raw.get("user") else None
    return Connection(id=raw["id"], portal=Portal(raw["host"], int(raw["port"])), iqn=raw["iqn"],
                      tpgt=int(raw["tpgt"]), chap=chap, initiator_name=raw.get("initiator_name"))


class ConnectionRegistry:
    """Thread-safe map of connection id -> (connection, reference count)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        if path.exists():
            for raw in json.loads(path.read_text()):
                self._entries[raw["connection"]["id"]] = _Entry(
                    _from_json(raw["connection"]), int(raw["refs"]))

    def add(self, connection: Connection) -> None:
        """Take one reference on ``connection.id`` (replacing its parameters)."""
        with self._lock:
            entry = self._entries.get(connection.id)
            refs = entry.refs + 1 if entry else 1
            self._entries[connection.id] = _Entry(connection, refs)
            self._save()

    def release(self, connection_id: str) -> tuple[Connection | None, bool]:
        """Drop one reference; returns the connection and whether its session is now unused."""
        with self._lock:
            entry = self._entries.get(connection_id)
            if entry is None:
                return None, False
            entry.refs -= 1
            if entry.refs <= 0:
                del self._entries[connection_id]
            key = entry.connection.session_key()
            unused = all(e.connection.session_key() != key for e in self._entries.values())
            self._save()
            return entry.connection, unused

    def get(self, connection_id: str) -> Connection | None:
        with self._lock:
            entry = self._entries.get(connection_id)
            return entry.connection if entry else None

    def refs(self, connection_id: str) -> int:
        with self._lock:
            entry = self._entries.get(connection_id)
            return entry.refs if entry else 0

    def all(self) -> list[Connection]:
        """Every connection with at least one reference."""
        with self._lock:
            return [e.connection for e in self._entries.values()]

    def _save(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([{"connection": _to_json(e.connection), "refs": e.refs}
                       for e in self._entries.values()], f)
        tmp.replace(self._path)
