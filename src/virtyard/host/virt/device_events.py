"""Waiting for libvirt to say a device is gone: a hot-unplug ends on libvirt's events.

QEMU removes a disk only when the guest lets it go (a PCI eject, a SCSI unit removal), any time
after libvirt's detach call returns. libvirt says when: ``DEVICE_REMOVED`` once the device is
gone, ``DEVICE_REMOVAL_FAILED`` when the guest refused. An unplug says what it waits for
*before* it asks libvirt (the event may come before the detach call returns), then sleeps until
the event wakes it, and looks at the live XML once to be sure.

The events arrive on the watcher's event connection (:mod:`virtyard.host.virt.events`), which
sets :attr:`DeviceRemovals.live`. While that connection is down (libvirtd restarting), or an
event was lost, waiting falls back to looking at the live XML every :data:`FALLBACK_POLL`
seconds; with it up, the XML is read again only every :data:`SAFETY_RECHECK` seconds.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

FALLBACK_POLL = 0.25  # seconds between looks at the live XML without events
SAFETY_RECHECK = 2.0  # seconds between looks at the live XML while events flow


class Removal:
    """One awaited removal: woken when libvirt reports the device removed, or refused."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.refused = False
        self.reported = False  # libvirt reported this device (removed or refused)

    def wake(self, *, refused: bool) -> None:
        self.refused = self.refused or refused
        self.reported = True
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """Sleep until libvirt reports this device (True) or ``timeout`` passes (False)."""
        woken = self._event.wait(timeout)
        self._event.clear()
        return woken


class DeviceRemovals:
    """Who waits for which device of which VM to go; filled by libvirt's event thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, str], Removal] = {}
        self.live = False  # the watcher's event connection is up: events will come

    @contextlib.contextmanager
    def expect(self, vm_id: str, alias: str | None) -> Iterator[Removal]:
        """Wait for device ``alias`` of VM ``vm_id`` (a device without an alias can only be
        looked for in the XML: its :class:`Removal` is never woken)."""
        removal = Removal()
        key = (vm_id, alias or "")
        if alias:
            with self._lock:
                self._waiting[key] = removal
        try:
            yield removal
        finally:
            if alias:
                with self._lock:
                    if self._waiting.get(key) is removal:
                        del self._waiting[key]

    def poll_period(self) -> float:
        """How long to sleep between looks at the live XML now."""
        return SAFETY_RECHECK if self.live else FALLBACK_POLL

    def removed(self, vm_id: str, alias: str) -> None:
        """libvirt's ``DEVICE_REMOVED`` (its event thread)."""
        self._wake(vm_id, alias, refused=False)

    def removal_failed(self, vm_id: str, alias: str) -> None:
        """libvirt's ``DEVICE_REMOVAL_FAILED``: the guest did not let the device go."""
        self._wake(vm_id, alias, refused=True)

    def _wake(self, vm_id: str, alias: str, *, refused: bool) -> None:
        with self._lock:
            removal = self._waiting.get((vm_id, alias))
        if removal is not None:
            removal.wake(refused=refused)
