"""The CLI's commands and errors: the exit code of every kind of failure, one line on stderr
with the engine's reason, detail and key; logins kept private; completion of names. Commands
run in-process (``run``) against a fake engine (httpx's MockTransport) answering as the real
one does."""

from __future__ import annotations

import functools
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import httpx
import pytest

from virtyard.cli import app as app_module
from virtyard.cli import completion as completion_module
from virtyard.cli.client import Engine, fault_of, transport_error
from virtyard.cli.errors import (
    AUTH,
    NOT_FOUND,
    OK,
    REFUSED,
    UNREACHABLE,
    USAGE,
    CliError,
    exit_code_for,
)
from virtyard.cli.main import cli as root_command
from virtyard.cli.main import run
from virtyard.cli.session import Login, SessionStore

BASE = "https://engine.test:8443"
VM_ID = "2b7d3c4e-1111-4222-8333-444455556666"
DISK_ID = "9a8b7c6d-1111-4222-8333-444455556666"


@pytest.mark.parametrize(("status", "key", "code"), [
    (400, "BAD_REQUEST", REFUSED), (409, "ACTION_TYPE_FAILED_VM_IS_RUNNING", REFUSED),
    (500, "INTERNAL", REFUSED), (404, "ENTITY_NOT_FOUND", NOT_FOUND),
    (404, "ACTION_TYPE_FAILED_DISK_NOT_ATTACHED_TO_VM", NOT_FOUND),
    (401, "UNAUTHORIZED", AUTH), (401, "", AUTH),
    (403, "USER_NOT_AUTHORIZED_TO_PERFORM_ACTION", AUTH),
    # A target's CHAP refusal is the engine refusing, not the caller's login.
    (401, "ACTION_TYPE_FAILED_ISCSI_AUTHENTICATION", REFUSED),
])
def test_exit_code_for(status: int, key: str, code: int) -> None:
    assert exit_code_for(status, key) == code


def test_error_line_is_one_line() -> None:
    error = CliError("Operation Failed", "[Cannot x.\n Because y.]", "KEY", hint="try z")
    assert error.line() == "Operation Failed: [Cannot x. Because y.] (KEY); try z"


def test_fault_of_reads_the_engine_fault() -> None:
    response = httpx.Response(409, json={"reason": "Operation Failed", "detail": "[No.]",
                                         "key": "ACTION_TYPE_FAILED_X"})
    error = fault_of(response)
    assert (error.reason, error.detail, error.key, error.exit_code, error.status) == (
        "Operation Failed", "[No.]", "ACTION_TYPE_FAILED_X", REFUSED, 409)
    wrapped = fault_of(httpx.Response(404, json={"fault": {"reason": "Gone", "key": "K"}}))
    assert (wrapped.reason, wrapped.exit_code) == ("Gone", NOT_FOUND)
    html = fault_of(httpx.Response(502, text="<html>bad gateway</html>"))
    assert html.reason == "HTTP 502 Bad Gateway" and html.exit_code == REFUSED
    expired = fault_of(httpx.Response(401, json={"reason": "Unauthorized",
                                                 "detail": "token expired",
                                                 "key": "UNAUTHORIZED"}))
    assert expired.exit_code == AUTH and "virtyard login" in expired.hint


def test_transport_errors_are_unreachable() -> None:
    request = httpx.Request("GET", BASE)
    refused = transport_error(BASE, httpx.ConnectError("[Errno 111] refused",
                                                       request=request), 30)
    assert refused.exit_code == UNREACHABLE and refused.key == "ENGINE_UNREACHABLE"
    tls = transport_error(BASE, httpx.ConnectError(
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", request=request), 30)
    assert "--ca-file" in tls.hint
    slow = transport_error(BASE, httpx.ReadTimeout("timed out", request=request), 30)
    assert slow.exit_code == UNREACHABLE and slow.key == "ENGINE_TIMEOUT"


# -- logins on disk -----------------------------------------------------------------------


def test_logins_are_private_and_found(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "virtyard")
    one = Login(BASE, "admin@internal", "t1")
    two = Login(BASE, "viewer@internal", "t2")
    path = store.save(one)
    store.save(two)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "virtyard").stat().st_mode) == 0o700
    assert path.name == "engine.test:8443-admin@internal.json"
    assert store.find().token == "t2"  # the last login is the current one
    assert store.find(BASE, "admin@internal").token == "t1"
    assert store.find("engine.test:8443").token == "t2"  # several: the current one
    assert store.find(user="admin@internal").token == "t1"
    store.remove(two)
    with pytest.raises(CliError) as err:
        store.find()
    assert err.value.exit_code == AUTH and err.value.key == "NOT_LOGGED_IN"
    assert store.find(BASE).token == "t1"
    with pytest.raises(CliError) as err:
        store.find("https://other:1")
    assert err.value.exit_code == AUTH


# -- whole commands against a fake engine --------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def fault(status: int, reason: str, detail: str, key: str) -> httpx.Response:
    return httpx.Response(status, json={"reason": reason, "detail": detail, "key": key})


class FakeEngine:
    """Answers like the engine: a VM ``web``, a disk ``data`` attached elsewhere."""

    def __init__(self) -> None:
        self.token = "good-token"
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return fault(401, "Unauthorized", "The token is not valid or has expired",
                         "UNAUTHORIZED")
        path = request.url.path.removeprefix("/ovirt-engine/api")
        search = request.url.params.get("search", "")
        vm = {"id": VM_ID, "name": "web", "status": "up", "memory": 1 << 28,
              "host": {"id": "h1"}}
        disk = {"id": DISK_ID, "alias": "data", "storage_type": "lun"}
        if path == "/hosts":
            return httpx.Response(200, json={"host": [{"id": "h1", "name": "one"}]})
        if path == "/hosts/h1":
            return httpx.Response(200, json={"id": "h1", "name": "one", "status": "up"})
        if path == "/hosts/h1/fence" and request.method == "POST":
            kind = json.loads(request.content)["fence_type"]
            return httpx.Response(200, json={"status": "complete", "power_management": {
                "status": "off"}} if kind == "status" else {"status": "complete"})
        if path == "/vms":
            wanted = search.removeprefix("name=").strip('"')
            found = wanted == "web" or not search or (wanted.endswith("*") and
                                                      "web".startswith(wanted[:-1]))
            return httpx.Response(200, json={"vm": [vm] if found else []})
        if path == f"/vms/{VM_ID}":
            return httpx.Response(200, json=vm)
        if path == "/disks":
            return httpx.Response(200, json={"disk": [disk] if 'name="data"' in search
                                             else []})
        if path == f"/vms/{VM_ID}/diskattachments" and request.method == "POST":
            return fault(409, "Operation Failed", "[Cannot attach Virtual Disk. The disk is "
                         "not shareable and is already attached to a VM.]",
                         "ACTION_TYPE_FAILED_NOT_SHAREABLE_DISK_ALREADY_ATTACHED")
        return fault(404, "Not Found", f"No resource at {path}", "NOT_FOUND")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeEngine]:
    """A saved login to a fake engine; the CLI's client talks to it in-process."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    for name in ("VIRTYARD_ENGINE", "VIRTYARD_USER", "VIRTYARD_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    engine = FakeEngine()
    SessionStore().save(Login(BASE, "admin@internal", engine.token))
    fake_engine = functools.partial(Engine, transport=httpx.MockTransport(engine))
    monkeypatch.setattr(app_module, "Engine", fake_engine)
    monkeypatch.setattr(completion_module, "Engine", fake_engine)
    yield engine


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("virtyard: ")
    return lines[0]


def test_json_output_of_a_list(fake: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "vm", "list", "--json")
    assert code == OK and err == ""
    [row] = json.loads(out)
    assert row["name"] == "web" and row["host"] == "one" and row["memory"] == 1 << 28
    code, out, _ = cli(capsys, "vm", "show", "web", "-o", "value", "-c", "status")
    assert (code, out) == (OK, "up\n")


def test_unknown_vm_is_not_found(fake: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "vm", "show", "nosuch")
    assert code == NOT_FOUND and out == ""
    assert one_line(err) == ("virtyard: Not found: VM 'nosuch' does not exist "
                             "(ENTITY_NOT_FOUND)")


def test_refused_attach_gives_the_engine_key(fake: FakeEngine,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "vm", "attach", "web", "data")
    assert code == REFUSED
    line = one_line(err)
    assert line.startswith("virtyard: Operation Failed: [Cannot attach Virtual Disk.")
    assert line.endswith("(ACTION_TYPE_FAILED_NOT_SHAREABLE_DISK_ALREADY_ATTACHED)")
    sent = json.loads(fake.requests[-1].content)
    assert sent["disk"] == {"id": DISK_ID} and sent["active"] is True


def test_expired_token_says_log_in(fake: FakeEngine,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    fake.token = "another"
    code, _, err = cli(capsys, "hosts")
    assert code == AUTH
    assert "(UNAUTHORIZED); run: virtyard login https://engine.test:8443" in one_line(err)


@pytest.mark.parametrize("args", [
    ["vm", "lst"], ["vm", "create"], ["vm", "list", "--output", "yaml"],
    ["vm", "create", "x", "--memory", "12q"], ["luns", "--host", "h", "--login", "iqn.x"],
    ["hosts", "list", "-c", "nope"], ["--timeout", "0", "hosts"],
])
def test_usage_errors(fake: FakeEngine, capsys: pytest.CaptureFixture[str],
                      args: list[str]) -> None:
    code, out, err = cli(capsys, *args)
    assert code == USAGE and out == ""
    one_line(err)


def test_not_logged_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("VIRTYARD_ENGINE", raising=False)
    code, _, err = cli(capsys, "vm", "list")
    assert code == AUTH
    assert one_line(err).endswith("(NOT_LOGGED_IN); run: virtyard login URL")


def test_unreachable_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("VIRTYARD_ENGINE", raising=False)
    SessionStore().save(Login("https://127.0.0.1:9", "admin@internal", "t"))
    code, _, err = cli(capsys, "vm", "list")
    assert code == UNREACHABLE
    assert "(ENGINE_UNREACHABLE)" in one_line(err)


def test_login_refused_and_password_never_an_argument(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    seen: list[dict[str, str]] = []

    def sso(request: httpx.Request) -> httpx.Response:
        form = dict(httpx.QueryParams(request.content.decode()))
        seen.append(form)
        if form.get("password") == "right":
            return httpx.Response(200, json={"access_token": "tok", "exp": "1"})
        return httpx.Response(400, json={"error_code": "access_denied", "error":
                                         "Cannot authenticate user 'admin@internal': bad "
                                         "user name or password"})

    real = httpx.Client
    monkeypatch.setattr(httpx, "Client", functools.partial(real,
                                                           transport=httpx.MockTransport(sso)))
    password_file = tmp_path / "pw"
    password_file.write_text("wrong\n")
    code, _, err = cli(capsys, "login", BASE, "--password-file", str(password_file))
    assert code == AUTH
    assert one_line(err).endswith("bad user name or password (ACCESS_DENIED)")
    assert not (tmp_path / "virtyard" / "current").exists()
    monkeypatch.setenv("VIRTYARD_PASSWORD", "right")
    code, out, _ = cli(capsys, "login", BASE + "/ovirt-engine/api", "--json")
    assert code == OK and seen[-1]["username"] == "admin@internal"
    saved = Path(json.loads(out)["session_file"])
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())["token"] == "tok"
    assert "right" not in saved.read_text()
    # Without a terminal, a file or the variable, it refuses rather than hang.
    monkeypatch.delenv("VIRTYARD_PASSWORD")
    code, _, err = cli(capsys, "login", BASE)
    assert code == USAGE and "(NO_PASSWORD)" in one_line(err)
    assert os.environ.get("VIRTYARD_PASSWORD") is None


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "--help")
    assert code == OK
    for line in ("0  success", "1  the engine refused", "2  usage error", "3  not found",
                 "4  cannot reach the engine", "5  authentication"):
        assert line in out
    assert "storage domains ('sd')" in out and "ISO upload" in out


def test_completion_offers_names_from_the_engine(fake: FakeEngine,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ctx = click.Context(root_command)
    names = completion_module.complete_vms(ctx, click.Argument(["vm"]), "w")
    assert [item.value for item in names] == ["web"]
    assert fake.requests[-1].url.params["search"] == "name=w*"
    assert completion_module.complete_vms(ctx, click.Argument(["vm"]), "x") == []
    fake.token = "expired"  # the engine refuses: nothing offered, nothing raised
    assert completion_module.complete_vms(ctx, click.Argument(["vm"]), "w") == []
    for shell in ("bash", "zsh"):
        code, out, _ = cli(capsys, "completion", shell)
        assert code == OK and "_VIRTYARD_COMPLETE" in out


def test_fence_asks_before_it_powers_off(fake: FakeEngine,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "hosts", "fence", "one", "stop")
    assert code == USAGE and "needs --yes" in one_line(err)
    assert not [r for r in fake.requests if r.url.path.endswith("/fence")]
    code, out, _ = cli(capsys, "hosts", "fence", "one", "status", "--json")
    assert code == OK and json.loads(out)["power"] == "off"
    code, out, _ = cli(capsys, "hosts", "fence", "one", "manual", "--yes", "--json")
    assert code == OK and json.loads(out)["action"] == "manual"
    sent = [json.loads(r.content) for r in fake.requests if r.url.path.endswith("/fence")]
    assert sent == [{"fence_type": "status"}, {"fence_type": "manual"}]
