"""The ``virtyard`` CLI driven as a user drives it — a subprocess per command, a real engine on
the real lab: log in; discover, log in and list LUNs; add a LUN disk; create and start a VM;
attach and hot-plug; read the guest's name for the disk; migrate; stop; remove; with
``--json`` parsed and checked. Every error path gives its documented exit code and one line.
A terminal session in tmux shows the progress bar and the tables as a person sees them (the
captures are kept in ``.test-artifacts/cli/``).

The CLI does not care which database the engine has: these tests run on SQLite only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import domain_on, guest_cd_sha, make_iso
from ovirtsdk4 import types
from test_engine_cdrom import iso_disk

from virtyard.lab import qga
from virtyard.lab.guest_image import DEFAULT_CMDLINE
from virtyard.lab.lab import Lab

pytestmark = [pytest.mark.lab,
              pytest.mark.parametrize("engine", ["sqlite"], indirect=True)]

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("VIRTYARD_TEST_ARTIFACTS", str(REPO / ".test-artifacts")))
# Exit codes, as `virtyard --help` documents them.
OK, REFUSED, USAGE, NOT_FOUND, UNREACHABLE, AUTH = 0, 1, 2, 3, 4, 5


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def error_line(self) -> str:
        """The one line an error prints (and there is nothing else on stderr)."""
        lines = self.err.splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
        assert lines[0].startswith("virtyard: "), lines[0]
        return lines[0]


class Cli:
    """``virtyard`` as a user runs it: its own config folder, no terminal."""

    def __init__(self, root: Path, engine: Any, lab: Lab) -> None:
        self.engine = engine
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        script = Path(sys.executable).with_name("virtyard")
        target = self.bin / "virtyard"
        if script.exists():
            target.symlink_to(script)
        else:  # not installed yet (pip install -e .): the module, as the script would
            target.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m virtyard.cli "
                              '"$@"\n')
            target.chmod(0o755)
        self.config = root / "config"
        image = lab.guest_image
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTYARD_")}
        self.env.update(XDG_CONFIG_HOME=str(self.config),
                        PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                        VIRTYARD_GUEST_KERNEL=str(image.kernel),
                        VIRTYARD_GUEST_INITRD=str(image.initrd),
                        VIRTYARD_GUEST_CMDLINE=DEFAULT_CMDLINE)
        self.password_file = root / "password"
        self.password_file.write_text(engine.password + "\n")
        self.password_file.chmod(0o600)

    def __call__(self, *args: str, expect: int | None = OK, timeout: float = 300) -> Result:
        done = subprocess.run(["virtyard", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              check=False)
        result = Result(done.returncode, done.stdout, done.stderr)
        if expect is not None:
            assert result.code == expect, (args, result)
        return result

    def login(self, user: str = "admin@internal", password_file: Path | None = None,
              **kw: Any) -> Result:
        return self("login", self.engine.base, "--ca-file", self.engine.ca_file, "--user", user,
                    "--password-file", str(password_file or self.password_file), **kw)

    def token(self) -> str:
        current = (self.config / "virtyard" / "current").read_text().strip()
        return str(json.loads((self.config / "virtyard" / current).read_text())["token"])


@pytest.fixture
def cli(tmp_path: Path, engine: Any, lab: Lab) -> Cli:
    return Cli(tmp_path, engine, lab)


@pytest.fixture
def cleanup_disks(engine: Any) -> Iterator[list[str]]:
    """Disk ids a test made; removed after it whatever happened (VMs go first: engine_vms)."""
    made: list[str] = []
    yield made
    token = engine.admin_token()
    for disk_id in made:
        engine.request("DELETE", f"/disks/{disk_id}", token=token)


def wait_until(probe: Callable[[], Any], done: Callable[[Any], bool], what: str,
               timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    value = probe()
    while not done(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {value!r} after {timeout} s")
        time.sleep(0.2)
        value = probe()
    return value


def test_lun_vm_lifecycle_through_the_cli(cli: Cli, engine: Any, lab: Lab, *,
                                          two_hosts: list[types.Host], make_target: Any,
                                          engine_vms: list[str],
                                          cleanup_disks: list[str]) -> None:
    host1, host2 = (h.name for h in two_hosts)
    target = make_target([64 * MiB, 32 * MiB])
    wwid = target.wwid(1)

    # Log in: the token is kept in a file only the user can read.
    assert "Logged in to" in cli.login().out
    saved = cli.config / "virtyard" / f"127.0.0.1:{engine.process.port}-admin@internal.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert engine.password not in saved.read_text()

    hosts = {h["name"]: h for h in cli("hosts", "list", "--json").json()}
    assert hosts[host1]["status"] == "up" and hosts[host2]["status"] == "up"
    assert cli("hosts", "show", host1, "-o", "value", "-c", "iscsi_initiator").out.strip() \
        == lab.agents[0].initiator_name

    # Discover, log in, list: the target's LUNs, free.
    portal = f"{target.address}:{target.port}"
    found = cli("luns", "--host", host1, "--discover", portal, "--targets", "--json").json()
    assert {"target": target.iqn, "address": target.address, "port": target.port,
            "portal": "1"} in found
    luns = {lun["wwid"]: lun for lun in cli("luns", "--host", host1, "--discover", portal,
                                            "--login", target.iqn, "--json").json()}
    assert luns[wwid]["status"] == "free" and luns[wwid]["size"] == 64 * MiB
    assert luns[wwid]["target"] == target.iqn and luns[wwid]["host"] == host1
    assert luns[target.wwid(2)]["size"] == 32 * MiB

    # The LUN as a disk; the LUN list then says why it is used.
    alias = f"cli-{uuid.uuid4().hex[:6]}"
    disk = cli("disk", "add-lun", wwid, "--alias", alias, "--json").json()
    cleanup_disks.append(disk["id"])
    assert (disk["alias"], disk["wwid"], disk["size"], disk["type"]) == (
        alias, wwid, 64 * MiB, "lun")
    used = {lun["wwid"]: lun for lun in cli("luns", "--host", host1, "--json").json()}
    assert used[wwid]["status"] == "used" and used[wwid]["used_by"] == f"disk {alias}"
    assert used[wwid]["disk_id"] == disk["id"]
    assert alias in cli("disk", "list", "-o", "value", "-c", "alias").out.split()

    # A VM on the tiny guest, started on the first of its hosts.
    name = f"cli-vm-{uuid.uuid4().hex[:6]}"
    vm = cli("vm", "create", name, "--memory", "256M", "--host", host1, "--host", host2,
             "--json").json()
    engine_vms.append(vm["id"])
    assert vm["status"] == "down" and vm["memory"] == 256 * MiB
    assert vm["placement"] == [host1, host2] and vm["kernel"] == str(lab.guest_image.kernel)
    follow_log = cli.root / "follow.jsonl"
    with follow_log.open("w") as sink:
        follower = subprocess.Popen(["virtyard", "events", "--follow", "--max", "1", "--json",
                                     "--interval", "0.3"], env=cli.env, stdout=sink,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: follow_log.read_text().count("\n"), bool, "the first event")
        started = cli("vm", "start", name, "--json").json()
        assert started["status"] == "up" and started["host"] == host1
        # --follow prints the start's event as it comes, one JSON object per line.
        wait_until(lambda: [e for e in map(json.loads, follow_log.read_text().splitlines())
                            if e["code"] == 153 and e["vm_id"] == vm["id"]], bool,
                   "the start event from events --follow")
    finally:
        follower.terminate()
        follower.wait(timeout=30)

    # Attach (not plugged), then hot-plug and wait for the guest's name for it.
    attached = cli("vm", "attach", name, alias, "--inactive", "--json").json()
    assert attached["active"] is False and attached["wwid"] == wwid
    plugged = cli("vm", "plug", name, alias, "--wait", "--json").json()
    assert plugged["active"] is True and plugged["logical_name"].startswith("/dev/sd")
    disks = cli("vm", "disks", name, "--json").json()
    assert [(d["alias"], d["logical_name"], d["interface"]) for d in disks] == [
        (alias, plugged["logical_name"], "virtio_scsi")]
    assert cli("vm", "disks", name, "-o", "value", "-c", "logical_name").out.strip() \
        == plugged["logical_name"]

    # Migrate to the other host, then stop.
    moved = cli("vm", "migrate", name, "--host", host2, "--json").json()
    assert moved["status"] == "up" and moved["host"] == host2
    assert cli("vm", "list", "-o", "value", "-c", "name", "-c", "host").out.count(
        f"{name}\t{host2}") == 1
    stopped = cli("vm", "stop", name, "--json").json()
    assert stopped["status"] == "down" and stopped["host"] is None

    # Detach, remove the disk and the VM.
    detached = cli("vm", "detach", name, alias, "--json").json()
    assert detached["disk_id"] == disk["id"] and detached["removed"] is False
    cli("disk", "remove", alias)
    assert cli("vm", "remove", name, "--json").json()["id"] == vm["id"]
    assert cli("vm", "show", name, expect=NOT_FOUND).code == NOT_FOUND
    events = cli("events", "--max", "60", "--json").json()
    codes = [e["code"] for e in events]
    for code in (153, 62, 33, 2018, 113):  # started, migrated, stopped, detached, removed
        assert code in codes, (code, codes)
    assert events == sorted(events, key=lambda e: e["id"])  # oldest first

    # Logging out ends the token: the next command says to log in.
    cli("logout")
    assert not saved.exists()
    line = cli("vm", "list", expect=AUTH).error_line()
    assert line.endswith("(NOT_LOGGED_IN); run: virtyard login URL")


def test_error_paths_give_their_exit_code_and_one_line(
        cli: Cli, engine: Any, *, add_lab_host: Callable[..., types.Host],
        wait_host: Callable[..., types.Host], make_target: Any, engine_vms: list[str],
        cleanup_disks: list[str]) -> None:
    # Bad credentials: exit 5, the engine's words.
    wrong = cli.root / "wrong"
    wrong.write_text("not-the-password\n")
    line = cli.login(password_file=wrong, expect=AUTH).error_line()
    assert line == ("virtyard: Login refused: Cannot authenticate user 'admin@internal': bad "
                    "user name or password (ACCESS_DENIED)")
    # No engine there: exit 4. The engine's certificate without its CA: exit 4, say --ca-file.
    line = cli("login", "https://127.0.0.1:9", "--password-file", str(cli.password_file),
               expect=UNREACHABLE).error_line()
    assert "(ENGINE_UNREACHABLE)" in line
    line = cli("login", engine.base, "--password-file", str(cli.password_file),
               expect=UNREACHABLE).error_line()
    assert "CERTIFICATE_VERIFY_FAILED" in line and "--ca-file" in line
    cli.login()

    host = add_lab_host(0)
    wait_host(host.id, types.HostStatus.UP)
    target = make_target([16 * MiB])
    portal = f"{target.address}:{target.port}"
    cli("luns", "--host", host.name, "--discover", portal, "--login", target.iqn)
    alias = f"err-{uuid.uuid4().hex[:6]}"
    cleanup_disks.append(cli("disk", "add-lun", target.wwid(1), "--alias", alias,
                             "--json").json()["id"])
    first, second = (f"err-vm-{uuid.uuid4().hex[:6]}" for _ in range(2))
    for vm_name in (first, second):
        engine_vms.append(cli("vm", "create", vm_name, "--memory", "128M",
                              "--json").json()["id"])
    cli("vm", "attach", first, alias)

    # Not found: exit 3.
    for args in (["vm", "show", "nosuch"], ["vm", "start", "nosuch"],
                 ["vm", "attach", first, "nosuch-disk"], ["hosts", "show", "nosuch"],
                 ["disk", "add-lun", "36000000000000000000000000000dead"]):
        result = cli(*args, expect=NOT_FOUND)
        assert result.out == ""
        result.error_line()
    assert cli("vm", "show", "nosuch", expect=NOT_FOUND).error_line() == (
        "virtyard: Not found: VM 'nosuch' does not exist (ENTITY_NOT_FOUND)")
    line = cli("vm", "detach", second, alias, expect=NOT_FOUND).error_line()
    assert "(ACTION_TYPE_FAILED_DISK_NOT_ATTACHED_TO_VM)" in line
    line = cli("luns", "--host", host.name, "--discover", portal, "--login", "iqn.x:nosuch",
               expect=NOT_FOUND).error_line()
    assert "(TARGET_NOT_FOUND)" in line

    # The engine refuses: exit 1 with its reason, detail and key.
    line = cli("vm", "attach", second, alias, expect=REFUSED).error_line()
    assert line == ("virtyard: Operation Failed: [Cannot attach Virtual Disk. The disk is not "
                    "shareable and is already attached to a VM.] "
                    "(ACTION_TYPE_FAILED_NOT_SHAREABLE_DISK_ALREADY_ATTACHED)")
    line = cli("vm", "stop", first, expect=REFUSED).error_line()
    assert line.endswith("(ACTION_TYPE_FAILED_VM_IS_NOT_RUNNING)")
    line = cli("vm", "create", first, expect=REFUSED).error_line()
    assert line.endswith("(ACTION_TYPE_FAILED_NAME_ALREADY_USED)")

    # Usage: exit 2.
    for args in (["vm", "create"], ["vm", "frobnicate"], ["vm", "list", "-o", "yaml"],
                 ["vm", "create", "x", "--memory", "lots"], ["hosts", "list", "-c", "nope"],
                 ["luns", "--host", host.name, "--login-all"]):
        cli(*args, expect=USAGE).error_line()

    # A read-only user is not allowed to change anything: exit 5.
    viewer_password = cli.root / "viewer"
    viewer_password.write_text(engine.add_user("viewer@internal", "readonly") + "\n")
    cli.login("viewer@internal", viewer_password)
    assert first in cli("vm", "list", "-o", "value", "-c", "name").out.split()
    line = cli("vm", "create", "by-viewer", expect=AUTH).error_line()
    assert "(USER_NOT_AUTHORIZED_TO_PERFORM_ACTION)" in line

    # An expired token: exit 5, and how to go on.
    cli.login()
    engine.expire_token(cli.token())
    line = cli("vm", "list", expect=AUTH).error_line()
    assert "(UNAUTHORIZED)" in line and f"run: virtyard login {engine.base}" in line


# -- a terminal session ----------------------------------------------------------------------


class Terminal:
    """A tmux session on its own server (socket), 160x40, running bash with the CLI on PATH."""

    def __init__(self, cli: Cli) -> None:
        tmux = shutil.which("tmux")
        if tmux is None:
            pytest.fail("tmux is missing: run scripts/ensure-system-packages")
        self.tmux = tmux
        self.socket = cli.root / "tmux.sock"
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in cli.env.items()
                       if k.startswith(("XDG_", "VIRTYARD_")) or k == "PATH")
        self._tmux("new-session", "-d", "-x", "160", "-y", "40", "-s", "cli",
                   f"env -i HOME={shlex.quote(str(cli.root))} TERM=screen-256color {env} "
                   "bash --noprofile --norc")
        self.type("PS1='$ '; clear")
        self.wait_for(lambda screen: screen.strip() == "$", "a clear prompt")

    def _tmux(self, *args: str) -> str:
        done = subprocess.run([self.tmux, "-S", str(self.socket), *args], capture_output=True,
                              text=True, timeout=30, check=True)
        return done.stdout

    def type(self, line: str) -> None:
        self._tmux("send-keys", "-t", "cli", line, "Enter")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "cli")

    def wait_for(self, done: Callable[[str], bool], what: str, timeout: float = 120.0,
                 interval: float = 0.05) -> str:
        return str(wait_until(self.screen, done, what, timeout))

    def close(self) -> None:
        subprocess.run([self.tmux, "-S", str(self.socket), "kill-server"], check=False,
                       capture_output=True, timeout=30)


@pytest.fixture
def terminal(cli: Cli) -> Iterator[Terminal]:
    term = Terminal(cli)
    try:
        yield term
    finally:
        term.close()


def bar_line(screen: str, words: str, elapsed: str = "0:00:") -> bool:
    """Whether the screen shows a progress bar (spinner, words, bar, elapsed time)."""
    return any(words in line and "━" in line and elapsed in line
               for line in screen.splitlines())


def test_a_terminal_session_shows_progress_and_tables(
        cli: Cli, terminal: Terminal, *, two_hosts: list[types.Host], make_target: Any,
        engine_vms: list[str], cleanup_disks: list[str]) -> None:
    host1, host2 = (h.name for h in two_hosts)
    target = make_target([32 * MiB, 16 * MiB])
    cli.login()
    name = f"tty-{uuid.uuid4().hex[:6]}"
    alias = f"tty-data-{uuid.uuid4().hex[:4]}"
    captures: dict[str, str] = {}

    terminal.type(f"virtyard luns --host {host1} --discover {target.address}:{target.port} "
                  f"--login {target.iqn}")
    captures["luns"] = terminal.wait_for(
        lambda s: target.wwid(2) in s and s.rstrip().endswith("$"), "the LUN table")
    table = captures["luns"]
    assert "WWID" in table and "USED BY" in table and "free" in table
    assert f"logged in to {target.iqn}" in table  # people see what happened
    assert "\x1b" not in table

    disk = cli("disk", "add-lun", target.wwid(1), "--alias", alias, "--json").json()
    cleanup_disks.append(disk["id"])
    engine_vms.append(cli("vm", "create", name, "--memory", "256M", "--host", host1,
                          "--json").json()["id"])
    cli("vm", "attach", name, alias)
    terminal.type("clear")
    terminal.type(f"virtyard vm start {name} && virtyard vm migrate {name} --host {host2}")
    captures["progress"] = terminal.wait_for(
        lambda s: bar_line(s, f"migrating VM {name}", "0:00:01") or
        f"migrated from {host1}" in s, "the migration's progress bar")
    assert bar_line(captures["progress"], f"migrating VM {name}"), captures["progress"]
    captures["migrated"] = terminal.wait_for(lambda s: f"migrated from {host1} to {host2}" in s,
                                             "the end of the migration")
    # The bar is gone once done (transient); the sentence stays.
    assert not bar_line(captures["migrated"], "migrating")
    assert f"VM {name} is up on {host1}" in captures["migrated"]

    wait_until(lambda: cli("vm", "disks", name, "--json").json()[0]["logical_name"], bool,
               "the guest's name for the disk", timeout=180)
    terminal.type("clear")
    terminal.type(f"virtyard vm; virtyard vm disks {name}; virtyard hosts")
    captures["tables"] = terminal.wait_for(
        lambda s: "LOGICAL NAME" in s and host2 in s and s.rstrip().endswith("$"),
        "the tables")
    lines = captures["tables"].splitlines()
    header = next(line for line in lines if line.startswith("NAME") and "MEMORY" in line)
    assert header.split() == ["NAME", "STATUS", "HOST", "MEMORY", "CPUS", "ID"]
    row = next(line for line in lines if line.startswith(name))
    assert row.split()[:5] == [name, "up", host2, "256", "MiB"]
    assert any(line.startswith(alias) and "virtio_scsi" in line and "/dev/sd" in line
               for line in lines)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    artifact = ARTIFACTS / "cli" / "terminal-session.txt"
    artifact.parent.mkdir(exist_ok=True)
    artifact.write_text("".join(f"--- {what} (tmux capture-pane, 160x40)\n{screen.rstrip()}\n\n"
                                for what, screen in captures.items()))
    cli("vm", "stop", name)


def test_storage_domain_and_cd_through_the_cli(
        cli: Cli, engine: Any, lab: Lab, tmp_path: Path, *,
        add_lab_host: Callable[..., types.Host], wait_host: Callable[..., types.Host],
        make_target: Any, engine_vms: list[str]) -> None:
    host = wait_host(add_lab_host(0).id, types.HostStatus.UP)
    target = make_target([64 * MiB])
    cli.login()
    name = f"cli-sd-{uuid.uuid4().hex[:6]}"
    made = cli("sd", "create", name, "--lun", target.wwid(1), "--host", host.name,
               "--address", target.address, "--port", str(target.port), "--target",
               target.iqn, "--json").json()
    assert (made["status"], made["wwid"], made["target"]) == ("active", target.wwid(1),
                                                              target.iqn)
    assert name in cli("sd", "list", "-o", "value", "-c", "name").out.split()
    text = f"cli {uuid.uuid4().hex}\n"
    iso_id = iso_disk(engine, lab, made["id"], made["data_center_id"], make_iso(tmp_path, text))

    vm_name = f"cli-cd-{uuid.uuid4().hex[:6]}"
    vm = cli("vm", "create", vm_name, "--memory", "256M", "--host", host.name, "--json").json()
    engine_vms.append(vm["id"])
    cli("vm", "start", vm_name)
    inserted = cli("vm", "cd", vm_name, "insert", iso_id, "--json").json()
    assert (inserted["iso"], inserted["current_iso"]) == (None, iso_id)
    dom = domain_on(lab, 0, vm["id"])
    assert dom is not None
    qga.wait_ready(dom)
    assert guest_cd_sha(dom) == hashlib.sha256(text.encode()).hexdigest()
    assert cli("vm", "cd", vm_name, "-o", "value", "-c", "current_iso").out.strip() == iso_id
    assert cli("vm", "cd", vm_name, "eject", "--json").json()["current_iso"] is None
    assert guest_cd_sha(dom) is None
    cli("vm", "cd", vm_name, "insert", expect=USAGE)

    # The next run's CD keeps the domain in use: removing it is refused, with the reason.
    assert cli("vm", "cd", vm_name, "insert", iso_id, "--next-run", "--json").json()["iso"] \
        == iso_id
    line = cli("sd", "remove", name, expect=REFUSED).error_line()
    assert "ACTION_TYPE_FAILED_STORAGE_DOMAIN_USED_BY_VMS" in line and vm_name in line
    cli("vm", "cd", vm_name, "eject", "--next-run")
    cli("vm", "stop", vm_name)
    assert cli("sd", "remove", name, "--format", "--host", host.name, "--json").json() == {
        "id": made["id"], "name": name, "formatted": True}
    assert name not in cli("sd", "list", "-o", "value", "-c", "name").out.split()
