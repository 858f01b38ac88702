"""Loopback port checks: the lab binds only to 127.0.0.1 and names a busy port clearly."""

from __future__ import annotations

import socket

from virtyard.lab.errors import PortBusyError

LOOPBACK = "127.0.0.1"


def port_is_free(port: int) -> bool:
    """True when nothing listens on, or holds, ``127.0.0.1:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def ensure_free(port: int, purpose: str) -> None:
    """Raise :class:`PortBusyError` naming ``port`` and what the lab wanted it for."""
    if not port_is_free(port):
        raise PortBusyError(port, purpose)


def port_is_listening(port: int) -> bool:
    """True when a TCP connect to ``127.0.0.1:port`` succeeds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0
