"""Run system tools with typed failures and bounded time — the one subprocess runner.

A thin layer over :mod:`subprocess`: the host agent's tool wrappers (iscsiadm, multipath, LVM,
the LUN-device helper's qemu-storage-daemon, losetup and umount) and the lab's tools (tgtadm,
libvirtd, apt-get, ...) call :func:`run`, so a failing tool always surfaces as
:class:`CommandError` naming the command (secrets masked), and a missing one as
:class:`MissingPackageError` naming its Debian package. It lives here, not in the lab, because
production code never imports the lab.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


class ToolError(Exception):
    """Base of every failure here; ``code`` is stable and machine-readable."""

    code = "lab-error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class MissingPackageError(ToolError):
    """A program the lab needs is not installed; names the Debian package and how to get it."""

    code = "missing-package"

    def __init__(self, program: str, package: str, *more: tuple[str, str]) -> None:
        missing = [(program, package), *more]
        names = ", ".join(f"'{prog}' (package {pkg})" for prog, pkg in missing)
        packages = " ".join(dict.fromkeys(pkg for _, pkg in missing))
        super().__init__(f"not found: {names}; install with: apt-get install -y {packages}")
        self.program = program
        self.package = package
        self.missing = missing


class CommandError(ToolError):
    """A system command failed; carries the command, its exit code and its error output."""

    code = "command-failed"

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(f"{' '.join(argv)} exited with {returncode}: {detail}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


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
    "umount": "mount",
    "useradd": "passwd",
    "groupadd": "passwd",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
}

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
    pass_fds: tuple[int, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion and return its result; raise :class:`CommandError` on failure.

    Every string in ``secrets`` (a CHAP password, say) is masked in the error raised. Standard
    input is ``input_text``, else ``/dev/null`` (a tool never reads ours); ``pass_fds`` are
    inherited by the tool (a pipe carrying a secret, say). With ``check=False`` only a timeout
    raises (:class:`CommandError` with ``returncode`` -1).
    """
    exe = require(argv[0]) if "/" not in argv[0] else argv[0]
    full = [exe, *argv[1:]]
    try:
        proc = subprocess.run(
            full,
            input=input_text,
            stdin=subprocess.DEVNULL if input_text is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=env,
            pass_fds=pass_fds,
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
