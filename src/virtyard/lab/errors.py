"""Typed lab errors with stable codes: the CLI prints one clear line and exits non-zero."""

from __future__ import annotations

from virtyard.common.process import CommandError, MissingPackageError, ToolError

# The lab's failures are the tool runner's (one hierarchy, one stable ``code`` each).
LabError = ToolError


class PortBusyError(LabError):
    """A TCP port the lab wants on the loopback address is already taken."""

    code = "port-busy"

    def __init__(self, port: int, purpose: str) -> None:
        super().__init__(f"port {port} on 127.0.0.1 ({purpose}) is already in use")
        self.port = port
        self.purpose = purpose


class GuestBuildError(LabError):
    """The tiny guest (kernel + initramfs) could not be built."""

    code = "guest-build-failed"


class ServiceStartError(LabError):
    """A lab daemon (tgtd, libvirtd) did not come up in time."""

    code = "service-start-failed"


__all__ = ["CommandError", "LabError", "MissingPackageError", "ToolError"]
