"""Host.getEvents on the real lab: a VM whose QEMU is killed (or destroyed behind the agent's
back) is Down within a second of libvirt seeing it, with libvirt's reason; a hot-plugged LUN and
the guest's name for it come as devices events carrying the hash getAllVmStats then reports;
long-polls block no other verb; sequence numbers grow across an agent restart, which resets
readers.

Where libvirt "sees" a killed QEMU: once the process is gone, not when it dies. A killed QEMU is
a zombie until its parent reaps it (QEMU is daemonised: the parent is PID 1), and libvirt counts
a zombie as alive (it polls ``kill(pid, 0)`` every 200 ms). On a host whose PID 1 is systemd that
is immediate; an init that reaps lazily delays libvirt (and so the agent, which reports what
libvirt reports) by as long. The tests therefore time the event from when libvirt reported the
stop on a connection of their own, and from when the zombie was gone, and print the whole
kill-to-event time as well.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from virtyard.host.client import HostCallError, HostClient
from virtyard.host.virt.events import ensure_libvirt_event_loop
from virtyard.lab import qga
from virtyard.lab.guest_image import DEFAULT_CMDLINE
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab

pytestmark = pytest.mark.lab

MiB = 1 << 20
LATENCY = 1.0  # the engine's promise: a dead VM is down ≤ 1 s after the host sees it


@dataclass
class Seen:
    at: float  # time.monotonic() when the answer carrying it arrived
    event: dict[str, Any]


class Follower:
    """Long-polls one agent in a thread, as the engine does, and keeps every event."""

    def __init__(self, lab: Lab, index: int = 0) -> None:
        self.client = lab.agent_client(index)
        first = self.client.call("Host.getEvents", {"since": 0})
        assert first["reset"] and first["events"] == []
        self.since: int = first["seq"]
        self.seen: list[Seen] = []
        self.resets = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self.client.call("Host.getEvents",
                                          {"since": self.since, "timeout": 2})
            except Exception:
                time.sleep(0.2)
                continue
            now = time.monotonic()
            with self._cond:
                self.since = answer["seq"]
                self.resets += answer["reset"]
                self.seen += [Seen(now, e) for e in answer["events"]]
                self._cond.notify_all()

    def wait(self, match: Callable[[dict[str, Any]], bool], *, after: float = 0.0,
             timeout: float = 15.0) -> Seen:
        """The first event (arrived after ``after``) that ``match`` accepts."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for seen in self.seen:
                    if seen.at >= after and match(seen.event):
                        return seen
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"no such event in {timeout:g} s; got "
                                f"{[s.event for s in self.seen]}")
                self._cond.wait(remaining)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


@pytest.fixture
def follower(lab: Lab) -> Iterator[Follower]:
    made = Follower(lab)
    yield made
    made.close()


@pytest.fixture
def start_vm(lab: Lab, host_client: HostClient) -> Iterator[Callable[..., dict[str, Any]]]:
    made: list[str] = []

    def start(devices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        vm_id = str(uuid.uuid4())
        made.append(vm_id)
        image = lab.guest_image
        result: dict[str, Any] = host_client.call("VM.create", {"vmParams": {
            "vmId": vm_id, "vmName": f"ev-{vm_id[:8]}", "memSize": 256,
            "kernel": str(image.kernel), "initrd": str(image.initrd),
            "kernelArgs": DEFAULT_CMDLINE, "devices": devices or [],
            "consoleLog": str(lab.console_dir / f"{vm_id}.log")}})
        return result

    yield start
    for vm_id in made:
        with contextlib.suppress(HostCallError):
            host_client.call("VM.destroy", {"vmID": vm_id})


class LibvirtStops:
    """When libvirt itself reported each VM stopped (a lifecycle callback of the test's own)."""

    def __init__(self, lab: Lab) -> None:
        ensure_libvirt_event_loop()
        self.at: dict[str, float] = {}
        self._cond = threading.Condition()
        self.conn = libvirt.open(lab.hosts[0].uri)
        self._id = self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None)

    def _event(self, _conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            with self._cond:
                self.at.setdefault(dom.UUIDString(), time.monotonic())
                self._cond.notify_all()

    def wait(self, vm_id: str, timeout: float = 15.0) -> float:
        with self._cond:
            assert self._cond.wait_for(lambda: vm_id in self.at, timeout), \
                f"libvirt never reported {vm_id} stopped"
            return self.at[vm_id]

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.domainEventDeregisterAny(self._id)
        self.conn.close()


@pytest.fixture
def libvirt_stops(lab: Lab) -> Iterator[LibvirtStops]:
    made = LibvirtStops(lab)
    yield made
    made.close()


def gone_at(pid: int, timeout: float = 15.0) -> float:
    """When process ``pid`` (dead: a zombie until reaped) is gone altogether."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"process {pid} still there"
        time.sleep(0.005)
    return time.monotonic()


def qemu_pid(vm_id: str) -> int:
    """The QEMU process running VM ``vm_id`` (its command line carries ``-uuid <id>``)."""
    wanted = vm_id.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"qemu" in args[0] and any(
                a == b"-uuid" and b == wanted for a, b in itertools.pairwise(args)):
            return int(entry.name)
    raise AssertionError(f"no QEMU process for {vm_id}")


def of(vm_id: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["vmId"] == vm_id and all(e[k] == v for k, v in fields.items())


def test_a_killed_qemu_is_down_within_a_second(
        follower: Follower, libvirt_stops: LibvirtStops,
        start_vm: Callable[..., dict[str, Any]]) -> None:
    vm = start_vm()
    vm_id = vm["vmId"]
    up = follower.wait(of(vm_id, kind="status", status="Up"))
    assert up.event["hash"] == vm["hash"]
    pid = qemu_pid(vm_id)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    reaped = gone_at(pid)
    down = follower.wait(of(vm_id, kind="status", status="Down"), after=killed)
    seen = libvirt_stops.wait(vm_id)
    print(f"\nQEMU killed: zombie reaped after {(reaped - killed) * 1000:.0f} ms, libvirt "
          f"reported it after {(seen - killed) * 1000:.0f} ms, Down event after "
          f"{(down.at - killed) * 1000:.0f} ms ({(down.at - seen) * 1000:.0f} ms after "
          f"libvirt)")
    assert down.at - seen < LATENCY
    assert down.at - reaped < LATENCY
    assert down.event["reason"] == "failed"
    assert down.event["hash"] == vm["hash"]


def test_a_vm_destroyed_behind_the_agents_back_is_down_within_a_second(
        lab: Lab, host_client: HostClient, follower: Follower, libvirt_stops: LibvirtStops,
        start_vm: Callable[..., dict[str, Any]]) -> None:
    vm_id = start_vm()["vmId"]
    follower.wait(of(vm_id, kind="status", status="Up"))
    conn = libvirt.open(lab.hosts[0].uri)
    try:
        dom = conn.lookupByUUIDString(vm_id)
        destroyed = time.monotonic()
        dom.destroy()
        returned = time.monotonic()
    finally:
        conn.close()
    down = follower.wait(of(vm_id, kind="status", status="Down"), after=destroyed)
    seen = libvirt_stops.wait(vm_id)
    print(f"\nvirsh destroy: returned after {(returned - destroyed) * 1000:.0f} ms, libvirt "
          f"reported it after {(seen - destroyed) * 1000:.0f} ms, Down event after "
          f"{(down.at - destroyed) * 1000:.0f} ms ({(down.at - seen) * 1000:.0f} ms after "
          f"libvirt)")
    assert down.at - seen < LATENCY
    assert down.at - returned < LATENCY
    assert down.event["reason"] == "destroyed"
    assert vm_id not in {s["vmId"] for s in host_client.call("Host.getAllVmStats", {})}


def test_a_guest_that_powers_off_is_down_with_its_reason(
        lab: Lab, host_client: HostClient, follower: Follower,
        start_vm: Callable[..., dict[str, Any]]) -> None:
    vm_id = start_vm()["vmId"]
    qga.wait_ready(libvirt.open(lab.hosts[0].uri).lookupByUUIDString(vm_id))
    asked = time.monotonic()
    assert host_client.call("VM.shutdown", {"vmID": vm_id, "timeout": 30})["status"] == "Down"
    down = follower.wait(of(vm_id, kind="status", status="Down"), after=asked)
    assert down.event["reason"] == "shutdown-guest"


def test_hotplug_and_the_guests_name_come_as_devices_events(
        lab: Lab, follower: Follower, make_target: Callable[..., TargetInfo],
        connect_target: Callable[..., Any], start_vm: Callable[..., dict[str, Any]]) -> None:
    host_client = follower.client  # thread-safe: a second connection of its pool
    target = make_target([16 * MiB, 16 * MiB])
    connect_target(target)
    vm = start_vm([{"type": "disk", "device": "disk", "iface": "scsi", "index": 0,
                    "GUID": target.wwid(1), "serial": "evfirst"}])
    vm_id = vm["vmId"]
    qga.wait_ready(libvirt.open(lab.hosts[0].uri).lookupByUUIDString(vm_id))
    follower.wait(lambda e: e["vmId"] == vm_id and e["kind"] == "devices", timeout=20)
    time.sleep(1.0)  # let the guest names service settle on the first disk

    asked = time.monotonic()
    plugged = host_client.call("VM.hotplugDisk", {"vmID": vm_id, "drive": {
        "type": "disk", "device": "disk", "iface": "scsi", "index": 1,
        "GUID": target.wwid(2), "serial": "evsecond"}})
    answered = time.monotonic()
    event = follower.wait(of(vm_id, kind="devices", hash=plugged["hash"]), after=asked)
    print(f"\nhot-plug answered -> devices event: {(event.at - answered) * 1000:.0f} ms")
    assert event.at - answered < LATENCY
    assert event.event["status"] == "Up"

    # Then the guest names the new disk: one more devices event, and the full list read
    # after it carries the name under the hash the event announced.
    def named(e: dict[str, Any]) -> bool:
        if e["vmId"] != vm_id or e["kind"] != "devices" or e["hash"] == plugged["hash"]:
            return False
        [full] = host_client.call("Host.getVMFullList", {"vmList": [vm_id]})
        disks = {d["GUID"]: d["guestName"] for d in full["devices"]}
        return bool(disks.get(target.wwid(2))) and full["hash"] == e["hash"]

    follower.wait(named, after=asked, timeout=20)
    [stats] = host_client.call("VM.getStats", {"vmID": vm_id})
    assert stats["hash"] == follower.seen[-1].event["hash"]


def test_long_polls_block_no_other_verb(lab: Lab, host_client: HostClient) -> None:
    since = host_client.call("Host.getEvents", {})["seq"]
    clients = [lab.agent_client(0) for _ in range(4)]
    answers: list[tuple[float, dict[str, Any]]] = []
    try:
        start = time.monotonic()
        def poll(client: HostClient) -> None:
            answer = client.call("Host.getEvents", {"since": since, "timeout": 3})
            answers.append((time.monotonic(), answer))

        pollers = [threading.Thread(target=poll, args=(c,)) for c in clients]
        for poller in pollers:
            poller.start()
        time.sleep(0.3)
        pinged = time.monotonic()
        host_client.call("Host.ping", {})
        host_client.call("Host.getAllVmStats", {})
        assert time.monotonic() - pinged < 0.5
        for poller in pollers:
            poller.join(10)
        assert len(answers) == 4
        for at, answer in answers:
            assert not answer["reset"]
            assert at - start < 3 + 1.0
            if not answer["events"]:
                assert at - start >= 2.9  # nothing happened: it waited the whole timeout
    finally:
        for client in clients:
            client.close()


def test_an_agent_restart_resets_readers_and_numbers_keep_growing(lab: Lab) -> None:
    with lab.agent_client(0) as client:
        before = client.call("Host.getEvents", {})["seq"]
    agent = lab.agents[0]
    agent.stop()
    agent.start()
    with lab.agent_client(0) as client:
        after = client.call("Host.getEvents", {"since": before})
        assert after["reset"] and after["events"] == []
        assert after["seq"] > before
        again = client.call("Host.getEvents", {"since": after["seq"], "timeout": 0.2})
        assert not again["reset"]
