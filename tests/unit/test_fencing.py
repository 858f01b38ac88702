"""Fence drivers against real counterparts: Redfish through sushy against sushy-tools'
emulator (fake driver, basic auth), IPMI through pyghmi against pyghmi's own BMC simulator
(``fakebmc``), fence-agents programs through the stdin protocol; the power sequence (off is only
off once an agent *shows* it off; the next agent takes over on failure); secrets never leak."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from virtyard.engine.fencing.agent import AgentSpec, FenceError, parse_options
from virtyard.engine.fencing.ipmi import IpmiDriver
from virtyard.engine.fencing.power import power
from virtyard.engine.fencing.program import ProgramDriver, stdin_text
from virtyard.engine.fencing.redfish import RedfishDriver

OFFSET = int(os.environ.get("VIRTYARD_TEST_PORT_OFFSET", "0"))
SECRET = "bmc-s3cret-never-shown"
BIN = Path(sys.executable).parent


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the emulator exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def redfish(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """sushy-tools' Redfish emulator, fake driver, one system, basic auth."""
    root = tmp_path_factory.mktemp("redfish")
    users = root / "htpasswd"
    users.write_text("admin:" + bcrypt.hashpw(SECRET.encode(), bcrypt.gensalt(4)).decode()
                     + "\n")
    port = free_port()
    config = root / "emulator.conf"
    config.write_text(
        "SUSHY_EMULATOR_FAKE_DRIVER = True\n"
        f"SUSHY_EMULATOR_AUTH_FILE = {str(users)!r}\n"
        f"SUSHY_EMULATOR_STATE_DIR = {str(root / 'state')!r}\n"
        "SUSHY_EMULATOR_FAKE_SYSTEMS = [{'uuid': '27946b59-9e44-4fa7-8e91-f3527a1ef094',"
        " 'name': 'node1', 'power_state': 'On', 'nics': []}]\n")
    proc = subprocess.Popen([str(BIN / "sushy-emulator"), "--config", str(config), "-i",
                             "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=(root / "log").open("wb"))
    try:
        wait_listening(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def spec_redfish(port: int, password: str = SECRET) -> AgentSpec:
    return AgentSpec("redfish", "127.0.0.1", port, "admin", password, {"ssl": "0"})


def test_redfish_off_on_status_against_the_emulator(redfish: int) -> None:
    driver = RedfishDriver(spec_redfish(redfish))
    assert driver.power("status") == "on"
    result = power([spec_redfish(redfish)], "off", timeout=30, poll=0.2)
    assert result.ok and result.state == "off"
    assert driver.power("status") == "off"
    assert power([spec_redfish(redfish)], "on", timeout=30, poll=0.2).state == "on"
    assert driver.power("status") == "on"


def test_redfish_wrong_password_fails_without_showing_it(redfish: int) -> None:
    wrong = "wrong-" + SECRET
    with pytest.raises(FenceError) as failure:
        RedfishDriver(spec_redfish(redfish, wrong)).power("status")
    assert wrong not in str(failure.value)
    result = power([spec_redfish(redfish, wrong)], "off", timeout=5, poll=0.2)
    assert not result.ok and wrong not in result.detail


@pytest.fixture(scope="module")
def bmc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """pyghmi's BMC simulator (user admin, password ``password``), on a UDP port; see
    ``fake_bmc.py`` for the one change it needs."""
    port = free_port(socket.SOCK_DGRAM)
    log = tmp_path_factory.mktemp("bmc") / "log"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fake_bmc.py")),
                             str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    time.sleep(1.0)
    assert proc.poll() is None
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_ipmi_off_on_status_against_pyghmi_bmc(bmc: int) -> None:
    spec = AgentSpec("ipmilan", "127.0.0.1", bmc, "admin", "password")
    driver = IpmiDriver(spec)
    assert driver.power("on") == "on"
    assert power([spec], "off", timeout=20, poll=0.2).state == "off"
    assert driver.power("status") == "off"
    assert power([spec], "on", timeout=20, poll=0.2).state == "on"


def test_ipmi_wrong_password_is_a_failure(bmc: int) -> None:
    spec = AgentSpec("ipmilan", "127.0.0.1", bmc, "admin", "not-" + SECRET)
    with pytest.raises(FenceError) as failure:
        IpmiDriver(spec).power("status")
    assert SECRET not in str(failure.value)


FAKE_AGENT = """#!/bin/sh
# A fence-agents style program: options on stdin; its power state in a file.
opts=$(cat)
echo "$opts" > "{root}/last-stdin"
echo "$@" > "{root}/last-argv"
action=$(echo "$opts" | sed -n 's/^action=//p')
state="{root}/state"
case "$action" in
  off) echo off > "$state" ;;
  on) echo on > "$state" ;;
  status) [ "$(cat "$state" 2>/dev/null || echo on)" = on ] && exit 0 || exit 2 ;;
  *) echo "bad action $action" >&2; exit 1 ;;
esac
"""


def fake_program(root: Path, name: str = "fence_fake") -> Path:
    path = root / name
    path.write_text(FAKE_AGENT.format(root=root))
    path.chmod(0o755)
    return path


def test_program_driver_speaks_the_fence_agents_protocol(tmp_path: Path) -> None:
    fake_program(tmp_path)
    spec = AgentSpec("fake", "bmc.example", 623, "admin", SECRET, {"plug": "node7"})
    driver = ProgramDriver(spec, [tmp_path])
    assert driver.power("status") == "on"
    assert driver.power("off") == "off"
    assert driver.power("status") == "off"
    stdin = (tmp_path / "last-stdin").read_text()
    assert "ip=bmc.example" in stdin and "plug=node7" in stdin and f"password={SECRET}" in stdin
    assert SECRET not in (tmp_path / "last-argv").read_text()  # never on a command line


def test_program_missing_or_failing_is_a_fence_error(tmp_path: Path) -> None:
    with pytest.raises(FenceError, match="no fence agent program fence_absent"):
        ProgramDriver(AgentSpec("absent", "x"), [tmp_path]).power("status")
    (tmp_path / "fence_broken").write_text(f"#!/bin/sh\necho 'bad login {SECRET}' >&2\nexit 1\n")
    (tmp_path / "fence_broken").chmod(0o755)
    with pytest.raises(FenceError) as failure:
        ProgramDriver(AgentSpec("broken", "x", password=SECRET), [tmp_path]).power("off")
    assert SECRET not in str(failure.value) and "***" in str(failure.value)


def test_stdin_has_no_injected_lines() -> None:
    text = stdin_text(AgentSpec("x", "a", options={"plug": "p"}, password="pw\naction=on"),
                      "off")
    assert "action=on" not in text


class Scripted:
    """A driver whose answers are scripted: the power sequence's rules, without hardware."""

    def __init__(self, states: list[str], fail: bool = False) -> None:
        self.states = states
        self.fail = fail
        self.calls: list[str] = []

    def power(self, action: str) -> str:
        self.calls.append(action)
        if self.fail:
            raise FenceError("unreachable")
        return self.states.pop(0) if self.states else "on"


def test_off_waits_until_the_agent_shows_off_and_fails_over() -> None:
    broken, slow = Scripted([], fail=True), Scripted(["on", "on", "off"])
    drivers = {"a": broken, "b": slow}
    result = power([AgentSpec("x", "a"), AgentSpec("x", "b")], "off", poll=0,
                   factory=lambda spec, _dirs: drivers[spec.address], sleep=lambda _s: None)
    assert result.ok and result.state == "off" and result.agent == "x at b"
    assert slow.calls == ["off", "status", "status"]


def test_off_never_shown_is_not_off() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += 1

    result = power([AgentSpec("x", "a")], "off", timeout=5, poll=1,
                   factory=lambda _s, _d: Scripted(["on"] * 100), sleep=sleep,
                   clock=lambda: now[0])
    assert not result.ok and "still on" in result.detail


def test_options_parse() -> None:
    assert parse_options("ssl=0, plug=node1,lanplus") == {"ssl": "0", "plug": "node1",
                                                          "lanplus": "1"}
    with pytest.raises(ValueError):
        parse_options("bad key=1")
