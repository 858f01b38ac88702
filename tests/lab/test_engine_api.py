"""The engine's REST API as the official oVirt SDK sees it: the entry point, clusters and data
centers, logging out, hosts from first contact to removal, the audit log, and the heartbeat.

Every test runs on both databases (the ``engine`` fixture); hosts are the lab's real agents,
reached over mutual TLS.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import ovirtsdk4 as sdk4
import pytest
from lxml import etree
from ovirtsdk4 import types

from virtyard.lab.lab import Lab

pytestmark = pytest.mark.lab

UP = types.HostStatus.UP
MAINTENANCE = types.HostStatus.MAINTENANCE
NON_RESPONSIVE = types.HostStatus.NON_RESPONSIVE
# Audit log codes (oVirt's AuditLogType numbers).
LOGIN, LOGOUT = 30, 31
HOST_ADDED, HOST_UP, HOST_NOT_RESPONDING = 42, 13, 12
HOST_MAINTENANCE, HOST_ACTIVATED, HOST_REMOVED = 600, 16, 44


def events_since(sdk: sdk4.Connection, since: int, search: str = "") -> list[types.Event]:
    """Events after id ``since`` (matching ``search``), oldest first."""
    events = sdk.system_service().events_service().list(from_=since, search=search or None)
    return sorted(events, key=lambda e: int(e.id))


def codes(events: list[types.Event]) -> list[int]:
    return [e.code for e in events]


def is_subsequence(wanted: list[int], seen: list[int]) -> bool:
    it = iter(seen)
    return all(code in it for code in wanted)


def fault_of(response: Any) -> dict[str, str]:
    """The XML fault of a raw response: reason, detail, key."""
    root = etree.fromstring(response.content)
    assert root.tag == "fault", response.text
    return {child.tag: child.text or "" for child in root}


def sdk_error(call: Callable[[], object], error: type[sdk4.Error] = sdk4.Error) -> sdk4.Error:
    with pytest.raises(error) as caught:
        call()
    return caught.value


# -- the entry point, clusters, data centers, logging out ------------------------------------


def test_connection_and_entry_point(engine: Any, sdk: sdk4.Connection) -> None:
    assert sdk.test(raise_exception=True) is True
    api = sdk.system_service().get()
    assert api.product_info.name == "Virtyard"
    assert api.product_info.vendor
    version = api.product_info.version
    assert version.full_version and isinstance(version.major, int)
    assert isinstance(version.minor, int)
    hosts = sdk.system_service().hosts_service().list()
    assert api.summary.hosts.total == len(hosts)
    assert api.summary.hosts.active == len([h for h in hosts if h.status == UP])
    assert api.summary.vms.total == 0
    assert api.summary.users.total >= 1
    assert api.time.tzinfo is not None
    now = datetime.datetime.now(datetime.UTC)
    assert abs((api.time - now).total_seconds()) < 60
    assert api.authenticated_user.name == "admin@internal"
    assert api.authenticated_user.id


def test_default_cluster_and_data_center(engine: Any, sdk: sdk4.Connection) -> None:
    system = sdk.system_service()
    dcs = system.data_centers_service().list()
    assert [dc.name for dc in dcs] == ["Default"]
    dc = system.data_centers_service().data_center_service(dcs[0].id).get()
    assert dc.name == "Default" and dc.id == dcs[0].id
    assert dc.status == types.DataCenterStatus.UP

    clusters = system.clusters_service().list()
    assert [c.name for c in clusters] == ["Default"]
    cluster = system.clusters_service().cluster_service(clusters[0].id).get()
    assert cluster.name == "Default"
    assert cluster.data_center.id == dc.id

    assert [c.id for c in system.clusters_service().list(search="name=Default")] == [cluster.id]
    assert system.clusters_service().list(search="name=nothing-here") == []
    assert [d.id for d in system.data_centers_service().list(search="name=Def*")] == [dc.id]
    assert len(system.clusters_service().list(max=1)) == 1
    sdk_error(system.clusters_service().cluster_service(dc.id).get, sdk4.NotFoundError)


def test_close_logs_out(engine: Any, sdk: sdk4.Connection) -> None:
    before = engine.last_event_id()
    connection = engine.connect()
    token = connection.authenticate()
    assert engine.request("GET", "", token=token).status_code == 200
    connection.close()

    response = engine.request("GET", "", token=token)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].lower().startswith("bearer")
    fault = fault_of(response)
    assert fault["reason"] and fault["detail"]
    events = [e for e in events_since(sdk, before) if "admin@internal" in e.description]
    assert is_subsequence([LOGIN, LOGOUT], codes(events)), codes(events)


# -- hosts ------------------------------------------------------------------------------------


def test_added_hosts_come_up_with_their_capabilities(
        engine: Any, sdk: sdk4.Connection, lab: Lab, add_lab_host: Callable[..., types.Host],
        wait_host: Callable[..., types.Host]) -> None:
    before = engine.last_event_id()
    added = [add_lab_host(0), add_lab_host(1)]
    for host, agent in zip(added, lab.agents, strict=True):
        # The answer to the add: known, not contacted yet.
        assert host.status == types.HostStatus.INSTALLING
        assert host.address == "127.0.0.1" and host.port == agent.port
        assert host.id

    default = sdk.system_service().clusters_service().list(search="name=Default")[0]
    up = [wait_host(h.id, UP, timeout=30) for h in added]
    for host, lab_host, agent in zip(up, lab.hosts, lab.agents, strict=True):
        assert host.hardware_information.uuid == lab_host.host_uuid
        assert host.iscsi.initiator.startswith("iqn.")
        assert host.iscsi.initiator.endswith(f":{agent.name}")
        assert host.memory > 0
        assert host.cpu.topology.cores > 0
        assert host.version.full_version
        assert host.libvirt_version.full_version
        assert host.cluster.id == default.id
        assert host.summary.total == 0
    assert up[0].hardware_information.uuid != up[1].hardware_information.uuid

    api = sdk.system_service().get()
    assert (api.summary.hosts.total, api.summary.hosts.active) == (2, 2)
    for host in added:
        mine = events_since(sdk, before, f"host.id={host.id}")
        assert is_subsequence([HOST_ADDED, HOST_UP], codes(mine)), codes(mine)
        assert host.name in mine[0].description
        assert mine[0].user.name == "admin@internal"


def test_host_list_search_case_and_max(
        engine: Any, sdk: sdk4.Connection, add_lab_host: Callable[..., types.Host],
        wait_host: Callable[..., types.Host]) -> None:
    first = add_lab_host(0, name="Search-Alpha")
    second = add_lab_host(1, name="Search-Beta")
    hosts = sdk.system_service().hosts_service()
    for host in (first, second):
        wait_host(host.id, UP, timeout=30)

    assert sorted(h.name for h in hosts.list()) == ["Search-Alpha", "Search-Beta"]
    assert [h.id for h in hosts.list(search="name=Search-Alpha")] == [first.id]
    assert [h.id for h in hosts.list(search='name="Search-Beta"')] == [second.id]
    assert sorted(h.id for h in hosts.list(search="name=Search-*")) \
        == sorted([first.id, second.id])
    # Case: compared as written unless the client says otherwise.
    assert hosts.list(search="name=search-alpha") == []
    assert hosts.list(search="name=search-alpha", case_sensitive=True) == []
    assert [h.id for h in hosts.list(search="name=search-alpha", case_sensitive=False)] \
        == [first.id]
    assert sorted(h.id for h in hosts.list(search="Hosts: status=up")) \
        == sorted([first.id, second.id])
    assert hosts.list(search="status=maintenance") == []
    assert len(hosts.list(max=1)) == 1
    assert len(hosts.list(search="name=Search-*", max=5)) == 2
    assert hosts.list(max=0) == []

    got = hosts.host_service(second.id).get()
    assert (got.id, got.name, got.address, got.status) \
        == (second.id, "Search-Beta", "127.0.0.1", UP)


def test_host_conflicts_answer_409_with_the_key(
        engine: Any, sdk: sdk4.Connection, lab: Lab,
        add_lab_host: Callable[..., types.Host]) -> None:
    host = add_lab_host(0, name="conflict-one")
    hosts = sdk.system_service().hosts_service()
    port0, port1 = lab.agents[0].port, lab.agents[1].port

    same_name = sdk_error(lambda: hosts.add(
        types.Host(name="conflict-one", address="127.0.0.1", port=port1)))
    assert same_name.code == 409
    assert "conflict-one" in same_name.fault.detail

    same_agent = sdk_error(lambda: hosts.add(
        types.Host(name="conflict-two", address="127.0.0.1", port=port0)))
    assert same_agent.code == 409
    assert f"127.0.0.1:{port0}" in same_agent.fault.detail

    # The stable key travels in the fault, in both flavours.
    token = engine.admin_token()
    response = engine.request("POST", "/hosts", token=token, body=(
        f"<host><name>conflict-one</name><address>127.0.0.1</address>"
        f"<port>{port1}</port></host>").encode())
    assert response.status_code == 409
    fault = fault_of(response)
    assert fault["key"] == "ACTION_TYPE_FAILED_NAME_ALREADY_USED"
    assert fault["reason"] == "Operation Failed"
    assert fault["detail"].startswith("[Cannot add Host.")

    response = engine.request("POST", "/hosts", token=token, flavor="json", body=(
        f'{{"name": "conflict-two", "address": "127.0.0.1", "port": {port0}}}').encode())
    assert response.status_code == 409
    assert response.json()["key"] == "ACTION_TYPE_FAILED_VDS_WITH_SAME_HOST_EXIST"

    assert [h.id for h in hosts.list()] == [host.id]


def test_host_maintenance_activation_and_removal(
        engine: Any, sdk: sdk4.Connection, add_lab_host: Callable[..., types.Host],
        wait_host: Callable[..., types.Host]) -> None:
    first = add_lab_host(0)
    second = add_lab_host(1)
    hosts = sdk.system_service().hosts_service()
    one, two = hosts.host_service(first.id), hosts.host_service(second.id)
    for host in (first, second):
        wait_host(host.id, UP, timeout=30)
    before = engine.last_event_id()

    one.deactivate()
    assert one.get().status == MAINTENANCE
    again = sdk_error(one.deactivate)
    assert again.code == 409

    # Removing a host that is up: refused, nothing changes.
    refused = sdk_error(two.remove)
    assert refused.code == 409
    response = engine.request("DELETE", f"/hosts/{second.id}", token=engine.admin_token())
    assert response.status_code == 409
    assert fault_of(response)["key"] == "VDS_CANNOT_REMOVE_VDS_STATUS_ILLEGAL"
    assert two.get().status == UP
    assert sdk_error(two.activate).code == 409  # already up

    one.activate()
    wait_host(first.id, UP, timeout=30)

    one.deactivate()
    assert one.get().status == MAINTENANCE
    one.remove()
    sdk_error(one.get, sdk4.NotFoundError)
    sdk_error(one.remove, sdk4.NotFoundError)
    assert [h.id for h in hosts.list()] == [second.id]
    response = engine.request("GET", f"/hosts/{first.id}", token=engine.admin_token())
    assert response.status_code == 404
    assert fault_of(response)["detail"]

    mine = events_since(sdk, before, f"host.id={first.id}")
    wanted = [HOST_MAINTENANCE, HOST_ACTIVATED, HOST_UP, HOST_MAINTENANCE, HOST_REMOVED]
    assert is_subsequence(wanted, codes(mine)), codes(mine)
    for event in mine:
        assert event.host is not None and event.host.id == first.id
        if event.code in (HOST_MAINTENANCE, HOST_ACTIVATED, HOST_REMOVED):
            assert event.user.name == "admin@internal"
            assert first.name in event.description
    # Nothing about the host that stayed up.
    assert events_since(sdk, before, f"host.id={second.id}") == []
    # The audit log's own queries.
    removed = sdk.system_service().events_service().list(search=f"code={HOST_REMOVED}",
                                                          max=1)
    assert [e.id for e in removed] == [mine[-1].id]
    assert sdk.system_service().events_service().event_service(mine[-1].id).get().code \
        == HOST_REMOVED
    assert events_since(sdk, int(mine[-1].id), f"host.id={first.id}") == []


# -- the heartbeat ----------------------------------------------------------------------------


def test_heartbeat_follows_an_agent_that_stops_and_returns(
        engine: Any, sdk: sdk4.Connection, lab: Lab, add_lab_host: Callable[..., types.Host],
        wait_host: Callable[..., types.Host]) -> None:
    host = add_lab_host(1)
    wait_host(host.id, UP, timeout=30)
    before = engine.last_event_id()
    agent = lab.agents[1]
    try:
        agent.stop()
        down = wait_host(host.id, NON_RESPONSIVE, timeout=30)
        assert down.status_detail
        lost = events_since(sdk, before, f"host.id={host.id}")
        assert codes(lost) == [HOST_NOT_RESPONDING]
        assert lost[0].severity == types.LogSeverity.ERROR
        assert host.name in lost[0].description
    finally:
        if not agent.is_running():
            agent.start()
    back = wait_host(host.id, UP, timeout=60)
    assert not back.status_detail
    assert back.hardware_information.uuid == lab.hosts[1].host_uuid
    seen = codes(events_since(sdk, before, f"host.id={host.id}"))
    assert is_subsequence([HOST_NOT_RESPONDING, HOST_UP], seen), seen
