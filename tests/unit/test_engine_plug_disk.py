"""Hot-plugging a LUN disk (``PlugDisk``) against a scripted agent, on SQLite and PostgreSQL:
a host that already holds the LUN's connections is not asked to prove it sees the LUN (the
agent's own refusal of an invisible LUN sends the plug back to proving it, so the outcome is the
same), the steps between the flow's two commits cost none yet keep their die points, and an
attachment update that changes nothing takes no write transaction."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from engine_db import VIEWER, context
from sqlalchemy import event, select

from virtyard.engine.commands import errors
from virtyard.engine.commands import flow as flow_module
from virtyard.engine.commands.attachments import UpdateAttachment
from virtyard.engine.commands.base import Context, run
from virtyard.engine.commands.errors import CommandError
from virtyard.engine.commands.plug_disk import PlugDisk, refused_as_not_visible
from virtyard.engine.config import EngineConfig
from virtyard.engine.db.database import Database
from virtyard.engine.db.models import (
    DEFAULT_CLUSTER_ID,
    BaseDisk,
    DiskVmElement,
    Event,
    Flow,
    Host,
    HostConnectionPin,
    Lun,
    LunConnection,
    StorageServerConnection,
    Vm,
    VmDevice,
    VmDynamic,
)
from virtyard.engine.hosts.connections import ConnectionReconciler
from virtyard.engine.hosts.pool import HostCallError
from virtyard.host.rpc.errors import HotplugDiskError
from virtyard.host.virt.drives import DriveNotVisibleError

HOST = "40000000-0000-0000-0000-000000000001"
VM = "70000000-0000-0000-0000-000000000001"
C1, C2 = "c0000000-0000-0000-0000-000000000001", "c0000000-0000-0000-0000-000000000002"
# disk → (its LUN, the connection that reaches it, plugged)
DISKS = {"d0000000-0000-0000-0000-000000000001": ("36001405aaa1", C1, True),
         "d0000000-0000-0000-0000-000000000002": ("36001405aaa2", C1, False),
         "d0000000-0000-0000-0000-000000000003": ("36001405bbb1", C2, False)}
_, SAME_TARGET, OTHER_TARGET = DISKS
WWID = {disk: lun for disk, (lun, _c, _p) in DISKS.items()}
OWNER = f"vm:{VM}"


def refusal(guid: str) -> HostCallError:
    """What the engine's pool raises when the agent's ``VM.hotplugDisk`` does not see ``guid``
    (the agent's own words: virt/hotplug.py, virt/drives.py)."""
    invisible = DriveNotVisibleError(f"LUN {guid}")
    error = HotplugDiskError(f"cannot hotplug sdb: {invisible}", vmId=VM,
                             invisible=invisible.what)
    return HostCallError(error.code, error.name, error.message, error.data)


class Agent:
    """The agent's storage and hot-plug verbs: a LUN is seen when its connection is kept and
    the target shows it (not ``hidden``); ``refuse_login`` makes every login fail."""

    def __init__(self, connected: set[str]) -> None:
        self.connected = set(connected)
        self.hidden: set[str] = set()
        self.refuse_login = False
        self.libvirt_refuses = False
        self.calls: list[str] = []

    def sees(self, guid: str) -> bool:
        return guid not in self.hidden and any(
            lun == guid and conn in self.connected for lun, conn, _p in DISKS.values())

    def call_sync(self, host: Any, method: str, params: dict[str, Any] | None = None,
                  *, timeout: float | None = None) -> Any:
        p = params or {}
        self.calls.append(method)
        if method == "StoragePool.getConnections":
            return [{"id": c, "refs": 1} for c in sorted(self.connected)]
        if method == "StoragePool.connectStorageServer":
            ids = [c["id"] for c in p["connectionParams"]]
            if not self.refuse_login:
                self.connected.update(ids)
            return [{"id": c, "status": 465 if self.refuse_login else 0} for c in ids]
        if method == "StoragePool.disconnectStorageServer":
            self.connected -= {c["id"] for c in p["connectionParams"]}
            return [{"id": c["id"], "status": 0} for c in p["connectionParams"]]
        if method == "Host.getDevicesVisibility":
            return {g: self.sees(g) for g in p["guidList"]}
        if method == "VM.hotplugDisk":
            drive = p["drive"]
            if not self.sees(drive["GUID"]):
                raise refusal(drive["GUID"])
            if self.libvirt_refuses:
                raise HostCallError(45, "hotplugDisk", "libvirt refused to plug sdb: busy", {})
            return {"devices": [{"diskId": drive["diskId"], "address": {
                "type": "drive", "controller": "0", "bus": "0", "target": "0", "unit": "1"}}]}
        raise AssertionError(method)

    async def call(self, host: Any, method: str, params: dict[str, Any] | None = None,
                   *, timeout: float | None = None) -> Any:
        return self.call_sync(host, method, params)


class Services:
    def __init__(self, db: Database, agent: Agent, state: Path) -> None:
        self.db = db
        self.pool = agent
        self.connections = ConnectionReconciler(db, agent)  # type: ignore[arg-type]
        self.config = EngineConfig(state_dir=state)


def seed(db: Database) -> None:
    """An Up host running a VM with one LUN disk plugged (so the host holds its connection C1
    for the VM), one more LUN of that target attached inactive, and one of another target."""
    with db.transaction() as tx:
        tx.add(Host(id=HOST, name="h1", address="192.0.2.1", port=54321, status="up",
                    cluster_id=DEFAULT_CLUSTER_ID))
        tx.add(Vm(id=VM, name="vm1", cluster_id=DEFAULT_CLUSTER_ID))
        for conn, iqn in ((C1, "iqn.2003-01.org.example:one"),
                          (C2, "iqn.2003-01.org.example:two")):
            tx.add(StorageServerConnection(id=conn, connection="192.0.2.10", iqn=iqn))
        tx.flush()
        tx.add(VmDynamic(vm_id=VM, status="up", run_on_host_id=HOST))
        for i, (disk_id, (lun, conn, plugged)) in enumerate(DISKS.items()):
            tx.add(BaseDisk(id=disk_id, alias=f"disk{i}", storage_type="lun"))
            tx.flush()
            tx.add(Lun(lun_id=lun, disk_id=disk_id, lun_mapping=i + 1))
            tx.flush()
            tx.add(LunConnection(lun_id=lun, connection_id=conn))
            tx.add(DiskVmElement(disk_id=disk_id, vm_id=VM, disk_interface="virtio_scsi",
                                 exclusive_disk_id=disk_id))
            tx.add(VmDevice(device_id=disk_id, vm_id=VM, type="disk", device="disk",
                            is_plugged=plugged,
                            address='{"index": 0}' if plugged else ""))
        tx.add(HostConnectionPin(host_id=HOST, connection_id=C1, owner=OWNER))


@pytest.fixture
def db(any_db: Database) -> Database:
    seed(any_db)
    return any_db


@contextmanager
def commits(db: Database) -> Iterator[list[str]]:
    """One entry per committed transaction meanwhile (reads are rolled back, never counted)."""
    seen: list[str] = []

    def on_commit(conn: Any) -> None:
        seen.append("commit")

    event.listen(db.engine, "commit", on_commit)
    try:
        yield seen
    finally:
        event.remove(db.engine, "commit", on_commit)


@pytest.fixture
def die_points(db: Database, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    """The die points a flow passes, each with the step its flow row says there (an engine
    killed at that point leaves that row for recovery)."""
    passed: list[tuple[str, str | None]] = []

    def record(ctx: Context, point: str) -> None:
        with db.read() as tx:
            passed.append((point, tx.scalar(select(Flow.step).where(Flow.vm_id == VM))))

    monkeypatch.setattr(flow_module, "die_point", record)
    return passed


def in_worker(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` as the engine runs a request: in a worker thread of an event loop."""
    async def go() -> Any:
        return await anyio.to_thread.run_sync(fn)
    return anyio.run(go)


def plug(db: Database, agent: Agent, tmp_path: Path, disk_id: str) -> dict[str, Any]:
    ctx = context(db)
    ctx.services = Services(db, agent, tmp_path)
    result: dict[str, Any] = in_worker(lambda: run(PlugDisk(VM, disk_id), ctx))
    return result


def plugged(db: Database, disk_id: str) -> bool:
    with db.read() as tx:
        device = tx.get(VmDevice, (disk_id, VM))
        return device is not None and device.is_plugged


def vm_pins(db: Database) -> set[str]:
    with db.read() as tx:
        return set(tx.scalars(select(HostConnectionPin.connection_id).where(
            HostConnectionPin.host_id == HOST, HostConnectionPin.owner == OWNER)))


def no_flow_left(db: Database) -> bool:
    with db.read() as tx:
        return tx.scalar(select(Flow.id)) is None


PROOF = ["StoragePool.getConnections", "Host.getDevicesVisibility"]


def test_a_lun_whose_connections_the_host_holds_is_plugged_without_a_proof(
        db: Database, tmp_path: Path, die_points: list[tuple[str, str | None]]) -> None:
    agent = Agent(connected={C1})
    with commits(db) as committed:
        plug(db, agent, tmp_path, SAME_TARGET)
    assert agent.calls == ["VM.hotplugDisk"]
    # begin (the flow row: the VM's lock) and finish; the steps between are not written
    # (recovery asks the host), yet an engine can still be killed at each, its row left
    assert len(committed) == 2
    assert die_points == [("plug_disk:begun", "started"), ("plug_disk:proven", "started"),
                          ("plug_disk:plugged", "started")]
    assert plugged(db, SAME_TARGET) and vm_pins(db) == {C1} and no_flow_left(db)


def test_a_lun_on_a_connection_the_host_lacks_is_proven_first(
        db: Database, tmp_path: Path, die_points: list[tuple[str, str | None]]) -> None:
    agent = Agent(connected={C1})
    with commits(db) as committed:
        plug(db, agent, tmp_path, OTHER_TARGET)
    assert agent.calls == ["StoragePool.getConnections", "StoragePool.connectStorageServer",
                           "Host.getDevicesVisibility", "VM.hotplugDisk"]
    assert len(committed) == 2
    assert [point for point, _step in die_points] == [
        "plug_disk:begun", "plug_disk:proven", "plug_disk:plugged"]
    assert plugged(db, OTHER_TARGET) and agent.connected == {C1, C2}
    assert vm_pins(db) == {C1, C2} and no_flow_left(db)


def test_pins_whose_session_was_lost_cost_a_proof_not_the_plug(db: Database,
                                                               tmp_path: Path) -> None:
    agent = Agent(connected=set())  # the database pins C1 on the host; the host lost it
    plug(db, agent, tmp_path, SAME_TARGET)
    assert agent.calls == ["VM.hotplugDisk", "StoragePool.getConnections",
                           "StoragePool.connectStorageServer", "Host.getDevicesVisibility",
                           "VM.hotplugDisk"]
    assert plugged(db, SAME_TARGET) and agent.connected == {C1} and no_flow_left(db)


@pytest.mark.parametrize("why", ["login refused", "LUN not shown"])
def test_a_lun_the_host_cannot_see_fails_clearly_and_leaves_nothing(
        db: Database, tmp_path: Path, why: str) -> None:
    agent = Agent(connected=set() if why == "login refused" else {C1})
    agent.refuse_login = why == "login refused"
    agent.hidden = {WWID[SAME_TARGET]}
    with pytest.raises(CommandError) as raised:
        plug(db, agent, tmp_path, SAME_TARGET)
    assert raised.value.error == errors.LUN_NOT_VISIBLE_ON_HOST
    assert agent.calls.count("VM.hotplugDisk") == 1
    assert not plugged(db, SAME_TARGET) and no_flow_left(db)
    assert vm_pins(db) == {C1}  # what the VM's plugged disk needs, as before the plug
    with db.read() as tx:
        assert tx.scalar(select(Event.code).order_by(Event.id.desc())) == 2003


def test_a_refusal_for_another_reason_is_not_retried(db: Database, tmp_path: Path) -> None:
    agent = Agent(connected={C1})
    agent.libvirt_refuses = True
    with pytest.raises(CommandError) as raised:
        plug(db, agent, tmp_path, SAME_TARGET)
    assert raised.value.error == errors.HOTPLUG_FAILED
    assert "libvirt refused" in str(raised.value)
    assert agent.calls == ["VM.hotplugDisk"]
    assert not plugged(db, SAME_TARGET) and vm_pins(db) == {C1} and no_flow_left(db)


def test_the_agents_words_for_an_invisible_lun_are_recognised() -> None:
    assert refused_as_not_visible(refusal("36001405aaa2"))
    assert not refused_as_not_visible(HostCallError(
        45, "hotplugDisk", "libvirt refused to plug sdb: busy", {"vmId": VM}))
    assert not refused_as_not_visible(HostCallError(
        1, "noVM", "LUN 3600 is not visible on this host", {}))


def test_an_attachment_update_that_changes_nothing_writes_nothing(db: Database) -> None:
    ctx = context(db)
    with commits(db) as committed:
        run(UpdateAttachment(VM, SAME_TARGET, interface="virtio_scsi", bootable=False,
                             read_only=False, pass_discard=False), ctx)
    assert committed == []
    with pytest.raises(CommandError) as raised:
        run(UpdateAttachment(VM, "d0000000-0000-0000-0000-00000000000f",
                             interface="virtio_scsi"), ctx)
    assert raised.value.error == errors.DISK_NOT_ATTACHED
    with pytest.raises(CommandError) as raised:
        run(UpdateAttachment(VM, SAME_TARGET, interface="virtio_scsi"), context(db, VIEWER))
    assert raised.value.error == errors.NOT_AUTHORIZED
    with commits(db) as committed:
        run(UpdateAttachment(VM, SAME_TARGET, interface="virtio_scsi", read_only=True), ctx)
    assert len(committed) == 1
    with db.read() as tx:
        device = tx.get(VmDevice, (SAME_TARGET, VM))
        assert device is not None and device.is_readonly
