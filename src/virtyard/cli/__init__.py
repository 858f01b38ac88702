"""``virtyard``: the command-line client of the engine's REST API (see ``main``, docs/cli.md)."""
