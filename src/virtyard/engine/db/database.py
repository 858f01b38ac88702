"""One :class:`Database` per engine: the SQLAlchemy engine, sessions, transactions, migrations.

SQLite (embedded, the default) and PostgreSQL (production) behave alike here: every unit of
work is one transaction (:meth:`Database.transaction`), and a transaction that reads a row and
then changes it cannot lose another's update. On PostgreSQL, commands lock the rows they change
(``SELECT … FOR UPDATE``). On SQLite (WAL, foreign keys on, busy timeout) write transactions
start with ``BEGIN IMMEDIATE`` and so run one at a time, while reads (:meth:`Database.read`, a
second engine with plain ``BEGIN``) go on beside them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.orm import Session, sessionmaker

from virtyard.engine.db.models import Base

log = logging.getLogger("virtyard.engine.db")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # We say when transactions begin (see _sqlite_begin), not the sqlite3 module, which would
    # begin only at the first write and so let a read-then-write lose another's update.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    # LIKE compares case as on PostgreSQL; searches ask for case-insensitivity explicitly.
    cursor.execute("PRAGMA case_sensitive_like=ON")
    cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_begin_deferred(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN")


class Database:
    """The engine's database at ``url`` (``sqlite:///path`` or ``postgresql+psycopg://…``)."""

    def __init__(self, url: str, *, echo: bool = False, pool_size: int = 20) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.is_sqlite:
            # As many pooled connections as request threads: a connection opened per request
            # (and its PRAGMAs and schema load) costs more than the request's own queries.
            kwargs.update(connect_args={"check_same_thread": False, "timeout": 30},
                          pool_size=2 * pool_size, max_overflow=pool_size)
        else:
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        self.engine: Engine = create_engine(url, **kwargs)
        self.read_engine: Engine = self.engine
        if self.is_sqlite:
            self.read_engine = create_engine(url, **kwargs)
            for engine, begin in ((self.engine, _sqlite_begin_immediate),
                                  (self.read_engine, _sqlite_begin_deferred)):
                event.listen(engine, "connect", _sqlite_pragmas)
                event.listen(engine, "begin", begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._readers = sessionmaker(self.read_engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading (its transaction is rolled back at the end)."""
        with self._readers() as session:
            yield session

    def migrate(self) -> None:
        """Bring the schema to the newest migration (a no-op when it is current)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def table_names(self) -> list[str]:
        return sorted(inspect(self.engine).get_table_names())

    def dispose(self) -> None:
        self.engine.dispose()
        self.read_engine.dispose()


__all__ = ["Base", "Database"]
