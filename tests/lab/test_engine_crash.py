"""The engine killed (as ``kill -9`` would: ``[debug] die_at``) at every named point of the
flows that call hosts — run, hot-plug, hot-unplug, migrate, stop — and started again: recovery
completes or undoes the flow, and afterwards the API says what the lab's hosts really do.

Each test: two Up hosts, a LUN disk on a VM whose placement prefers lab host 0, the VM brought to
where the flow starts; the engine restarted with ``die_at``; the action over raw HTTP (the
request fails: the engine dies); the engine started without ``die_at``; once no flow row is
left, the VM's status and host match libvirt on both hosts (it runs on at most one), each
agent keeps exactly the engine's connections the VM needs there, and the attachment's
``active`` matches the guest's devices. Then the VM still obeys: a stop leaves nothing behind.
Two harder cases: another VM's flow that waits for a host that does not answer must not hold
up this VM's recovery, and a migration is settled even when the source's agent restarted (and
so forgot the migration) while the engine was down.

The module runs its own engine per database (own port, own fresh database), so killing it
disturbs no other test.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import libvirt
import ovirtsdk4 as sdk4
import pytest
import sqlalchemy as sa
from engine_helpers import add_tiny_vm, own_engine
from ovirtsdk4 import types

from virtyard.lab import ports
from virtyard.lab.engine import EngineProcess
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab
from virtyard.lab.process import wait_until

pytestmark = pytest.mark.lab

MiB = 1 << 20
PORT_OFFSET = int(os.environ.get("VIRTYARD_TEST_PORT_OFFSET", "0"))
# This module's engines: clear of the session's (15540, 15541) and PostgreSQL's (15532).
CRASH_PORTS = {"sqlite": 15545 + PORT_OFFSET, "postgresql": 15546 + PORT_OFFSET}
RECOVERY_TIMEOUT = 60.0

# die point → (where the VM starts, the action, what recovery must make of it: the lab host
# the VM runs on — 0 or 1, None = down — and whether the disk is active afterwards).
UP, DOWN, INACTIVE = "up", "down", "up-inactive"
CASES: dict[str, tuple[str, str, int | None, bool]] = {
    "run_vm:begun": (DOWN, "start", None, True),
    "run_vm:proven": (DOWN, "start", None, True),
    "run_vm:created": (DOWN, "start", 0, True),
    "plug_disk:proven": (INACTIVE, "plug", 0, False),
    "plug_disk:plugged": (INACTIVE, "plug", 0, True),
    "plug_disk:unplugged": (UP, "unplug", 0, False),
    "migrate_vm:proven": (UP, "migrate", 0, True),
    "migrate_vm:started": (UP, "migrate", 1, True),
    "migrate_vm:done": (UP, "migrate", 1, True),
    "stop_vm:begun": (UP, "stop", None, True),
    "stop_vm:stopped": (UP, "stop", None, True),
}


# -- this module's engine ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(engine: Any, lab: Lab, request: pytest.FixtureRequest) -> Iterator[Any]:
    """An engine of the same database kind as the session's, but this module's own: its own
    port, state folder and fresh database, so it can be killed and restarted at will."""
    with own_engine(engine, lab, request, "crash", CRASH_PORTS[engine.kind]) as own:
        yield own


def restart(engine: Any, die_at: str = "") -> None:
    """Kill the engine (if it still runs: quicker than a clean stop, and an engine must
    survive that anyway) and start it, with ``die_at`` armed or not."""
    process: EngineProcess = engine.process
    process.kill()
    process.extra_config = f'\n[debug]\ndie_at = "{die_at}"\n' if die_at else ""
    process.start()


def flow_rows(engine: Any, vm_id: str | None = None) -> list[tuple[str, str, str]]:
    """The flows in progress (of one VM): kind, step, VM id."""
    db = engine.database()
    try:
        with db.connect() as conn:
            rows = conn.execute(sa.text("SELECT kind, step, vm_id FROM flows")).all()
    finally:
        db.dispose()
    return [(row[0], row[1], row[2]) for row in rows if vm_id in (None, row[2])]


def insert_flow(engine: Any, **values: Any) -> None:
    """A flow row as an engine that died in the middle of that flow leaves it."""
    from virtyard.engine.db.models import Flow  # noqa: PLC0415  (the engine's model)

    db = engine.database()
    try:
        with db.begin() as conn:
            conn.execute(sa.insert(Flow).values(**values))
    finally:
        db.dispose()


def query(engine: Any, sql: str, **params: Any) -> set[str]:
    db = engine.database()
    try:
        with db.connect() as conn:
            return {str(row[0]) for row in conn.execute(sa.text(sql), params)}
    finally:
        db.dispose()


def wait_settled(engine: Any) -> None:
    """Until recovery has settled every flow (no row left in ``flows``)."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    rows = flow_rows(engine)
    while rows:
        if time.monotonic() > deadline:
            raise AssertionError(f"recovery left flows after {RECOVERY_TIMEOUT:g} s: {rows}")
        time.sleep(0.2)
        rows = flow_rows(engine)


# -- the lab's side ------------------------------------------------------------------------------

def kept_connections(lab: Lab, index: int) -> list[dict[str, Any]]:
    with lab.agent_client(index) as agent:
        return [c for c in agent.call("StoragePool.getConnections") if isinstance(c, dict)]


def running_on(lab: Lab, index: int, vm_id: str) -> bool:
    conn = libvirt.open(lab.hosts[index].uri)
    try:
        return bool(conn.lookupByUUIDString(vm_id).isActive())
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def guest_disks(lab: Lab, index: int, vm_id: str) -> set[str]:
    """The disk ids of the VM's devices on host ``index`` (empty when it does not run there)."""
    with lab.agent_client(index) as agent:
        vms = agent.call("Host.getVMFullList", {"vmList": [vm_id]})
    return {str(d["diskId"]) for vm in vms for d in vm.get("devices", [])
            if isinstance(d, dict) and d.get("diskId")}


def scrub(lab: Lab, vm_id: str, connection_ids: set[str]) -> None:
    """Last resort after a test: no domain of the VM and none of the engine's connections
    stay on any lab host, whatever the engine did."""
    for index in range(len(lab.hosts)):
        conn = libvirt.open(lab.hosts[index].uri)
        try:
            dom = conn.lookupByUUIDString(vm_id)
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
        with lab.agent_client(index) as agent:
            for kept in agent.call("StoragePool.getConnections"):
                if kept.get("id") not in connection_ids:
                    continue
                params = {k: kept[k] for k in ("id", "connection", "port", "iqn", "tpgt",
                                               "user") if k in kept}
                for _ in range(max(1, int(kept.get("refs", 1)))):
                    agent.call("StoragePool.disconnectStorageServer",
                               {"domainType": 3, "connectionParams": [params]})


# -- one VM with one LUN disk on two hosts -------------------------------------------------------

@dataclasses.dataclass
class Scenario:
    engine: Any
    sdk: sdk4.Connection
    lab: Lab
    hosts: list[types.Host]
    target: TargetInfo
    vm_id: str
    disk_id: str

    @property
    def vm_service(self) -> Any:
        return self.sdk.system_service().vms_service().vm_service(self.vm_id)

    @property
    def attachment(self) -> Any:
        return self.vm_service.disk_attachments_service().attachment_service(self.disk_id)

    def ours(self) -> set[str]:
        """Every storage server connection the engine knows."""
        return query(self.engine, "SELECT id FROM storage_server_connections")

    def needed(self) -> set[str]:
        """The connections that reach the VM's LUN."""
        return query(self.engine, "SELECT connection_id FROM "
                     "lun_storage_server_connection_map WHERE lun_id = :wwid",
                     wwid=self.target.wwid(1))

    def host_index(self, host: types.Host | None) -> int | None:
        if host is None:
            return None
        return next(i for i, h in enumerate(self.hosts) if h.id == host.id)

    def request(self, method: str, path: str, body: str) -> httpx.Response:
        return self.engine.request(method, path, token=self.engine.admin_token(),
                                   body=body.encode())

    def act(self, action: str) -> httpx.Response:
        vm = f"/vms/{self.vm_id}"
        if action == "start":
            return self.request("POST", vm + "/start", "<action/>")
        if action == "stop":
            return self.request("POST", vm + "/stop", "<action/>")
        if action == "migrate":
            return self.request("POST", vm + "/migrate",
                                f'<action><host id="{self.hosts[1].id}"/></action>')
        active = "true" if action == "plug" else "false"
        return self.request("PUT", f"{vm}/diskattachments/{self.disk_id}",
                            f"<disk_attachment><active>{active}</active></disk_attachment>")

    def problems(self) -> list[str]:
        """Every way the API and the lab's hosts disagree (empty: they agree)."""
        found: list[str] = []
        left = flow_rows(self.engine, self.vm_id)
        if left:
            found.append(f"the VM's flow is left: {left}")
        vm = self.vm_service.get()
        active = bool(self.attachment.get().active)
        runs = {i for i in range(len(self.hosts)) if running_on(self.lab, i, self.vm_id)}
        where = self.host_index(vm.host) if vm.status == types.VmStatus.UP else None
        if vm.status == types.VmStatus.UP:
            if runs != {where}:
                found.append(f"the API says up on host {where}; libvirt runs it on {runs}")
        elif vm.status == types.VmStatus.DOWN:
            if runs:
                found.append(f"the API says down; libvirt runs it on {runs}")
            if vm.host is not None:
                found.append("a down VM has a host")
        else:
            found.append(f"the VM is {vm.status}")
        ours, needed = self.ours(), self.needed()
        for i in range(len(self.hosts)):
            kept = {c["id"] for c in kept_connections(self.lab, i)} & ours
            want = needed if i == where and active else set()
            if kept != want:
                found.append(f"host {i} keeps {sorted(kept)}, the VM needs {sorted(want)}")
            present = self.disk_id in guest_disks(self.lab, i, self.vm_id)
            if present != (i == where and active):
                found.append(f"host {i}: the disk is {'' if present else 'not '}in the guest; "
                             f"the API says active={active}, up on host {where}")
        return found

    def outcome(self) -> tuple[int | None, bool]:
        vm = self.vm_service.get()
        where = self.host_index(vm.host) if vm.status == types.VmStatus.UP else None
        return where, bool(self.attachment.get().active)

    def die_in(self, die_at: str, action: str) -> int:
        """Restart the engine with ``die_at``, ask for ``action``: the engine dies at that
        point (its flow row stays). Returns the engine log's offset before the action."""
        restart(self.engine, die_at)
        offset = self.engine.log_size()
        with pytest.raises(httpx.TransportError):
            answer = self.act(action)
            pytest.fail(f"the engine answered instead of dying at {die_at}: "
                        f"{answer.status_code} {answer.text[:300]}")
        assert wait_until(lambda: not self.engine.process.is_running(), timeout=10)
        assert f"debug.die_at={die_at}: dying now" in self.engine.log_since(offset)
        assert flow_rows(self.engine, self.vm_id), "the flow's row is the engine's memory of it"
        return offset

    def wait_consistent(self, timeout: float = 30.0) -> None:
        """Until the API and the hosts agree (the reconcile after recovery is asynchronous)."""
        deadline = time.monotonic() + timeout
        found = self.problems()
        while found:
            if time.monotonic() > deadline:
                raise AssertionError("after recovery the API and the hosts disagree:\n  "
                                     + "\n  ".join(found))
            time.sleep(0.3)
            found = self.problems()


@pytest.fixture
def scenario(engine: Any, sdk: sdk4.Connection, lab: Lab, *,
             add_lab_host: Callable[..., types.Host], wait_host: Callable[..., types.Host],
             make_target: Callable[..., TargetInfo]) -> Iterator[Scenario]:
    """Two Up hosts, a VM (placement: lab host 0, then 1) with a 32 MiB LUN disk attached and
    active, down. Afterwards, whatever happened: the engine runs without ``die_at`` and has
    settled its flows, the VM is stopped and removed with its disk, and nothing of it stays on
    the hosts."""
    added = [add_lab_host(0), add_lab_host(1)]
    hosts = [wait_host(h.id, types.HostStatus.UP) for h in added]
    system = sdk.system_service()
    target = make_target([32 * MiB])
    disk = system.disks_service().add(types.Disk(
        alias=f"crash-{uuid.uuid4().hex[:6]}", lun_storage=types.HostStorage(
            type=types.StorageType.ISCSI, logical_units=[types.LogicalUnit(
                id=target.wwid(1), address=target.address, port=target.port,
                target=target.iqn)])))
    vm = add_tiny_vm(sdk, lab, "crash", hosts)
    sc = Scenario(engine, sdk, lab, hosts, target, vm.id, disk.id)
    connection_ids = sc.ours()
    try:
        sc.vm_service.disk_attachments_service().add(types.DiskAttachment(
            disk=types.Disk(id=disk.id), active=True,
            interface=types.DiskInterface.VIRTIO_SCSI))
        yield sc
    finally:
        connection_ids |= sc.ours()
        try:
            if engine.process.extra_config or not engine.process.is_running():
                restart(engine)
            wait_settled(engine)
            connection = engine.connect()
            try:
                service = connection.system_service().vms_service().vm_service(vm.id)
                if service.get().status != types.VmStatus.DOWN:
                    service.stop()
                service.remove()
                connection.system_service().disks_service().disk_service(disk.id).remove()
            except sdk4.NotFoundError:
                pass
            finally:
                connection.close()
        finally:
            scrub(lab, vm.id, connection_ids)


def bring_to(sc: Scenario, start: str) -> None:
    """Put the VM where the flow under test starts: down, or up on lab host 0 (disk active
    or not)."""
    if start == DOWN:
        return
    if start == INACTIVE:
        sc.attachment.update(types.DiskAttachment(active=False))
    sc.vm_service.start()
    sc.wait_consistent()
    assert sc.outcome() == (0, start == UP)


# -- the tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("die_at", list(CASES))
def test_engine_killed_in_a_flow(die_at: str, engine: Any, scenario: Scenario) -> None:
    start, action, host, active = CASES[die_at]
    bring_to(scenario, start)
    offset = scenario.die_in(die_at, action)

    restart(engine)
    wait_settled(engine)
    scenario.wait_consistent()
    assert scenario.outcome() == (host, active)
    logged = engine.log_since(offset)
    assert "Traceback" not in logged, logged[-4000:]
    events = scenario.sdk.system_service().events_service().list(max=20)
    assert any(e.code == 9010 for e in events), [e.description for e in events]

    # The VM obeys again; stopped, it leaves nothing on any host.
    if host is not None:
        scenario.vm_service.stop()
    scenario.wait_consistent()
    assert scenario.outcome() == (None, active)
    ours = scenario.ours()
    for index in range(len(scenario.hosts)):
        assert not {c["id"] for c in kept_connections(scenario.lab, index)} & ours
    assert ports.port_is_listening(engine.process.port)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind((ports.LOOPBACK, 0))
        return int(sock.getsockname()[1])


def remove_host(engine: Any, host_id: str) -> None:
    token = engine.admin_token()
    answer = engine.request("POST", f"/hosts/{host_id}/deactivate", token=token,
                            body=b"<action/>")
    assert answer.status_code in (200, 404, 409), answer.text
    answer = engine.request("DELETE", f"/hosts/{host_id}", token=token)
    assert answer.status_code in (200, 404), answer.text


def test_a_flow_waiting_for_a_silent_host_holds_up_no_other(engine: Any, sdk: sdk4.Connection,
                                                            scenario: Scenario) -> None:
    """The engine died while starting our VM (both hosts connected and pinned) and while
    stopping another VM on a host that now does not answer: that flow waits (never a guess),
    but ours is undone at once with its connections released on both hosts."""
    system = sdk.system_service()
    silent = system.hosts_service().add(types.Host(
        name=f"silent-{uuid.uuid4().hex[:6]}", address=ports.LOOPBACK, port=closed_port()))
    other = system.vms_service().add(types.Vm(
        name=f"other-{uuid.uuid4().hex[:6]}", cluster=types.Cluster(name="Default"),
        template=types.Template(name="Blank")))
    try:
        scenario.die_in("run_vm:proven", "start")
        insert_flow(engine, kind="stop_vm", vm_id=other.id, host_id=silent.id, step="begun")
        restart(engine)
        scenario.wait_consistent()
        assert scenario.outcome() == (None, True)
        assert [(kind, vm) for kind, _step, vm in flow_rows(engine)] == [("stop_vm", other.id)]
    finally:
        remove_host(engine, silent.id)  # its flow can settle now: the host is gone
        wait_settled(engine)
        system.vms_service().vm_service(other.id).remove()


def test_migration_settled_after_the_source_agent_restarted(engine: Any, lab: Lab,
                                                            scenario: Scenario) -> None:
    """The engine died when the migration was done; the source's agent restarted before the
    engine came back, so it knows of no migration of the VM: the VM is where it runs."""
    bring_to(scenario, UP)
    scenario.die_in("migrate_vm:done", "migrate")
    agent = lab.agents[0]
    pid = agent.pid()
    try:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        agent.stop()
    finally:
        agent.start()
    restart(engine)
    wait_settled(engine)
    scenario.wait_consistent()
    assert scenario.outcome() == (1, True)
