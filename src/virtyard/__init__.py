"""Virtyard: a virtualization manager for virtual machines on SAN storage."""

__version__ = "0.1.0"
