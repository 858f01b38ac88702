"""The heartbeat's transitions, on a real database and a scripted host pool."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from engine_db import context
from sqlalchemy import select

from virtyard.engine.commands.base import run
from virtyard.engine.commands.hosts import AddHost, DeactivateHost
from virtyard.engine.db.database import Database
from virtyard.engine.db.models import Event, Host
from virtyard.engine.hosts.heartbeat import Heartbeat
from virtyard.engine.hosts.pool import HostAddress, HostUnreachableError

CAPS = {"hostUUID": "uuid-1", "iscsiInitiatorName": "iqn.2026-11.test:h1", "cpuCores": 4,
        "cpuModel": "Test CPU", "memoryMiB": 2048, "libvirtVersion": "9.0.0",
        "agentVersion": "0.1.0"}


class ScriptedPool:
    """Answers like agents do; ``down`` holds the hosts whose agent does not answer."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.started_at: dict[str, float] = {}
        self.caps: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.forgotten: list[str] = []

    def known(self) -> set[str]:
        return {"gone-host"}

    async def forget(self, host_id: str) -> None:
        self.forgotten.append(host_id)

    async def call(self, host: HostAddress, method: str, params: Any = None, *,
                   timeout: float | None = None) -> Any:
        self.calls.append((host.address, method))
        if host.address in self.down:
            raise HostUnreachableError(f"{host.address}: connection refused")
        if method == "Host.ping":
            return {"time": 1.0, "agentStartedAt": self.started_at.get(host.address, 100.0)}
        return self.caps.get(host.address, CAPS)


@pytest.fixture
def db(any_db: Database) -> Database:
    return any_db


def beat(hb: Heartbeat, times: int = 1) -> None:
    async def go() -> None:
        for _ in range(times):
            await hb.cycle()
    asyncio.run(go())


def host(db: Database, host_id: str) -> Host:
    with db.read() as tx:
        found = tx.get(Host, host_id)
        assert found is not None
        return found


def codes(db: Database) -> list[int]:
    with db.read() as tx:
        return [e.code for e in tx.scalars(select(Event).order_by(Event.id))]


def test_first_contact_reads_capabilities_then_only_pings(db: Database) -> None:
    pool = ScriptedPool()
    hb = Heartbeat(db, pool, misses=2)  # type: ignore[arg-type]
    added = run(AddHost(name="h1", address="10.0.0.1"), context(db))
    beat(hb)
    h = host(db, added.id)
    assert (h.status, h.host_uuid, h.memory_bytes, h.cpu_cores) == ("up", "uuid-1", 2 << 30, 4)
    assert h.iscsi_initiator_name == "iqn.2026-11.test:h1"
    assert codes(db) == [42, 13]
    pool.calls.clear()
    beat(hb, 3)
    assert [m for _a, m in pool.calls] == ["Host.ping"] * 3
    assert set(pool.forgotten) == {"gone-host"}  # connections of removed hosts are closed


def test_misses_make_non_responsive_and_recovery_makes_up(db: Database) -> None:
    pool = ScriptedPool()
    hb = Heartbeat(db, pool, misses=2)  # type: ignore[arg-type]
    added = run(AddHost(name="h1", address="10.0.0.1"), context(db))
    beat(hb)
    pool.down.add("10.0.0.1")
    beat(hb)
    assert host(db, added.id).status == "up"  # one miss is not enough
    beat(hb)
    h = host(db, added.id)
    assert h.status == "non_responsive" and "connection refused" in h.status_detail
    beat(hb, 2)
    assert codes(db).count(12) == 1  # one event per transition, not per miss
    pool.down.clear()
    beat(hb)
    assert host(db, added.id).status == "up"
    assert codes(db) == [42, 13, 12, 13]


def test_agent_restart_is_noticed(db: Database) -> None:
    pool = ScriptedPool()
    hb = Heartbeat(db, pool)  # type: ignore[arg-type]
    run(AddHost(name="h1", address="10.0.0.1"), context(db))
    beat(hb)
    pool.started_at["10.0.0.1"] = 200.0
    pool.calls.clear()
    beat(hb)
    assert ("10.0.0.1", "Host.getCapabilities") in pool.calls
    assert codes(db)[-1] == 9000


def test_maintenance_is_kept(db: Database) -> None:
    pool = ScriptedPool()
    hb = Heartbeat(db, pool, misses=1)  # type: ignore[arg-type]
    added = run(AddHost(name="h1", address="10.0.0.1"), context(db))
    beat(hb)
    run(DeactivateHost(added.id), context(db))
    pool.down.add("10.0.0.1")
    beat(hb, 2)
    assert host(db, added.id).status == "maintenance"
    pool.down.clear()
    beat(hb)
    assert host(db, added.id).status == "maintenance"


def test_two_hosts_with_one_uuid(db: Database) -> None:
    pool = ScriptedPool()
    hb = Heartbeat(db, pool)  # type: ignore[arg-type]
    first = run(AddHost(name="h1", address="10.0.0.1"), context(db))
    beat(hb)
    second = run(AddHost(name="h2", address="10.0.0.2"), context(db))
    beat(hb)
    assert host(db, first.id).status == "up"
    clone = host(db, second.id)
    assert clone.status == "non_responsive" and "h1" in clone.status_detail
    assert 9001 in codes(db)


def test_hostile_capabilities_are_clamped(db: Database) -> None:
    pool = ScriptedPool()
    pool.caps["10.0.0.1"] = {"hostUUID": "u" * 500, "cpuCores": "many", "memoryMiB": -5,
                             "cpuModel": "x" * 5000, "iscsiInitiatorName": ["not", "text"]}
    hb = Heartbeat(db, pool)  # type: ignore[arg-type]
    added = run(AddHost(name="h1", address="10.0.0.1"), context(db))
    beat(hb)
    h = host(db, added.id)
    assert h.status == "up" and len(h.host_uuid or "") == 64 and len(h.cpu_model) == 255
    assert (h.cpu_cores, h.memory_bytes) == (0, 0)


def test_the_engine_drops_idle_host_connections_before_the_agent_closes_them() -> None:
    # Otherwise a request can go out on a connection the agent is closing at that moment.
    from virtyard.engine.hosts.pool import KEEPALIVE_EXPIRY  # noqa: PLC0415
    from virtyard.host.server import KEEP_ALIVE  # noqa: PLC0415

    assert 15.0 < KEEPALIVE_EXPIRY < KEEP_ALIVE - 5  # outlives the 15 s poll interval
