"""The engine's configuration: one TOML file, every setting with a sane default.

Example (``/etc/virtyard/engine.toml``)::

    state_dir = "/var/lib/virtyard-engine"

    [server]                      # the REST API, HTTPS only
    address = "0.0.0.0"
    port = 8443
    cert = "pki/engine-server.pem"
    key = "pki/engine-server-key.pem"

    [database]
    url = "postgresql+psycopg://virtyard@db.example.com/virtyard"   # default: SQLite in state_dir

    [hosts]                       # how the engine reaches host agents (mutual TLS)
    ca = "pki/ca.pem"
    cert = "pki/engine.pem"
    key = "pki/engine-key.pem"

    [auth]
    admin_password_file = "/etc/virtyard/admin-password"

Relative paths are taken from the file's folder. ``VIRTYARD_ENGINE_DB_URL`` overrides the
database URL and ``VIRTYARD_ENGINE_ADMIN_PASSWORD`` the first admin password.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from virtyard.common.config import ConfigError, read_toml


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    address: str = "127.0.0.1"
    port: int = Field(default=8443, ge=1, le=65535)
    cert: Path = Path("pki/engine-server.pem")
    key: Path = Path("pki/engine-server-key.pem")


class DatabaseConfig(_Section):
    # Empty: an embedded SQLite database in state_dir (engine.db).
    url: str = ""
    echo: bool = False


class HostsConfig(_Section):
    ca: Path = Path("pki/ca.pem")
    cert: Path = Path("pki/engine.pem")
    key: Path = Path("pki/engine-key.pem")
    call_timeout: float = Field(default=120.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    per_host_connections: int = Field(default=8, ge=1, le=256)
    max_concurrent_calls: int = Field(default=512, ge=1, le=65536)


class HeartbeatConfig(_Section):
    interval: float = Field(default=3.0, gt=0)
    # Pings missed in a row before a host is non_responsive.
    misses: int = Field(default=2, ge=1)
    timeout: float = Field(default=5.0, gt=0)
    concurrency: int = Field(default=64, ge=1)


class MonitoringConfig(_Section):
    # The safety-net poll of every host's VMs (oVirt: 15 s); pushes bring changes sooner.
    poll_interval: float = Field(default=15.0, gt=0)
    push: bool = True
    long_poll: float = Field(default=25.0, gt=0, le=60)
    concurrency: int = Field(default=64, ge=1)
    # Benchmarks only: read every VM's full device list every cycle (what the hash avoids).
    naive: bool = False
    # Seconds between log lines of what the loop did (cycles, wall, calls); 0: none.
    report_interval: float = Field(default=300.0, ge=0)


class HaConfig(_Section):
    """High availability (``engine/ha``): restarts of crashed HA VMs, fencing of lost hosts."""

    # How often the HA loop looks at the database (monitoring also wakes it at once).
    interval: float = Field(default=2.0, gt=0)
    # Restart tries per VM before giving up (an error event), and the back-off between them.
    max_attempts: int = Field(default=5, ge=1, le=100)
    backoff_initial: float = Field(default=2.0, ge=0)
    backoff_max: float = Field(default=60.0, ge=0)
    # Why a VM went down (the host's stop reason) that counts as a crash worth a restart.
    crash_reasons: list[str] = ["failed", "crashed", "shutdown-host", "unknown"]
    # A VM a poll found gone has no reason yet; the host's own (pushed) reason usually
    # follows within a second. Wait this long for it, then count it as a crash.
    reason_grace: float = Field(default=5.0, ge=0)
    # Fence a non-responsive host with power management after it has been seen
    # non-responsive this long by this engine run (oVirt also waits after an engine start).
    fence_after: float = Field(default=3.0, ge=0)
    # How long a power off may take to show as off; checked every fence_poll seconds.
    fence_timeout: float = Field(default=60.0, gt=0)
    fence_poll: float = Field(default=1.0, gt=0)
    # Power the host back on after its VMs were restarted elsewhere.
    power_on_after_fence: bool = True
    # Where fence-agents programs (fence_<type>) are looked for; empty: beside the engine's
    # Python, then /usr/sbin and /usr/bin.
    fence_agent_dirs: list[Path] = []


class AuthConfig(_Section):
    # The first start creates admin@internal with this password (file, or the environment);
    # without one it generates a password and writes it to <state_dir>/admin-password (0600).
    admin_password_file: Path | None = None
    token_lifetime_minutes: int = Field(default=30, ge=1, le=7 * 24 * 60)


class ApiConfig(_Section):
    max_body_bytes: int = Field(default=1 << 20, ge=1024)


class TransfersConfig(_Section):
    """Image transfers (ISO uploads, ``engine/transfers``)."""

    # Seconds without a data request before an unfinished transfer is cancelled and cleaned
    # up (oVirt: 60); a client may ask for another value per transfer, up to max.
    inactivity_timeout: int = Field(default=60, ge=1)
    max_inactivity_timeout: int = Field(default=3600, ge=1)
    # Finished transfers stay this long for clients that poll their phase.
    keep_finished: float = Field(default=300.0, ge=0)
    # How often timeouts are checked.
    check_interval: float = Field(default=2.0, gt=0)
    # Where received bytes are kept until verified (absolute); default <state_dir>/transfers.
    spool_dir: Path | None = None
    # Parallel writers a client may use (OPTIONS max_writers).
    max_writers: int = Field(default=4, ge=1, le=64)
    # https://host:port clients reach the engine at (transfer_url); empty: the server's
    # address and port (its FQDN when it listens on every address).
    public_url: str = ""


class DebugConfig(_Section):
    # Fault injection for crash tests: the engine dies (os._exit) at this named point of a flow.
    die_at: str = ""


class EngineConfig(_Section):
    state_dir: Path = Path("/var/lib/virtyard-engine")
    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = DatabaseConfig()
    hosts: HostsConfig = HostsConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    auth: AuthConfig = AuthConfig()
    api: ApiConfig = ApiConfig()
    transfers: TransfersConfig = TransfersConfig()
    ha: HaConfig = HaConfig()
    debug: DebugConfig = DebugConfig()

    @property
    def database_url(self) -> str:
        url = os.environ.get("VIRTYARD_ENGINE_DB_URL") or self.database.url
        return url or f"sqlite:///{self.state_dir / 'engine.db'}"


def load_config(path: Path) -> EngineConfig:
    config = read_toml(path, EngineConfig)
    base = path.parent
    server = config.server.model_copy(update={"cert": base / config.server.cert,
                                              "key": base / config.server.key})
    hosts = config.hosts.model_copy(update={"ca": base / config.hosts.ca,
                                            "cert": base / config.hosts.cert,
                                            "key": base / config.hosts.key})
    auth = config.auth
    if auth.admin_password_file is not None:
        auth = auth.model_copy(update={"admin_password_file": base / auth.admin_password_file})
    return config.model_copy(update={"state_dir": base / config.state_dir, "server": server,
                                     "hosts": hosts, "auth": auth})


__all__ = ["ConfigError", "EngineConfig", "load_config"]
