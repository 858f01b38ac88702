"""Typed lab errors with stable codes: the CLI prints one clear line and exits non-zero."""

from __future__ import annotations


class LabError(Exception):
    """Base of every lab failure; ``code`` is stable and machine-readable."""

    code = "lab-error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class MissingPackageError(LabError):
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


class PortBusyError(LabError):
    """A TCP port the lab wants on the loopback address is already taken."""

    code = "port-busy"

    def __init__(self, port: int, purpose: str) -> None:
        super().__init__(f"port {port} on 127.0.0.1 ({purpose}) is already in use")
        self.port = port
        self.purpose = purpose


class CommandError(LabError):
    """A system command failed; carries the command, its exit code and its error output."""

    code = "command-failed"

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(f"{' '.join(argv)} exited with {returncode}: {detail}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class GuestBuildError(LabError):
    """The tiny guest (kernel + initramfs) could not be built."""

    code = "guest-build-failed"


class ServiceStartError(LabError):
    """A lab daemon (tgtd, libvirtd) did not come up in time."""

    code = "service-start-failed"
