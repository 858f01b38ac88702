"""One libvirt connection per agent, opened lazily and reopened after libvirtd restarts.

libvirt-python connections are thread-safe; every verb shares this one. A call that fails
because the daemon went away gets a fresh connection once and is retried.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import libvirt

log = logging.getLogger("virtyard.host.virt")

T = TypeVar("T")

_CONNECTION_LOST = {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR,
                    libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN}


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt-python prints every error to stderr by default; we log what matters ourselves."""


def quiet_libvirt_errors() -> None:
    """Stop libvirt-python printing each error to stderr (they surface as exceptions)."""
    libvirt.registerErrorHandler(_quiet, None)


quiet_libvirt_errors()


class LibvirtConnection:
    """The agent's connection to its host's libvirtd."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._lock = threading.Lock()
        self._conn: libvirt.virConnect | None = None
        self._failing = False  # the last open failed: pollers retry often, say it once

    def get(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is None or not self._conn.isAlive():
                if not self._failing:
                    log.info("connecting to %s", self.uri)
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError:
                    self._failing = True
                    raise
                if self._failing:
                    log.info("connected to %s again", self.uri)
                self._failing = False
            return self._conn

    def call(self, fn: Callable[[libvirt.virConnect], T]) -> T:
        """``fn(conn)``, retried once on a fresh connection if the old one was lost."""
        conn = self.get()
        try:
            return fn(conn)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in _CONNECTION_LOST or conn.isAlive():
                raise
            with self._lock:
                self._conn = None
            return fn(self.get())

    def lookup(self, vm_id: str) -> libvirt.virDomain | None:
        """The domain with UUID ``vm_id`` on this host, or ``None``."""
        def find(conn: libvirt.virConnect) -> libvirt.virDomain | None:
            try:
                return conn.lookupByUUIDString(vm_id)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
        return self.call(find)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
