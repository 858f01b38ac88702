"""Host.getEvents: the event log (sequence numbers, resets, waiting, the ring), the verb through
the dispatcher, and the watcher on libvirt's in-process test driver (real lifecycle events,
real ``getAllDomainStats``, real metadata writes)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import libvirt
import pytest

from virtyard.host.rpc.errors import InvalidParamsError
from virtyard.host.rpc.jsonrpc import Dispatcher
from virtyard.host.verbs import SCHEMA
from virtyard.host.verbs.events import HostEvents
from virtyard.host.virt.events import (
    REASON_DESTROYED,
    REASON_UNKNOWN,
    EventLog,
    VmEvent,
    VmEvents,
    sequence_base,
)
from virtyard.host.virt.libvirt_conn import LibvirtConnection
from virtyard.host.virt.metadata import VmMetadata
from virtyard.host.virt.vms import VmManager

BASE = sequence_base(1_700_000_000.25)
TEST_URI = "test:///default"


# -- the log ------------------------------------------------------------------------------------

def test_sequence_numbers_start_after_the_start_time_in_microseconds() -> None:
    assert BASE == 1_700_000_000_250_000
    log = EventLog(BASE)
    assert log.read(BASE).seq == BASE  # nothing yet: seq is the base, no reset
    assert not log.read(BASE).reset
    first = log.append("vm-a", "status", "Up", "1-0")
    second = log.append("vm-a", "devices", "Up", "1-1")
    assert (first.seq, second.seq) == (BASE + 1, BASE + 2)
    batch = log.read(BASE)
    assert (batch.seq, batch.reset) == (BASE + 2, False)
    assert [e.seq for e in batch.events] == [BASE + 1, BASE + 2]
    assert batch.events[1] == VmEvent(BASE + 2, "vm-a", "devices", "Up", "1-1", "")
    assert [e.seq for e in log.read(BASE + 1).events] == [BASE + 2]
    later = EventLog(sequence_base(1_700_000_001.0))  # a later agent run: larger numbers
    assert later.read(0).seq > batch.seq


@pytest.mark.parametrize("since", [0, BASE - 1, BASE + 3, BASE + 10**9])
def test_a_since_of_another_run_or_the_future_is_a_reset(since: int) -> None:
    log = EventLog(BASE)
    for n in range(2):
        log.append(f"vm-{n}", "status", "Up", f"{n}-0")
    start = time.monotonic()
    batch = log.read(since, timeout=5)
    assert time.monotonic() - start < 0.5  # a reset answers at once
    assert (batch.seq, batch.reset, batch.events) == (BASE + 2, True, [])


def test_the_ring_keeps_the_newest_and_resets_readers_who_lost_events() -> None:
    log = EventLog(BASE, capacity=4)
    for n in range(10):
        log.append("vm", "devices", "Up", f"1-{n}")
    # Kept: BASE+7 .. BASE+10. Continuing from BASE+6 loses nothing; from BASE+5 it would.
    kept = log.read(BASE + 6)
    assert not kept.reset
    assert [e.seq for e in kept.events] == [BASE + 7, BASE + 8, BASE + 9, BASE + 10]
    assert [e.hash for e in kept.events] == ["1-6", "1-7", "1-8", "1-9"]
    lost = log.read(BASE + 5)
    assert (lost.reset, lost.seq, lost.events) == (True, BASE + 10, [])
    assert log.read(BASE).reset
    assert [e.seq for e in log.read(BASE + 9).events] == [BASE + 10]


def test_nothing_new_waits_for_the_timeout() -> None:
    log = EventLog(BASE)
    log.append("vm", "status", "Up", "1-0")
    start = time.monotonic()
    batch = log.read(BASE + 1, timeout=0.3)
    waited = time.monotonic() - start
    assert 0.29 <= waited < 1.0
    assert (batch.seq, batch.reset, batch.events) == (BASE + 1, False, [])
    start = time.monotonic()
    assert log.read(BASE + 1).events == []  # timeout 0: at once
    assert time.monotonic() - start < 0.05


def test_a_waiting_reader_wakes_at_the_next_event() -> None:
    log = EventLog(BASE)
    woke: list[float] = []
    heard: list[int] = []
    log.subscribe(lambda: heard.append(log.newest))

    def wait() -> None:
        batch = log.read(BASE, timeout=10)
        woke.append(time.monotonic())
        assert [e.vm_id for e in batch.events] == ["vm-x"]

    reader = threading.Thread(target=wait)
    reader.start()
    time.sleep(0.2)
    sent = time.monotonic()
    log.append("vm-x", "status", "Down", "3-2", REASON_DESTROYED)
    reader.join(5)
    assert woke and woke[0] - sent < 0.1
    assert heard == [BASE + 1]


def test_close_wakes_waiting_readers() -> None:
    log = EventLog(BASE)
    done = threading.Event()
    reader = threading.Thread(target=lambda: (log.read(BASE, timeout=30), done.set()))
    reader.start()
    time.sleep(0.1)
    log.close()
    assert done.wait(2)


# -- the verb -----------------------------------------------------------------------------------

def _agent_with(log: EventLog) -> Any:
    agent = SimpleNamespace()
    agent._virtyard_vm_events = SimpleNamespace(log=log)  # as the first call leaves it
    return agent


def test_verb_shape_and_parameters() -> None:
    log = EventLog(BASE)
    dispatcher = Dispatcher(SCHEMA, _agent_with(log))
    first = dispatcher.call("Host.getEvents", {})
    assert first == {"seq": BASE, "reset": True, "events": []}
    log.append("11111111-2222-4333-8444-555555555555", "status", "Down", "4-2", "failed")
    answer = dispatcher.call("Host.getEvents", {"since": BASE, "timeout": 1})
    HostEvents.model_validate(answer)
    assert answer == {"seq": BASE + 1, "reset": False, "events": [
        {"seq": BASE + 1, "vmId": "11111111-2222-4333-8444-555555555555", "kind": "status",
         "status": "Down", "hash": "4-2", "reason": "failed"}]}
    assert dispatcher.call("Host.getEvents", [BASE + 1, 0]) == {
        "seq": BASE + 1, "reset": False, "events": []}
    for bad in ({"timeout": 61}, {"timeout": -1}, {"since": -5}, {"since": "x"},
                {"wait": 1}):
        with pytest.raises(InvalidParamsError):
            dispatcher.call("Host.getEvents", bad)
    verb = SCHEMA.verbs["Host.getEvents"]
    assert verb.lock_keys(verb.parse_params({"timeout": 5})) == []


def test_a_long_poll_blocks_no_other_verb_and_wakes_at_once() -> None:
    log = EventLog(BASE)
    dispatcher = Dispatcher(SCHEMA, _agent_with(log))
    answers: list[dict[str, Any]] = []
    pollers = [threading.Thread(target=lambda: answers.append(
        dispatcher.call("Host.getEvents", {"since": BASE, "timeout": 20}))) for _ in range(3)]
    for poller in pollers:
        poller.start()
    time.sleep(0.2)
    start = time.monotonic()
    assert "time" in dispatcher.call("Host.ping")
    assert time.monotonic() - start < 0.5
    assert len(dispatcher.locks) == 0
    sent = time.monotonic()
    log.append("vm", "devices", "Up", "1-5")
    for poller in pollers:
        poller.join(5)
    assert time.monotonic() - sent < 0.5
    assert [a["seq"] for a in answers] == [BASE + 1] * 3


# -- the watcher, on libvirt's test driver --------------------------------------------------------

def _domain_xml(vm_id: str) -> str:
    return (f"<domain type='test'><name>ev-{vm_id[:8]}</name><uuid>{vm_id}</uuid>"
            "<memory>1024</memory><os><type>hvm</type></os></domain>")


@pytest.fixture
def test_conn() -> Iterator[libvirt.virConnect]:
    conn = libvirt.open(TEST_URI)
    yield conn
    conn.close()


@pytest.fixture
def watch() -> Iterator[Callable[..., VmEvents]]:
    made: list[VmEvents] = []

    def start(*, libvirt_events: bool = True) -> VmEvents:
        vms = VmManager(LibvirtConnection(TEST_URI), drives=None,  # type: ignore[arg-type]
                        virt_type="qemu")
        events = VmEvents(vms, started_at=time.time(), period=0.2,
                          libvirt_events=libvirt_events)
        events.start()
        made.append(events)
        return events

    yield start
    for events in made:
        events.stop()


def _next(events: VmEvents, since: int, vm_id: str, *, timeout: float = 3.0
          ) -> tuple[int, list[VmEvent]]:
    """Wait for events of ``vm_id`` after ``since``; (new since, its events)."""
    deadline = time.monotonic() + timeout
    while True:
        batch = events.log.read(since, timeout=max(0.0, deadline - time.monotonic()))
        assert not batch.reset
        mine = [e for e in batch.events if e.vm_id == vm_id]
        since = batch.seq
        if mine or time.monotonic() >= deadline:
            return since, mine


def test_watcher_reports_status_and_device_changes(
        watch: Callable[..., VmEvents], test_conn: libvirt.virConnect) -> None:
    events = watch()
    first = events.log.read(0)
    assert first.reset and first.events == []
    since = first.seq
    vm_id = str(uuid.uuid4())
    dom = test_conn.createXML(_domain_xml(vm_id), 0)
    since, [up] = _next(events, since, vm_id)
    assert (up.kind, up.status, up.hash, up.reason) == ("status", "Up", f"{dom.ID()}-0", "")

    dom.suspend()
    since, [paused] = _next(events, since, vm_id)
    assert (paused.kind, paused.status) == ("status", "Paused")
    dom.resume()
    since, [resumed] = _next(events, since, vm_id)
    assert resumed.status == "Up"

    vms = events.watcher.vms
    vms.write_metadata(dom, VmMetadata(generation=1))
    since, [changed] = _next(events, since, vm_id)
    assert (changed.kind, changed.status, changed.hash) == ("devices", "Up", f"{dom.ID()}-1")

    # A change is reported once the operation that made it let the VM go; a change undone
    # before that (a refused hot-plug) is never reported.
    with vms.locks.hold([vm_id]):
        vms.write_metadata(dom, VmMetadata(generation=2))
        vms.write_metadata(dom, VmMetadata(generation=3))
        time.sleep(0.4)
        assert events.log.read(since).events == []
    since, [after] = _next(events, since, vm_id)
    assert after.hash == f"{dom.ID()}-3"
    with vms.locks.hold([vm_id]):
        vms.write_metadata(dom, VmMetadata(generation=4))
        vms.write_metadata(dom, VmMetadata(generation=3))  # rolled back
    time.sleep(0.3)
    assert events.log.read(since).events == []

    killed = time.monotonic()
    dom.destroy()
    since, [down] = _next(events, since, vm_id)
    assert time.monotonic() - killed < 1.0
    assert (down.kind, down.status, down.hash, down.reason) == (
        "status", "Down", after.hash, REASON_DESTROYED)


def test_watcher_without_libvirt_events_still_reports_a_vm_that_went_away(
        watch: Callable[..., VmEvents], test_conn: libvirt.virConnect) -> None:
    events = watch(libvirt_events=False)
    since = events.log.read(0).seq
    vm_id = str(uuid.uuid4())
    dom = test_conn.createXML(_domain_xml(vm_id), 0)
    since, [up] = _next(events, since, vm_id)
    gone = time.monotonic()
    dom.destroy()
    since, [down] = _next(events, since, vm_id)
    assert time.monotonic() - gone < 1.0
    assert (down.status, down.reason, down.hash) == ("Down", REASON_UNKNOWN, up.hash)


def test_watcher_reports_a_new_run_of_the_same_vm(
        watch: Callable[..., VmEvents], test_conn: libvirt.virConnect) -> None:
    events = watch(libvirt_events=False)
    vm_id = str(uuid.uuid4())
    dom = test_conn.createXML(_domain_xml(vm_id), 0)
    time.sleep(0.3)
    since = events.log.read(0).seq
    # Stopped and started again (between two polls or across one): down with the last run's
    # hash, then up with the new run's.
    old = f"{dom.ID()}-0"
    dom.destroy()
    again = test_conn.createXML(_domain_xml(vm_id), 0)
    deadline = time.monotonic() + 3
    seen: list[VmEvent] = []
    while len(seen) < 2 and time.monotonic() < deadline:
        batch = events.log.read(since, timeout=0.5)
        since = batch.seq
        seen += [e for e in batch.events if e.vm_id == vm_id]
    assert [(e.status, e.hash) for e in seen] == [("Down", old), ("Up", f"{again.ID()}-0")]
    again.destroy()


def test_vms_already_running_at_start_are_the_baseline_not_events(
        watch: Callable[..., VmEvents], test_conn: libvirt.virConnect) -> None:
    vm_id = str(uuid.uuid4())
    dom = test_conn.createXML(_domain_xml(vm_id), 0)
    try:
        events = watch()
        since = events.log.read(0).seq
        time.sleep(0.5)
        assert events.log.read(since).events == []
    finally:
        dom.destroy()


def test_a_vm_that_stops_by_itself_lets_go_of_its_holds_first(
        test_conn: libvirt.virConnect) -> None:
    released: list[tuple[str, bool]] = []
    vms = VmManager(LibvirtConnection(TEST_URI), drives=None,  # type: ignore[arg-type]
                    virt_type="qemu")
    events = VmEvents(vms, started_at=time.time(), period=0.2)

    def release(vm_id: str) -> None:  # what the agent does: drop the VM's volume holds
        released.append((vm_id, bool(events.log.read(0).events)
                         and any(e.status == "Down" and e.vm_id == vm_id
                                 for e in events.log.read(0).events)))

    vms.release = release
    events.start()
    try:
        since = events.log.read(0).seq
        vm_id = str(uuid.uuid4())
        dom = test_conn.createXML(_domain_xml(vm_id), 0)
        since, _ = _next(events, since, vm_id)
        dom.destroy()  # behind the agent's back, as a QEMU crash or a guest poweroff
        since, [down] = _next(events, since, vm_id)
        assert down.status == "Down"
        assert released == [(vm_id, False)]  # released before the engine could hear of it

        # A VM someone holds (a destroy or a create in progress) is theirs to release.
        busy = str(uuid.uuid4())
        dom = test_conn.createXML(_domain_xml(busy), 0)
        since, _ = _next(events, since, busy)
        with vms.locks.hold([busy]):
            dom.destroy()
            since, [down] = _next(events, since, busy)
        assert down.status == "Down" and [r for r in released if r[0] == busy] == []
    finally:
        events.stop()
