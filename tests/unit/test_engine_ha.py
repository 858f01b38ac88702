"""The HA policy without hosts: which VMs are owed a restart (a crash — never a user's stop or
a guest shutdown), priority order, back-off then a clear error, busy VMs, no restart of a lost
host's VMs before it is known off (power management or a manual confirmation), fencing through
a fence-agents program, a returning host's stale copies destroyed, and the API (high
availability on VMs, fence agents without passwords, ``fence``)."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ovirtsdk4.readers  # registers the SDK's readers
import ovirtsdk4.types as sdk
import ovirtsdk4.writers  # noqa: F401  (registers the SDK's writers)
import pytest
from engine_db import context
from ovirtsdk4.reader import Reader
from ovirtsdk4.writer import Writer
from sqlalchemy import select, update
from starlette.testclient import TestClient

from virtyard.common.pki import create_ca, issue
from virtyard.engine import audit
from virtyard.engine.api.app import build_app
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Context, run
from virtyard.engine.commands.errors import CommandError
from virtyard.engine.commands.power import ConfirmHostOff
from virtyard.engine.commands.run_vm import RunVm
from virtyard.engine.config import EngineConfig, HaConfig, HostsConfig
from virtyard.engine.db.database import Database
from virtyard.engine.db.models import (
    DEFAULT_CLUSTER_ID,
    Event,
    FenceAgent,
    HaRestart,
    Host,
    Vm,
    VmDynamic,
    utcnow,
)
from virtyard.engine.ha.fencer import Fencer, clear_stale
from virtyard.engine.ha.restart import NO_REASON, Restarter, backoff
from virtyard.engine.hosts.heartbeat import Heartbeat
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostUnreachableError
from virtyard.engine.services import build_services

API = "/ovirt-engine/api"
SECRET = "bmc-password-never-shown"
FAKE_AGENT = """#!/bin/sh
action=$(sed -n 's/^action=//p')
case "$action" in
  off) echo off > "{state}" ;;
  on) echo on > "{state}" ;;
  status) [ "$(cat "{state}" 2>/dev/null || echo on)" = on ] && exit 0 || exit 2 ;;
esac
"""


class Services:
    """Enough of the engine's services for the HA parts (no host is called)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.pool = None
        self.extra: dict[str, Any] = {}


@pytest.fixture
def db(any_db: Database) -> Database:
    """Both databases: the HA queries (owed restarts, priorities, times) run on each."""
    return any_db


def add_host(db: Database, name: str, status: str = "up", pm: bool = False) -> str:
    with db.transaction() as tx:
        host = Host(name=name, address=f"{name}.example", port=54321,
                    cluster_id=DEFAULT_CLUSTER_ID, status=status, pm_enabled=pm)
        tx.add(host)
        tx.flush()
        return host.id


def add_vm(db: Database, name: str, *, ha: bool = True, priority: int = 1,
           status: str = "down", reason: str = "", host_id: str | None = None) -> str:
    with db.transaction() as tx:
        vm = Vm(name=name, cluster_id=DEFAULT_CLUSTER_ID, ha_enabled=ha, ha_priority=priority)
        tx.add(vm)
        tx.flush()
        tx.add(VmDynamic(vm_id=vm.id, status=status, exit_reason=reason,
                         run_on_host_id=host_id))
        return vm.id


def crash(db: Database, vm_id: str, host_id: str, reason: str = "failed") -> None:
    """What monitoring writes when a host reports the VM down."""
    with db.transaction() as tx:
        tx.execute(update(VmDynamic).where(VmDynamic.vm_id == vm_id).values(
            status="down", exit_reason=reason, run_on_host_id=None))
        audit.record(tx, audit.VM_DOWN, audit.Ids(vm_id=vm_id, host_id=host_id), vm="x",
                     reason=reason)


class Runner:
    """Stands in for ``run(RunVm)``: records the order, then succeeds or fails as told."""

    def __init__(self, db: Database, fail: CommandError | None = None) -> None:
        self.db = db
        self.fail = fail
        self.runs: list[tuple[str, list[str]]] = []

    def __call__(self, command: RunVm, ctx: Context) -> object:
        self.runs.append((command.vm_id, list(command.prefer)))
        if self.fail is not None:
            raise self.fail
        with self.db.transaction() as tx:
            dynamic = tx.get(VmDynamic, command.vm_id)
            assert dynamic is not None
            dynamic.status, dynamic.run_on_host_id = "up", command.prefer[0]
        return None


def codes(db: Database) -> list[int]:
    with db.read() as tx:
        return list(tx.scalars(select(Event.code).order_by(Event.id)))


def restarter(db: Database, runner: Runner, **config: Any) -> Restarter:
    return Restarter(Services(db), HaConfig(**config), runner=runner)


def test_a_crash_is_restarted_a_stop_or_guest_shutdown_never(db: Database) -> None:
    h1, h2 = add_host(db, "h1"), add_host(db, "h2")
    crashed = add_vm(db, "crashed", status="up", host_id=h2)
    crash(db, crashed, h2, "failed")
    add_vm(db, "stopped", reason="stopped by admin@internal")
    add_vm(db, "guest-off", reason="shutdown-guest")
    add_vm(db, "not-ha", ha=False, reason="failed")
    runner = Runner(db)
    assert restarter(db, runner).pass_once() == ["crashed"]
    # Its own host first (it may still see its LUNs), then the others.
    assert runner.runs == [(crashed, [h2, h1])]
    assert audit.HA_VM_FAILED.code in codes(db) and audit.HA_VM_RESTARTED.code in codes(db)
    with db.read() as tx:
        assert tx.scalars(select(HaRestart)).all() == []
    assert restarter(db, runner).pass_once() == []  # nothing owed any more


@pytest.mark.parametrize("reason", ["crashed", "shutdown-host", "unknown"])
def test_other_crash_reasons(db: Database, reason: str) -> None:
    add_host(db, "h1")
    add_vm(db, "vm", reason=reason)
    assert restarter(db, Runner(db)).pass_once() == ["vm"]


def test_priority_order(db: Database) -> None:
    add_host(db, "h1")
    for name, priority in (("low", 1), ("high", 90), ("mid", 50)):
        add_vm(db, name, priority=priority, reason="failed")
    runner = Runner(db)
    assert restarter(db, runner).pass_once() == ["high", "mid", "low"]


def test_back_off_then_a_clear_error(db: Database) -> None:
    add_host(db, "h1")
    vm_id = add_vm(db, "vm", reason="failed")
    runner = Runner(db, fail=CommandError(errors.RUN_FAILED, "run", "VM", name="vm",
                                          why="no LUN"))
    ha = restarter(db, runner, max_attempts=3, backoff_initial=2.0, backoff_max=3.0)
    assert [backoff(ha.config, n) for n in (1, 2, 3)] == [2.0, 3.0, 3.0]
    ha.pass_once()
    with db.read() as tx:
        row = tx.get(HaRestart, vm_id)
        assert row is not None and row.attempts == 1 and row.state == "pending"
        assert row.next_try_at > utcnow() + datetime.timedelta(seconds=1)
    ha.pass_once()  # not due yet: no try
    assert len(runner.runs) == 1
    for _ in range(2):
        with db.transaction() as tx:
            tx.execute(update(HaRestart).values(next_try_at=utcnow()))
        ha.pass_once()
    assert len(runner.runs) == 3
    with db.read() as tx:
        row = tx.get(HaRestart, vm_id)
        assert row is not None and row.state == "failed" and row.attempts == 3
    assert codes(db).count(audit.HA_VM_RESTART_RETRY.code) == 2
    assert codes(db)[-1] == audit.HA_VM_RESTART_FAILED.code
    with db.transaction() as tx:
        tx.execute(update(HaRestart).values(next_try_at=utcnow()))
    ha.pass_once()
    assert len(runner.runs) == 3  # given up: never tried again


def test_a_busy_vm_is_not_a_failed_try(db: Database) -> None:
    add_host(db, "h1")
    vm_id = add_vm(db, "vm", reason="failed")
    runner = Runner(db, fail=CommandError(errors.VM_IS_LOCKED, "run", "VM"))
    restarter(db, runner).pass_once()
    with db.read() as tx:
        row = tx.get(HaRestart, vm_id)
        assert row is not None and row.attempts == 0


def test_a_vm_running_again_or_no_longer_ha_owes_nothing(db: Database) -> None:
    h1 = add_host(db, "h1")
    vm_id = add_vm(db, "vm", reason="failed")
    other = add_vm(db, "other", reason="failed")
    with db.transaction() as tx:
        tx.add(HaRestart(vm_id=vm_id, next_try_at=utcnow() + datetime.timedelta(hours=1)))
        tx.add(HaRestart(vm_id=other, next_try_at=utcnow() + datetime.timedelta(hours=1)))
        tx.execute(update(VmDynamic).where(VmDynamic.vm_id == vm_id)
                   .values(status="up", run_on_host_id=h1))
        tx.execute(update(Vm).where(Vm.id == other).values(ha_enabled=False))
    restarter(db, Runner(db)).pass_once()
    with db.read() as tx:
        assert tx.scalars(select(HaRestart)).all() == []


def lost_host(db: Database, pm: bool = False) -> tuple[str, str, str]:
    """A non-responsive host whose HA VM is unknown, and a healthy second host."""
    lost, good = add_host(db, "lost", status="non_responsive", pm=pm), add_host(db, "good")
    vm_id = add_vm(db, "ha-vm", status="unknown", host_id=lost)
    return lost, good, vm_id


def test_no_restart_of_a_lost_hosts_vms_without_certainty(db: Database) -> None:
    lost, good, vm_id = lost_host(db)
    runner = Runner(db)
    ha = restarter(db, runner)
    fencer = Fencer(Services(db), HaConfig(fence_after=0))
    for _ in range(3):
        asyncio.run(fencer.check())
        ha.pass_once()
    assert runner.runs == []
    with db.read() as tx:
        dynamic = tx.get(VmDynamic, vm_id)
        assert dynamic is not None and dynamic.status == "unknown"
    assert codes(db).count(audit.HOST_NEEDS_MANUAL_FENCE.code) == 1  # said once
    # The administrator confirms the host is off: now it restarts, elsewhere.
    run(ConfirmHostOff(lost), context(db))
    assert ha.pass_once() == ["ha-vm"]
    assert runner.runs == [(vm_id, [good])]
    with db.read() as tx:
        host = tx.get(Host, lost)
        assert host is not None and host.status == "down"


def test_manual_confirmation_only_for_a_non_responsive_host(db: Database) -> None:
    up = add_host(db, "up")
    with pytest.raises(CommandError) as refused:
        run(ConfirmHostOff(up), context(db))
    assert refused.value.key == errors.HOST_STATUS_ILLEGAL.key


def fence_program(tmp_path: Path) -> Path:
    state = tmp_path / "power-state"
    program = tmp_path / "fence_fake"
    program.write_text(FAKE_AGENT.format(state=state))
    program.chmod(0o755)
    return state


def add_agent(db: Database, host_id: str, kind: str = "fake") -> None:
    with db.transaction() as tx:
        tx.add(FenceAgent(host_id=host_id, position=1, type=kind, address="bmc.example",
                          user_name="admin", password=SECRET, options="plug=lost",
                          encrypt_options=False))


def fence_once(fencer: Fencer) -> None:
    async def go() -> None:
        await fencer.check()
        while fencer._tasks:
            await asyncio.gather(*list(fencer._tasks))
    asyncio.run(go())


def test_power_management_fences_then_restarts_elsewhere(db: Database, tmp_path: Path) -> None:
    state = fence_program(tmp_path)
    lost, good, vm_id = lost_host(db, pm=True)
    add_agent(db, lost)
    runner = Runner(db)
    ha = restarter(db, runner)
    fencer = Fencer(Services(db), HaConfig(fence_after=0, fence_poll=0.05,
                                            power_on_after_fence=False,
                                            fence_agent_dirs=[tmp_path]))
    fence_once(fencer)
    assert state.read_text().strip() == "off"
    with db.read() as tx:
        host = tx.get(Host, lost)
        assert host is not None and host.status == "down" and "fake" in host.status_detail
    assert ha.pass_once() == ["ha-vm"] and runner.runs == [(vm_id, [good])]
    event_codes = codes(db)
    assert event_codes.index(audit.HOST_FENCING.code) < event_codes.index(
        audit.HOST_FENCED_OFF.code) < event_codes.index(audit.HA_VM_RESTARTED.code)
    with db.read() as tx:
        assert all(SECRET not in e for e in tx.scalars(select(Event.description)))


def test_a_failed_fence_restarts_nothing(db: Database, tmp_path: Path) -> None:
    lost, _good, vm_id = lost_host(db, pm=True)
    add_agent(db, lost, kind="absent")  # no such program: the power off cannot happen
    runner = Runner(db)
    fence_once(Fencer(Services(db), HaConfig(fence_after=0, fence_agent_dirs=[tmp_path])))
    restarter(db, runner).pass_once()
    assert runner.runs == []
    assert audit.HOST_FENCE_FAILED.code in codes(db)
    with db.read() as tx:
        dynamic = tx.get(VmDynamic, vm_id)
        assert dynamic is not None and dynamic.status == "unknown"


class Pool:
    """A returning host that still runs copies: the real one elsewhere, and an unknown VM."""

    def __init__(self, running: list[str]) -> None:
        self.running = running
        self.destroyed: list[str] = []

    async def call(self, host: HostAddress, method: str, params: Any = None,
                   **_kw: Any) -> Any:
        if method == "Host.getAllVmStats":
            return [{"vmId": v, "status": "Up"} for v in self.running]
        if method == "VM.destroy":
            self.destroyed.append(params["vmID"])
            if params["vmID"] not in self.running:
                raise HostCallError(1, "no such VM")
            return {}
        raise AssertionError(method)


def test_a_returning_host_loses_its_stale_copies(db: Database) -> None:
    back, elsewhere = add_host(db, "back", status="down"), add_host(db, "elsewhere")
    moved = add_vm(db, "moved", status="up", host_id=elsewhere)
    stopped = add_vm(db, "stopped")
    external = "11111111-2222-3333-4444-555555555555"
    services = Services(db)
    services.pool = Pool([moved, stopped, external])  # type: ignore[assignment]
    ok = asyncio.run(clear_stale(services, HostAddress(back, "back.example", 54321)))
    assert ok and sorted(services.pool.destroyed) == sorted([moved, stopped])  # type: ignore
    with db.read() as tx:
        dynamic = tx.get(VmDynamic, moved)
        assert dynamic is not None and dynamic.run_on_host_id == elsewhere  # the real copy
    assert codes(db).count(audit.HOST_STALE_VM_DESTROYED.code) == 2


# ---------------------------------------------------------------------------- the API


@pytest.fixture
def client(db: Database, tmp_path: Path) -> Iterator[TestClient]:
    root = tmp_path / "pki"
    ca = create_ca(root)
    issue(ca, root, "engine", common_name="virtyard-engine", server=False, client=True)
    config = EngineConfig(state_dir=tmp_path, hosts=HostsConfig(
        ca=root / "ca.pem", cert=root / "engine.pem", key=root / "engine-key.pem"),
        ha=HaConfig(fence_agent_dirs=[tmp_path], fence_poll=0.05))
    services = build_services(config, db)
    services.auth.add_user("admin@internal", "password", "admin")
    http = TestClient(build_app(services))
    token = http.post("/ovirt-engine/sso/oauth/token", data={
        "grant_type": "password", "scope": "ovirt-app-api", "username": "admin@internal",
        "password": "password"}).json()["access_token"]
    http.headers.update({"Accept": "application/xml", "Content-Type": "application/xml",
                         "Version": "4", "Authorization": f"Bearer {token}"})
    yield http
    http.close()


def test_vm_high_availability_through_the_api(client: TestClient, db: Database) -> None:
    answer = client.post(f"{API}/vms", content=(
        "<vm><name>ha1</name><cluster><name>Default</name></cluster>"
        "<high_availability><enabled>true</enabled><priority>50</priority>"
        "</high_availability></vm>"))
    assert answer.status_code == 201, answer.text
    vm_id = answer.text.split('id="')[1].split('"')[0]
    with db.read() as tx:
        vm = tx.get(Vm, vm_id)
        assert vm is not None and vm.ha_enabled and vm.ha_priority == 50
    answer = client.put(f"{API}/vms/{vm_id}", content=(
        "<vm><high_availability><enabled>false</enabled><priority>7</priority>"
        "</high_availability></vm>"))
    assert answer.status_code == 200, answer.text
    with db.read() as tx:
        vm = tx.get(Vm, vm_id)
        assert vm is not None and not vm.ha_enabled and vm.ha_priority == 7
    bad = client.put(f"{API}/vms/{vm_id}", content=(
        "<vm><high_availability><priority>1000</priority></high_availability></vm>"))
    assert bad.status_code == 400


def test_fence_agents_power_management_and_fence(client: TestClient, db: Database,
                                                 tmp_path: Path) -> None:
    state = fence_program(tmp_path)
    refused = client.post(f"{API}/hosts", content=(
        "<host><name>pm</name><address>pm.example</address><power_management>"
        "<enabled>true</enabled></power_management></host>"))
    assert refused.status_code == 409 and "PM_ENABLED_WITHOUT_AGENT" in refused.text
    host_id = add_host(db, "h1")
    refused = client.put(f"{API}/hosts/{host_id}", content=(
        "<host><power_management><enabled>true</enabled></power_management></host>"))
    assert refused.status_code == 409 and "PM_ENABLED_WITHOUT_AGENT" in refused.text
    added = client.post(f"{API}/hosts/{host_id}/fenceagents", content=(
        f"<agent><type>fake</type><address>bmc.example</address><username>admin</username>"
        f"<password>{SECRET}</password><order>1</order><options><option><name>plug</name>"
        f"<value>h1</value></option></options></agent>"))
    assert added.status_code == 201, added.text
    assert "<password>" not in added.text and "<value>h1</value>" in added.text.replace(
        " ", "").replace("\n", "")
    listed = client.get(f"{API}/hosts/{host_id}/fenceagents")
    assert "bmc.example" in listed.text and SECRET not in listed.text
    enabled = client.put(f"{API}/hosts/{host_id}", content=(
        "<host><power_management><enabled>true</enabled></power_management></host>"))
    assert enabled.status_code == 200, enabled.text
    with db.read() as tx:
        assert tx.get(Host, host_id).pm_enabled  # type: ignore[union-attr]
    status = client.post(f"{API}/hosts/{host_id}/fence",
                         content="<action><fence_type>status</fence_type></action>")
    assert status.status_code == 200 and "<status>on</status>" in status.text
    manual = client.post(f"{API}/hosts/{host_id}/fence",
                         content="<action><fence_type>manual</fence_type></action>")
    assert manual.status_code == 409  # an Up host answers: it is not off
    stop = client.post(f"{API}/hosts/{host_id}/fence",
                       content="<action><fence_type>stop</fence_type></action>")
    assert stop.status_code == 200, stop.text
    assert state.read_text().strip() == "off"
    with db.read() as tx:
        host = tx.get(Host, host_id)
        assert host is not None and host.status == "down"
        assert all(SECRET not in e for e in tx.scalars(select(Event.description)))
    wrong = client.post(f"{API}/hosts/{host_id}/fence",
                        content="<action><fence_type>explode</fence_type></action>")
    assert wrong.status_code == 400


class PingPool:
    """Agents that answer pings (or not: ``silent``)."""

    def __init__(self) -> None:
        self.silent = False

    def known(self) -> set[str]:
        return set()

    async def call(self, host: HostAddress, method: str, params: Any = None,
                   **_kw: Any) -> Any:
        if self.silent:
            raise HostUnreachableError("refused")
        if method == "Host.ping":
            return {"agentStartedAt": 1.0}
        return {"hostUUID": "", "cpuCores": 1}


def test_a_down_host_returns_only_once_its_stale_copies_are_gone(db: Database) -> None:
    host_id = add_host(db, "back", status="down")
    pool = PingPool()
    heartbeat = Heartbeat(db, pool, misses=1)  # type: ignore[arg-type]
    came_up: list[str] = []
    cleared = [False]

    async def gate(host: HostAddress) -> bool:
        return cleared[0]

    async def up(host: HostAddress) -> None:
        came_up.append(host.host_id)

    heartbeat.before_up.append(gate)
    heartbeat.on_up.append(up)

    def status() -> str:
        with db.read() as tx:
            return str(tx.scalar(select(Host.status).where(Host.id == host_id)))

    pool.silent = True
    asyncio.run(heartbeat.cycle())
    assert status() == "down"  # a silent down host stays down (not non_responsive)
    pool.silent = False
    asyncio.run(heartbeat.cycle())
    assert status() == "down" and came_up == []  # answers, but stale copies remain
    cleared[0] = True
    asyncio.run(heartbeat.cycle())
    assert status() == "up" and came_up == [host_id]


def test_a_vm_a_poll_found_gone_waits_for_the_hosts_reason(db: Database) -> None:
    add_host(db, "h1")
    shut = add_vm(db, "shut", reason=NO_REASON)
    killed = add_vm(db, "killed", reason=NO_REASON)
    silent = add_vm(db, "silent", reason=NO_REASON)
    stale = add_vm(db, "stale", reason=NO_REASON)
    runner = Runner(db)
    ha = restarter(db, runner, reason_grace=60.0)
    ha.wake([(stale, "destroyed")])  # a user's earlier stop: older than this going down
    with db.transaction() as tx:
        tx.execute(update(VmDynamic).where(VmDynamic.vm_id == stale).values(
            status_changed_at=utcnow() + datetime.timedelta(seconds=10)))
    ha.wake([(shut, "shutdown-guest"), (killed, "failed")])
    # The guest's own shutdown is not restarted; silent and stale wait for a reason.
    assert ha.pass_once() == ["killed"]
    with db.read() as tx:
        reasons = {d.vm_id: d.exit_reason for d in tx.scalars(select(VmDynamic))}
    assert reasons[shut] == "shutdown-guest" and reasons[stale] == NO_REASON
    with db.transaction() as tx:  # no reason ever came: after the grace, a crash
        tx.execute(update(VmDynamic).where(VmDynamic.vm_id == silent).values(
            status_changed_at=utcnow() - datetime.timedelta(minutes=5)))
    assert ha.pass_once() == ["silent"]


def test_what_the_sdk_writes_is_accepted(client: TestClient, db: Database,
                                         tmp_path: Path) -> None:
    """The oVirt SDK's own writer: an Agent, PowerManagement, a fence Action, HA on a Vm."""
    fence_program(tmp_path)
    host_id = add_host(db, "sdk-host", status="non_responsive")
    agent = Writer.write(sdk.Agent(type="fake", address="bmc.example", username="admin",
                                   password=SECRET, order=1, port=623, concurrent=False,
                                   encrypt_options=False,
                                   options=[sdk.Option(name="plug", value="sdk-host")]))
    added = client.post(f"{API}/hosts/{host_id}/fenceagents", content=agent)
    assert added.status_code == 201, added.text
    parsed = Reader.read(added.text.encode())
    assert parsed.address == "bmc.example" and parsed.password is None
    assert [(o.name, o.value) for o in parsed.options] == [("plug", "sdk-host")]
    update = Writer.write(sdk.Host(power_management=sdk.PowerManagement(enabled=True)))
    assert client.put(f"{API}/hosts/{host_id}", content=update).status_code == 200
    host = Reader.read(client.get(f"{API}/hosts/{host_id}").text.encode())
    assert host.power_management.enabled is True
    fence = Writer.write(sdk.Action(fence_type="manual"))
    assert client.post(f"{API}/hosts/{host_id}/fence", content=fence).status_code == 200
    vm = Writer.write(sdk.Vm(name="sdk-ha", cluster=sdk.Cluster(name="Default"),
                             high_availability=sdk.HighAvailability(enabled=True,
                                                                    priority=60)))
    answer = client.post(f"{API}/vms", content=vm)
    assert answer.status_code == 201, answer.text
    made = Reader.read(answer.text.encode())
    assert made.high_availability.enabled is True and made.high_availability.priority == 60
