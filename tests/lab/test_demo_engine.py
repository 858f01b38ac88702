"""`make demo` with the engine, as a person runs it: `virtyard-lab up` and `demo` with an env
file, then the oVirt SDK with nothing but that file's values; `down` leaves nothing behind."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import ovirtsdk4
import ovirtsdk4.types as otypes
import pytest

from virtyard.lab.lab import leftovers

pytestmark = pytest.mark.lab

LAB_CLI = [sys.executable, "-m", "virtyard.lab.cli"]
PORT_BASE = 42000 + int(os.environ.get("VIRTYARD_TEST_PORT_OFFSET", "0"))  # its own lab


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAB_CLI, *args], capture_output=True, text=True, timeout=600,
                          check=False)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        values[key] = shlex.split(value)[0] if value else ""
    return values


@pytest.fixture
def demo_state() -> Iterator[Path]:
    """A state folder for a demo lab (short: libvirt's socket paths); down at the end."""
    state = Path(f"/tmp/vy-demo-{uuid.uuid4().hex[:6]}")
    try:
        yield state
    finally:
        if state.exists():
            _cli("--state-dir", str(state), "down")


def test_demo_engine_answers_the_sdk_and_down_leaves_nothing(demo_state: Path,
                                                            tmp_path: Path) -> None:
    state, env_file = str(demo_state), tmp_path / "demo.env"
    up = _cli("--state-dir", state, "up", "--port-base", str(PORT_BASE), "--env-file",
              str(env_file))
    assert up.returncode == 0, up.stderr
    url = f"https://127.0.0.1:{PORT_BASE + 90}/ovirt-engine/api"
    assert f"engine: {url} (running" in up.stdout
    demo = _cli("--state-dir", state, "demo", "--env-file", str(env_file))
    assert demo.returncode == 0, demo.stderr

    env = read_env_file(env_file)
    assert env["VIRTYARD_ENGINE_URL"] == url
    assert env["VIRTYARD_ENGINE_USER"] == "admin@internal"
    assert Path(env["VIRTYARD_ENGINE_CA"]).is_file()
    password_file = demo_state / "engine" / "admin-password"
    assert env["VIRTYARD_ENGINE_PASSWORD"] == password_file.read_text().strip()
    assert password_file.stat().st_mode & 0o777 == 0o600
    connection = ovirtsdk4.Connection(
        url=env["VIRTYARD_ENGINE_URL"], username=env["VIRTYARD_ENGINE_USER"],
        password=env["VIRTYARD_ENGINE_PASSWORD"], ca_file=env["VIRTYARD_ENGINE_CA"])
    try:
        assert connection.test(raise_exception=True)
        hosts_service = connection.system_service().hosts_service()
        hosts = hosts_service.list()
        assert sorted((h.name, h.address, h.port, h.status) for h in hosts) == [
            ("host1", "127.0.0.1", PORT_BASE + 50, otypes.HostStatus.UP),
            ("host2", "127.0.0.1", PORT_BASE + 51, otypes.HostStatus.UP)]

        # The demo again (make demo on a running demo): the same hosts, left as they were.
        again = _cli("--state-dir", state, "demo", "--env-file", str(env_file))
        assert again.returncode == 0, again.stderr
        assert sorted((h.name, h.id) for h in hosts_service.list()) == sorted(
            (h.name, h.id) for h in hosts)
    finally:
        connection.close()

    down = _cli("--state-dir", state, "down")
    assert down.returncode == 0, down.stderr
    assert leftovers(demo_state) == []
