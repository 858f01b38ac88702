"""``Host.getEvents``: the engine's long-poll for VM status and device changes.

The engine polls every host for ``Host.getAllVmStats`` and re-reads only VMs whose ``hash``
moved; this verb is the push half on the same mutual-TLS channel (no listener on the engine):
the engine keeps one call open per host and the agent answers it as soon as something happens.

Threads: the dispatcher runs every verb in a worker thread (``[server] workers``, 32 by
default). A waiting ``Host.getEvents`` holds one of them for up to its ``timeout`` (60 s at
most) but no VM, storage or named lock, and it is woken the moment an event is appended. One
engine keeps one long-poll open per host, so it costs one worker of 32; a second engine (or a
stuck client) costs another. Shutting the agent down waits for open long-polls to answer
(uvicorn's graceful shutdown): at most their ``timeout``.

The service (:class:`~virtyard.host.virt.events.VmEvents`) is started when the agent starts
(by the first call where no server started it, as in tests) and then follows the VMs for the
agent's life — so a VM that stops by itself lets go of its CD, and a hot-unplug hears
libvirt's device-removed event, even before any engine asks. A reader's first answer is a
reset (its ``since`` is not of this run), so nothing that happened before it is needed.
"""

from __future__ import annotations

import threading
from typing import Literal

from pydantic import BaseModel, Field

from virtyard.host.agent import HostAgent
from virtyard.host.rpc.schema import Params
from virtyard.host.verbs.host import AGENT_STARTED_AT
from virtyard.host.verbs.registry import SCHEMA
from virtyard.host.virt.events import EventBatch, VmEvents

MAX_TIMEOUT = 60.0

_ATTRIBUTE = "_virtyard_vm_events"  # where the agent's service lives once started
_create_lock = threading.Lock()


def vm_events(agent: HostAgent) -> VmEvents:
    """The agent's event service, created and started on first use."""
    with _create_lock:
        events: VmEvents | None = agent.__dict__.get(_ATTRIBUTE)
        if events is None:
            events = VmEvents(agent.vms, started_at=AGENT_STARTED_AT)
            events.start()
            setattr(agent, _ATTRIBUTE, events)
        return events


class GetEventsParams(Params):
    since: int = Field(default=0, ge=0, description=(
        "the seq of the last answer (0: none yet); events after it are returned"))
    timeout: float = Field(default=0.0, ge=0, le=MAX_TIMEOUT, description=(
        "seconds to wait for the next event when there is none after since (0: answer at once)"))


class VmEvent(BaseModel):
    seq: int = Field(description="this event's sequence number")
    vmId: str
    kind: Literal["status", "devices"] = Field(
        description="status: the VM's status changed (it appeared, paused, went down…); "
                    "devices: its devices changed (its hash moved)")
    status: str = Field(description="the VM's status as Host.getAllVmStats reports it")
    hash: str = Field(description="the VM's hash as Host.getAllVmStats reports it "
                                  "(a Down VM: its last)")
    reason: str = Field(default="", description="why a Down VM went down; empty otherwise")


class HostEvents(BaseModel):
    seq: int = Field(description="the newest event's sequence number: the next call's since")
    reset: bool = Field(description="since cannot be continued from: read every VM again")
    events: list[VmEvent]


def events_result(batch: EventBatch) -> HostEvents:
    return HostEvents(seq=batch.seq, reset=batch.reset, events=[
        VmEvent(seq=e.seq, vmId=e.vm_id, kind=e.kind, status=e.status, hash=e.hash,
                reason=e.reason) for e in batch.events])


@SCHEMA.verb("Host.getEvents", params=GetEventsParams, result=HostEvents)
def host_get_events(agent: HostAgent, p: GetEventsParams) -> HostEvents:
    """The events after ``since``: at once if there are any, else the next one as soon as it
    happens, waiting up to ``timeout`` seconds (an answer without events when none came).

    Each event is about one VM: ``kind`` ``status`` when its status changed (it started or
    arrived, paused, resumed, went down) and ``devices`` when its devices changed (a disk was
    plugged or unplugged, the guest named a disk, the CD changed: its ``hash`` moved; sent once
    the change is complete, so ``Host.getVMFullList`` then shows it). ``status`` and ``hash``
    are what ``Host.getAllVmStats`` reports; a VM that went down has status ``Down``, its last
    hash and a ``reason``: ``destroyed`` (VM.destroy, or virsh destroy), ``shutdown-guest``
    (the guest powered off), ``shutdown-host`` (QEMU quit on a signal), ``failed`` (QEMU ended
    without shutting down: killed or crashed), ``crashed`` (the guest crashed), ``migrated``
    (it runs on another host now), ``saved``, ``from-snapshot`` or ``unknown``.

    Sequence numbers start at the agent's start time in microseconds, so they grow across
    agent restarts; the answer's ``seq`` is the next call's ``since``. ``reset`` is true (and
    ``events`` empty, at once) when ``since`` cannot be continued from: 0, a number of another
    agent run, older than the oldest event kept (the newest 4096 are), or newer than the
    newest. Then read every VM again (``Host.getAllVmStats``) and continue from this ``seq``:
    what changes meanwhile comes as events.

    A status change is reported within 0.2 s of libvirt's seeing it (one libvirt call polls
    every domain's state), usually at once: libvirt's lifecycle events wake the poll and say
    why a VM stopped (a VM gone without its reason waits up to 0.5 s for it). Waiting takes
    no lock; it holds one of the agent's worker threads (32 by default)."""
    return events_result(vm_events(agent).log.read(p.since, p.timeout))
