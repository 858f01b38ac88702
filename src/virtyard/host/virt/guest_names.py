"""Keeps each running VM's guest disk names current, from both guest agents.

Our guest agent pushes its mapping over the VM's ``org.virtyard.guest_agent.0`` channel
(followed by one :class:`ChannelPoller` thread for all VMs); qemu-guest-agent is asked through
libvirt (``guestInfo`` disks) every :data:`QGA_PERIOD` seconds, and right after every hot-plug
or unplug (:meth:`GuestNames.poke`: within a second, not a long period). One worker thread
merges both (:func:`map_disks`: the fresher report wins) and, when the names or the reported
mapping change, writes the names into the VM's metadata with a new generation — so the stats
``hash`` changes and the engine re-reads the VM. Only while the VM is up and not migrating.
If the guest agents stop or vanish, names stay as last known and nothing errors.

qemu-ga is asked from a few other threads, one question per VM at a time: a frozen qemu-ga
holds a ``guestInfo`` call for libvirt's agent timeout (5 s each), and that must delay neither
our agent's reports nor any other VM (CI saw a hot-plugged disk go unnamed for a minute).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import libvirt

from virtyard.host.virt.device_specs import disk_dict
from virtyard.host.virt.disk_mapping import GuestReport, VmDisk, map_disks
from virtyard.host.virt.domain_xml import (
    QEMU_GA_CHANNEL,
    VIRTYARD_GA_CHANNEL,
    Channel,
    Domain,
)
from virtyard.host.virt.guest_channel import ChannelPoller, GuestChannel, MappingReport
from virtyard.host.virt.vms import VmManager

log = logging.getLogger("virtyard.host.virt.guest_names")

QGA_PERIOD = 30.0
QGA_RETRY = 1.0  # while qemu-ga has never answered (the guest is booting)
# After a hot-plug: ask qemu-ga this long after (the guest needs 0.15-0.3 s to see a disk).
POKE_DELAYS = (0.25, 0.6, 1.2, 2.5)
TICK = 0.05
QGA_ASKERS = 4  # threads asking qemu-ga (one question per VM at a time)
# libvirt waits for qemu-ga's answer forever by default (guest-shutdown excepted): a frozen
# qemu-ga would hold an asker and libvirt's agent job for good. This bounds every agent call.
QGA_ANSWER_TIMEOUT = 5
UNIX_PATH_MAX = 107


@dataclasses.dataclass
class _VmState:
    qga: GuestReport | None = None
    qga_due: list[float] = dataclasses.field(default_factory=list)
    asking: bool = False  # a question to qemu-ga is out
    dirty: bool = True
    mapping_digest: str = ""
    guest_disk_mapping: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)


class GuestNames:
    """The guest-name service of one host agent."""

    def __init__(self, vms: VmManager, channel_dir: Path) -> None:
        self.vms = vms
        self.channel_dir = channel_dir
        self.poller = ChannelPoller()
        self._states: dict[str, _VmState] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._askers = ThreadPoolExecutor(QGA_ASKERS, thread_name_prefix="qga-ask")
        self._last_sync = 0.0
        self._libvirt_away = False  # said once until a sync succeeds again

    # -- channels ---------------------------------------------------------------------------

    def channel_path(self, vm_id: str) -> str:
        """Where QEMU binds the VM's channel to our guest agent (short enough for a socket)."""
        path = str(self.channel_dir / f"{vm_id}.sock")
        if len(path.encode()) > UNIX_PATH_MAX:
            digest = hashlib.sha1(path.encode()).hexdigest()[:16]
            path = f"/run/virtyard-hostd/{digest}.sock"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return path

    def channels(self, vm_id: str) -> list[Channel]:
        """The guest-agent channels a VM gets on this host."""
        return [Channel(QEMU_GA_CHANNEL), Channel(VIRTYARD_GA_CHANNEL, self.channel_path(vm_id))]

    # -- what the verbs read ----------------------------------------------------------------

    def guest_disk_mapping(self, vm_id: str) -> dict[str, dict[str, str]]:
        """``{guest serial: {"name": devname}}`` as last reported (merged), or ``{}``."""
        with self._lock:
            state = self._states.get(vm_id)
            return dict(state.guest_disk_mapping) if state else {}

    def poke(self, vm_id: str) -> None:
        """A disk was plugged or unplugged: ask both agents again within a second or two."""
        now = time.monotonic()
        with self._lock:
            state = self._states.setdefault(vm_id, _VmState())
            state.qga_due = sorted({*state.qga_due, *(now + d for d in POKE_DELAYS)})
            state.dirty = True
        self.poller.refresh(vm_id)
        self._wake.set()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.poller.start()
        self._thread = threading.Thread(target=self._run, name="guest-names", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._askers.shutdown(wait=False, cancel_futures=True)
        self.poller.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except libvirt.libvirtError as exc:  # libvirtd away (a host without it): say so once
                if not self._libvirt_away:
                    log.warning("guest names: libvirt failed (%s); retrying", exc)
                self._libvirt_away = True
            except Exception:  # never let one bad VM stop the service
                log.exception("guest names: step failed")
            self._wake.wait(TICK)
            self._wake.clear()

    def _step(self) -> None:
        now = time.monotonic()
        if now - self._last_sync > 2.0:
            self._sync_running(now)
        with self._lock:
            due = [vm for vm, s in self._states.items()
                   if s.qga_due and s.qga_due[0] <= now and not s.asking]
            for vm_id in due:
                state = self._states[vm_id]
                state.asking = True
                state.qga_due = [t for t in state.qga_due if t > now] or [now + QGA_PERIOD]
            dirty = [vm for vm, s in self._states.items() if s.dirty]
        for vm_id in due:
            self._askers.submit(self._ask_qga, vm_id)
        for vm_id in dirty:
            self._update(vm_id)

    def _sync_running(self, now: float) -> None:
        """Follow the VMs running here now (started, migrated in, gone)."""
        self._last_sync = now
        running: dict[str, libvirt.virDomain] = {}
        for dom in self.vms.running():
            if self.vms.is_ours(dom):  # never connect to channels of domains we do not run
                running[dom.UUIDString()] = dom
        if self._libvirt_away:
            log.info("guest names: libvirt answers again")
            self._libvirt_away = False
        with self._lock:
            gone = [vm for vm in self._states if vm not in running]
            new = [vm for vm in running if vm not in self._states]
            for vm_id in gone:
                del self._states[vm_id]
            for vm_id in new:
                self._states[vm_id] = _VmState(qga_due=[now])
        for vm_id in gone:
            self.poller.remove(vm_id)
        for vm_id in new:
            _bound_agent_answers(running[vm_id])
            path = self._channel_of(running[vm_id])
            if path:
                self.poller.add(vm_id, path, on_report=self._reported(vm_id))

    def _channel_of(self, dom: libvirt.virDomain) -> str | None:
        try:
            domain = Domain.from_xml(dom.XMLDesc(0))
        except Exception:
            return None
        for channel in domain.channels:
            if channel.name == VIRTYARD_GA_CHANNEL and channel.path:
                return channel.path
        return None

    def _reported(self, vm_id: str) -> Any:
        def on_report(_channel: GuestChannel, _report: MappingReport) -> None:
            with self._lock:
                state = self._states.get(vm_id)
                if state is not None:
                    state.dirty = True
            self._wake.set()
        return on_report

    def _ask_qga(self, vm_id: str) -> None:
        """In an asker thread: ask qemu-ga for the disks; the merge thread takes the answer."""
        now = time.monotonic()
        report: GuestReport | None = None
        failed = False
        try:
            dom = self.vms.libvirt.lookup(vm_id)
            if dom is not None:
                params = dom.guestInfo(libvirt.VIR_DOMAIN_GUEST_INFO_DISKS, 0)
                report = GuestReport.from_guest_info(params, time.monotonic())
        except libvirt.libvirtError:
            # No agent (yet, or any more), or libvirtd away (the merge thread says that, once):
            # names stay as last known; ask again soon while we have never heard from it (a
            # guest still booting), else on the period.
            failed = True
        except Exception:  # never lose the asker thread
            log.exception("guest names: asking qemu-ga of VM %s failed", vm_id)
        with self._lock:
            state = self._states.get(vm_id)
            if state is not None:
                state.asking = False
                if report is not None:
                    state.qga = report
                    state.dirty = True
                elif failed and state.qga is None:
                    state.qga_due = sorted({*state.qga_due, now + QGA_RETRY})
        self._wake.set()

    def _update(self, vm_id: str) -> None:
        """Merge both reports; write changed names into the VM's metadata (new generation)."""
        with self._lock:
            state = self._states.get(vm_id)
            if state is None:
                return
            state.dirty = False
            qga = state.qga
        channel = self.poller.get(vm_id)
        ours = (GuestReport.from_agent_mapping(channel.report.mapping, channel.report.received)
                if channel is not None and channel.report is not None else None)
        if qga is None and ours is None:
            return
        dom = self.vms.libvirt.lookup(vm_id)
        if dom is None or not _up(dom):
            return
        try:
            with self.vms.locks.hold([vm_id], timeout=0.5):
                snap = self.vms.snapshot(dom)
                disks = [VmDisk.from_device(disk_dict(d.device)) for d in snap.domain.disks]
                result = map_disks(disks, [qga, ours])
                digest = hashlib.sha1(json.dumps(result.guest_disk_mapping,
                                                 sort_keys=True).encode()).hexdigest()
                metadata = snap.metadata
                for name, guest_name in result.names.items():
                    entry = metadata.device(name)
                    if guest_name and entry.guest_name != guest_name:
                        metadata = metadata.with_device(
                            name, dataclasses.replace(entry, guest_name=guest_name))
                with self._lock:
                    state = self._states.get(vm_id)
                    mapping_changed = state is not None and bool(state.mapping_digest) \
                        and state.mapping_digest != digest
                    if state is not None:
                        state.mapping_digest = digest
                        state.guest_disk_mapping = result.guest_disk_mapping
                if metadata != snap.metadata or mapping_changed:
                    self.vms.write_metadata(dom, metadata.next_generation())
                    log.info("VM %s guest names: %s", vm_id,
                             {k: v for k, v in result.names.items() if v})
        except TimeoutError:  # a hot-plug holds the VM: try again on the next tick
            with self._lock:
                state = self._states.get(vm_id)
                if state is not None:
                    state.dirty = True
        except libvirt.libvirtError as exc:
            log.debug("VM %s: guest names not written now: %s", vm_id, exc)


def _bound_agent_answers(dom: libvirt.virDomain) -> None:
    """Every qemu-ga call on this VM gives up after :data:`QGA_ANSWER_TIMEOUT` (libvirt keeps
    the setting while the VM runs here; a migrated-in VM gets it from this host's agent)."""
    try:
        dom.agentSetResponseTimeout(QGA_ANSWER_TIMEOUT, 0)
    except libvirt.libvirtError as exc:
        log.debug("VM %s: qemu-ga answer timeout not set: %s", dom.UUIDString(), exc)


def _up(dom: libvirt.virDomain) -> bool:
    """Running and not migrating: metadata writes are safe (bz1527416)."""
    try:
        if dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
            return False
        return bool(dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE)
    except libvirt.libvirtError:
        return False
