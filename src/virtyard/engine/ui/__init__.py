"""The engine's web UI: server-rendered pages and htmx fragments on the engine's own commands
and queries (see docs/ARCHITECTURE.md, "The web UI")."""
