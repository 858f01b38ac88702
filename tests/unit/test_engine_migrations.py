"""The Alembic migrations build exactly the tables the models describe, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select

from virtyard.engine.db.database import Database
from virtyard.engine.db.models import DEFAULT_CLUSTER_ID, Base, Cluster


def test_migrations_match_the_models(any_db: Database) -> None:
    with any_db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    any_db.migrate()  # a second run is a no-op
    with any_db.read() as tx:
        assert tx.scalars(select(Cluster.id)).all() == [DEFAULT_CLUSTER_ID]
