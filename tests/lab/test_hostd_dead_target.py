"""A dead or unreachable storage server never hides the others: ``Host.getDeviceList`` and
``Host.getDevicesVisibility`` on lab host 1 with one of two targets gone without a disconnect
(deleted, taken offline, or behind a portal that no longer answers), and back again."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from virtyard.host.client import HostClient
from virtyard.host.storage.userspace_initiator import PROBE_LOGIN_TIMEOUT
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab

pytestmark = pytest.mark.lab

MiB = 1 << 20
Connect = Callable[..., list[dict[str, Any]]]
MakeTarget = Callable[..., TargetInfo]


class Relay:
    """A TCP relay to the lab's portal: a storage server with a portal of its own.

    ``blackhole()`` makes it a server that is gone: connections are accepted (by the kernel)
    but never answered, and the ones being relayed are cut; ``forward()`` brings it back.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self.dead = False
        self.closed = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True, name="relay")
        self._thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
                if self.dead:
                    continue  # held open, never answered
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def blackhole(self) -> None:
        with self._lock:
            self.dead = True
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def forward(self) -> None:
        with self._lock:
            self.dead = False

    def close(self) -> None:
        self.blackhole()
        self.closed = True
        self.listener.close()
        self._thread.join(5)


@pytest.fixture
def relay(lab: Lab) -> Iterator[Relay]:
    r = Relay(lab.storage.port)
    yield r
    r.close()


def name_of(target: TargetInfo) -> str:
    return target.iqn.rsplit(":", 1)[1]


def timed_listing(client: HostClient, **params: Any) -> tuple[dict[str, dict[str, Any]], float]:
    started = time.monotonic()
    devices = client.call("Host.getDeviceList", params)
    return {d["GUID"]: d for d in devices}, time.monotonic() - started


def assert_healthy(device: dict[str, Any], lun: int, *, status: str) -> None:
    assert device["pathstatus"] == [{"type": "iSCSI", "lun": lun, "state": "active",
                                     "physdev": ""}]
    assert device["status"] == status


def assert_dead(device: dict[str, Any], target: TargetInfo, conn_id: str, port: int,
                kinds: tuple[str, ...]) -> dict[str, Any]:
    """The LUN is still listed (from the last good listing), its one path failed with the
    connection's failure; returns that failure."""
    assert device["status"] == "unknown" and device["usedReason"] is None
    assert device["capacity"] == 16 * MiB
    assert [p["iqn"] for p in device["pathlist"]] == [target.iqn]
    [path] = device["pathstatus"]
    assert (path["lun"], path["state"]) == (1, "failed")
    error = path["error"]
    assert (error["connection"], error["target"], error["portal"]) == (
        conn_id, target.iqn, f"127.0.0.1:{port}")
    assert error["kind"] in kinds, error
    assert error["message"]
    return dict(error)


def test_deleted_target_does_not_hide_the_others(lab: Lab, host_client: HostClient,
                                                  make_target: MakeTarget,
                                                  connect_target: Connect) -> None:
    """The issue's case: a target went away without a disconnect."""
    live = make_target([16 * MiB, 32 * MiB])
    dead = make_target([16 * MiB])
    dead_id = str(uuid.uuid4())
    assert connect_target(live)[0]["status"] == 0
    assert connect_target(dead, conn_id=dead_id)[0]["status"] == 0
    before, _ = timed_listing(host_client, checkStatus=False)
    assert {live.wwid(1), live.wwid(2), dead.wwid(1)} <= set(before)

    lab.storage.delete_target(name_of(dead))

    for check_status in (False, True):
        listing, took = timed_listing(host_client, checkStatus=check_status)
        status = "free" if check_status else "unknown"
        assert_healthy(listing[live.wwid(1)], 1, status=status)
        assert_healthy(listing[live.wwid(2)], 2, status=status)
        assert_dead(listing[dead.wwid(1)], dead, dead_id, dead.port, ("target-not-found",))
        assert took < 3, took  # a refused login costs nothing
    cached, _ = timed_listing(host_client, checkStatus=True, refresh=False)
    assert_dead(cached[dead.wwid(1)], dead, dead_id, dead.port, ("target-not-found",))
    only, _ = timed_listing(host_client, guids=[dead.wwid(1)], checkStatus=False)
    assert list(only) == [dead.wwid(1)]
    assert_dead(only[dead.wwid(1)], dead, dead_id, dead.port, ("target-not-found",))

    visible = host_client.call("Host.getDevicesVisibility",
                               {"guidList": [live.wwid(1), live.wwid(2), dead.wwid(1)]})
    assert visible == {live.wwid(1): True, live.wwid(2): True, dead.wwid(1): False}

    # The engine gives up on it: disconnecting drops its LUN.
    assert host_client.call("StoragePool.disconnectStorageServer", {
        "domainType": 3, "connectionParams": [{"id": dead_id, "connection": "127.0.0.1",
                                               "port": dead.port, "iqn": dead.iqn}]}
                            ) == [{"id": dead_id, "status": 0}]
    after, _ = timed_listing(host_client, checkStatus=False)
    assert dead.wwid(1) not in after and live.wwid(1) in after


def test_offline_target_recovers(lab: Lab, host_client: HostClient, make_target: MakeTarget,
                                 connect_target: Connect) -> None:
    live = make_target([16 * MiB])
    flaky = make_target([16 * MiB])
    flaky_id = str(uuid.uuid4())
    connect_target(live)
    connect_target(flaky, conn_id=flaky_id)
    guids = [live.wwid(1), flaky.wwid(1)]
    assert host_client.call("Host.getDevicesVisibility", {"guidList": guids}) == dict.fromkeys(
        guids, True)

    lab.storage.adm.set_target_state(flaky.tid, "offline")
    try:
        listing, _ = timed_listing(host_client)
        assert_healthy(listing[live.wwid(1)], 1, status="free")
        error = assert_dead(listing[flaky.wwid(1)], flaky, flaky_id, flaky.port,
                            ("login", "target-not-found", "session", "connect", "timeout"))
        print(f"\noffline target: {error['kind']}: {error['message']}")
        assert host_client.call("Host.getDevicesVisibility", {"guidList": guids}) == {
            live.wwid(1): True, flaky.wwid(1): False}
    finally:
        lab.storage.adm.set_target_state(flaky.tid, "ready")

    listing, _ = timed_listing(host_client)
    for guid in guids:
        assert_healthy(listing[guid], 1, status="free")
    assert host_client.call("Host.getDevicesVisibility", {"guidList": guids}) == dict.fromkeys(
        guids, True)


def test_unreachable_portal_costs_a_bounded_time(lab: Lab, host_client: HostClient,
                                                 make_target: MakeTarget,
                                                 connect_target: Connect,
                                                 relay: Relay) -> None:
    """A storage server that stops answering at all (the worst case: every login waits for
    its bound) delays a listing by the login bound only, and comes back by itself."""
    live = make_target([16 * MiB, 16 * MiB])
    far = make_target([16 * MiB])
    far_id = str(uuid.uuid4())
    connect_target(live)
    assert connect_target(dataclasses.replace(far, port=relay.port),
                          conn_id=far_id)[0]["status"] == 0
    healthy, healthy_took = timed_listing(host_client)
    assert healthy[far.wwid(1)]["pathlist"][0]["port"] == relay.port

    relay.blackhole()
    timings = {}
    for check_status in (False, True):
        listing, took = timed_listing(host_client, checkStatus=check_status)
        timings[check_status] = took
        status = "free" if check_status else "unknown"
        assert_healthy(listing[live.wwid(1)], 1, status=status)
        assert_healthy(listing[live.wwid(2)], 2, status=status)
        assert_dead(listing[far.wwid(1)], far, far_id, relay.port, ("timeout", "connect"))
        assert PROBE_LOGIN_TIMEOUT - 0.5 < took < PROBE_LOGIN_TIMEOUT + 3, took
    started = time.monotonic()
    assert host_client.call("Host.getDevicesVisibility", {"guidList": [live.wwid(1)]}) == {
        live.wwid(1): True}
    live_visibility_took = time.monotonic() - started
    assert live_visibility_took < 1  # known and reachable: no rescan
    started = time.monotonic()
    assert host_client.call("Host.getDevicesVisibility", {"guidList": [far.wwid(1)]}) == {
        far.wwid(1): False}
    dead_visibility_took = time.monotonic() - started
    print(f"\nlisting, all healthy: {healthy_took:.3f} s; one portal unreachable: "
          f"checkStatus=false {timings[False]:.3f} s, checkStatus=true {timings[True]:.3f} s; "
          f"visibility of a live LUN {live_visibility_took:.3f} s, of the dead one (rescan) "
          f"{dead_visibility_took:.3f} s")

    relay.forward()
    listing, _ = timed_listing(host_client)
    assert_healthy(listing[far.wwid(1)], 1, status="free")
    assert host_client.call("Host.getDevicesVisibility", {"guidList": [far.wwid(1)]}) == {
        far.wwid(1): True}
