"""The host agent's services, built once from the configuration and shared by every verb."""

from __future__ import annotations

import logging
import os

from virtyard.host.config import HostConfig
from virtyard.host.storage.connections import ConnectionRegistry
from virtyard.host.storage.devices import DeviceService
from virtyard.host.storage.initiator import Initiator, choose_initiator_kind
from virtyard.host.storage.userspace_initiator import UserspaceInitiator
from virtyard.host.storage.volumes import VolumeService
from virtyard.host.virt.domain_xml import DiskDevice, Source
from virtyard.host.virt.drives import DriveNotVisibleError, DriveResolver
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
        self.vms = VmManager(self.libvirt, self.drives, virt_type=virt_type(config))
        self.migrations = Migrations(self.vms, config)

    @property
    def migration_uri(self) -> str:
        """Where other hosts' libvirtd send this host VMs (peer-to-peer migration)."""
        return (self.config.libvirt.migration_uri
                or f"qemu+tls://{self.config.server.address}/system")

    def resolve_volume(self, device: DiskDevice) -> Source:
        """The source of an image volume (PDIV) on this host."""
        raise DriveNotVisibleError(f"volume {device.pdiv}")


def virt_type(config: HostConfig) -> str:
    """``kvm`` or ``qemu`` (TCG): configured, or KVM when ``/dev/kvm`` can be opened."""
    if config.libvirt.virt_type != "auto":
        return config.libvirt.virt_type
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
