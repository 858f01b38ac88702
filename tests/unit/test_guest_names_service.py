"""The guest-name service's threads: a frozen qemu-ga (its ``guestInfo`` hangs for libvirt's
agent timeout) must delay neither the merge of our own agent's reports nor other VMs, and a
VM has one question to qemu-ga out at a time."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import libvirt

from virtyard.host.virt.guest_names import GuestNames, _VmState


class HangingAgentDomain:
    """qemu-ga frozen: ``guestInfo`` blocks until the test lets it fail."""

    def __init__(self) -> None:
        self.asked = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def guestInfo(self, *_args: Any) -> dict[str, Any]:  # noqa: N802 - libvirt's name
        self.asked += 1
        self.entered.set()
        self.release.wait(30)
        raise libvirt.libvirtError("Guest agent is not responding")


def service(tmp_path: Path, dom: HangingAgentDomain) -> tuple[GuestNames, list[str]]:
    vms = SimpleNamespace(libvirt=SimpleNamespace(lookup=lambda _vm: dom))
    names = GuestNames(vms, tmp_path)  # type: ignore[arg-type]
    names._last_sync = time.monotonic() + 3600  # no libvirt sync in these steps
    merged: list[str] = []
    names._update = merged.append  # type: ignore[method-assign]
    return names, merged


def test_a_frozen_qemu_ga_does_not_hold_the_merge_of_our_agents_report(tmp_path: Path) -> None:
    dom = HangingAgentDomain()
    names, merged = service(tmp_path, dom)
    names._states["frozen"] = _VmState(qga_due=[0.0], dirty=False)
    names._states["ours"] = _VmState(dirty=True)  # our agent reported
    try:
        names._step()
        assert dom.entered.wait(10), "qemu-ga was not asked"
        # The step came back while qemu-ga still hangs, and merged our agent's report.
        assert not dom.release.is_set()
        assert merged == ["ours"]
        # One question to a VM's qemu-ga at a time: a second due time waits for the first.
        with names._lock:
            names._states["frozen"].qga_due = [0.0]
        names._step()
        assert dom.asked == 1
        dom.release.set()
        assert wait_for(lambda: not names._states["frozen"].asking)
        names._step()
        assert wait_for(lambda: dom.asked == 2)
    finally:
        dom.release.set()
        names._askers.shutdown(wait=True)


def test_names_stay_as_known_when_qemu_ga_fails(tmp_path: Path) -> None:
    dom = HangingAgentDomain()
    dom.release.set()
    names, _merged = service(tmp_path, dom)
    known = object()
    names._states["vm"] = _VmState(qga=known, dirty=False)  # type: ignore[arg-type]
    names._ask_qga("vm")
    state = names._states["vm"]
    assert state.qga is known and not state.asking and not state.dirty
    names._askers.shutdown(wait=True)


def wait_for(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
