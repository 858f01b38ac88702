"""The VMs of this host: create, destroy, shut down, stats, full device lists.

Restart-safe by construction: the agent keeps no VM state of its own. A VM is its libvirt
domain (transient: it exists while it runs) and our metadata inside it (GUIDs, PDIVs, disk ids,
guest names, the generation counter), so a restarted agent finds every running VM as it was,
stops none and invents none. The only in-memory state is per-VM locks and migration jobs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt

from virtyard.host.rpc.errors import NoSuchVmError, VmCreateError, VmExistsError
from virtyard.host.rpc.locks import KeyedLocks
from virtyard.host.virt.device_events import DeviceRemovals
from virtyard.host.virt.device_specs import parse_disks
from virtyard.host.virt.disk_sources import DomainXmlError
from virtyard.host.virt.domain_xml import QEMU_GA_CHANNEL, Channel, Domain, DomainDisk, KernelBoot
from virtyard.host.virt.drives import DriveNotVisibleError, DriveResolver
from virtyard.host.virt.libvirt_conn import LibvirtConnection
from virtyard.host.virt.metadata import METADATA_KEY, METADATA_NS, VmMetadata

log = logging.getLogger("virtyard.host.virt.vms")

T = TypeVar("T")

_STATE_NAMES = {
    libvirt.VIR_DOMAIN_RUNNING: "Up",
    libvirt.VIR_DOMAIN_BLOCKED: "Up",
    libvirt.VIR_DOMAIN_PAUSED: "Paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "Powering down",
    libvirt.VIR_DOMAIN_SHUTOFF: "Down",
    libvirt.VIR_DOMAIN_CRASHED: "Down",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "Paused",
}


def status_of(state: int) -> str:
    """The VM status (as the stats report it) of a libvirt domain state."""
    return _STATE_NAMES.get(state, "Unknown")


@dataclass(frozen=True)
class VmSnapshot:
    """A running VM as one live XML read shows it."""

    vm_id: str
    name: str
    status: str
    domain: Domain
    run_id: int

    @property
    def metadata(self) -> VmMetadata:
        return self.domain.metadata

    @property
    def hash(self) -> str:
        return change_hash(self.run_id, self.metadata)


@dataclass(frozen=True)
class VmStatsView:
    """What the frequent stats poll needs of a VM."""

    vm_id: str
    name: str
    status: str
    hash: str


def change_hash(run_id: int, metadata: VmMetadata) -> str:
    """Changes whenever the VM's devices (or guest names) change: the runtime id (a new run of
    the same VM) and the generation counter every device change bumps. A counter, not a digest
    of the devices, so an unplug and replug to the same name still changes it."""
    return f"{run_id}-{metadata.generation}"


class VmManager:
    """All VM operations of one host agent."""

    def __init__(self, libvirt_conn: LibvirtConnection, drives: DriveResolver, *,
                 virt_type: str, release: Callable[[str], None] = lambda vm_id: None,
                 locks: KeyedLocks | None = None) -> None:
        self.libvirt = libvirt_conn
        self.drives = drives
        # The guest-agent channels a VM gets on this host (set by the agent: paths it follows).
        self.channels: Callable[[str], list[Channel]] = lambda vm_id: [Channel(QEMU_GA_CHANNEL)]
        # Told after every device change (the guest names service asks the guest again).
        self.devices_changed: Callable[[str], None] = lambda vm_id: None
        # Told the new hash after every metadata write, under the VM's lock (the events).
        self.metadata_written: Callable[[str, str], None] = lambda vm_id, hash: None
        # Drops a VM's holds on image volumes when it stops or leaves this host.
        self.release = release
        self.virt_type = virt_type
        # Per-VM locks (``vm:<id>`` in the agent's one lock table when it hands one in).
        self.locks = (KeyedLocks() if locks is None else locks).scope("vm:")
        # Hot-unplugs waiting for libvirt's device-removed events (fed by the watcher).
        self.removals = DeviceRemovals()

    # -- lookup ---------------------------------------------------------------------------

    def domain(self, vm_id: str) -> libvirt.virDomain:
        """The running domain of ``vm_id``, or :class:`NoSuchVmError`."""
        dom = self.libvirt.lookup(vm_id)
        if dom is None or not dom.isActive():
            raise NoSuchVmError(f"virtual machine {vm_id} does not exist", vmId=vm_id)
        return dom

    def snapshot(self, dom: libvirt.virDomain) -> VmSnapshot:
        state = dom.state()[0]
        domain = Domain.from_xml(dom.XMLDesc(0))
        return VmSnapshot(vm_id=dom.UUIDString(), name=dom.name(),
                          status=_STATE_NAMES.get(state, "Unknown"), domain=domain,
                          run_id=dom.ID())

    def running(self) -> list[libvirt.virDomain]:
        return self.libvirt.call(
            lambda c: c.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))

    def with_vm(self, vm_id: str, fn: Callable[[libvirt.virDomain], T]) -> T:
        """Run ``fn`` on the VM's domain holding the VM's lock (one device change at a time)."""
        with self.locks.hold([vm_id]):
            return fn(self.domain(vm_id))

    # -- create / destroy / shutdown ----------------------------------------------------

    def create(self, params: dict[str, Any]) -> VmSnapshot:
        """Start a VM from the engine's parameters (device dicts); all checked before libvirt.

        A disk whose LUN or volume this host does not see fails the call and nothing is
        defined.
        """
        vm_id = params["vmId"]
        with self.locks.hold([vm_id]):
            if self.libvirt.lookup(vm_id) is not None:
                raise VmExistsError(f"virtual machine {vm_id} already exists", vmId=vm_id)
            domain = self.build(params)
            xml = domain.to_xml()
            try:
                dom = self.libvirt.call(lambda c: c.createXML(xml, 0))
            except libvirt.libvirtError as exc:
                self.release(vm_id)
                raise VmCreateError(f"libvirt refused the VM: {exc.get_error_message()}",
                                    vmId=vm_id) from None
            log.info("VM %s (%s) started with %d disks", vm_id, domain.name, len(domain.disks))
            return self.snapshot(dom)

    def build(self, params: dict[str, Any]) -> Domain:
        """The domain for ``params``, every disk source resolved on this host."""
        vm_id = params["vmId"]
        devices = parse_disks(params.get("devices", []))
        disks: list[DomainDisk] = []
        invisible: list[str] = []
        for device in devices:
            try:
                disks.append(DomainDisk(device, self.drives.resolve(device, vm_id)))
            except DriveNotVisibleError as exc:
                invisible.append(exc.what)
        if invisible:
            self.release(vm_id)
            raise VmCreateError(f"not visible on this host: {', '.join(invisible)}",
                                vmId=vm_id, invisible=invisible)
        kernel = params.get("kernel")
        try:
            return Domain(
                name=params.get("vmName") or f"vm-{vm_id}", uuid=vm_id,
                memory_mib=int(params.get("memSize", 256)), vcpus=int(params.get("smp", 1)),
                virt_type="kvm" if self.virt_type == "kvm" else "qemu",
                kernel_boot=KernelBoot(kernel, params.get("initrd"), params.get("kernelArgs"))
                if kernel else None,
                disks=disks, channels=self.channels(vm_id),
                console_log=params.get("consoleLog"))
        except DomainXmlError as exc:
            raise VmCreateError(str(exc), vmId=vm_id) from None

    def destroy(self, vm_id: str) -> None:
        """Power the VM off at once (its transient domain goes away)."""
        def off(dom: libvirt.virDomain) -> None:
            try:
                dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
            except libvirt.libvirtError:
                dom.destroy()
        self.with_vm(vm_id, off)
        self.release(vm_id)
        log.info("VM %s destroyed", vm_id)

    def shutdown(self, vm_id: str, *, timeout: float, force: bool) -> str:
        """Ask the guest to power off (guest agent first, then ACPI); wait up to ``timeout``.

        Returns ``"Down"`` when it went away in time, else ``"Powering down"`` (and with
        ``force`` the VM is then destroyed: ``"Down"``).
        """
        dom = self.domain(vm_id)
        try:
            dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        except libvirt.libvirtError:
            dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.libvirt.lookup(vm_id) is None:
                self.release(vm_id)
                return "Down"
            time.sleep(0.1)
        if force:
            self.destroy(vm_id)
            return "Down"
        return "Powering down"

    # -- metadata --------------------------------------------------------------------------

    def write_metadata(self, dom: libvirt.virDomain, metadata: VmMetadata) -> None:
        """Replace our metadata in the live domain (survives agent restarts and migrations)."""
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, metadata.to_libvirt_xml(),
                        METADATA_KEY, METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        self.metadata_written(dom.UUIDString(), change_hash(dom.ID(), metadata))

    def read_metadata(self, dom: libvirt.virDomain) -> VmMetadata:
        """Only our metadata element (much cheaper than the whole live XML)."""
        try:
            return VmMetadata.from_xml(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                                    METADATA_NS))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return VmMetadata()
            raise

    def is_ours(self, dom: libvirt.virDomain) -> bool:
        """Whether this agent runs the domain (it carries our metadata element); other
        domains on the host (someone's by hand) are listed but never touched."""
        try:
            dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
        except libvirt.libvirtError:
            return False
        return True

    def stats(self, dom: libvirt.virDomain) -> VmStatsView:
        """Status and change hash without reading the devices (the frequent, cheap poll)."""
        return VmStatsView(vm_id=dom.UUIDString(), name=dom.name(),
                           status=_STATE_NAMES.get(dom.state()[0], "Unknown"),
                           hash=change_hash(dom.ID(), self.read_metadata(dom)))
