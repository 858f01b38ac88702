"""The host agent's services, built once from the configuration and shared by every verb."""

from __future__ import annotations

import logging

from virtyard.host.config import HostConfig
from virtyard.host.storage.connections import ConnectionRegistry
from virtyard.host.storage.devices import DeviceService
from virtyard.host.storage.initiator import Initiator, choose_initiator_kind
from virtyard.host.storage.userspace_initiator import UserspaceInitiator

log = logging.getLogger("virtyard.host.agent")


def make_initiator(config: HostConfig) -> Initiator:
    """The initiator the configuration asks for (auto: what this host's kernel supports)."""
    kind = choose_initiator_kind(config.storage.initiator)
    if kind == "kernel":
        from virtyard.host.storage.kernel_initiator import KernelInitiator  # noqa: PLC0415

        return KernelInitiator(config.storage.initiator_name)
    return UserspaceInitiator(config.storage.initiator_name)


class HostAgent:
    """Everything a verb may need: configuration, initiator, connections, devices."""

    def __init__(self, config: HostConfig, *, initiator: Initiator | None = None) -> None:
        self.config = config
        self.initiator = initiator or make_initiator(config)
        self.connections = ConnectionRegistry(config.state_dir / "storage" / "connections.json")
        self.devices = DeviceService(self.initiator, self.connections,
                                     probe_bytes=config.storage.probe_bytes,
                                     timeout=config.storage.login_timeout)
