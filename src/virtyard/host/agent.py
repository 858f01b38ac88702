"""The host agent's services, built once from the configuration and shared by every verb."""

from __future__ import annotations

import logging
import os

from virtyard.host.config import HostConfig
from virtyard.host.rpc.errors import HostError
from virtyard.host.storage.connections import ConnectionRegistry
from virtyard.host.storage.devices import DeviceService
from virtyard.host.storage.initiator import Initiator, choose_initiator_kind
from virtyard.host.storage.userspace_initiator import UserspaceInitiator
from virtyard.host.storage.volumes import VolumeService
from virtyard.host.virt.cdrom import drive_user, reconcile, source_of
from virtyard.host.virt.domain_xml import DiskDevice, Source
from virtyard.host.virt.drives import DriveNotVisibleError, DriveResolver
from virtyard.host.virt.guest_names import GuestNames
from virtyard.host.virt.libvirt_conn import LibvirtConnection
from virtyard.host.virt.migration import Migrations
from virtyard.host.virt.vms import VmManager

log = logging.getLogger("virtyard.host.agent")


def make_initiator(config: HostConfig) -> Initiator:
    """The initiator the configuration asks for (auto: what this host's kernel supports)."""
    kind = choose_initiator_kind(config.storage.initiator)
    if kind == "kernel":
        from virtyard.host.storage.kernel_initiator import KernelInitiator  # noqa: PLC0415

        return KernelInitiator(config.storage.initiator_name)
    return UserspaceInitiator(config.storage.initiator_name)


class HostAgent:
    """Everything a verb may need: configuration, initiator, connections, devices, VMs."""

    def __init__(self, config: HostConfig, *, initiator: Initiator | None = None) -> None:
        self.config = config
        self.initiator = initiator or make_initiator(config)
        self.connections = ConnectionRegistry(config.state_dir / "storage" / "connections.json")
        self.devices = DeviceService(self.initiator, self.connections,
                                     probe_bytes=config.storage.probe_bytes,
                                     timeout=config.storage.login_timeout)
        self.volumes = VolumeService(config.state_dir / "storage", self.initiator, self.devices,
                                     initiator_name=config.storage.initiator_name,
                                     timeout=config.storage.login_timeout)
        self.libvirt = LibvirtConnection(config.libvirt.uri)
        self.drives = DriveResolver(self, self.libvirt)
        self.vms = VmManager(self.libvirt, self.drives, virt_type=virt_type(config),
                             release=self.release_volumes)
        self.migrations = Migrations(self.vms, config)
        self.guest_names = GuestNames(self.vms, config.state_dir / "ch")
        self.vms.channels = self.guest_names.channels
        self.vms.devices_changed = self.guest_names.poke

    def recover(self) -> None:
        """At agent start: undo what a crash left half-done (LUN attachments, activations) and
        settle CD changes in flight, so prepared volumes and drives agree again."""
        try:
            self.volumes.recover()
            log.info("recovery: %s", reconcile(self))
        except Exception:  # libvirt or storage unreachable now: the agent still serves
            log.exception("recovery at start failed; it runs again at the next start")
        self.guest_names.start()

    @property
    def migration_uri(self) -> str:
        """Where other hosts' libvirtd send this host VMs (peer-to-peer migration)."""
        return (self.config.libvirt.migration_uri
                or f"qemu+tls://{self.config.server.address}/system")

    def resolve_volume(self, device: DiskDevice, vm_id: str) -> Source:
        """The source of an image volume (PDIV) on this host, prepared for the VM's drive."""
        assert device.pdiv is not None
        try:
            prepared = self.volumes.prepare(device.pdiv, drive_user(vm_id, device.name),
                                            iso=device.device == "cdrom")
        except HostError as exc:
            raise DriveNotVisibleError(f"volume {device.pdiv} ({exc.message})") from None
        return source_of(self, prepared)

    def release_volumes(self, vm_id: str) -> None:
        """Drop every hold VM ``vm_id`` has on image volumes (it stopped or left this host)."""
        prefix = f"{vm_id}:"
        for prepared in self.volumes.prepared():
            for user in prepared.users:
                if user.startswith(prefix):
                    try:
                        self.volumes.teardown(prepared.pdiv, user)
                    except HostError as exc:
                        log.warning("releasing %s for %s failed: %s", prepared.pdiv, user, exc)


def virt_type(config: HostConfig) -> str:
    """``kvm`` or ``qemu`` (TCG): configured, or KVM when ``/dev/kvm`` can be opened."""
    if config.libvirt.virt_type != "auto":
        return config.libvirt.virt_type
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
