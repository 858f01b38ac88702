"""Virtyard host (see docs/ARCHITECTURE.md)."""
