"""A lab daemon that serves one TCP port: its pid file, start (config first, ready once the
port listens) and stop (until the port is free again). The host agents and the engine are
both run this way."""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from pathlib import Path

from virtyard.lab import ports
from virtyard.lab.process import read_pid, start_daemon, terminate, wait_until


class PortDaemon(ABC):
    """Subclasses say where it lives (``root``, ``port``), what it runs and how it is named."""

    root: Path
    port: int
    pid_name: str = "daemon.pid"
    log_name: str = "daemon.log"

    @property
    def pidfile(self) -> Path:
        return self.root / self.pid_name

    @property
    def log_path(self) -> Path:
        return self.root / self.log_name

    @abstractmethod
    def module_args(self) -> list[str]:
        """``-m module …`` arguments after the Python interpreter."""

    @abstractmethod
    def write_config(self) -> None:
        """Write the configuration the next start reads."""

    @property
    @abstractmethod
    def what(self) -> str:
        """Its name in messages, e.g. 'engine on port 15470'."""

    def pid(self) -> int | None:
        return read_pid(self.pidfile)

    def is_running(self) -> bool:
        return self.pid() is not None

    def start(self, timeout: float = 30.0) -> None:
        """Start it (no-op when it runs) and wait until its port listens."""
        if self.is_running():
            return
        ports.ensure_free(self.port, self.what)
        self.write_config()
        start_daemon([sys.executable, *self.module_args()], pidfile=self.pidfile,
                     log=self.log_path, timeout=timeout,
                     ready=lambda: ports.port_is_listening(self.port), what=self.what)

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            terminate(pid, grace=10)
        self.pidfile.unlink(missing_ok=True)
        # The kernel closes a killed server's sockets a moment after the process is gone.
        wait_until(lambda: ports.port_is_free(self.port), timeout=10)
