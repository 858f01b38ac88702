"""Host.ping and Host.getCapabilities: result shapes (libvirt's in-process test driver or a fake
connection), and the heartbeat answering without libvirt, storage or locks."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import virtyard
from virtyard.host.config import HostConfig, LibvirtConfig, StorageConfig
from virtyard.host.rpc.errors import GeneralError
from virtyard.host.rpc.jsonrpc import Dispatcher
from virtyard.host.verbs import SCHEMA
from virtyard.host.verbs.host import (
    LibvirtFacts,
    capabilities_of,
    processor_name,
    read_boot_id,
    version_string,
)
from virtyard.host.virt.libvirt_conn import LibvirtConnection

IQN = "iqn.2026-11.org.virtyard.test:h1"
MIGRATION_URI = "qemu+tcp://127.0.0.1:16509/system"
HOST_UUID = "8b7c3f0e-6a55-5a1e-9d6b-2b5f7c1d0e42"

CAPABILITIES_XML = f"""<capabilities>
  <host>
    <uuid>{HOST_UUID}</uuid>
    <cpu>
      <arch>x86_64</arch>
      <model>Skylake-Client-IBRS</model>
      <vendor>Intel</vendor>
      <topology sockets='1' dies='1' cores='4' threads='2'/>
    </cpu>
  </host>
</capabilities>"""


class Untouchable:
    """An agent whose every service fails the test when a verb reaches for it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Host.ping touched agent.{name}")


def fake_agent(libvirt: Any, *, initiator: str = "userspace",
               virt_type: str = "qemu") -> Any:
    config = HostConfig(name="h1", storage=StorageConfig(initiator_name=IQN),
                        libvirt=LibvirtConfig(migration_uri=MIGRATION_URI))
    return SimpleNamespace(config=config, initiator=SimpleNamespace(kind=initiator),
                           libvirt=libvirt, vms=SimpleNamespace(virt_type=virt_type),
                           migration_uri=MIGRATION_URI)


class FakeLibvirt:
    """LibvirtConnection's call(): facts from a fixed XML, optionally blocking first."""

    uri = "qemu:///fake"

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.entered = threading.Event()

    def call(self, fn: Any) -> Any:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        conn = SimpleNamespace(getCapabilities=lambda: CAPABILITIES_XML,
                               getInfo=lambda: ["x86_64", 7823, 8, 2400, 1, 1, 4, 2],
                               getLibVersion=lambda: 9_000_000,
                               getVersion=lambda: 7_002_019)
        return fn(conn)


# -- Host.ping ----------------------------------------------------------------------------------

def test_ping_answers_without_touching_the_agent() -> None:
    agent: Any = Untouchable()
    before = time.time()
    result = Dispatcher(SCHEMA, agent).call("Host.ping")
    assert set(result) == {"time", "agentStartedAt", "bootId"}
    assert before <= result["time"] <= time.time()
    assert result["agentStartedAt"] <= result["time"]
    assert result["bootId"] == read_boot_id()
    again = Dispatcher(SCHEMA, agent).call("Host.ping", [])
    assert again["agentStartedAt"] == result["agentStartedAt"]  # same process, same value
    assert again["time"] >= result["time"]


def test_ping_takes_no_lock_and_refuses_parameters() -> None:
    verb = SCHEMA.verbs["Host.ping"]
    assert verb.lock_keys(verb.parse_params(None)) == []
    with pytest.raises(Exception, match="unknown parameter 'x'"):
        verb.parse_params({"x": 1})


def test_ping_answers_while_libvirt_hangs_and_locks_are_held() -> None:
    gate = threading.Event()
    libvirt = FakeLibvirt(gate)
    dispatcher = Dispatcher(SCHEMA, fake_agent(libvirt))
    stuck = threading.Thread(target=dispatcher.call, args=("Host.getCapabilities",))
    stuck.start()
    try:
        assert libvirt.entered.wait(5)
        with dispatcher.locks.hold(["connection:c1", "device:3600", "vm:x", "domain:d"]):
            start = time.monotonic()
            assert "time" in dispatcher.call("Host.ping")
            assert time.monotonic() - start < 1
    finally:
        gate.set()
        stuck.join(10)


def test_boot_id(tmp_path: Path) -> None:
    path = tmp_path / "boot_id"
    path.write_text("401f0919-c0b6-4799-8c20-13f737906014\n")
    assert read_boot_id(path) == "401f0919-c0b6-4799-8c20-13f737906014"
    assert read_boot_id(tmp_path / "missing") is None


# -- Host.getCapabilities -----------------------------------------------------------------------

CAPABILITY_KEYS = {"hostUUID", "hostName", "iscsiInitiatorName", "initiator", "cpuModel",
                   "cpuSockets", "cpuCores", "cpuThreads", "cpuArch", "memoryMiB",
                   "libvirtVersion", "qemuVersion", "agentVersion", "virtType", "migrationUri"}


def test_capabilities_from_a_real_libvirt_connection() -> None:
    """libvirt's in-process test driver: a fixed node (i686, 3 GiB, 2 NUMA nodes x 2 sockets
    x 2 cores x 2 threads), no host UUID."""
    conn = LibvirtConnection("test:///default")
    try:
        result = Dispatcher(SCHEMA, fake_agent(conn, virt_type="kvm")).call(
            "Host.getCapabilities")
    finally:
        conn.close()
    assert set(result) == CAPABILITY_KEYS
    assert result["hostUUID"] is None
    assert result["hostName"] == "h1"
    assert result["iscsiInitiatorName"] == IQN
    assert result["initiator"] == "userspace"
    assert result["memoryMiB"] == 3072
    assert (result["cpuSockets"], result["cpuCores"], result["cpuThreads"]) == (4, 8, 16)
    assert result["cpuArch"] == "i686"
    assert result["cpuModel"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", result["libvirtVersion"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", result["qemuVersion"])
    assert result["agentVersion"] == virtyard.__version__
    assert result["virtType"] == "kvm"
    assert result["migrationUri"] == MIGRATION_URI


def test_capabilities_host_uuid_and_cpu_model() -> None:
    facts = LibvirtFacts(CAPABILITIES_XML, ["x86_64", 7823, 8, 2400, 1, 1, 4, 2], 10_002_001,
                         7_002_019)
    agent = fake_agent(FakeLibvirt(), initiator="kernel")
    caps = capabilities_of(agent, facts, cpu_name="Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz")
    assert caps.hostUUID == HOST_UUID
    assert caps.cpuModel == "Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz"
    assert (caps.cpuSockets, caps.cpuCores, caps.cpuThreads, caps.memoryMiB) == (1, 4, 8, 7823)
    assert (caps.libvirtVersion, caps.qemuVersion) == ("10.2.1", "7.2.19")
    assert (caps.initiator, caps.virtType) == ("kernel", "qemu")
    # No processor name in /proc/cpuinfo (some architectures): libvirt's CPU model.
    assert capabilities_of(agent, facts, cpu_name=None).cpuModel == "Skylake-Client-IBRS"


def test_capabilities_through_the_dispatcher() -> None:
    result = Dispatcher(SCHEMA, fake_agent(FakeLibvirt())).call("Host.getCapabilities", {})
    assert set(result) == CAPABILITY_KEYS
    assert result["hostUUID"] == HOST_UUID
    assert SCHEMA.verbs["Host.getCapabilities"].lock_keys(
        SCHEMA.verbs["Host.getCapabilities"].parse_params(None)) == []


def test_capabilities_when_libvirt_is_unreachable(tmp_path: Path) -> None:
    conn = LibvirtConnection(f"test://{tmp_path}/no-such-node.xml")
    with pytest.raises(GeneralError) as info:
        Dispatcher(SCHEMA, fake_agent(conn)).call("Host.getCapabilities")
    assert info.value.code == 100
    assert "no-such-node.xml" in info.value.message


def test_version_string() -> None:
    assert version_string(9_000_000) == "9.0.0"
    assert version_string(10_010_003) == "10.10.3"


def test_processor_name(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC\n")
    assert processor_name(cpuinfo) == "AMD EPYC"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n")
    assert processor_name(cpuinfo) is None
    assert processor_name(tmp_path / "missing") is None
