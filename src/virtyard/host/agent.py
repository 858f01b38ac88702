"""The host agent's services, built once from the configuration and shared by every verb."""

from __future__ import annotations

import logging
import os

from virtyard.host.config import HostConfig
from virtyard.host.rpc.locks import KeyedLocks
from virtyard.host.storage.connections import ConnectionRegistry
from virtyard.host.storage.devices import DeviceService
from virtyard.host.storage.initiator import Initiator, choose_initiator_kind
from virtyard.host.storage.userspace_initiator import UserspaceInitiator
from virtyard.host.storage.volumes import VolumeService
from virtyard.host.virt.cdrom import CdServices, reconcile
from virtyard.host.virt.drives import DriveResolver
from virtyard.host.virt.guest_names import GuestNames
from virtyard.host.virt.libvirt_conn import LibvirtConnection
from virtyard.host.virt.migration import Migrations
from virtyard.host.virt.vms import VmManager
from virtyard.host.virt.volume_sources import ChapSecrets, VolumeSources

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
        # The agent's one table of named locks (verbs, VMs, volume prepares: see rpc/locks.py).
        self.locks = KeyedLocks()
        self.initiator = initiator or make_initiator(config)
        self.connections = ConnectionRegistry(config.state_dir / "storage" / "connections.json")
        self.devices = DeviceService(self.initiator, self.connections,
                                     probe_bytes=config.storage.probe_bytes,
                                     timeout=config.storage.login_timeout)
        self.volumes = VolumeService(config.state_dir / "storage", self.initiator, self.devices,
                                     initiator_name=config.storage.initiator_name,
                                     timeout=config.storage.login_timeout,
                                     lvm_udev=config.storage.lvm_udev, locks=self.locks)
        self.libvirt = LibvirtConnection(config.libvirt.uri)
        self.sources = VolumeSources(self.volumes, self.connections, ChapSecrets(self.libvirt),
                                     initiator_name=config.storage.initiator_name)
        self.drives = DriveResolver(self.devices, self.sources,
                                    initiator_kind=self.initiator.kind,
                                    initiator_name=config.storage.initiator_name)
        self.vms = VmManager(self.libvirt, self.drives, virt_type=virt_type(config),
                             release=self.sources.release, locks=self.locks)
        self.cd = CdServices(self.vms, self.volumes, self.sources, die_at=config.debug.die_at)
        self.migrations = Migrations(self.vms, config)
        self.guest_names = GuestNames(self.vms, config.state_dir / "ch")
        self.vms.channels = self.guest_names.channels
        self.vms.devices_changed = self.guest_names.poke

    def recover(self) -> None:
        """At agent start: undo what a crash left half-done (LUN attachments, activations) and
        settle CD changes in flight, so prepared volumes and drives agree again."""
        try:
            self.volumes.recover()
            log.info("recovery: %s", reconcile(self.cd))
        except Exception:  # libvirt or storage unreachable now: the agent still serves
            log.exception("recovery at start failed; it runs again at the next start")
        self.guest_names.start()

    @property
    def migration_uri(self) -> str:
        """Where other hosts' libvirtd send this host VMs (peer-to-peer migration)."""
        return (self.config.libvirt.migration_uri
                or f"qemu+tls://{self.config.server.address}/system")


def virt_type(config: HostConfig) -> str:
    """``kvm`` or ``qemu`` (TCG): configured, or KVM when ``/dev/kvm`` can be opened."""
    if config.libvirt.virt_type != "auto":
        return config.libvirt.virt_type
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
