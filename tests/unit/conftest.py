"""Fixtures of the unit tests: engine databases on SQLite and PostgreSQL (``engine_db``)."""

from engine_db import any_db, postgres

__all__ = ["any_db", "postgres"]
