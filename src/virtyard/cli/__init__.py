"""Virtyard cli (see docs/ARCHITECTURE.md)."""
