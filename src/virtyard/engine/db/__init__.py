"""The engine's database: tables (``models``), sessions and transactions (``database``),
schema migrations (``migrations/``, Alembic, applied at engine start)."""
