"""A hot-unplug waits for libvirt's device-removed event, not on a loop re-reading the XML."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from virtyard.host.rpc.errors import HotunplugDiskError
from virtyard.host.virt import hotplug
from virtyard.host.virt.device_events import FALLBACK_POLL, SAFETY_RECHECK, DeviceRemovals
from virtyard.host.virt.domain_xml import DiskDevice, DomainDisk

VM = "6c1c0d2e-8f4e-4a8a-9c77-1d2d3e4f5a6b"


def _disk(**kw: Any) -> DomainDisk:
    return DomainDisk(DiskDevice(device="disk", iface="virtio", index=1, **kw), None)


class FakeVms:
    """Just what the unplug wait reads: the live disks (counted) and the removals."""

    def __init__(self, disk: DomainDisk) -> None:
        self.removals = DeviceRemovals()
        self.disks = [disk]
        self.looks = 0
        self.looked = threading.Event()

    def snapshot(self, _dom: object) -> Any:
        self.looks += 1
        self.looked.set()
        return SimpleNamespace(vm_id=VM, domain=SimpleNamespace(disks=list(self.disks)))


def test_the_alias_libvirt_reports_is_the_user_alias_of_our_disk_id() -> None:
    assert hotplug.live_alias(_disk(disk_id="d1")) == "ua-d1"
    assert hotplug.live_alias(_disk(alias="virtio-disk1")) == "virtio-disk1"
    assert hotplug.live_alias(_disk()) is None


def test_an_unplug_sleeps_until_the_event_then_looks_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    disk = _disk(disk_id="d1")
    vms = FakeVms(disk)
    vms.removals.live = True
    monkeypatch.setattr(vms.removals, "poll_period", lambda: 3600.0)

    def guest_releases() -> None:
        vms.looked.wait(30)
        vms.disks = []
        vms.removals.removed(VM, "ua-d1")

    with vms.removals.expect(VM, "ua-d1") as removal:
        threading.Thread(target=guest_releases).start()
        after = hotplug._wait_gone(vms, None, disk, removal, 60.0)  # type: ignore[arg-type]
    assert after.domain.disks == []
    assert removal.reported
    # One look before sleeping, one after the event: with an hour between safety looks, only
    # the event can have woken it.
    assert vms.looks == 2


def test_events_for_other_devices_or_vms_wake_nobody() -> None:
    removals = DeviceRemovals()
    with removals.expect(VM, "ua-d1") as removal:
        removals.removed(VM, "ua-d2")
        removals.removed("another-vm", "ua-d1")
        assert not removal.wait(0.01)
        assert not removal.reported
    removals.removed(VM, "ua-d1")  # nobody waits any more: ignored
    assert not removal.reported


def test_a_guest_that_refuses_ends_the_wait_with_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    disk = _disk(disk_id="d1")
    vms = FakeVms(disk)
    monkeypatch.setattr(vms.removals, "poll_period", lambda: 3600.0)

    def guest_refuses() -> None:
        vms.looked.wait(30)
        vms.removals.removal_failed(VM, "ua-d1")

    with vms.removals.expect(VM, "ua-d1") as removal:
        threading.Thread(target=guest_refuses).start()
        with pytest.raises(HotunplugDiskError, match="refused"):
            hotplug._wait_gone(vms, None, disk, removal, 3600.0)  # type: ignore[arg-type]
    assert vms.looks == 2


def test_without_events_the_live_xml_is_looked_at_until_the_disk_is_gone() -> None:
    disk = _disk()  # no alias: no event can name it
    vms = FakeVms(disk)
    assert vms.removals.poll_period() == FALLBACK_POLL
    vms.removals.live = True
    assert vms.removals.poll_period() == SAFETY_RECHECK
    vms.removals.live = False

    real_snapshot = vms.snapshot

    def snapshot(dom: object) -> Any:
        if vms.looks == 2:
            vms.disks = []  # released; libvirt's event never came
        return real_snapshot(dom)

    vms.snapshot = snapshot  # type: ignore[method-assign]
    with vms.removals.expect(VM, None) as removal:
        after = hotplug._wait_gone(vms, None, disk, removal, 3600.0)  # type: ignore[arg-type]
    assert after.domain.disks == [] and vms.looks == 3 and not removal.reported


def test_a_guest_that_never_lets_go_times_out() -> None:
    disk = _disk(disk_id="d1")
    vms = FakeVms(disk)
    with vms.removals.expect(VM, "ua-d1") as removal, \
            pytest.raises(HotunplugDiskError, match="did not release"):
        hotplug._wait_gone(vms, None, disk, removal, 0.3)  # type: ignore[arg-type]
