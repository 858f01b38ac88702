"""Migrated engine databases for unit tests: SQLite in a temporary folder, and PostgreSQL
(one throwaway server for the session, a fresh database per test), so that the database's
own rules are proven on both."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtyard.engine.commands.base import ADMIN, READONLY, Context, Principal
from virtyard.engine.db.database import Database
from virtyard.lab.postgres import PostgresServer

ADMIN_USER = Principal("u-admin", "admin@internal", ADMIN)
VIEWER = Principal("u-viewer", "viewer@internal", READONLY)
PG_PORT = 15632 + int(os.environ.get("VIRTYARD_TEST_PORT_OFFSET", "0"))
_names = itertools.count(1)


def migrated(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'engine.db'}")
    db.migrate()
    return db


def context(db: Database, principal: Principal = ADMIN_USER) -> Context:
    return Context(db, principal, None)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer(PG_PORT) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated engine database, on each of the two the engine supports."""
    if request.param == "sqlite":
        db = migrated(tmp_path)
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        db = Database(server.create_database(f"unit{next(_names)}"))
        db.migrate()
    yield db
    db.dispose()
