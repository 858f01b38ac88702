"""Virtyard guest (see docs/ARCHITECTURE.md)."""
