"""Host agents for the lab's hosts: certificates from a lab CA, a TOML config, a daemon each.

The lab plays the engine's part in enrolment: its CA signs each agent's certificate (valid for
127.0.0.1) and one client certificate that the tests, the demo and ``virtyard-hostctl`` use.
"""

from __future__ import annotations

from pathlib import Path

from virtyard.common.pki import CertPair, create_ca, issue
from virtyard.lab import ports
from virtyard.lab.daemon import PortDaemon


class LabPki:
    """The lab's CA and the client certificate the engine side uses."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        ca = create_ca(self.root, "Virtyard lab CA")
        issue(ca, self.root, "engine", common_name="virtyard-engine", server=False, client=True)

    @property
    def ca(self) -> CertPair:
        return CertPair(self.root / "ca.pem", self.root / "ca-key.pem")

    @property
    def client(self) -> CertPair:
        return CertPair(self.root / "engine.pem", self.root / "engine-key.pem")

    def host_cert(self, name: str) -> CertPair:
        return issue(self.ca, self.root, name, common_name=name,
                     addresses=(ports.LOOPBACK, "localhost"), server=True, client=True)


class AgentProcess(PortDaemon):
    """One ``virtyard-hostd`` for one lab host."""

    def __init__(self, name: str, root: Path, port: int, libvirt_uri: str, pki: LabPki, *,
                 migration_uri: str = "", virt_type: str = "qemu") -> None:
        self.name = name
        self.root = root
        self.port = port
        self.libvirt_uri = libvirt_uri
        self.migration_uri = migration_uri
        self.virt_type = virt_type
        self.pki = pki
        # Appended to the configuration at the next start (fault injection in crash tests).
        self.extra_config = ""

    @property
    def initiator_name(self) -> str:
        """The iSCSI initiator name this agent logs in with."""
        return f"iqn.2026-11.org.virtyard.lab:{self.name}"

    @property
    def address(self) -> str:
        return f"{ports.LOOPBACK}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "hostd.toml"

    def write_config(self) -> None:
        """The agent's TOML configuration (with :attr:`extra_config` appended)."""
        extra = self.extra_config
        cert = self.pki.host_cert(self.name)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f'name = "{self.name}"\n'
            f'state_dir = "{self.root / "state"}"\n\n'
            "[server]\n"
            f'address = "{ports.LOOPBACK}"\nport = {self.port}\n'
            f'cert = "{cert.cert}"\nkey = "{cert.key}"\nca = "{self.pki.ca.cert}"\n\n'
            "[storage]\n"
            f'initiator = "userspace"\n'
            f'initiator_name = "{self.initiator_name}"\n\n'
            "[libvirt]\n"
            f'uri = "{self.libvirt_uri}"\n'
            f'migration_uri = "{self.migration_uri}"\n'
            f'virt_type = "{self.virt_type}"\n' + extra)

    pid_name = "hostd.pid"
    log_name = "hostd.log"

    def module_args(self) -> list[str]:
        return ["-m", "virtyard.host.server", "--config", str(self.config_path)]

    @property
    def what(self) -> str:
        return f"host agent {self.name} on port {self.port}"

    def status(self) -> dict[str, object]:
        return {"name": self.name, "address": self.address, "pid": self.pid(),
                "running": self.is_running(), "log": str(self.log_path)}
