"""The web UI's gates without a browser: the session cookie's flags, CSRF (login's
double-submit and the session's token), Origin checks, role gating before any form is read,
open redirects, and the engine's faults shown instead of stack traces."""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from engine_db import migrated
from starlette.applications import Starlette
from starlette.testclient import TestClient

from virtyard.engine import audit
from virtyard.engine.auth import Authenticator
from virtyard.engine.db.database import Database
from virtyard.engine.ui import security
from virtyard.engine.ui.routes import ui_routes

BASE = "https://testserver"
PASSWORD = "secret-pw-1"


class FakeServices:
    """What the UI's login and read paths use of the engine's services."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.auth = Authenticator(db, token_lifetime=datetime.timedelta(minutes=30))
        self.pool = None

    def record_event(self, kind: audit.EventType, values: dict[str, object]) -> None:
        with self.db.transaction() as tx:
            audit.record(tx, kind, **values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeServices]:
    """One database for the module (migrating and hashing passwords is what costs here)."""
    db = migrated(tmp_path_factory.mktemp("web-ui"))
    services = FakeServices(db)
    services.auth.add_user("admin@internal", PASSWORD, "admin")
    services.auth.add_user("viewer@internal", PASSWORD, "readonly")
    yield services
    db.dispose()


def client(services: FakeServices) -> TestClient:
    """The UI as the engine mounts it (the cookies' path is the UI's)."""
    return TestClient(Starlette(routes=ui_routes(services)), base_url=BASE + "/ovirt-engine/web")


def log_in(web: TestClient, user: str) -> str:
    """Log in through the form; return the page's CSRF token."""
    form = web.get("/login")
    nonce = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert nonce is not None
    done = web.post("/login", data={"csrf": nonce.group(1), "username": user,
                                    "password": PASSWORD, "next": "/ovirt-engine/web/vms"},
                    headers={"Origin": BASE}, follow_redirects=False)
    assert done.status_code == 303, done.text
    assert done.headers["location"] == "/ovirt-engine/web/vms"
    cookie = next(c for c in done.headers.get_list("set-cookie")
                  if c.startswith(security.SESSION_COOKIE + "="))
    for flag in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/ovirt-engine/web"):
        assert flag in cookie
    page = web.get("/vms")
    assert page.status_code == 200
    token = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert token is not None
    return token.group(1)


def test_csrf_token_is_bound_to_the_session() -> None:
    a, b = security.csrf_for("token-a"), security.csrf_for("token-b")
    assert a != b and len(a) == 64
    assert security.csrf_ok("token-a", a)
    assert not security.csrf_ok("token-a", b)
    assert not security.csrf_ok("", security.csrf_for(""))
    assert not security.csrf_ok("token-a", "")


@pytest.mark.parametrize(("headers", "ok"), [
    ({"origin": "https://engine:8443"}, True),
    ({"origin": "https://ENGINE:8443"}, True),
    ({"origin": "https://evil.example"}, False),
    ({"origin": "null"}, False),
    ({"referer": "https://engine:8443/ovirt-engine/web/vms"}, True),
    ({"referer": "https://evil.example/ovirt-engine/web/vms"}, False),
    ({}, True),
])
def test_same_origin(headers: dict[str, str], ok: bool) -> None:
    assert security.same_origin(headers, "https", "engine:8443") is ok


@pytest.mark.parametrize(("target", "expected"), [
    ("/ovirt-engine/web/vms/1", "/ovirt-engine/web/vms/1"),
    ("https://evil.example/ovirt-engine/web/", "/ovirt-engine/web/"),
    ("//evil.example/ovirt-engine/web/", "/ovirt-engine/web/"),
    ("/ovirt-engine/api", "/ovirt-engine/web/"),
    ("/ovirt-engine/web\\@evil", "/ovirt-engine/web/"),
    ("", "/ovirt-engine/web/"),
])
def test_safe_next(target: str, expected: str) -> None:
    assert security.safe_next(target, "/ovirt-engine/web") == expected


def test_pages_need_a_session(services: FakeServices) -> None:
    web = client(services)
    page = web.get("/vms", follow_redirects=False)
    assert page.status_code == 303 and "/login?next=" in page.headers["location"]
    fragment = web.get("/vms?fragment=1", headers={"HX-Request": "true"})
    assert fragment.status_code == 401 and "/login" in fragment.headers["HX-Redirect"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    web.cookies.set(security.SESSION_COOKIE, "forged", domain="testserver.local")
    assert web.get("/vms", follow_redirects=False).status_code == 303


def test_login_needs_its_csrf_cookie_and_the_right_password(services: FakeServices) -> None:
    web = client(services)
    web.get("/login")
    refused = web.post("/login", data={"csrf": "guess", "username": "admin@internal",
                                       "password": PASSWORD}, follow_redirects=False)
    assert refused.status_code == 403 and security.SESSION_COOKIE not in refused.headers.get(
        "set-cookie", "")
    form = web.get("/login")
    nonce = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert nonce is not None
    wrong = web.post("/login", data={"csrf": nonce.group(1), "username": "admin@internal",
                                     "password": "nope"}, follow_redirects=False)
    assert wrong.status_code == 401 and "bad user name or password" in wrong.text
    assert "nope" not in wrong.text
    cross = web.post("/login", data={"csrf": nonce.group(1), "username": "admin@internal",
                                     "password": PASSWORD},
                     headers={"Origin": "https://evil.example"}, follow_redirects=False)
    assert cross.status_code == 403


def test_posts_need_the_csrf_token_and_same_origin(services: FakeServices) -> None:
    web = client(services)
    token = log_in(web, "admin@internal")
    missing = web.post("/vms/nope/stop", headers={"Origin": BASE})
    assert missing.status_code == 403 and "out of date" in missing.text
    cross = web.post("/vms/nope/stop", headers={"Origin": "https://evil.example",
                                                "X-CSRF-Token": token})
    assert cross.status_code == 403
    # With the token, the request reaches the engine, whose fault the page shows.
    answer = web.post("/vms/nope/stop", headers={"Origin": BASE, "X-CSRF-Token": token})
    assert answer.status_code == 404
    assert "Entity not found" in answer.text and "VM with id" in answer.text
    assert "Traceback" not in answer.text


def test_read_only_users_see_no_actions_and_cannot_act(services: FakeServices) -> None:
    web = client(services)
    token = log_in(web, "viewer@internal")
    page = web.get("/vms")
    assert "read-only" in page.text and "viewer@internal" in page.text
    assert "hx-post" not in page.text
    assert "New disk" not in web.get("/disks").text
    refused = web.post("/vms/nope/start", headers={"Origin": BASE, "X-CSRF-Token": token})
    assert refused.status_code == 403
    assert "User is not authorized to perform this action." in refused.text
    # The role is checked before the form is read, so even a bad token gets the 403.
    assert web.post("/vms/nope/start", headers={"Origin": BASE}).status_code == 403


def test_logout_ends_the_engine_session(services: FakeServices) -> None:
    web = client(services)
    token = log_in(web, "admin@internal")
    session = hashlib.sha256(str(web.cookies.get(security.SESSION_COOKIE)).encode()).hexdigest()
    done = web.post("/logout", data={"csrf": token}, headers={"Origin": BASE},
                    follow_redirects=False)
    assert done.status_code == 303
    with services.db.read() as tx:
        count = tx.execute(sa.text("SELECT count(*) FROM sessions WHERE token_hash = :h"),
                           {"h": session}).scalar()
    assert count == 0
    assert web.get("/vms", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("path", ["/hosts", "/vms", "/disks", "/storage", "/events",
                                  "/disks/new-lun", "/vms?fragment=1", "/events?fragment=1"])
def test_every_page_renders(services: FakeServices, path: str) -> None:
    web = client(services)
    log_in(web, "admin@internal")
    page = web.get(path)
    assert page.status_code == 200, page.text
    assert "Traceback" not in page.text
    missing = web.get("/vms/no-such-vm")
    assert missing.status_code == 404 and "Entity not found" in missing.text


@pytest.mark.parametrize("path", ["/disks/new-lun", "/vms/x/migrate", "/vms/x/attach",
                                  "/vms/x/cd"])
def test_read_only_users_get_no_forms_that_change_things(services: FakeServices,
                                                          path: str) -> None:
    web = client(services)
    log_in(web, "viewer@internal")
    page = web.get(path)
    assert page.status_code == 403
    assert "User is not authorized to perform this action." in page.text


def test_a_failed_refresh_goes_to_the_status_area(services: FakeServices) -> None:
    web = client(services)
    log_in(web, "admin@internal")
    answer = web.get("/vms/no-such-vm?fragment=disks", headers={"HX-Request": "true"})
    assert answer.status_code == 404 and "Entity not found" in answer.text
    assert answer.headers["HX-Retarget"] == "#flash"
    assert "<html" not in answer.text  # a fragment, not a page
