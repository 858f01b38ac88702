"""An agent whose libvirtd is away (the storage host VM before it had one): its pollers retry
several times a second, and the log says so once per outage, not a traceback or a line every
try (the connection, the guest names service)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import libvirt
import pytest

from virtyard.host.virt.guest_names import GuestNames
from virtyard.host.virt.libvirt_conn import LibvirtConnection


class FlakyVms:
    """``running()`` fails or answers (nothing runs) as the script says, one entry a sync."""

    def __init__(self, script: list[bool]) -> None:
        self.script = script

    def running(self) -> list[Any]:
        if not self.script.pop(0):
            raise libvirt.libvirtError("Failed to connect socket to '/run/libvirt/libvirt-sock'")
        return []


class Ticks:
    """Stands in for the service's wake event: every wait is a tick that forces the next sync;
    the service stops when the script is done."""

    def __init__(self, names: GuestNames, vms: FlakyVms) -> None:
        self.names, self.vms = names, vms

    def wait(self, _timeout: float) -> bool:
        self.names._last_sync = 0.0
        if not self.vms.script:
            self.names._stop.set()
        return False

    def clear(self) -> None:
        pass

    def set(self) -> None:
        pass


def test_libvirt_away_is_said_once_per_outage(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    vms = FlakyVms([False, False, False, True, True, False, False])
    names = GuestNames(vms, tmp_path)  # type: ignore[arg-type]
    names._wake = Ticks(names, vms)  # type: ignore[assignment]
    with caplog.at_level(logging.INFO, logger="virtyard.host.virt.guest_names"):
        names._run()
    said = [(r.levelname, r.getMessage().split(" (")[0]) for r in caplog.records]
    assert said == [("WARNING", "guest names: libvirt failed"),
                    ("INFO", "guest names: libvirt answers again"),
                    ("WARNING", "guest names: libvirt failed")]
    assert not any(r.exc_info for r in caplog.records)


def test_connecting_is_said_once_while_libvirtd_is_away(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    conn = LibvirtConnection(f"qemu:///system?socket={tmp_path}/no-libvirt-sock")
    with caplog.at_level(logging.INFO, logger="virtyard.host.virt"):
        for _ in range(3):
            with pytest.raises(libvirt.libvirtError):
                conn.get()
    assert [r.getMessage() for r in caplog.records] == [f"connecting to {conn.uri}"]


def test_the_event_connection_says_once_that_libvirt_is_away(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    from virtyard.host.virt.events import EventLog, VmWatcher  # noqa: PLC0415
    from virtyard.host.virt.vms import VmManager  # noqa: PLC0415

    uri = f"qemu+unix:///system?socket={tmp_path}/no-libvirt-sock"
    vms = VmManager(LibvirtConnection(uri), drives=None, virt_type="qemu")  # type: ignore[arg-type]
    watcher = VmWatcher(vms, EventLog(1))
    caplog.set_level(logging.INFO, logger="virtyard.host.virt.events")
    for _ in range(5):
        watcher._next_connect = 0.0  # no wait between tries
        watcher._connect_events()
    failed = [r for r in caplog.records if "event connection" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING
    assert not watcher._events_live and not vms.removals.live
