"""virtyard-hostsim: simulated hosts speak the agent's protocol (mutual TLS, the real verbs'
names, parameter and result models and error codes), keep their state, change at the rate they
are told, and push the changes through Host.getEvents."""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter

from virtyard.common.pki import create_ca, issue
from virtyard.host.client import ClientTls, HostCallError, HostClient
from virtyard.host.rpc.errors import (
    HotplugDiskError,
    HotunplugDiskError,
    InvalidParameterError,
    NoSuchVmError,
    VmCreateError,
    VmExistsError,
)
from virtyard.host.verbs import SCHEMA
from virtyard.hostsim.cli import make_pki
from virtyard.hostsim.server import ServerTls, Simulator
from virtyard.hostsim.state import SAN_IQN, SimHost, SimOptions
from virtyard.hostsim.verbs import SIM_SCHEMA

REQUIRED = {
    "Host.ping", "Host.getCapabilities", "Host.getAllVmStats", "Host.getVMFullList",
    "Host.getEvents", "Host.getDeviceList", "Host.getDevicesVisibility",
    "StoragePool.connectStorageServer", "StoragePool.disconnectStorageServer",
    "StoragePool.getConnections", "ISCSIConnection.discoverSendTargets", "VM.create",
    "VM.destroy", "VM.shutdown", "VM.getStats", "VM.hotplugDisk", "VM.hotunplugDisk",
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[ServerTls, ClientTls]:
    directory = tmp_path_factory.mktemp("pki")
    server, (cert, key) = make_pki(directory, "127.0.0.1")
    return server, ClientTls(cert, key, server.ca)


@pytest.fixture(scope="module")
def sim(pki: tuple[ServerTls, ClientTls]) -> Iterator[Simulator]:
    options = SimOptions(hosts=3, vms_per_host=20, base_port=0, luns_per_host=8,
                         change_rate=0.25, change_interval=0.2, guest_name_delay=0.1, seed=3)
    with Simulator(options, pki[0]) as simulator:
        yield simulator
    # Every error the tests provoked was one its verb declares.
    assert [d.undeclared for d in simulator.dispatchers] == [Counter()] * options.hosts


def client(sim: Simulator, pki: tuple[ServerTls, ClientTls], index: int = 0) -> HostClient:
    return HostClient(sim.hosts[index].endpoint, pki[1], timeout=30)


def check(method: str, answer: Any) -> Any:
    """``answer`` is valid for the real agent's result type of ``method``."""
    TypeAdapter(SCHEMA.verbs[method].result).validate_python(answer)
    return answer


def test_every_verb_is_the_agents_own() -> None:
    assert set(SIM_SCHEMA.verbs) >= REQUIRED
    for name, verb in SIM_SCHEMA.verbs.items():
        real = SCHEMA.verbs[name]
        assert verb.params is real.params, name
        assert verb.result == real.result, name
        assert verb.errors == real.errors, name


def test_a_client_without_a_good_certificate_is_refused_in_the_handshake(
        sim: Simulator, pki: tuple[ServerTls, ClientTls], tmp_path: Path) -> None:
    url = f"https://{sim.hosts[0].endpoint}/jsonrpc"
    body = {"jsonrpc": "2.0", "id": 1, "method": "Host.ping"}
    anonymous = ssl.create_default_context(cafile=str(pki[0].ca))
    with httpx.Client(verify=anonymous) as http, pytest.raises(httpx.TransportError):
        http.post(url, json=body)
    other_ca = create_ca(tmp_path / "other", "someone else's CA")
    stranger = issue(other_ca, tmp_path / "other", "stranger", common_name="stranger",
                     server=False, client=True)
    foreign = ssl.create_default_context(cafile=str(pki[0].ca))
    foreign.load_cert_chain(str(stranger.cert), str(stranger.key))
    with httpx.Client(verify=foreign) as http, pytest.raises(httpx.TransportError):
        http.post(url, json=body)
    with client(sim, pki) as good:  # the same request with the right certificate
        assert check("Host.ping", good.call("Host.ping"))["agentStartedAt"] > 0


def test_host_verbs_answer_the_agents_shapes(
        sim: Simulator, pki: tuple[ServerTls, ClientTls]) -> None:
    host = sim.hosts[1]
    with client(sim, pki, 1) as c:
        ping = check("Host.ping", c.call("Host.ping"))
        assert ping["agentStartedAt"] == sim.started_at
        caps = check("Host.getCapabilities", c.call("Host.getCapabilities"))
        assert (caps["hostUUID"], caps["hostName"], caps["iscsiInitiatorName"]) == (
            host.host_uuid, host.name, host.initiator_name)
        assert caps["hostUUID"] != sim.hosts[0].host_uuid
        stats = check("Host.getAllVmStats", c.call("Host.getAllVmStats"))
        assert len(stats) == 20 and all(s["status"] == "Up" for s in stats)
        assert len({s["vmId"] for s in stats}) == 20
        full = check("Host.getVMFullList",
                     c.call("Host.getVMFullList", {"vmList": [stats[0]["vmId"]]}))
        assert [f["vmId"] for f in full] == [stats[0]["vmId"]]
        for disk in full[0]["devices"]:
            assert disk["GUID"] and disk["guestName"].startswith("/dev/sd")
            assert {"type", "device", "iface", "index", "address", "serial"} <= set(disk)
        everything = check("Host.getVMFullList", c.call("Host.getVMFullList"))
        assert len(everything) == 20
        luns = check("Host.getDeviceList", c.call("Host.getDeviceList"))
        assert len(luns) == 8 + 20  # the free pool and each VM's own disk
        assert {lun["status"] for lun in luns} == {"free", "used"}
        assert all(lun["pathlist"][0]["iqn"] == SAN_IQN for lun in luns)
        assert all(lun["pathstatus"][0]["state"] == "active" for lun in luns)
        one = check("Host.getDeviceList", c.call("Host.getDeviceList",
                                                 {"guids": [luns[0]["GUID"]]}))
        assert [lun["GUID"] for lun in one] == [luns[0]["GUID"]]
        assert c.call("Host.getDeviceList", {"storageType": "FCP"}) == []
        assert check("Host.getDevicesVisibility", c.call(
            "Host.getDevicesVisibility", {"guidList": [luns[0]["GUID"], "3600" + "0" * 28]}
        )) == {luns[0]["GUID"]: True, "3600" + "0" * 28: False}
        events = check("Host.getEvents", c.call("Host.getEvents", {"since": 0}))
        assert events["reset"] and events["events"] == []


def test_storage_verbs_keep_connections(sim: Simulator, pki: tuple[ServerTls, ClientTls]) -> None:
    with client(sim, pki, 2) as c:
        targets = check("ISCSIConnection.discoverSendTargets", c.call(
            "ISCSIConnection.discoverSendTargets", {"host": "192.0.2.10", "port": 3260}))
        assert targets == [f"192.0.2.10:3260,1 {SAN_IQN}"]
        conn = {"id": "c1", "connection": "192.0.2.10", "port": 3260, "iqn": SAN_IQN}
        wrong = {"id": "c2", "connection": "192.0.2.10", "iqn": "iqn.2026-11.org.example:x"}
        answer = c.call("StoragePool.connectStorageServer",
                        {"domainType": 3, "connectionParams": [conn, wrong]})
        assert check("StoragePool.connectStorageServer", answer) == [
            {"id": "c1", "status": 0}, {"id": "c2", "status": 465}]
        c.call("StoragePool.connectStorageServer", {"domainType": 3, "connectionParams": [conn]})
        kept = check("StoragePool.getConnections", c.call("StoragePool.getConnections"))
        assert [(k["id"], k["refs"], k["iqn"]) for k in kept] == [("c1", 2, SAN_IQN)]
        for refs in (1, 0):
            assert c.call("StoragePool.disconnectStorageServer",
                          {"domainType": 3, "connectionParams": [conn]}) == [
                {"id": "c1", "status": 0}]
            assert [k["refs"] for k in c.call("StoragePool.getConnections")] == (
                [refs] if refs else [])
        with pytest.raises(HostCallError) as info:
            c.call("StoragePool.connectStorageServer", {"domainType": 3,
                                                        "connectionParams": []})
        assert info.value.code == InvalidParameterError.code
        with pytest.raises(HostCallError) as info:
            c.call("StoragePool.connectStorageServer",
                   {"domainType": 3, "connectionParams": [{**conn, "port": 0}]})
        assert info.value.code == -32602 and "port" in info.value.message


def test_vm_verbs_keep_state_and_push_events(
        sim: Simulator, pki: tuple[ServerTls, ClientTls]) -> None:
    host = sim.hosts[0]
    with client(sim, pki, 0) as c:
        since = c.call("Host.getEvents", {"since": 0})["seq"]
        free = [lun["GUID"] for lun in c.call("Host.getDeviceList")
                if lun["status"] == "free"]
        vm_id = str(uuid.uuid4())
        created = check("VM.create", c.call("VM.create", {"vmParams": {
            "vmId": vm_id, "vmName": "mine", "memSize": 512, "devices": [
                {"type": "disk", "device": "disk", "iface": "virtio", "index": 0,
                 "GUID": free[0], "serial": "boot", "diskId": "d-1"}]}}))
        assert created["status"] == "Up"
        [disk] = created["devices"]
        assert (disk["GUID"], disk["guestName"], disk["alias"]) == (free[0], "/dev/vda",
                                                                     "ua-d-1")
        with pytest.raises(HostCallError) as info:
            c.call("VM.create", {"vmParams": {"vmId": vm_id}})
        assert info.value.code == VmExistsError.code
        [stats] = check("VM.getStats", c.call("VM.getStats", {"vmID": vm_id}))
        assert stats["hash"] == created["hash"]

        plugged = check("VM.hotplugDisk", c.call("VM.hotplugDisk", {"vmID": vm_id, "drive": {
            "type": "disk", "device": "disk", "iface": "scsi", "index": 0, "GUID": free[1]}}))
        assert plugged["hash"] != created["hash"]
        new = next(d for d in plugged["devices"] if d["GUID"] == free[1])
        assert new["guestName"] == ""  # the guest has not named it yet

        def named() -> dict[str, Any]:
            [vm] = c.call("Host.getVMFullList", {"vmList": [vm_id]})
            return vm  # type: ignore[no-any-return]

        deadline = time.monotonic() + 5
        while not next(d for d in named()["devices"] if d["GUID"] == free[1])["guestName"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert next(d for d in named()["devices"]
                    if d["GUID"] == free[1])["guestName"] == "/dev/sda"

        unplugged = check("VM.hotunplugDisk", c.call("VM.hotunplugDisk", {
            "vmID": vm_id, "drive": {"GUID": free[1]}}))
        assert [d["GUID"] for d in unplugged["devices"]] == [free[0]]
        with pytest.raises(HostCallError) as info:
            c.call("VM.hotunplugDisk", {"vmID": vm_id, "drive": {"GUID": free[1]}})
        assert info.value.code == HotunplugDiskError.code
        with pytest.raises(HostCallError) as info:
            c.call("VM.hotplugDisk", {"vmID": vm_id, "drive": {
                "type": "disk", "device": "disk", "iface": "scsi", "index": 1,
                "GUID": "3600" + "1" * 28}})
        assert info.value.code == HotplugDiskError.code
        assert info.value.data["invisible"] == "LUN 3600" + "1" * 28  # as the agent says it

        assert check("VM.shutdown", c.call("VM.shutdown", {"vmID": vm_id})) == {
            "vmId": vm_id, "status": "Down"}
        with pytest.raises(HostCallError) as info:
            c.call("VM.getStats", {"vmID": vm_id})
        assert info.value.code == NoSuchVmError.code

        # What happened came as events, with the hashes getAllVmStats reported.
        seen: list[dict[str, Any]] = []
        while not any(e["vmId"] == vm_id and e["status"] == "Down" for e in seen):
            answer = check("Host.getEvents", c.call("Host.getEvents",
                                                     {"since": since, "timeout": 2}))
            assert not answer["reset"]
            since = answer["seq"]
            seen += answer["events"]
        mine = [(e["kind"], e["status"], e["reason"]) for e in seen if e["vmId"] == vm_id]
        assert mine == [("status", "Up", ""), ("devices", "Up", ""), ("devices", "Up", ""),
                        ("devices", "Up", ""), ("status", "Down", "shutdown-guest")]
        assert vm_id not in host.vms

        with pytest.raises(HostCallError) as info:  # a LUN this host does not see
            c.call("VM.create", {"vmParams": {"vmId": str(uuid.uuid4()), "devices": [
                {"type": "disk", "device": "disk", "iface": "virtio", "index": 0,
                 "GUID": "3600" + "2" * 28}]}})
        assert info.value.code == VmCreateError.code and "not visible" in info.value.message
        with pytest.raises(HostCallError) as info:
            c.call("VM.create", {"vmParams": {"vmId": "not-a-uuid"}})
        assert info.value.code == -32602 and "vmId" in info.value.message
        with pytest.raises(HostCallError) as info:
            c.call("VM.migrate", {})
        assert info.value.code == -32601


def test_device_changes_come_at_the_configured_rate(
        pki: tuple[ServerTls, ClientTls]) -> None:
    # 40 VMs, a tenth of them per 0.25 s: 4 changes per host per round, 16 per second.
    options = SimOptions(hosts=2, vms_per_host=40, base_port=0, change_rate=0.1,
                         change_interval=0.25, seed=5)
    with Simulator(options, pki[0]) as simulator, \
            HostClient(simulator.hosts[1].endpoint, pki[1]) as c:
        since = c.call("Host.getEvents", {"since": 0})["seq"]
        first = {s["vmId"]: s["hash"] for s in c.call("Host.getAllVmStats")}
        ticks = simulator.ticks
        start = time.monotonic()
        changes: list[dict[str, Any]] = []
        while time.monotonic() - start < 2.0:
            answer = c.call("Host.getEvents", {"since": since, "timeout": 1})
            assert not answer["reset"]
            since = answer["seq"]
            changes += answer["events"]
        rounds = simulator.ticks - ticks
        assert rounds >= 6
        assert {e["kind"] for e in changes} == {"devices"}
        assert abs(len(changes) - 4 * rounds) <= 8  # the window's ends cut rounds
        last = {s["vmId"]: s["hash"] for s in c.call("Host.getAllVmStats")}
        # Every change moved the VM's hash; getAllVmStats reports the last one of each VM...
        previous: dict[str, str] = {}
        for event in changes:
            assert event["hash"] != previous.get(event["vmId"])
            previous[event["vmId"]] = event["hash"]
        latest = {e["vmId"]: e["hash"] for e in changes}
        for vm_id, hash in latest.items():
            assert last[vm_id] == hash
        # ...and the VMs no event named kept their hash.
        assert {v for v in last if last[v] != first[v]} <= set(latest)


def test_a_long_poll_answers_at_once_on_a_change_or_after_its_timeout(
        pki: tuple[ServerTls, ClientTls]) -> None:
    quiet = SimOptions(hosts=1, vms_per_host=2, base_port=0, guest_name_delay=0.5)
    with Simulator(quiet, pki[0]) as simulator, \
            HostClient(simulator.hosts[0].endpoint, pki[1]) as c:
        since = c.call("Host.getEvents", {"since": 0})["seq"]
        start = time.monotonic()
        idle = c.call("Host.getEvents", {"since": since, "timeout": 0.4})
        assert 0.35 <= time.monotonic() - start < 2
        assert idle == {"seq": since, "reset": False, "events": []}
        assert c.call("Host.getEvents", {"since": since + 5})["reset"]  # from the future
        vm_id = next(iter(simulator.hosts[0].vms))
        start = time.monotonic()
        c.call("VM.destroy", {"vmID": vm_id})
        down = c.call("Host.getEvents", {"since": since, "timeout": 10})
        assert time.monotonic() - start < 1
        assert [(e["vmId"], e["status"], e["reason"]) for e in down["events"]] == [
            (vm_id, "Down", "destroyed")]


def test_the_simulated_life_of_a_host() -> None:
    options = SimOptions(vms_per_host=10, luns_per_host=2, change_rate=0.3,
                         crash_rate=0.0)
    host = SimHost(0, options, started_at=1_700_000_000.0, rng=random.Random(1))
    before = {v.vm_id: v.hash for v in host.vms.values()}
    totals = [host.tick()[0] for _ in range(10)]
    assert totals == [3] * 10  # 0.3 x 10 VMs, exactly, every round
    for vm in host.vms.values():
        assert len(vm.extra) <= 4
        names = [vm.guest_names[n] for n in vm.disks]
        assert len(set(names)) == len(names)  # the guest never gives one name twice
    assert sum(v.hash != before[v.vm_id] for v in host.vms.values()) >= 3
    crashing = SimHost(1, SimOptions(vms_per_host=10, crash_rate=0.25),
                       started_at=1_700_000_000.0, rng=random.Random(2))
    # A quarter of what is left each round, the fraction carried: 2.5, 2+.5, 1.5+.5, 1.
    assert [crashing.tick()[1] for _ in range(4)] == [2, 2, 2, 1]
    downs = [e for e in crashing.events.read(crashing.events.base).events]
    assert all((e.status, e.reason) == ("Down", "failed") for e in downs)
    assert len(crashing.vms) == 10 - len(downs)


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise AssertionError("no two free ports in a row")


def test_the_command_line(tmp_path: Path) -> None:
    port = _free_port_pair()
    hosts_file, env_file = tmp_path / "hosts.json", tmp_path / "sim.env"
    command = [sys.executable, "-m", "virtyard.hostsim.cli", "--hosts", "2",
               "--vms-per-host", "3", "--base-port", str(port), "--pki", str(tmp_path / "pki"),
               "--hosts-file", str(hosts_file), "--env-file", str(env_file),
               "--change-rate", "0.5", "--change-interval", "0.2", "--log-level", "WARNING"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 30
        tls = ClientTls(tmp_path / "pki" / "hostsim-client.pem",
                        tmp_path / "pki" / "hostsim-client-key.pem", tmp_path / "pki" / "ca.pem")
        while True:
            assert process.poll() is None, process.communicate()
            try:
                with HostClient(f"127.0.0.1:{port + 1}", tls, timeout=5) as c:
                    caps = c.call("Host.getCapabilities")
                break
            except Exception:
                assert time.monotonic() < deadline, "the simulator never answered"
                time.sleep(0.2)
        assert caps["hostName"] == "sim0002"
        env = env_file.read_text()
        assert f"VIRTYARD_HOSTS='127.0.0.1:{port} 127.0.0.1:{port + 1}'" in env
        assert "VIRTYARD_HOST_CERT=" in env and "VIRTYARD_HOST_CA=" in env
        assert '"name": "sim0001"' in hosts_file.read_text()
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then lets the signal end the process (as hostd).
        assert process.wait(15) in (0, -signal.SIGTERM)
        assert "Traceback" not in process.communicate()[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    bad = subprocess.run([sys.executable, "-m", "virtyard.hostsim.cli", "--hosts", "1",
                          "--change-rate", "2", "--pki", str(tmp_path / "pki")],
                         capture_output=True, text=True, timeout=60, check=False,
                         env={**os.environ})
    assert bad.returncode == 2 and "--change-rate" in bad.stderr
