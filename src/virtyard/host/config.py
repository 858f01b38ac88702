"""The host agent's configuration: one TOML file, every setting with a sane default.

Example (``/etc/virtyard/hostd.toml``)::

    [server]
    address = "0.0.0.0"
    port = 54321
    cert = "/etc/virtyard/pki/host.pem"
    key = "/etc/virtyard/pki/host-key.pem"
    ca = "/etc/virtyard/pki/ca.pem"

    [storage]
    initiator = "auto"            # auto | userspace | kernel
    initiator_name = "iqn.2026-11.org.virtyard:host1"

    [libvirt]
    uri = "qemu:///system"
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from virtyard.common.config import ConfigError, read_toml


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    address: str = "127.0.0.1"
    port: int = Field(default=54321, ge=1, le=65535)
    cert: Path = Path("/etc/virtyard/pki/host.pem")
    key: Path = Path("/etc/virtyard/pki/host-key.pem")
    ca: Path = Path("/etc/virtyard/pki/ca.pem")
    workers: int = Field(default=32, ge=1, le=1024)


class StorageConfig(_Section):
    initiator: Literal["auto", "userspace", "kernel"] = "auto"
    initiator_name: str = "iqn.2026-11.org.virtyard:host"
    discovery_timeout: float = Field(default=10.0, gt=0)
    login_timeout: float = Field(default=15.0, gt=0)
    # First bytes of each LUN read for signature probing (LVM label and mda header, MBR/GPT,
    # most filesystem superblocks); LVM metadata text further in is read only where needed.
    probe_bytes: int = Field(default=8192, ge=512, le=1 << 20)
    # Whether LVM works with udev (udev_sync, udev_rules): "auto" asks the host (udev's control
    # socket /run/udev/control exists); "off" where udev runs but cannot answer LVM (some
    # containers), "on" to insist.
    lvm_udev: Literal["auto", "on", "off"] = "auto"


class LibvirtConfig(_Section):
    uri: str = "qemu:///system"
    # Where other hosts' libvirtd reach this host's for peer-to-peer migration
    # (empty: qemu+tls://<server.address>/system).
    migration_uri: str = ""
    # The emulator QEMU binary domains run; KVM or TCG is decided at start ("auto" probes /dev/kvm
    # usability the way the lab does; "qemu" forces TCG).
    virt_type: Literal["auto", "kvm", "qemu"] = "auto"


class DebugConfig(_Section):
    # Fault injection for crash tests: the agent dies (os._exit) at this named step, e.g.
    # "changecd:updated" (steps: marked, prepared, ejected, updated, applied, torn-down). Never in
    # production.
    die_at: str = ""


class HostConfig(_Section):
    """The whole agent configuration."""

    name: str = "host"
    state_dir: Path = Path("/var/lib/virtyard-hostd")
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    libvirt: LibvirtConfig = LibvirtConfig()
    debug: DebugConfig = DebugConfig()


def load_config(path: Path) -> HostConfig:
    """Read and validate ``path``; relative paths in it are taken from the file's folder."""
    config = read_toml(path, HostConfig)
    base = path.parent
    server = config.server.model_copy(update={
        "cert": base / config.server.cert, "key": base / config.server.key,
        "ca": base / config.server.ca})
    return config.model_copy(update={"server": server, "state_dir": base / config.state_dir})


__all__ = ["ConfigError", "HostConfig", "load_config"]
