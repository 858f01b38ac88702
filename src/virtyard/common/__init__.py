"""Pieces the engine and the host agent share (certificates, …)."""
