"""VM monitoring on a real database and a scripted host: hash-driven device reads, guest
names into ``vm_device.logical_name``, VMs that die, hostile reports, external VMs."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, select

from virtyard.engine.db.database import Database
from virtyard.engine.db.models import (
    DEFAULT_CLUSTER_ID,
    BaseDisk,
    DiskVmElement,
    Event,
    Flow,
    Host,
    Vm,
    VmDevice,
    VmDynamic,
)
from virtyard.engine.hosts.pool import HostAddress
from virtyard.engine.monitoring import sync
from virtyard.engine.monitoring.loop import Monitor
from virtyard.engine.monitoring.sync import mark_unknown


class ScriptedHost:
    """One host's agent: VMs with a status, a hash and disks named by the guest."""

    def __init__(self) -> None:
        self.vms: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.extra_stats: list[Any] = []
        self.reconciled = 0

    async def call(self, host: HostAddress, method: str, params: Any = None, *,
                   timeout: float | None = None) -> Any:
        self.calls.append((method, params))
        if method == "Host.getAllVmStats":
            return [{"vmId": vm_id, "status": vm["status"], "hash": vm["hash"]}
                    for vm_id, vm in self.vms.items()] + self.extra_stats
        if method == "Host.getVMFullList":
            return [{"vmId": vm_id, "hash": self.vms[vm_id]["hash"], "status": "Up",
                     "devices": [{"diskId": d, "guestName": n, "index": i,
                                  "address": {"type": "drive", "unit": str(i)}}
                                 for i, (d, n) in enumerate(self.vms[vm_id]["disks"].items())]}
                    for vm_id in params["vmList"] if vm_id in self.vms]
        raise AssertionError(method)

    def full_lists(self) -> list[list[str]]:
        return [p["vmList"] for m, p in self.calls if m == "Host.getVMFullList"]


@pytest.fixture
def world(any_db: Database) -> SimpleNamespace:
    """A host running three VMs, each with one LUN disk attached and plugged."""
    db = any_db
    agent = ScriptedHost()
    with db.transaction() as tx:
        host = Host(name="h1", address="10.0.0.1", port=54321, cluster_id=DEFAULT_CLUSTER_ID,
                    status="up")
        tx.add(host)
        tx.flush()
        vm_ids, disk_ids = [], []
        for i in range(3):
            vm = Vm(id=str(uuid.uuid4()), name=f"vm{i}", cluster_id=DEFAULT_CLUSTER_ID)
            disk = BaseDisk(id=str(uuid.uuid4()), alias=f"d{i}", storage_type="lun")
            tx.add_all([vm, disk])
            tx.flush()
            tx.add_all([VmDynamic(vm_id=vm.id, status="up", run_on_host_id=host.id),
                        DiskVmElement(disk_id=disk.id, vm_id=vm.id, exclusive_disk_id=disk.id),
                        VmDevice(device_id=disk.id, vm_id=vm.id, type="disk", device="disk",
                                 is_plugged=True)])
            agent.vms[vm.id] = {"status": "Up", "hash": "run-1",
                                "disks": {disk.id: f"/dev/sd{'bcd'[i]}"}}
            vm_ids.append(vm.id)
            disk_ids.append(disk.id)
        host_id = host.id

    async def reconcile_quietly(_host: HostAddress) -> None:
        agent.reconciled += 1

    services = SimpleNamespace(db=db, pool=agent,
                               connections=SimpleNamespace(reconcile_quietly=reconcile_quietly))
    return SimpleNamespace(db=db, agent=agent, services=services, vms=vm_ids, disks=disk_ids,
                           host=HostAddress(host_id, "10.0.0.1", 54321))


def poll(world: SimpleNamespace, monitor: Monitor, times: int = 1) -> None:
    async def go() -> None:
        for _ in range(times):
            await monitor.poll(world.host)
    asyncio.run(go())


def names(db: Database) -> dict[str, str]:
    with db.read() as tx:
        return {d.device_id: d.logical_name for d in tx.scalars(select(VmDevice))}


def test_names_are_read_once_then_only_when_the_hash_moves(world: SimpleNamespace) -> None:
    monitor = Monitor(world.services, push=False)
    poll(world, monitor)
    assert names(world.db) == dict(zip(world.disks, ["/dev/sdb", "/dev/sdc", "/dev/sdd"],
                                       strict=True))
    assert world.agent.full_lists() == [sorted(world.vms, key=world.vms.index)]
    world.agent.calls.clear()
    poll(world, monitor, 3)  # nothing changes: no device list read
    assert world.agent.full_lists() == []
    vm = world.agent.vms[world.vms[1]]
    vm["hash"], vm["disks"] = "run-2", {world.disks[1]: "/dev/sdz"}
    poll(world, monitor)
    assert world.agent.full_lists() == [[world.vms[1]]]
    assert names(world.db)[world.disks[1]] == "/dev/sdz"
    # Unplugged: the name goes, and the attachment is inactive.
    vm["hash"], vm["disks"] = "run-3", {}
    poll(world, monitor)
    with world.db.read() as tx:
        device = tx.get(VmDevice, (world.disks[1], world.vms[1]))
        assert device is not None and not device.is_plugged and device.logical_name == ""


def test_a_quiet_report_takes_no_write_transaction(world: SimpleNamespace,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite runs write transactions one at a time: a report that changes nothing only reads,
    or a hundred quiet hosts queue for the lock every cycle."""
    monitor = Monitor(world.services, push=False)
    poll(world, monitor)  # first contact: the names are written
    writes: list[int] = []
    real = world.db.transaction

    def counted() -> Any:
        writes.append(1)
        return real()

    monkeypatch.setattr(world.db, "transaction", counted)
    poll(world, monitor, 3)
    assert writes == []
    world.agent.vms[world.vms[0]]["status"] = "Paused"
    poll(world, monitor)
    assert writes == [1]
    with world.db.read() as tx:
        dynamic = tx.get(VmDynamic, world.vms[0])
        assert dynamic is not None and dynamic.status == "paused"
    del world.agent.vms[world.vms[1]]  # gone from the host: down, a write
    poll(world, monitor)
    assert writes == [1, 1]


def test_a_restarted_engine_does_not_reread_what_it_stored(world: SimpleNamespace) -> None:
    poll(world, Monitor(world.services, push=False))
    world.agent.calls.clear()
    restarted = Monitor(world.services, push=False)
    restarted._hashes = restarted._stored_hashes()
    poll(world, restarted)
    assert world.agent.full_lists() == []


def test_naive_mode_reads_every_device_list(world: SimpleNamespace) -> None:
    monitor = Monitor(world.services, push=False, naive=True)
    poll(world, monitor, 3)
    assert len(world.agent.full_lists()) == 3


def test_a_vm_that_dies_is_down_with_an_event(world: SimpleNamespace) -> None:
    monitor = Monitor(world.services, push=False)
    poll(world, monitor)
    del world.agent.vms[world.vms[0]]
    poll(world, monitor)
    with world.db.read() as tx:
        dynamic = tx.get(VmDynamic, world.vms[0])
        assert dynamic is not None and dynamic.status == "down"
        assert dynamic.run_on_host_id is None and "no longer runs" in dynamic.exit_reason
        events = list(tx.scalars(select(Event).where(Event.vm_id == world.vms[0])))
    assert [e.code for e in events] == [119]
    assert world.agent.reconciled == 1  # its connections are released on the host


def test_flows_and_external_vms_are_left_alone(world: SimpleNamespace) -> None:
    with world.db.transaction() as tx:
        tx.add(Flow(kind="run_vm", vm_id=world.vms[2]))
    del world.agent.vms[world.vms[2]]  # mid-flow: not down
    stranger = str(uuid.uuid4())
    world.agent.vms[stranger] = {"status": "Up", "hash": "x", "disks": {}}
    monitor = Monitor(world.services, push=False)
    poll(world, monitor)
    with world.db.read() as tx:
        assert tx.get(VmDynamic, world.vms[2]).status == "up"  # type: ignore[union-attr]
        assert tx.get(VmDynamic, stranger) is None
        assert tx.get(Vm, stranger) is None


def test_hostile_reports_are_clamped(world: SimpleNamespace) -> None:
    vm = world.agent.vms[world.vms[0]]
    vm["disks"] = {world.disks[0]: "; rm -rf / #"}
    world.agent.extra_stats = [
        "not a dict", {"vmId": "../../etc", "status": "Up", "hash": "h"},
        {"vmId": str(uuid.uuid4()), "status": "Exploded", "hash": "h"},
        {"vmId": str(uuid.uuid4()), "status": "Up", "hash": "h" * 5000},
        {"vmId": 42, "status": None}]
    monitor = Monitor(world.services, push=False)
    poll(world, monitor)
    assert monitor.stats.dropped == 6
    assert names(world.db)[world.disks[0]] == ""  # not a device path: not stored
    assert names(world.db)[world.disks[1]] == "/dev/sdc"  # the rest is applied


def test_a_non_responsive_host_makes_its_vms_unknown(world: SimpleNamespace) -> None:
    with world.db.transaction() as tx:
        assert mark_unknown(tx, world.host.host_id) == 3
    with world.db.read() as tx:
        assert tx.scalar(select(func.count()).where(VmDynamic.status == "unknown")) == 3
    poll(world, Monitor(world.services, push=False))  # the host answers again
    with world.db.read() as tx:
        assert tx.scalar(select(func.count()).where(VmDynamic.status == "up")) == 3


def test_a_report_older_than_the_engines_change_is_ignored(world: SimpleNamespace) -> None:
    """A stop that ended after the host was asked: the stale "Up" must not revive the VM."""
    asked = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    with world.db.transaction() as tx:
        dynamic = tx.get(VmDynamic, world.vms[0])
        assert dynamic is not None
        dynamic.status, dynamic.run_on_host_id = "down", None
        dynamic.status_changed_at = datetime.datetime.now(datetime.UTC)
    reports = [sync.VmReport(vm_id, "up", "run-1") for vm_id in world.vms]
    with world.db.transaction() as tx:
        result = sync.apply(tx, world.host.host_id, reports, [], complete=True, asked_at=asked)
    with world.db.read() as tx:
        assert tx.get(VmDynamic, world.vms[0]).status == "down"  # type: ignore[union-attr]
    assert result.went_down == [] and result.changed_vms == 0


def test_a_skipped_report_is_read_again(world: SimpleNamespace) -> None:
    """A device report skipped because the VM was in a flow must not be taken as read."""
    monitor = Monitor(world.services, push=False)
    poll(world, monitor)
    vm = world.agent.vms[world.vms[0]]
    vm["hash"], vm["disks"] = "run-9", {world.disks[0]: "/dev/sdq"}
    with world.db.transaction() as tx:
        tx.add(Flow(kind="plug_disk", vm_id=world.vms[0]))
    poll(world, monitor)
    assert names(world.db)[world.disks[0]] == "/dev/sdb"  # the flow's VM is left alone
    with world.db.transaction() as tx:
        tx.query(Flow).delete()
    poll(world, monitor)
    assert names(world.db)[world.disks[0]] == "/dev/sdq"
