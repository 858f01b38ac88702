"""Power a lab host off and on as a BMC would: off is the plug pulled — its libvirtd, every
QEMU process it runs and its host agent are killed at once (SIGKILL, no clean-up), and its
``/run`` is emptied as a reboot would; on starts libvirtd and the agent again (no VM runs:
they were transient domains, gone with the power)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from virtyard.lab.errors import LabError
from virtyard.lab.lab import Lab
from virtyard.lab.process import pid_alive, wait_until


def _lab_host(state_dir: Path, name: str) -> tuple[Lab, int]:
    lab = Lab.load(state_dir)
    if lab is None:
        raise LabError(f"no lab in {state_dir}")
    for i, host in enumerate(lab.hosts):
        if host.name == name:
            return lab, i
    raise LabError(f"the lab has no host {name!r}")


def state(state_dir: Path, name: str) -> str:
    """``on`` while any process of the host (or its agent) lives, else ``off``."""
    lab, i = _lab_host(state_dir, name)
    alive = lab.hosts[i].processes() or lab.agents[i].is_running()
    return "on" if alive else "off"


def off(state_dir: Path, name: str) -> None:
    lab, i = _lab_host(state_dir, name)
    host, agent = lab.hosts[i], lab.agents[i]

    def pids() -> list[int]:
        found = list(host.processes())
        agent_pid = agent.pid()
        return found + ([agent_pid] if agent_pid is not None else [])

    for _ in range(5):
        for pid in pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if wait_until(lambda: not [p for p in pids() if pid_alive(p)], timeout=5.0):
            break
    if pids():
        raise LabError(f"processes of {name} survive the power off: {pids()}")
    agent.pidfile.unlink(missing_ok=True)
    host._clear_runtime_dir()  # a reboot's empty /run


def on(state_dir: Path, name: str) -> None:
    lab, i = _lab_host(state_dir, name)
    if not lab.hosts[i].is_running():
        lab.hosts[i].start()
    if not lab.agents[i].is_running():
        lab.agents[i].virt_type = "kvm" if lab.accelerator == "kvm" else "qemu"
        lab.agents[i].start()
