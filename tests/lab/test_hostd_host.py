"""Host.ping and Host.getCapabilities on the real lab agents, over mutual-TLS JSON-RPC."""

from __future__ import annotations

import time
import uuid
from typing import Any

import libvirt
import pytest

import virtyard
from virtyard.host.client import HostClient
from virtyard.lab.lab import Lab

pytestmark = pytest.mark.lab


def capabilities(lab: Lab, index: int) -> dict[str, Any]:
    with lab.agent_client(index) as client:
        result: dict[str, Any] = client.call("Host.getCapabilities")
        return result


def test_ping(host_client: HostClient) -> None:
    before = time.time()
    first = host_client.call("Host.ping")
    second = host_client.call("Host.ping", [])
    assert set(first) == {"time", "agentStartedAt", "bootId"}
    assert before - 5 <= first["time"] <= second["time"] <= time.time() + 5
    assert first["agentStartedAt"] == second["agentStartedAt"] <= first["time"]
    assert first["bootId"] == second["bootId"]
    assert first["bootId"] is None or uuid.UUID(first["bootId"])


def test_capabilities_of_each_lab_host(lab: Lab) -> None:
    caps = [capabilities(lab, i) for i in range(len(lab.agents))]
    assert len(caps) >= 2
    for i, (c, agent, host) in enumerate(zip(caps, lab.agents, lab.hosts, strict=True)):
        assert c["hostUUID"] == host.host_uuid, f"host {i}"
        assert c["hostName"] == agent.name
        assert c["iscsiInitiatorName"] == f"iqn.2026-11.org.virtyard.lab:{agent.name}"
        assert c["initiator"] == "userspace"
        assert c["memoryMiB"] > 0
        assert c["cpuThreads"] >= c["cpuCores"] >= c["cpuSockets"] >= 1
        assert c["cpuModel"] and c["cpuArch"]
        assert c["virtType"] == agent.virt_type
        assert c["migrationUri"] == agent.migration_uri == host.migration_uri
        assert c["agentVersion"] == virtyard.__version__
        conn = libvirt.open(host.uri)
        try:
            major, minor, micro = (int(n) for n in c["libvirtVersion"].split("."))
            assert major * 1_000_000 + minor * 1_000 + micro == conn.getLibVersion()
            assert conn.getInfo()[1] == c["memoryMiB"]
        finally:
            conn.close()
    assert caps[0]["hostUUID"] != caps[1]["hostUUID"]
    assert caps[0]["iscsiInitiatorName"] != caps[1]["iscsiInitiatorName"]


def test_agent_restart_changes_agent_started_at(lab: Lab) -> None:
    agent = lab.agents[1]
    with lab.agent_client(1) as client:
        before = client.call("Host.ping")
    agent.stop()
    agent.start()
    with lab.agent_client(1) as client:
        after = client.call("Host.ping")
    assert after["agentStartedAt"] > before["agentStartedAt"]
    assert after["bootId"] == before["bootId"]  # the agent restarted, not the host
