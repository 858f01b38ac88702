"""Virtyard engine (see docs/ARCHITECTURE.md)."""
