"""Talk to qemu-guest-agent inside a lab guest through libvirt: ping, run a command.

Tests use it to look inside the guest ("does the guest see the LUN, are the bytes there?")
without a network or a console.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirt_qemu

from virtyard.lab.errors import LabError


class GuestAgentError(LabError):
    """The guest agent did not answer, or a command run through it failed."""

    code = "guest-agent-error"


@dataclass(frozen=True)
class ExecResult:
    """Exit code and output of a command run in the guest."""

    exitcode: int
    stdout: bytes
    stderr: bytes


def command(dom: libvirt.virDomain, execute: str, arguments: dict[str, Any] | None = None,
            *, timeout: int = 10) -> Any:
    """Send one QMP-style command to the guest agent and return its ``return`` value."""
    request: dict[str, Any] = {"execute": execute}
    if arguments is not None:
        request["arguments"] = arguments
    try:
        reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(request), timeout, 0)
    except libvirt.libvirtError as exc:
        raise GuestAgentError(f"{execute} failed in guest {dom.name()}: {exc}") from exc
    return json.loads(reply)["return"]


def wait_ready(dom: libvirt.virDomain, *, timeout: float = 90.0) -> float:
    """Wait until the guest agent answers a ping; return how long it took."""
    start = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - start < timeout:
        try:
            command(dom, "guest-ping", timeout=2)
            return time.monotonic() - start
        except GuestAgentError as exc:
            last = exc
            time.sleep(0.25)
    raise GuestAgentError(f"guest agent of {dom.name()} not ready after {timeout:g} s: {last}")


def run(dom: libvirt.virDomain, shell: str, *, timeout: float = 60.0) -> ExecResult:
    """Run ``/bin/sh -c shell`` in the guest and wait for it to finish."""
    started = command(dom, "guest-exec", {
        "path": "/bin/sh", "arg": ["-c", shell], "capture-output": True,
    })
    pid = started["pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = command(dom, "guest-exec-status", {"pid": pid})
        if status.get("exited"):
            return ExecResult(
                exitcode=int(status.get("exitcode", -1)),
                stdout=base64.b64decode(status.get("out-data", "")),
                stderr=base64.b64decode(status.get("err-data", "")),
            )
        time.sleep(0.05)
    raise GuestAgentError(f"command did not finish in {timeout:g} s in {dom.name()}: {shell}")


def check_output(dom: libvirt.virDomain, shell: str, *, timeout: float = 60.0) -> str:
    """Like :func:`run`, but raise on a non-zero exit and return stdout as text."""
    result = run(dom, shell, timeout=timeout)
    if result.exitcode != 0:
        raise GuestAgentError(
            f"'{shell}' exited {result.exitcode} in {dom.name()}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return result.stdout.decode(errors="replace")

