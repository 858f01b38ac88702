"""Run system tools with typed failures and bounded time.

A thin layer over :mod:`subprocess`: every lab wrapper (tgtadm, libvirtd, apt-get, …) calls
:func:`run`, so a failing tool always surfaces as :class:`CommandError` naming the command.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from virtyard.lab.errors import CommandError, MissingPackageError, ServiceStartError

# Program -> Debian package that provides it; used to name the package in errors.
PACKAGE_OF: dict[str, str] = {
    "tgtd": "tgt",
    "tgtadm": "tgt",
    "libvirtd": "libvirt-daemon",
    "virsh": "libvirt-clients",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "qemu-storage-daemon": "qemu-system-x86",
    "iscsi-ls": "libiscsi-bin",
    "lvm": "lvm2",
    "pvcreate": "lvm2",
    "genisoimage": "genisoimage",
    "cpio": "cpio",
    "udevadm": "udev",
    "unshare": "util-linux",
    "losetup": "util-linux",
    "mount": "mount",
    "useradd": "passwd",
    "groupadd": "passwd",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
}

# busybox-static installs /bin/busybox; the lab needs the static one for the guest.
STATIC_BUSYBOX = Path("/bin/busybox")


def require(program: str) -> str:
    """Return the absolute path of ``program`` or raise :class:`MissingPackageError`."""
    path = shutil.which(program)
    if path is None:
        raise MissingPackageError(program, PACKAGE_OF.get(program, program))
    return path


def run(
    argv: list[str],
    *,
    timeout: float = 60.0,
    check: bool = True,
    input_text: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    secrets: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion and return its result; raise :class:`CommandError` on failure.

    Every string in ``secrets`` (a CHAP password, say) is masked in the error raised.
    """
    exe = require(argv[0]) if "/" not in argv[0] else argv[0]
    full = [exe, *argv[1:]]
    try:
        proc = subprocess.run(
            full,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        # from None: the original exception carries the unmasked argv (passwords)
        raise CommandError(mask(argv, secrets), -1, f"timed out after {timeout:g} s") from None
    if check and proc.returncode != 0:
        output = proc.stderr or proc.stdout
        for secret in secrets:
            output = output.replace(secret, "***") if secret else output
        raise CommandError(mask(argv, secrets), proc.returncode, output)
    return proc


def mask(argv: list[str], secrets: tuple[str, ...]) -> list[str]:
    """``argv`` with every secret replaced by ``***``, fit for logs and error messages."""
    masked = []
    for arg in argv:
        text = arg
        for secret in secrets:
            if secret:
                text = text.replace(secret, "***")
        masked.append(text)
    return masked


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
