"""The engine for a lab: ``virtyard-engine`` as a real process, its configuration and PKI.

The lab's CA plays the engine's CA: the engine reaches the lab's agents with the lab's client
certificate and serves its REST API with a server certificate from the same CA, so one CA file
is all a client (the SDK, curl, the tests) needs. Every lab runs one on SQLite in
``<lab>/engine/`` (part of ``Lab.up``/``down``); tests may start more, one per database (SQLite
file or a throwaway PostgreSQL).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx

from virtyard.common.pki import CertPair, issue
from virtyard.lab import ports
from virtyard.lab.agents import LabPki
from virtyard.lab.daemon import PortDaemon
from virtyard.lab.errors import LabError
from virtyard.lab.process import pid_alive, wait_until

ADMIN = "admin@internal"
API_PATH = "/ovirt-engine/api"
SSO_TOKEN_PATH = "/ovirt-engine/sso/oauth/token"
SSO_LOGOUT_PATH = "/ovirt-engine/services/sso-logout"


class EngineProcess(PortDaemon):
    """One ``virtyard-engine run`` with its own state folder, port and database."""

    def __init__(self, root: Path, port: int, pki: LabPki, *, database_url: str = "",
                 heartbeat_interval: float = 1.0, poll_interval: float = 5.0,
                 extra_config: str = "") -> None:
        self.root = root
        self.port = port
        self.pki = pki
        self.database_url = database_url
        self.heartbeat_interval = heartbeat_interval
        # The monitoring's safety-net poll; the push channel brings changes sooner.
        self.poll_interval = poll_interval
        # Appended to the configuration at the next start (fault injection in crash tests).
        self.extra_config = extra_config

    @property
    def url(self) -> str:
        return f"https://{ports.LOOPBACK}:{self.port}{API_PATH}"

    @property
    def ca_file(self) -> Path:
        return self.pki.ca.cert

    @property
    def config_path(self) -> Path:
        return self.root / "engine.toml"

    @property
    def password_file(self) -> Path:
        return self.root / "admin-password"

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def server_cert(self) -> CertPair:
        return issue(self.pki.ca, self.pki.root, "engine-server", common_name=ports.LOOPBACK,
                     addresses=(ports.LOOPBACK, "localhost"), server=True, client=False)

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.pki.ensure()
        if not self.password_file.exists():
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(12) + "\n")
        cert = self.server_cert()
        db = f'url = "{self.database_url}"\n' if self.database_url else ""
        self.config_path.write_text(
            f'state_dir = "{self.root / "state"}"\n\n'
            "[server]\n"
            f'address = "{ports.LOOPBACK}"\nport = {self.port}\n'
            f'cert = "{cert.cert}"\nkey = "{cert.key}"\n\n'
            f"[database]\n{db}\n"
            "[hosts]\n"
            f'ca = "{self.pki.ca.cert}"\ncert = "{self.pki.client.cert}"\n'
            f'key = "{self.pki.client.key}"\n\n'
            "[heartbeat]\n"
            f"interval = {self.heartbeat_interval}\n\n"
            "[monitoring]\n"
            f"poll_interval = {self.poll_interval}\n\n"
            "[auth]\n"
            f'admin_password_file = "{self.password_file}"\n' + self.extra_config)

    pid_name = "engine.pid"
    log_name = "engine.log"

    def module_args(self) -> list[str]:
        return ["-m", "virtyard.engine.server", "run", "--config", str(self.config_path)]

    @property
    def what(self) -> str:
        return f"engine on port {self.port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start the engine (no-op when it runs); return once its API port listens."""
        super().start(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would (no clean shutdown of anything)."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not pid_alive(pid), timeout=10)
        self.pidfile.unlink(missing_ok=True)
        wait_until(lambda: ports.port_is_free(self.port), timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def status(self) -> dict[str, object]:
        return {"url": self.url, "pid": self.pid(), "running": self.is_running(),
                "log": str(self.log_path)}

    @contextlib.contextmanager
    def api(self, user: str = ADMIN, password: str | None = None, *,
            timeout: float = 30.0) -> Iterator[httpx.Client]:
        """An httpx client of the REST API (JSON, the lab's CA, a bearer token of ``user``);
        paths are relative to the API (``api.get("/hosts")``); logged out at the end."""
        base = f"https://{ports.LOOPBACK}:{self.port}"
        tls = ssl.create_default_context(cafile=str(self.ca_file))
        with httpx.Client(base_url=self.url, verify=tls, timeout=timeout) as client:
            answer = client.post(base + SSO_TOKEN_PATH, data={
                "grant_type": "password", "scope": "ovirt-app-api", "username": user,
                "password": self.password if password is None else password})
            if answer.status_code != 200:
                raise LabError(f"engine login as {user} failed: {answer.status_code} "
                               f"{answer.text[:200]}")
            token = answer.json()["access_token"]
            client.headers.update({"Authorization": f"Bearer {token}",
                                   "Accept": "application/json"})
            try:
                yield client
            finally:
                with contextlib.suppress(httpx.HTTPError):
                    client.post(base + SSO_LOGOUT_PATH, data={"token": token})
