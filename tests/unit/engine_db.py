"""A migrated engine database in a temporary folder, for unit tests (SQLite)."""

from __future__ import annotations

from pathlib import Path

from virtyard.engine.commands.base import ADMIN, READONLY, Context, Principal
from virtyard.engine.db.database import Database

ADMIN_USER = Principal("u-admin", "admin@internal", ADMIN)
VIEWER = Principal("u-viewer", "viewer@internal", READONLY)


def migrated(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'engine.db'}")
    db.migrate()
    return db


def context(db: Database, principal: Principal = ADMIN_USER) -> Context:
    return Context(db, principal, None)
