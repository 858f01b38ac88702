"""Host agents for the lab's hosts: certificates from a lab CA, a TOML config, a daemon each.

The lab plays the engine's part in enrolment: its CA signs each agent's certificate (valid for
127.0.0.1) and one client certificate that the tests, the demo and ``virtyard-hostctl`` use.
"""

from __future__ import annotations

import sys
from pathlib import Path

from virtyard.common.pki import CertPair, create_ca, issue
from virtyard.lab import ports
from virtyard.lab.process import read_pid, start_daemon, terminate, wait_until


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


class AgentProcess:
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

    @property
    def pidfile(self) -> Path:
        return self.root / "hostd.pid"

    @property
    def log_path(self) -> Path:
        return self.root / "hostd.log"

    def pid(self) -> int | None:
        return read_pid(self.pidfile)

    def is_running(self) -> bool:
        return self.pid() is not None

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

    def start(self, timeout: float = 30.0) -> None:
        """Start the agent (no-op when it runs) and wait until it accepts TLS connections."""
        if self.is_running():
            return
        ports.ensure_free(self.port, f"host agent of {self.name}")
        self.write_config()
        start_daemon(
            [sys.executable, "-m", "virtyard.host.server", "--config", str(self.config_path)],
            pidfile=self.pidfile, log=self.log_path, timeout=timeout,
            ready=lambda: ports.port_is_listening(self.port),
            what=f"host agent {self.name} on port {self.port}")

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            terminate(pid, grace=10)
        self.pidfile.unlink(missing_ok=True)
        # The kernel closes a killed server's sockets a moment after the process is gone.
        wait_until(lambda: ports.port_is_free(self.port), timeout=10)

    def status(self) -> dict[str, object]:
        return {"name": self.name, "address": self.address, "pid": self.pid(),
                "running": self.is_running(), "log": str(self.log_path)}
