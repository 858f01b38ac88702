"""Users, roles and tokens: a read-only user made with ``virtyard-engine users add`` reads
everything and changes nothing; bad passwords, forged and expired tokens are refused.

Every test runs on both databases (the ``engine`` fixture).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import ovirtsdk4 as sdk4
import pytest
from lxml import etree
from ovirtsdk4 import types

from virtyard.lab.engine import ADMIN
from virtyard.lab.lab import Lab

pytestmark = pytest.mark.lab

VIEWER = "viewer@internal"
LOGIN_FAILED = 114
HOST_EVENTS = (42, 44, 16, 600)
NOT_AUTHORIZED = "USER_NOT_AUTHORIZED_TO_PERFORM_ACTION"


@pytest.fixture
def viewer(engine: Any) -> str:
    """The read-only user's password (the user is made once per engine)."""
    return str(engine.add_user(VIEWER, "readonly"))


def fault_of(response: Any) -> dict[str, str]:
    root = etree.fromstring(response.content)
    assert root.tag == "fault", response.text
    return {child.tag: child.text or "" for child in root}


def openapi(engine: Any, token: str) -> dict[str, Any]:
    response = engine.request("GET", "/openapi.json", token=token, flavor="json")
    assert response.status_code == 200, response.text
    return dict(response.json())


def concrete(engine: Any, path: str, ids: dict[str, str]) -> str | None:
    """``/hosts/{id}`` → ``/hosts/<id>``: the id given for the collection, else the first one
    the collection (``/vms/<id>/cdroms``, say) lists; ``None`` when it lists none."""
    path = path.removeprefix("/ovirt-engine/api")
    while match := re.search(r"{\w+}", path):
        above = path[:match.start()].rstrip("/")
        collection = above.rsplit("/", 1)[-1]
        ident = ids.get(collection)
        if ident is None:
            listed = engine.get_json(above)
            items = next(iter(listed.values()), []) if listed else []
            if not items:
                return None
            ident = str(items[0]["id"])
        path = path[:match.start()] + ident + path[match.end():]
    return path


def snapshot(engine: Any) -> list[tuple[str, str, str]]:
    return sorted((h["id"], h["name"], h["status"]) for h in engine.hosts())


def test_readonly_user_reads_everything(
        engine: Any, viewer: str, add_lab_host: Callable[..., types.Host],
        wait_host: Callable[..., types.Host]) -> None:
    host = add_lab_host(0)
    wait_host(host.id, types.HostStatus.UP, timeout=30)

    connection = engine.connect(VIEWER, viewer)
    try:
        system = connection.system_service()
        api = system.get()
        assert api.authenticated_user.name == VIEWER
        assert [h.id for h in system.hosts_service().list()] == [host.id]
        assert system.hosts_service().host_service(host.id).get().status == types.HostStatus.UP
        assert [h.id for h in system.hosts_service().list(search=f"name={host.name}")] \
            == [host.id]
        clusters = system.clusters_service().list()
        assert system.clusters_service().cluster_service(clusters[0].id).get().name == "Default"
        dcs = system.data_centers_service().list()
        assert system.data_centers_service().data_center_service(dcs[0].id).get().name \
            == "Default"
        events = system.events_service().list(max=5)
        assert events
        assert system.events_service().event_service(events[0].id).get().id == events[0].id
    finally:
        connection.close()

    # Every GET the API declares answers 200 to the viewer, in both flavours.
    token = engine.login(VIEWER, viewer)
    document = openapi(engine, token)
    ids = {"hosts": host.id, "clusters": clusters[0].id, "datacenters": dcs[0].id,
           "events": events[0].id}
    gets = [path for path, operations in document["paths"].items() if "get" in operations]
    assert len(gets) >= 9
    for path in gets:
        target = concrete(engine, path, ids)
        if target is None:  # a collection with nothing in it yet
            continue
        for flavor in ("xml", "json"):
            response = engine.request("GET", target, token=token, flavor=flavor)
            assert response.status_code == 200, (path, flavor, response.text)


def test_readonly_user_changes_nothing(
        engine: Any, viewer: str, lab: Lab, add_lab_host: Callable[..., types.Host],
        wait_host: Callable[..., types.Host]) -> None:
    up = add_lab_host(0)
    down = add_lab_host(1)
    wait_host(up.id, types.HostStatus.UP, timeout=30)
    wait_host(down.id, types.HostStatus.UP, timeout=30)
    engine.admin_token()  # log in before counting events: only the viewer acts below
    admin = engine.connect()
    try:
        admin.system_service().hosts_service().host_service(down.id).deactivate()
    finally:
        admin.close()
    before_hosts = snapshot(engine)
    before_event = engine.last_event_id()

    connection = engine.connect(VIEWER, viewer)
    try:
        hosts = connection.system_service().hosts_service()
        writes: list[Callable[[], object]] = [
            lambda: hosts.add(types.Host(name="made-by-viewer", address="127.0.0.1",
                                         port=lab.agents[1].port + 1000)),
            hosts.host_service(up.id).deactivate,
            hosts.host_service(up.id).remove,
            hosts.host_service(down.id).activate,
            hosts.host_service(down.id).remove,
        ]
        for write in writes:
            with pytest.raises(sdk4.AuthError) as refused:
                write()
            assert refused.value.code == 403
            assert "not authorized" in refused.value.fault.detail.lower()
    finally:
        connection.close()

    # Raw: every host write the API declares is refused with 403 and the key, given a body
    # that would otherwise be accepted; any other write is refused one way or another.
    token = engine.login(VIEWER, viewer)
    document = openapi(engine, token)
    host_body = (f"<host><name>made-by-viewer</name><address>127.0.0.1</address>"
                 f"<port>{lab.agents[1].port + 1000}</port></host>").encode()
    host_writes = 0
    for path, operations in document["paths"].items():
        for method in operations:
            if method == "get":
                continue
            target = down.id if path.endswith(("/activate", "{id}")) else up.id
            body = None if method == "delete" else \
                host_body if path.endswith("/hosts") else b"<action/>"
            where = concrete(engine, path, {"hosts": target})
            if where is None:
                continue
            response = engine.request(method.upper(), where, token=token, body=body)
            if path.startswith("/ovirt-engine/api/hosts"):
                host_writes += 1
                assert response.status_code == 403, (method, path, response.text)
                assert fault_of(response)["key"] == NOT_AUTHORIZED
            else:
                assert 400 <= response.status_code < 500, (method, path, response.text)
    assert host_writes >= 4

    assert snapshot(engine) == before_hosts
    assert {h["name"] for h in engine.hosts()} == {up.name, down.name}
    changes = [e for e in engine.get_json("/events", {"from": before_event}).get("event", [])
               if int(e["code"]) in HOST_EVENTS]
    assert changes == []


def test_bad_password_is_refused_and_logged(engine: Any) -> None:
    before = engine.last_event_id()
    wrong = f"wrong-{uuid.uuid4().hex}"
    engine.secrets.add(wrong)  # a wrong password is a secret too: never in logs or events
    for username in (ADMIN, "nobody@internal"):
        connection = sdk4.Connection(url=engine.url, username=username, password=wrong,
                                     ca_file=engine.ca_file)
        try:
            with pytest.raises(sdk4.AuthError):
                connection.test(raise_exception=True)
        finally:
            connection.close()

    response = engine.sso(ADMIN, wrong)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error_code"] == "access_denied"
    assert response.json()["error"]

    failed = [e for e in engine.get_json("/events", {"from": before}).get("event", [])
              if int(e["code"]) == LOGIN_FAILED]
    texts = " | ".join(e["description"] for e in failed)
    assert len(failed) == 3, texts
    assert ADMIN in texts and "nobody@internal" in texts
    assert all(e["severity"] == "error" for e in failed)
    searched = engine.get_json("/events", {"from": before, "search": f"code={LOGIN_FAILED}"})
    assert len(searched.get("event", [])) == 3


@pytest.mark.parametrize("authorization", [
    None,
    "Bearer forged-0123456789abcdef0123456789abcdef0123456789a",
    "Bearer",
    "Basic YWRtaW5AaW50ZXJuYWw6c2VjcmV0",
    "forged-without-scheme",
])
def test_missing_or_forged_token_is_401(engine: Any, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for path in ("", "/hosts", "/events", "/openapi.json"):
        for flavor in ("xml", "json"):
            response = engine.request("GET", path, flavor=flavor, headers=headers)
            assert response.status_code == 401, (path, response.text)
            assert response.headers["www-authenticate"].lower().startswith("bearer")
            fault = response.json() if flavor == "json" else fault_of(response)
            assert fault["reason"] and fault["detail"]
    response = engine.request("POST", "/hosts", headers=headers, body=b"<host/>")
    assert response.status_code == 401


def test_expired_token_is_401(engine: Any) -> None:
    token = engine.login()
    assert engine.request("GET", "/hosts", token=token).status_code == 200
    engine.expire_token(token)
    response = engine.request("GET", "/hosts", token=token)
    assert response.status_code == 401
    assert "expired" in fault_of(response)["detail"].lower()
    # Gone for good once seen expired.
    assert engine.request("GET", "/hosts", token=token).status_code == 401

    # The SDK logs in again by itself when its token expires (as with oVirt's engine).
    connection = engine.connect()
    try:
        old = connection.authenticate()
        engine.expire_token(old)
        assert connection.test(raise_exception=True) is True
        new = connection.authenticate()
        engine.secrets.add(new)
        assert new != old
    finally:
        connection.close()
