"""Fixtures for the engine's integration tests: the real ``virtyard-engine run`` process on the
real lab, once per database (SQLite, and PostgreSQL on a throwaway server), driven by the
official oVirt SDK and by raw HTTP.

Every engine test takes the ``engine`` fixture and so runs twice, once per database::

    def test_x(engine, sdk):              # sdk: an ovirtsdk4.Connection as admin@internal
        sdk.test(raise_exception=True)

The engine of a database starts once per session (pytest groups the tests by database), with
its own state folder under the lab's folder, its own fresh database and its own port. It
reaches the lab's host agents with the lab's client certificate and serves its API with a
certificate from the lab's CA, so the CA file is all a client needs.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import os
import re
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ovirtsdk4 as sdk4
import pytest
import sqlalchemy as sa
from engine_helpers import target_name
from ovirtsdk4 import types

from virtyard.lab.engine import ADMIN, EngineProcess
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab
from virtyard.lab.postgres import PostgresServer

PORT_OFFSET = int(os.environ.get("VIRTYARD_TEST_PORT_OFFSET", "0"))
# Ports of the tests' engines and their PostgreSQL: clear of the test lab's (iSCSI 23260,
# libvirtd 26610+, agents 25430+, its own engine 25470, migration 27400+), the demo lab's
# (13260, 15430+, 15470, 16610+) and the PostgreSQL unit test's (15432).
PG_PORT = 15532 + PORT_OFFSET
ENGINE_PORTS = {"sqlite": 15540 + PORT_OFFSET, "postgresql": 15541 + PORT_OFFSET}
DATABASES = list(ENGINE_PORTS)
SSO_TOKEN = "/ovirt-engine/sso/oauth/token"
SSO_LOGOUT = "/ovirt-engine/services/sso-logout"
XML = "application/xml"
JSON = "application/json"

# Characters XML 1.0 cannot carry.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")

T = TypeVar("T")
_databases = itertools.count(1)


def poll(probe: Callable[[], T], done: Callable[[T], bool], *, timeout: float, what: str,
         interval: float = 0.1, describe: Callable[[T], object] = repr) -> T:
    """Call ``probe()`` until ``done(result)`` holds and return that result; fail the test
    naming ``what`` and the last result if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if done(result):
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}; "
                        f"last: {describe(result)}")
        time.sleep(interval)


@dataclass
class LabEngine:
    """One running engine of the tests, and what the tests need to talk to it."""

    kind: str  # sqlite | postgresql
    process: EngineProcess
    database_url: str
    # Passwords and tokens handed out during the session: none may appear in logs or events.
    secrets: set[str] = field(default_factory=set)
    users: dict[str, str] = field(default_factory=dict)
    _admin_token: str = ""

    # -- where it is ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The API's URL, as the SDK takes it (``https://127.0.0.1:P/ovirt-engine/api``)."""
        return self.process.url

    @property
    def base(self) -> str:
        return self.url.removesuffix("/ovirt-engine/api")

    @property
    def ca_file(self) -> str:
        return str(self.process.ca_file)

    @property
    def password(self) -> str:
        return self.process.password

    @property
    def config_path(self) -> Path:
        return self.process.config_path

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    # -- logging in -----------------------------------------------------------------------

    def sso(self, username: str, password: str) -> httpx.Response:
        """The SSO token request as the SDK makes it."""
        with httpx.Client(verify=self.tls(), timeout=30) as client:
            return client.post(self.base + SSO_TOKEN,
                               data={"grant_type": "password", "scope": "ovirt-app-api",
                                     "username": username, "password": password},
                               headers={"Accept": JSON})

    def login(self, username: str = ADMIN, password: str | None = None) -> str:
        """A fresh bearer token (raw SSO)."""
        response = self.sso(username, self.password if password is None else password)
        assert response.status_code == 200, response.text
        token = str(response.json()["access_token"])
        self.secrets.add(token)
        return token

    def logout(self, token: str) -> None:
        """The SSO logout as the SDK's ``close()`` sends it."""
        with httpx.Client(verify=self.tls(), timeout=30) as client:
            response = client.post(self.base + SSO_LOGOUT, headers={"Accept": JSON},
                                   data={"scope": "ovirt-app-api", "token": token})
        assert response.status_code == 200, response.text

    def admin_token(self) -> str:
        """A token of admin@internal for the tests' own housekeeping (renewed when refused)."""
        if self._admin_token:
            probe = self.request("GET", "", token=self._admin_token)
            if probe.status_code == 200:
                return self._admin_token
        self._admin_token = self.login()
        return self._admin_token

    def connect(self, username: str = ADMIN, password: str | None = None) -> sdk4.Connection:
        """An SDK connection, logged in (its token is recorded as a secret)."""
        password = self.password if password is None else password
        connection = sdk4.Connection(url=self.url, username=username, password=password,
                                     ca_file=self.ca_file, timeout=60)
        try:
            self.secrets.add(connection.authenticate())
        except BaseException:
            connection.close(logout=False)
            raise
        return connection

    def add_user(self, login: str, role: str = "readonly") -> str:
        """Create ``login`` with ``virtyard-engine users add`` while the engine runs (the
        command shares its database); return the password. Once per engine and login."""
        if login in self.users:
            return self.users[login]
        password = f"pw-{uuid.uuid4().hex}"
        password_file = self.process.root / f"password-{login.replace('@', '-')}"
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTYARD_ENGINE_")}
        script = Path(sys.executable).with_name("virtyard-engine")
        command = [str(script)] if script.exists() else \
            [sys.executable, "-m", "virtyard.engine.server"]
        done = subprocess.run(
            [*command, "users", "add", login, "--role", role,
             "--password-file", str(password_file), "--config", str(self.config_path)],
            capture_output=True, text=True, timeout=120, env=env, check=False)
        assert done.returncode == 0, f"users add failed: {done.stdout}{done.stderr}"
        self.users[login] = password
        self.secrets.add(password)
        return password

    # -- raw HTTP -------------------------------------------------------------------------

    def request(self, method: str, path: str, *, token: str | None = None,
                flavor: str = "xml", body: bytes | None = None,
                content_type: str | None = None, headers: dict[str, str] | None = None,
                params: Any = None) -> httpx.Response:
        """One request below the API's URL (``path`` "" is the API root), on a connection of
        its own. ``flavor`` sets Accept and Content-Type (xml or json)."""
        media = JSON if flavor == "json" else XML
        sent = {"Accept": media, "Version": "4"}
        if body is not None:
            sent["Content-Type"] = content_type or media
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        sent.update(headers or {})
        with httpx.Client(verify=self.tls(), timeout=60) as client:
            return client.request(method, self.url + path, content=body, headers=sent,
                                  params=params)

    def get_json(self, path: str, params: Any = None) -> Any:
        response = self.request("GET", path, token=self.admin_token(), flavor="json",
                                params=params)
        assert response.status_code == 200, response.text
        return response.json()

    # -- the engine's side ----------------------------------------------------------------

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def database(self) -> sa.Engine:
        """A SQLAlchemy engine on the engine's database (dispose it after use)."""
        if self.database_url.startswith("sqlite"):
            return sa.create_engine(self.database_url, connect_args={"timeout": 30})
        return sa.create_engine(self.database_url)

    def expire_token(self, token: str) -> None:
        """Make ``token``'s session expired, straight in the database."""
        from virtyard.engine.db.models import Session  # noqa: PLC0415  (the engine's model)

        digest = hashlib.sha256(token.encode()).hexdigest()
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        db = self.database()
        try:
            with db.begin() as conn:
                done = conn.execute(sa.update(Session).where(Session.token_hash == digest)
                                    .values(expires_at=past))
                assert done.rowcount == 1, "the token's session is not in the database"
        finally:
            db.dispose()

    def delete_unreadable_events(self, *, after: int) -> None:
        """Delete the events after id ``after`` whose text has control characters (a test
        that made one cleans up, so later tests read the audit log as XML)."""
        from virtyard.engine.db.models import Event  # noqa: PLC0415  (the engine's model)

        db = self.database()
        try:
            with db.begin() as conn:
                rows = conn.execute(sa.select(Event.id, Event.description)
                                    .where(Event.id > after)).all()
                bad = [row.id for row in rows if CONTROL.search(row.description)]
                if bad:
                    conn.execute(sa.delete(Event).where(Event.id.in_(bad)))
        finally:
            db.dispose()

    def hosts(self) -> list[dict[str, Any]]:
        return list(self.get_json("/hosts").get("host", []))

    def remove_all_hosts(self) -> None:
        """Deactivate and remove every host (tests leave the engine without hosts)."""
        token = self.admin_token()
        for host in self.hosts():
            path = f"/hosts/{host['id']}"
            if host.get("status") not in ("maintenance", "installing", "install_failed"):
                response = self.request("POST", path + "/deactivate", token=token,
                                        body=b"<action/>")
                assert response.status_code in (200, 409), response.text
            response = self.request("DELETE", path, token=token)
            assert response.status_code in (200, 404), response.text
        assert self.hosts() == []

    def last_event_id(self) -> int:
        events = self.get_json("/events", params={"max": "1"}).get("event", [])
        return int(events[0]["id"]) if events else 0


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the session (started only when a test needs it)."""
    server = PostgresServer(PG_PORT)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", params=DATABASES)
def engine(request: pytest.FixtureRequest, lab: Lab) -> Iterator[LabEngine]:
    """The real engine on the lab, on a fresh database of the kind named by the parameter."""
    kind: str = request.param
    root = lab.state_dir / f"engine-{kind}"
    name = ""
    pg: PostgresServer | None = None
    if kind == "sqlite":
        root.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{root / 'engine.db'}"
    else:
        pg = request.getfixturevalue("postgres")
        name = f"engine_{next(_databases)}_{uuid.uuid4().hex[:8]}"
        url = pg.create_database(name)
    process = EngineProcess(root, ENGINE_PORTS[kind], lab.pki, database_url=url,
                            heartbeat_interval=1.0)
    lab_engine = LabEngine(kind, process, url)
    try:
        process.start()
        lab_engine.secrets.add(process.password)
        yield lab_engine
    finally:
        process.stop()
        if pg is not None and name:
            pg.drop_database(name)


@pytest.fixture
def sdk(engine: LabEngine) -> Iterator[sdk4.Connection]:
    """An SDK connection as admin@internal; logged out after the test."""
    connection = engine.connect()
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def add_lab_host(engine: LabEngine, lab: Lab, sdk: sdk4.Connection
                 ) -> Iterator[Callable[..., types.Host]]:
    """Factory: add lab host ``index``'s agent to the engine (127.0.0.1, the agent's port) and
    return the SDK's answer; every host of the engine is removed after the test."""
    engine.remove_all_hosts()

    def add(index: int, name: str | None = None) -> types.Host:
        name = name or f"{lab.agents[index].name}-{uuid.uuid4().hex[:6]}"
        return sdk.system_service().hosts_service().add(
            types.Host(name=name, address="127.0.0.1", port=lab.agents[index].port))

    yield add
    engine.remove_all_hosts()


@pytest.fixture
def wait_host(sdk: sdk4.Connection) -> Callable[..., types.Host]:
    """Waits until a host has a status (polling the API) and returns it."""

    def wait(host_id: str, status: types.HostStatus, timeout: float = 60.0) -> types.Host:
        service = sdk.system_service().hosts_service().host_service(host_id)
        return poll(service.get, lambda h: h.status == status, timeout=timeout,
                    what=f"host {host_id} to be {status.value}",
                    describe=lambda h: f"{h.status} ({h.status_detail})")

    return wait


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[pytest.TestReport]:
    """Keep each phase's report on the test item (``no_tracebacks`` looks at the call's)."""
    report: pytest.TestReport = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def no_tracebacks(engine: LabEngine, request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if the engine logs a traceback while it runs (a test that failed
    already says so, with the engine's log: see ``_engine_log_on_trouble``)."""
    offset = engine.log_size()
    yield
    call = getattr(request.node, "report_call", None)
    if call is not None and call.failed:
        return
    logged = engine.log_since(offset)
    assert "Traceback" not in logged, f"the engine logged a traceback:\n{logged[-4000:]}"


@pytest.fixture(autouse=True)
def _engine_log_on_trouble(request: pytest.FixtureRequest) -> Iterator[None]:
    """For engine tests: print what the engine logged during the test when it logged an
    error (pytest shows it with a failing test's report)."""
    if "engine" not in request.fixturenames:
        yield
        return
    engine: LabEngine = request.getfixturevalue("engine")
    offset = engine.log_size()
    yield
    logged = engine.log_since(offset)
    if "Traceback" in logged or " ERROR " in logged:
        print(f"--- the {engine.kind} engine logged during this test:\n{logged[-8000:]}")


# -- engine flows on the lab ------------------------------------------------------------

@pytest.fixture
def two_hosts(add_lab_host: Callable[..., types.Host],
              wait_host: Callable[..., types.Host]) -> list[types.Host]:
    hosts = [add_lab_host(0), add_lab_host(1)]
    return [wait_host(h.id, types.HostStatus.UP) for h in hosts]


@pytest.fixture
def engine_vms(sdk: sdk4.Connection) -> Iterator[list[str]]:
    """VM ids a test made; stopped and removed after it, whatever happened."""
    made: list[str] = []
    yield made
    vms = sdk.system_service().vms_service()
    for vm_id in made:
        service = vms.vm_service(vm_id)
        try:
            if service.get().status != types.VmStatus.DOWN:
                service.stop()
            service.remove()
        except sdk4.NotFoundError:
            pass


@pytest.fixture
def restricted(lab: Lab) -> Iterator[Callable[[TargetInfo, list[int] | None], None]]:
    """Let only some lab hosts' initiators log in to a target (undone after the test)."""
    touched: list[TargetInfo] = []

    def restrict(target: TargetInfo, hosts: list[int] | None) -> None:
        touched.append(target)
        names = None if hosts is None else [lab.agents[i].initiator_name for i in hosts]
        lab.storage.restrict(target_name(target), names)

    yield restrict
    for target in {t.iqn: t for t in touched}.values():
        lab.storage.restrict(target_name(target), None)
