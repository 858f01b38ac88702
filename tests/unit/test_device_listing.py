"""Listing LUNs when a storage server is dead: each target on its own (``Initiator.scan``),
the dead one's LUNs kept from the last listing with failed paths (``merge_scan``), through the
device service's cache and visibility, and as ``Host.getDeviceList`` returns them."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from virtyard.host.config import HostConfig, StorageConfig
from virtyard.host.storage.connections import ConnectionRegistry
from virtyard.host.storage.devices import DeviceService, merge_scan
from virtyard.host.storage.initiator import (
    Connection,
    ConnectionFailure,
    Device,
    DeviceScan,
    Initiator,
    InitiatorError,
    PathInfo,
    Portal,
)
from virtyard.host.verbs import SCHEMA
from virtyard.host.verbs.storage import GetDeviceListParams, get_device_list

MiB = 1 << 20
A = Connection("conn-a", Portal("192.0.2.1", 3260), "iqn.2026-11.org.example:a")
B = Connection("conn-b", Portal("192.0.2.2", 3260), "iqn.2026-11.org.example:b")
B_ALIAS = Connection("conn-b2", B.portal, B.iqn)  # another id for the same session
# One LUN of target a reached through a second portal (multipath): same iqn, other address.
A2 = Connection("conn-a2", Portal("192.0.2.3", 3260), A.iqn)
DEAD = InitiatorError("target-not-found", "Target not found(515)", portal=str(B.portal),
                      target=B.iqn)


def device(guid: str, *paths: PathInfo, head: bytes | None = None,
           serial: str = "") -> Device:
    return Device(guid, "IET", "VIRTUAL-DISK", "0001", serial, 16 * MiB, 512, 512, 0,
                  list(paths), head)


def failure(connection: Connection = B, kind: str = "target-not-found") -> ConnectionFailure:
    return ConnectionFailure(connection, kind, "gone")


# -- merge_scan ---------------------------------------------------------------------------------

def test_merge_without_failures_is_the_scan() -> None:
    scan = DeviceScan([device("3a1", PathInfo(A, 1)), device("3a2", PathInfo(A, 2))])
    known = [device("3a1", PathInfo(A, 1)), device("3b1", PathInfo(B, 1))]
    assert merge_scan(scan, known) == scan.devices  # 3b1 is gone from a healthy target


def test_merge_keeps_the_dead_connections_luns_with_failed_paths() -> None:
    gone = failure()
    scan = DeviceScan([device("3a1", PathInfo(A, 1), head=b"x")], [gone])
    known = [device("3a1", PathInfo(A, 1)),
             device("3b1", PathInfo(B, 1), head=b"old", serial="s1"),
             device("3b2", PathInfo(B, 2))]
    merged = merge_scan(scan, known)
    assert [d.guid for d in merged] == ["3a1", "3b1", "3b2"]
    assert merged[0].paths == [PathInfo(A, 1)] and merged[0].head == b"x"
    assert merged[1].paths == [PathInfo(B, 1, "failed", failure=gone)]
    assert merged[1].head is None  # never probed: its status is unknown
    assert (merged[1].serial, merged[1].capacity) == ("s1", 16 * MiB)  # from the last listing
    assert merged[2].paths == [PathInfo(B, 2, "failed", failure=gone)]
    assert known[1].paths == [PathInfo(B, 1)]  # the cache's devices are not changed


def test_merge_adds_a_failed_path_to_a_lun_still_listed_elsewhere() -> None:
    gone = failure(A2, "timeout")
    scan = DeviceScan([device("3a1", PathInfo(A, 1))], [gone])
    known = [device("3a1", PathInfo(A2, 1), PathInfo(A, 1))]  # the dead path used to be first
    [merged] = merge_scan(scan, known)
    assert merged.paths == [PathInfo(A, 1), PathInfo(A2, 1, "failed", failure=gone)]


def test_merge_orders_active_paths_first_and_never_doubles_a_listed_path() -> None:
    gone = failure()
    # The kernel initiator lists a dead session's paths itself (multipath keeps the map).
    scan = DeviceScan([device("3a1", PathInfo(B, 1, "failed", "sdb", gone),
                              PathInfo(A, 1, "active", "sdc"))], [gone])
    known = [device("3a1", PathInfo(B, 1, "active", "sdb"), PathInfo(A, 1, "active", "sdc"))]
    [merged] = merge_scan(scan, known)
    assert merged.paths == [PathInfo(A, 1, "active", "sdc"),
                            PathInfo(B, 1, "failed", "sdb", gone)]


def test_merge_takes_the_serial_of_a_map_it_cannot_ask() -> None:
    gone = failure()
    scan = DeviceScan([device("3b1", PathInfo(B, 1, "failed", "sdb", gone))], [gone])
    [merged] = merge_scan(scan, [device("3b1", PathInfo(B, 1), serial="beef")])
    assert merged.serial == "beef"


def test_merge_respects_the_guid_filter_and_aliases() -> None:
    gone_alias, gone = failure(B_ALIAS), failure(B)
    scan = DeviceScan([], [gone_alias, gone])
    known = [device("3b1", PathInfo(B, 1)), device("3b2", PathInfo(B, 2))]
    [merged] = merge_scan(scan, known, guids=frozenset({"3b2"}))
    assert merged.guid == "3b2"
    assert merged.paths[0].failure == gone_alias  # the first failure of that session


# -- Initiator.scan (the default: each session on its own) --------------------------------------

class ListingInitiator(Initiator):
    """``devices()`` from a dict per session; a target may raise or be slow."""

    kind = "userspace"

    def __init__(self, luns: dict[str, list[Device]]) -> None:
        self.luns = luns  # iqn -> devices
        self.broken: dict[str, Exception] = {}
        self.delay = 0.0
        self.calls: list[list[str]] = []
        self.reads: list[str] = []

    def discover(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def login(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def logout(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do."""

    def devices(self, connections: list[Connection], *, guids: frozenset[str] | None,
                read_head: int, timeout: float) -> list[Device]:
        self.calls.append([c.id for c in connections])
        time.sleep(self.delay)
        found = []
        for connection in connections:
            if connection.iqn in self.broken:
                raise self.broken[connection.iqn]
            for d in self.luns.get(connection.iqn, []):
                if guids is None or d.guid in guids:
                    paths = [replace(p, connection=connection) for p in d.paths]
                    found.append(replace(d, paths=paths,
                                         head=bytes(read_head) if read_head else None))
        return found

    def read_many(self, requests: list[tuple[Device, int, int]], *,
                  timeout: float) -> list[bytes]:
        self.reads.extend(d.guid for d, _, _ in requests)
        return [bytes(length) for _, _, length in requests]

    def device_path(self, guid: str) -> str | None:
        return None


def luns() -> dict[str, list[Device]]:
    return {A.iqn: [device("3a1", PathInfo(A, 1)), device("3a2", PathInfo(A, 2))],
            B.iqn: [device("3b1", PathInfo(B, 1), serial="b-serial")]}


def test_scan_lists_each_session_on_its_own() -> None:
    initiator = ListingInitiator(luns())
    initiator.broken[B.iqn] = DEAD
    scan = initiator.scan([A, B, B_ALIAS], guids=None, read_head=0, timeout=5)
    assert [d.guid for d in scan.devices] == ["3a1", "3a2"]
    assert scan.failures == [ConnectionFailure(B, "target-not-found", "Target not found(515)"),
                             ConnectionFailure(B_ALIAS, "target-not-found",
                                               "Target not found(515)")]
    assert sorted(initiator.calls) == [["conn-a"], ["conn-b"]]  # one call per session


def test_scan_reports_an_unexpected_error_as_internal(caplog: pytest.LogCaptureFixture) -> None:
    initiator = ListingInitiator(luns())
    initiator.broken[B.iqn] = ValueError("bad VPD page")
    scan = initiator.scan([A, B], guids=None, read_head=0, timeout=5)
    assert [d.guid for d in scan.devices] == ["3a1", "3a2"]
    assert scan.failures == [ConnectionFailure(B, "internal", "ValueError: bad VPD page")]
    assert "bad VPD page" in caplog.text  # logged with its traceback


def test_scan_lists_targets_in_parallel() -> None:
    initiator = ListingInitiator(luns())
    initiator.delay = 0.3
    started = time.monotonic()
    scan = initiator.scan([A, B], guids=None, read_head=0, timeout=5)
    assert time.monotonic() - started < 0.55  # not 0.6: a slow target does not add up
    assert len(scan.devices) == 3


def test_scan_merges_paths_of_one_lun_through_two_portals() -> None:
    initiator = ListingInitiator({A.iqn: [device("3a1", PathInfo(A, 1))]})
    scan = initiator.scan([A, A2], guids=None, read_head=0, timeout=5)
    [merged] = scan.devices
    assert {p.connection.id for p in merged.paths} == {"conn-a", "conn-a2"}
    assert initiator.scan([], guids=None, read_head=0, timeout=5) == DeviceScan()


# -- DeviceService ------------------------------------------------------------------------------

@pytest.fixture
def service(tmp_path: Path) -> tuple[DeviceService, ListingInitiator]:
    registry = ConnectionRegistry(tmp_path / "connections.json")
    registry.add(A)
    registry.add(B)
    initiator = ListingInitiator(luns())
    return DeviceService(initiator, registry, probe_bytes=4096, timeout=5), initiator


def states(entries: list[Any]) -> dict[str, list[str]]:
    return {e.device.guid: [p.state for p in e.device.paths] for e in entries}


def test_service_lists_the_live_target_and_keeps_the_dead_ones_luns(
        service: tuple[DeviceService, ListingInitiator]) -> None:
    devices, initiator = service
    healthy = devices.listing(guids=None, check_status=True, refresh=True)
    assert states(healthy) == {"3a1": ["active"], "3a2": ["active"], "3b1": ["active"]}
    assert all(e.usage is not None and e.usage.status == "free" for e in healthy)

    initiator.broken[B.iqn] = DEAD
    initiator.reads.clear()
    for _ in range(2):  # and again: the cache still knows the dead target's LUNs
        entries = devices.listing(guids=None, check_status=True, refresh=True)
        assert states(entries) == {"3a1": ["active"], "3a2": ["active"], "3b1": ["failed"]}
        dead = entries[2]
        assert dead.usage is None  # status unknown, never "free"
        assert dead.device.serial == "b-serial"
        assert dead.device.paths[0].failure == ConnectionFailure(B, "target-not-found",
                                                                 "Target not found(515)")
    assert "3b1" not in initiator.reads  # never read through a dead target
    cached = devices.listing(guids=None, check_status=True, refresh=False)
    assert states(cached) == states(entries)

    del initiator.broken[B.iqn]  # the target is back
    entries = devices.listing(guids=None, check_status=True, refresh=True)
    assert states(entries) == {"3a1": ["active"], "3a2": ["active"], "3b1": ["active"]}
    assert all(p.failure is None for e in entries for p in e.device.paths)
    assert all(e.usage is not None for e in entries)


def test_service_visibility_of_a_dead_lun_is_no(
        service: tuple[DeviceService, ListingInitiator]) -> None:
    devices, initiator = service
    devices.listing(guids=None, check_status=True, refresh=True)
    initiator.broken[B.iqn] = DEAD
    initiator.calls.clear()
    # Like a multipath map that is still there: reachable as of the last listing, no I/O.
    assert devices.visibility(["3a1", "3b1"]) == {"3a1": True, "3b1": True}
    assert initiator.calls == []
    devices.listing(guids=None, check_status=True, refresh=True)  # finds target b dead
    initiator.calls.clear()
    assert devices.visibility(["3a1", "3a2"]) == {"3a1": True, "3a2": True}
    assert initiator.calls == []  # cached and reachable: no rescan
    assert devices.visibility(["3a1", "3b1"]) == {"3a1": True, "3b1": False}
    assert sorted(initiator.calls) == [["conn-a"], ["conn-b"]]  # one rescan before "no"
    # The rescan kept what probing found for the live LUNs.
    cached = {e.device.guid: e for e in devices.listing(guids=None, check_status=True,
                                                        refresh=False)}
    assert cached["3a1"].usage is not None and cached["3b1"].usage is None
    del initiator.broken[B.iqn]
    assert devices.visibility(["3b1"]) == {"3b1": True}


def test_service_connect_replaces_the_failed_paths_and_disconnect_drops_them(
        service: tuple[DeviceService, ListingInitiator]) -> None:
    devices, initiator = service
    devices.listing(guids=None, check_status=False, refresh=True)
    initiator.broken[B.iqn] = DEAD
    devices.listing(guids=None, check_status=False, refresh=True)
    devices.disconnected(B)
    assert "3b1" not in states(devices.listing(guids=None, check_status=False, refresh=False))

    devices.listing(guids=None, check_status=False, refresh=True)
    devices.connected(B)  # listing it fails: logged, nothing added
    del initiator.broken[B.iqn]
    devices.connected(B)
    cached = devices.listing(guids=None, check_status=False, refresh=False)
    assert states(cached)["3b1"] == ["active"]


def test_service_connect_after_a_failure_has_one_active_path(tmp_path: Path) -> None:
    registry = ConnectionRegistry(tmp_path / "connections.json")
    registry.add(A)
    registry.add(A2)
    initiator = ListingInitiator({A.iqn: [device("3a1", PathInfo(A, 1))]})
    devices = DeviceService(initiator, registry, probe_bytes=4096, timeout=5)
    devices.listing(guids=None, check_status=False, refresh=True)
    initiator.broken[A.iqn] = DEAD  # both portals of target a fail
    [entry] = devices.listing(guids=None, check_status=False, refresh=True)
    assert [p.state for p in entry.device.paths] == ["failed", "failed"]
    del initiator.broken[A.iqn]
    devices.connected(A2)  # reconnected through one portal: its fresh path replaces the old
    [entry] = devices.listing(guids=None, check_status=False, refresh=False)
    assert [(p.connection.id, p.state) for p in entry.device.paths] == [
        ("conn-a2", "active"), ("conn-a", "failed")]


def test_service_listing_of_one_dead_lun_by_guid(
        service: tuple[DeviceService, ListingInitiator]) -> None:
    devices, initiator = service
    devices.listing(guids=None, check_status=False, refresh=True)
    initiator.broken[B.iqn] = DEAD
    entries = devices.listing(guids=frozenset({"3b1"}), check_status=True, refresh=True)
    assert states(entries) == {"3b1": ["failed"]}


def test_listings_run_concurrently_with_a_dead_target(
        service: tuple[DeviceService, ListingInitiator]) -> None:
    devices, initiator = service
    devices.listing(guids=None, check_status=False, refresh=True)
    initiator.broken[B.iqn] = DEAD
    results: list[dict[str, list[str]]] = []

    def run() -> None:
        results.append(states(devices.listing(guids=None, check_status=True, refresh=True)))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [{"3a1": ["active"], "3a2": ["active"], "3b1": ["failed"]}] * 4


# -- Host.getDeviceList's result ----------------------------------------------------------------

def test_verb_result_marks_failed_paths_and_leaves_healthy_ones_as_they_were(
        service: tuple[DeviceService, ListingInitiator]) -> None:
    devices, initiator = service
    agent = SimpleNamespace(devices=devices, config=HostConfig(
        name="h1", storage=StorageConfig(initiator_name="iqn.2026-11.org.example:h1")))
    devices.listing(guids=None, check_status=False, refresh=True)
    initiator.broken[B.iqn] = DEAD
    verb = SCHEMA.verbs["Host.getDeviceList"]
    result = verb.dump_result(get_device_list(agent, GetDeviceListParams()))  # type: ignore[arg-type]
    by_guid = {d["GUID"]: d for d in result}
    assert by_guid["3a1"]["pathstatus"] == [{"type": "iSCSI", "lun": 1, "state": "active",
                                             "physdev": ""}]
    assert by_guid["3a1"]["status"] == "free"
    dead = by_guid["3b1"]
    assert dead["status"] == "unknown" and dead["serial"] == "b-serial"
    assert dead["pathlist"][0]["iqn"] == B.iqn
    assert dead["pathstatus"] == [{
        "type": "iSCSI", "lun": 1, "state": "failed", "physdev": "",
        "error": {"connection": "conn-b", "target": B.iqn, "portal": "192.0.2.2:3260",
                  "kind": "target-not-found", "message": "Target not found(515)"}}]
