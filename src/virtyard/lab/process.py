"""The lab's processes: daemons started and stopped by pid file, waits with a deadline.

Tools are run through :mod:`virtyard.common.process` (re-exported here for the lab's modules).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from virtyard.common.process import PACKAGE_OF, mask, require, run
from virtyard.lab.errors import ServiceStartError

# busybox-static installs /bin/busybox; the lab needs the static one for the guest.
STATIC_BUSYBOX = Path("/bin/busybox")


def pid_alive(pid: int) -> bool:
    """True when a process with ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state != "Z"


def read_pid(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` if that process still runs, else ``None``."""
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def terminate(pid: int, *, grace: float = 10.0) -> None:
    """SIGTERM ``pid``, wait up to ``grace`` seconds, then SIGKILL; return once it is gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                _reap(pid)
                return
            time.sleep(0.05)
    _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def wait_until(predicate: Callable[[], bool], *, timeout: float,
               interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` seconds pass; return the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def start_daemon(argv: list[str], *, pidfile: Path, log: Path, ready: Callable[[], bool],
                 timeout: float, what: str) -> int:
    """Start a foreground daemon in its own session, its pid in ``pidfile`` and its output in
    ``log``; return its pid once ``ready()`` holds. On failure nothing is left running and
    :class:`ServiceStartError` carries the log's last lines."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    pidfile.write_text(str(proc.pid))
    if not wait_until(lambda: proc.poll() is None and ready(), timeout=timeout):
        terminate(proc.pid, grace=2)
        pidfile.unlink(missing_ok=True)
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise ServiceStartError(f"{what} did not start: {' | '.join(tail) or 'no output'}")
    return proc.pid


__all__ = ["PACKAGE_OF", "mask", "require", "run"]
