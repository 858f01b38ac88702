"""The kernel initiator end to end, with recorded tool output and a recorded-layout sysfs tree.

No kernel session can exist on this machine (no ``iscsi_tcp``, no device-mapper), so:

* iscsiadm answers come from ``recorded_here.json`` (recorded on this machine against the lab's
  tgtd: what works without the kernel — records, interfaces — and how the rest fails) and from
  ``public_failures.json``/``*.txt`` (published recordings: 3PAR discovery, a CHAP failure,
  session-exists, …);
* the host's state is ``sysfs_host.json`` (see its ``about``: kernel layout, values from
  recorded sources), materialised in a temporary directory; a login "creates" its session by
  materialising that session's part of the tree, and multipath "creates" the maps a few polls
  later, driven by a fake clock — so waiting is tested without sleeping.

The last test runs the real iscsiadm against a real tgtd when both are installed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from virtyard.host.storage import kernel_initiator as ki
from virtyard.host.storage.initiator import (
    Chap,
    Connection,
    Device,
    DiscoveredTarget,
    InitiatorAuthError,
    InitiatorError,
    PathInfo,
    Portal,
    Secret,
)
from virtyard.host.storage.iscsiadm import CommandResult
from virtyard.host.storage.kernel_initiator import KernelInitiator
from virtyard.lab import ports
from virtyard.lab.iscsi_target import TargetServer

DATA = Path(__file__).resolve().parent.parent / "data" / "kernel"
RECORDED: dict[str, dict[str, Any]] = json.loads(
    (DATA / "recorded_here.json").read_text())["cases"]
PUBLIC: dict[str, dict[str, Any]] = json.loads(
    (DATA / "public_failures.json").read_text())["cases"]
SPEC: dict[str, Any] = json.loads((DATA / "sysfs_host.json").read_text())

IQN = "iqn.2026-11.org.virtyard.lab:rec"
W1 = "360000000000000000e00000000010001"
W2 = "360000000000000000e00000000010002"
W3 = "360000000000000000e00000000020001"
C1 = Connection("c1", Portal("192.0.2.10", 3260), IQN)
C2 = Connection("c2", Portal("192.0.2.11", 3260), IQN)
OK = CommandResult(0, "", "")
SCSI_ID = "/lib/udev/scsi_id"


def fixture(name: str) -> str:
    """A text fixture without its ``## `` source header."""
    header, sep, body = (DATA / name).read_text().partition("## ---\n")
    assert sep and all(line.startswith("##") for line in header.splitlines()), name
    return body


def result(case: dict[str, Any]) -> CommandResult:
    return CommandResult(case["returncode"], case["stdout"], case["stderr"])


# --- the sysfs tree ----------------------------------------------------------------------------

SESSION1 = re.compile(r"platform/host7/|session1$|connection1:0$|^sys/block/sd[bc]$")
MAPS = re.compile(r"block/dm-[123](/|$)")


def split(spec: dict[str, Any], pattern: re.Pattern[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the part of ``spec`` whose paths match, the rest)."""
    hit: dict[str, Any] = {"files": {}, "links": {}}
    rest: dict[str, Any] = {"files": {}, "links": {}}
    for kind in ("files", "links"):
        for path, value in spec[kind].items():
            (hit if pattern.search(path) else rest)[kind][path] = value
    return hit, rest


def materialize(spec: dict[str, Any], root: Path) -> None:
    for rel, text in spec["files"].items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for rel, target in sorted(spec["links"].items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)


class Clock:
    """A fake monotonic clock; ``sleep`` advances it and runs the next scheduled event."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.events: list[Callable[[], None] | None] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds
        if self.events:
            event = self.events.pop(0)
            if event is not None:
                event()


Answer = CommandResult | Exception


class Script:
    """Runner that checks each command against the expected argv, answers, and may act
    (e.g. make the session appear in sysfs when the login command runs)."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[str], Answer, Callable[[], None] | None]] = []
        self.calls: list[tuple[list[str], float, tuple[str, ...]]] = []

    def expect(self, argv: list[str], answer: Answer = OK,
               then: Callable[[], None] | None = None) -> Script:
        self.steps.append((argv, answer, then))
        return self

    def __call__(self, argv: Sequence[str], *, timeout: float,
                 secrets: tuple[str, ...] = ()) -> CommandResult:
        self.calls.append((list(argv), timeout, secrets))
        assert self.steps, f"unexpected command {list(argv)}"
        expected, answer, then = self.steps.pop(0)
        assert list(argv) == expected
        if then is not None:
            then()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def done(self) -> None:
        assert not self.steps, f"commands not run: {[s[0] for s in self.steps]}"


class Host:
    """A KernelInitiator over a temporary sysfs/dev tree, a scripted runner and a fake clock."""

    def __init__(self, root: Path, spec: dict[str, Any] = SPEC,
                 resolver: Callable[[str], frozenset[str]] | None = None,
                 initiator_name: str | None = None) -> None:
        self.root = root
        self.dev = root / "dev"
        self.dev.mkdir(parents=True)
        materialize(spec, root)
        name_file = root / "etc" / "iscsi" / "initiatorname.iscsi"
        name_file.parent.mkdir(parents=True)
        name_file.write_text(RECORDED["initiatorname_file"]["stdout"])
        self.script = Script()
        self.clock = Clock()
        self.initiator = KernelInitiator(
            initiator_name, initiator_name_file=name_file, runner=self.script,
            sysfs_root=root, dev_root=self.dev, clock=self.clock, sleep=self.clock.sleep,
            scsi_id=SCSI_ID,
            resolver=resolver or ki.resolve_addresses)

    def add(self, spec: dict[str, Any]) -> Callable[[], None]:
        return lambda: materialize(spec, self.root)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


@pytest.fixture
def fresh(tmp_path: Path) -> tuple[Host, dict[str, Any], dict[str, Any]]:
    """A host before logging in to C1: session 2 exists, session 1 and the maps do not yet.
    Returns the host and the two deferred parts of the tree (session 1, maps)."""
    session1, rest = split(SPEC, SESSION1)
    maps, rest = split(rest, MAPS)
    return Host(tmp_path, rest), session1, maps


def node(portal: str, *rest: str, iface: str = "default", iqn: str = IQN) -> list[str]:
    return ["iscsiadm", "-m", "node", "-T", iqn, "-I", iface, "-p", portal, *rest]


def update(portal: str, key: str, value: str, iface: str = "default") -> list[str]:
    return node(portal, "-n", key, "-v", value, "--op=update", iface=iface)


def expect_node_setup(script: Script, portal: str, *, login_timeout: str = "10",
                      iface: str = "default") -> None:
    script.expect(node(portal, "--op=new", iface=iface))
    script.expect(update(portal, "node.startup", "manual", iface))
    script.expect(update(portal, "node.conn[0].timeo.login_timeout", login_timeout, iface))
    script.expect(update(portal, "node.session.initial_login_retry_max", "1", iface))


DISCOVERYDB = ["iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-I", "default", "-p"]


# --- discovery ---------------------------------------------------------------------------------

def test_discover_deletes_its_record(host: Host) -> None:
    portal = Portal("192.168.68.203", 3260)
    db = [*DISCOVERYDB, "192.168.68.203:3260"]
    host.script.expect([*db, "--op=new"], result(RECORDED["discoverydb_new"]))
    host.script.expect([*db, "--discover"], CommandResult(0, fixture("discovery_3par.txt"), ""))
    host.script.expect([*db, "--op=delete"])
    found = host.initiator.discover(portal, None, timeout=20)
    assert found == [DiscoveredTarget(portal, 1024, "iqn.2000-05.com.3pardata:20210002ac01db31")]
    host.script.done()


def test_discover_with_chap_masks_the_password(host: Host, caplog: pytest.LogCaptureFixture
                                               ) -> None:
    secret = "chapsecret12"
    db = [*DISCOVERYDB, "[fe80::211:32ff:fe8a:51d9]:3260"]
    auth = "discovery.sendtargets.auth."
    host.script.expect([*db, "--op=new"])
    host.script.expect([*db, "-n", auth + "authmethod", "-v", "CHAP", "--op=update"])
    host.script.expect([*db, "-n", auth + "username", "-v", "chapuser", "--op=update"])
    host.script.expect([*db, "-n", auth + "password", "-v", secret, "--op=update"])
    host.script.expect([*db, "--discover"],
                       CommandResult(24, "", "iscsiadm: Login failed to authenticate with target\n"
                                             "iscsiadm: discovery login to fe80::1 rejected: "
                                             "initiator failed authorization\n"))
    host.script.expect([*db, "--op=delete"])
    caplog.set_level(logging.DEBUG)
    with pytest.raises(InitiatorAuthError) as info:
        host.initiator.discover(Portal("fe80::211:32ff:fe8a:51d9", 3260),
                                Chap("chapuser", Secret(secret)), timeout=20)
    assert info.value.kind == "authentication"
    assert info.value.portal == "[fe80::211:32ff:fe8a:51d9]:3260"
    for text in (str(info.value), repr(info.value), info.value.detail, caplog.text):
        assert secret not in text
    assert [c[2] for c in host.script.calls].count((secret,)) == 1
    host.script.done()


def test_discover_without_iscsi_tcp_recorded_here(host: Host) -> None:
    """What discovery does on this machine: iscsiadm drops its only interface because the
    tcp transport cannot be loaded, and exits with NO_OBJS_FOUND. The record is still deleted."""
    host.script.expect(*_recorded("discoverydb_new"))
    host.script.expect(*_recorded("discoverydb_discover"))
    host.script.expect(*_recorded("discoverydb_delete"))
    with pytest.raises(InitiatorError) as info:
        host.initiator.discover(Portal("127.0.0.1", 35417), None, timeout=20)
    assert info.value.kind == "unavailable"
    assert "Could not load transport tcp" in info.value.detail
    assert not isinstance(info.value, InitiatorAuthError)
    host.script.done()


def _recorded(name: str) -> tuple[list[str], CommandResult]:
    return RECORDED[name]["argv"], result(RECORDED[name])


def test_discover_survives_a_failed_cleanup(host: Host, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    db = [*DISCOVERYDB, "192.168.68.203:3260"]
    host.script.expect([*db, "--op=new"])
    host.script.expect([*db, "--discover"], CommandResult(0, fixture("discovery_3par.txt"), ""))
    host.script.expect([*db, "--op=delete"], CommandResult(13, "", "iscsiadm: access denied\n"))
    with caplog.at_level(logging.WARNING):
        found = host.initiator.discover(Portal("192.168.68.203", 3260), None, timeout=20)
    assert len(found) == 1
    assert "could not delete the discovery record" in caplog.text
    host.script.done()


def test_discover_cleanup_runs_even_when_the_budget_is_spent(host: Host) -> None:
    db = [*DISCOVERYDB, "192.168.68.203:3260"]

    def slow() -> None:
        host.clock.now += 60  # the discovery took the whole budget and more
    host.script.expect([*db, "--op=new"], then=slow)
    host.script.expect([*db, "--op=delete"])  # nothing else may run; cleanup still does
    with pytest.raises(InitiatorError) as info:
        host.initiator.discover(Portal("192.168.68.203", 3260), None, timeout=20)
    assert info.value.kind == "timeout"
    assert host.script.calls[-1][1] == ki.CLEANUP_TIMEOUT
    host.script.done()


# --- login -------------------------------------------------------------------------------------

def test_login_waits_for_every_disk_of_the_new_session(
        fresh: tuple[Host, dict[str, Any], dict[str, Any]]) -> None:
    host, session1, maps = fresh
    portal = "192.0.2.10:3260,1"
    expect_node_setup(host.script, portal)
    host.script.expect(update(portal, "node.session.auth.authmethod", "None"))
    host.script.expect(node(portal, "-l"), then=host.add(session1))
    host.script.expect(["iscsiadm", "-m", "session", "-r", "1", "-R"])
    host.clock.events = [None, None, host.add(maps)]  # multipath needs three polls
    host.initiator.login(C1, timeout=30)
    assert len(host.clock.sleeps) == 3
    assert host.clock.sleeps == [0.05, 0.1, 0.2]  # backing off, no blind settle
    assert all(c[1] <= 30 for c in host.script.calls)
    host.script.done()


def test_login_waits_for_expected_wwids(fresh: tuple[Host, dict[str, Any], dict[str, Any]]
                                        ) -> None:
    host, session1, maps = fresh
    portal = "192.0.2.10:3260,1"
    expect_node_setup(host.script, portal)
    host.script.expect(update(portal, "node.session.auth.authmethod", "None"))
    host.script.expect(node(portal, "-l"), then=host.add(session1))
    host.script.expect(["iscsiadm", "-m", "session", "-r", "1", "-R"])
    only_w2, _ = split(maps, re.compile(r"dm-2"))
    host.clock.events = [host.add(only_w2)]
    host.initiator.login(C1, timeout=30, wwids=[W2])
    assert len(host.clock.sleeps) == 1  # W1 is not mapped yet, but only W2 was asked for
    host.script.done()


def test_login_times_out_naming_what_is_missing(
        fresh: tuple[Host, dict[str, Any], dict[str, Any]]) -> None:
    host, session1, _ = fresh
    portal = "192.0.2.10:3260,1"
    expect_node_setup(host.script, portal)
    host.script.expect(update(portal, "node.session.auth.authmethod", "None"))
    host.script.expect(node(portal, "-l"), then=host.add(session1))
    host.script.expect(["iscsiadm", "-m", "session", "-r", "1", "-R"])
    paths = ("uuid                              dev dev_t hcil    dm_st dev_st  chk_st\n"
             f"{W1} sdb 8:16  7:0:0:1 undef running ready \n"
             f"{W2} sdc 8:32  7:0:0:2 undef running faulty\n"
             f"{W1} sdd 8:48  8:0:0:1 undef running ready \n")
    host.script.expect(["multipathd", "show", "paths", "format", "%w %d %D %i %t %o %T"],
                       CommandResult(0, paths, ""))
    with pytest.raises(ki.DevicesNotReadyError) as info:
        host.initiator.login(C1, timeout=30)
    error = info.value
    assert isinstance(error, InitiatorError) and error.kind == "timeout"
    assert error.pending == ["sdb (7:0:0:1)", "sdc (7:0:0:2)"]  # not the controller LUN 0
    assert f"sdb uuid={W1} dm_st=undef chk_st=ready" in error.detail
    assert "sdc" in error.detail and "chk_st=faulty" in error.detail
    assert "sdd" not in error.detail  # another session's path
    assert host.clock.now == pytest.approx(1030)  # waited the whole budget, not more
    assert max(host.clock.sleeps) == ki.MAX_POLL_INTERVAL
    host.script.done()  # and it did not log out: the session is left to the caller


def test_login_timeout_with_wwids_and_multipathd_down(
        fresh: tuple[Host, dict[str, Any], dict[str, Any]]) -> None:
    host, session1, _ = fresh
    portal = "192.0.2.10:3260,1"
    expect_node_setup(host.script, portal, login_timeout="1")
    host.script.expect(update(portal, "node.session.auth.authmethod", "None"))
    host.script.expect(node(portal, "-l"), then=host.add(session1))
    host.script.expect(["iscsiadm", "-m", "session", "-r", "1", "-R"])
    rec = RECORDED["multipathd_show_paths"]  # recorded here: no daemon, exit 1, no word
    host.script.expect(["multipathd", "show", "paths", "format", "%w %d %D %i %t %o %T"],
                       result(rec))
    with pytest.raises(ki.DevicesNotReadyError) as info:
        host.initiator.login(C1, timeout=2, wwids=[W1, W3])
    assert info.value.pending == [W1]  # W3 (mpathb) is mapped already
    assert "is multipathd running" in info.value.detail
    host.script.done()


def test_login_to_a_target_without_disk_luns(
        fresh: tuple[Host, dict[str, Any], dict[str, Any]]) -> None:
    """Only tgt's array controller (LUN 0, SCSI type 12, no block device) behind the session:
    nothing to wait for."""
    host, session1, _ = fresh
    _, controller_only = split(session1, re.compile(r"7:0:0:[12]|sys/block/sd[bc]"))
    portal = "192.0.2.10:3260,1"
    expect_node_setup(host.script, portal, login_timeout="15")
    host.script.expect(update(portal, "node.session.auth.authmethod", "None"))
    host.script.expect(node(portal, "-l"), then=host.add(controller_only))
    host.script.expect(["iscsiadm", "-m", "session", "-r", "1", "-R"])
    host.initiator.login(C1, timeout=300)
    assert host.clock.sleeps == []
    host.script.done()


def test_login_to_an_existing_session(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    portal = "192.0.2.10:3260,1"
    expect_node_setup(host.script, portal)
    host.script.expect(update(portal, "node.session.auth.authmethod", "None"))
    host.script.expect(node(portal, "-l"), result(PUBLIC["login_session_exists"]))
    host.script.expect(["iscsiadm", "-m", "session", "-r", "1", "-R"])
    with caplog.at_level(logging.WARNING):
        host.initiator.login(C1, timeout=30)
    assert host.clock.sleeps == []  # the maps were there already
    assert "session exists" in caplog.text
    host.script.done()


def test_login_without_iscsid_recorded_here_cleans_up(
        fresh: tuple[Host, dict[str, Any], dict[str, Any]]) -> None:
    host, _, _ = fresh
    portal = "192.0.2.10:3260,1"
    expect_node_setup(host.script, portal)
    host.script.expect(update(portal, "node.session.auth.authmethod", "None"))
    host.script.expect(node(portal, "-l"), result(RECORDED["node_login"]))
    host.script.expect(node(portal, "-u"), result(RECORDED["node_logout_no_session"]))
    host.script.expect(node(portal, "--op=delete"), result(RECORDED["node_delete"]))
    with pytest.raises(InitiatorError) as info:
        host.initiator.login(C1, timeout=30)
    assert info.value.kind == "unavailable"
    assert "could not connect to iscsid" in info.value.detail
    assert (info.value.portal, info.value.target) == ("192.0.2.10:3260", IQN)
    host.script.done()


def test_login_chap_failure(fresh: tuple[Host, dict[str, Any], dict[str, Any]],
                            caplog: pytest.LogCaptureFixture) -> None:
    host, _, _ = fresh
    secret = "wrongsecret12"
    portal = "192.0.2.10:3260,1"
    expect_node_setup(host.script, portal)
    host.script.expect(update(portal, "node.session.auth.authmethod", "CHAP"))
    host.script.expect(update(portal, "node.session.auth.username", "chapuser"))
    host.script.expect(update(portal, "node.session.auth.password", secret))
    host.script.expect(node(portal, "-l"), result(PUBLIC["login_auth_failed"]))
    host.script.expect(node(portal, "-u"), result(RECORDED["node_logout_no_session"]))
    host.script.expect(node(portal, "--op=delete"))
    connection = Connection("c1", C1.portal, IQN, chap=Chap("chapuser", Secret(secret)))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(InitiatorAuthError) as info:
        host.initiator.login(connection, timeout=30)
    assert info.value.kind == "authentication"
    for text in (str(info.value), repr(info.value), caplog.text):
        assert secret not in text
    host.script.done()


def test_failed_setup_of_a_shared_session_keeps_its_node(host: Host) -> None:
    # session 1 already exists (another connection uses it): a failure must not delete the node
    portal = "192.0.2.10:3260,1"
    host.script.expect(node(portal, "--op=new"))
    host.script.expect(update(portal, "node.startup", "manual"),
                       result(RECORDED["node_update_bad_key"]))
    with pytest.raises(InitiatorError) as info:
        host.initiator.login(C1, timeout=30)
    assert "Invalid param name" in info.value.detail
    host.script.done()  # no logout, no delete


def test_login_reported_but_no_session_in_sysfs(
        fresh: tuple[Host, dict[str, Any], dict[str, Any]]) -> None:
    host, _, _ = fresh
    portal = "192.0.2.10:3260,1"
    expect_node_setup(host.script, portal)
    host.script.expect(update(portal, "node.session.auth.authmethod", "None"))
    host.script.expect(node(portal, "-l"))
    with pytest.raises(ki.SessionNotFoundError) as info:
        host.initiator.login(C1, timeout=30)
    assert info.value.kind == "session"
    host.script.done()


def test_login_with_own_initiator_name_uses_its_own_iface(
        fresh: tuple[Host, dict[str, Any], dict[str, Any]]) -> None:
    host, session1, maps = fresh
    name = "iqn.2026-11.org.virtyard:host-b"
    iface = ki.iface_name(name)
    assert re.fullmatch(r"vy-[0-9a-f]{12}", iface) and iface == ki.iface_name(name)
    # the session the login creates is bound to that iface
    bound = json.loads(json.dumps(session1).replace('"default\\n"', f'"{iface}\\n"'))
    portal = "192.0.2.10:3260,1"
    host.script.expect(*_recorded("iface_list"))
    host.script.expect(["iscsiadm", "-m", "iface", "-I", iface, "--op=new"],
                       result(RECORDED["iface_new"]))
    host.script.expect(["iscsiadm", "-m", "iface", "-I", iface, "-n", "iface.initiatorname",
                        "-v", name, "--op=update"])
    expect_node_setup(host.script, portal, iface=iface)
    host.script.expect(update(portal, "node.session.auth.authmethod", "None", iface))
    host.script.expect(node(portal, "-l", iface=iface), then=host.add(bound))
    host.script.expect(["iscsiadm", "-m", "session", "-r", "1", "-R"])
    host.clock.events = [host.add(maps)]
    host.initiator.login(Connection("c1", C1.portal, IQN, initiator_name=name), timeout=30)
    host.script.done()


def test_login_with_own_initiator_name_recorded_here(host: Host) -> None:
    """On this machine the interface can be created but not given an initiator name."""
    name = "iqn.2026-11.org.virtyard:rec"
    iface = ki.iface_name(name)
    host.script.expect(*_recorded("iface_list"))
    host.script.expect(["iscsiadm", "-m", "iface", "-I", iface, "--op=new"],
                       result(RECORDED["iface_new"]))
    host.script.expect(["iscsiadm", "-m", "iface", "-I", iface, "-n", "iface.initiatorname",
                        "-v", name, "--op=update"], result(RECORDED["iface_update_initiatorname"]))
    with pytest.raises(InitiatorError) as info:
        host.initiator.login(Connection("c1", C1.portal, IQN, initiator_name=name), timeout=30)
    assert info.value.kind == "unavailable"
    host.script.done()


# --- logout ------------------------------------------------------------------------------------

def test_logout_of_a_session(host: Host) -> None:
    session1, _ = split(SPEC, re.compile(r"session1$|connection1:0$"))

    def gone() -> None:
        for link in session1["links"]:
            (host.root / link).unlink()
    portal = "192.0.2.10:3260,1"
    host.script.expect(node(portal, "-u"), then=gone)
    host.script.expect(node(portal, "--op=delete"))
    host.initiator.logout(C1, timeout=10)
    host.script.done()


def test_logout_flushes_a_map_it_left_without_paths(host: Host) -> None:
    """Seen in the storage host VM: after a path failed and came back, multipathd kept an
    empty map when the last session went. The logout removes such a map itself — only the
    maps its session served that now have no path at all (dm-2 still has sde)."""
    session1, _ = split(SPEC, re.compile(r"session1$|connection1:0$"))
    slaves = host.root / "sys/devices/virtual/block"

    def gone() -> None:
        for link in session1["links"]:
            (host.root / link).unlink()
        for rel in ("dm-1/slaves/sdb", "dm-1/slaves/sdd", "dm-2/slaves/sdc"):
            (slaves / rel).unlink()
    portal = "192.0.2.10:3260,1"
    host.script.expect(node(portal, "-u"), then=gone)
    host.script.expect(node(portal, "--op=delete"))
    host.script.expect(["multipath", "-f", W1])
    host.initiator.logout(C1, timeout=10)
    host.script.done()


def test_logout_removes_the_node_a_gone_map_left(host: Host) -> None:
    """Seen in the storage host VM: the map went with its last path, but its /dev/mapper node
    stayed (udev missed it). The logout makes the node agree with the kernel."""
    session1, _ = split(SPEC, re.compile(r"session1$|connection1:0$"))
    dm = host.root / "sys/devices/virtual/block/dm-1"
    (host.dev / "mapper").mkdir()
    (host.dev / "mapper" / W1).touch()

    def gone() -> None:
        for link in session1["links"]:
            (host.root / link).unlink()
        for rel in ("dm-1/slaves/sdb", "dm-1/slaves/sdd", "dm-2/slaves/sdc"):
            (host.root / "sys/devices/virtual/block" / rel).unlink()
        shutil.rmtree(dm)  # the map itself went (multipathd removed it)
    portal = "192.0.2.10:3260,1"
    host.script.expect(node(portal, "-u"), then=gone)
    host.script.expect(node(portal, "--op=delete"))
    host.script.expect(["dmsetup", "mknodes", W1])
    host.initiator.logout(C1, timeout=10)
    host.script.done()


def test_logout_without_session_recorded_here(
        fresh: tuple[Host, dict[str, Any], dict[str, Any]]) -> None:
    host, _, _ = fresh
    host.script.expect(node("192.0.2.10:3260,1", "--op=delete"),
                       result(RECORDED["node_delete_missing"]))
    host.initiator.logout(C1, timeout=10)  # no session, no record: nothing to do
    host.script.done()


def test_logout_leaves_sessions_of_other_ifaces_alone(host: Host) -> None:
    # session 1 is on the default iface; this connection logs in with its own initiator name
    name = "iqn.2026-11.org.virtyard:host-b"
    host.script.expect(node("192.0.2.10:3260,1", "--op=delete", iface=ki.iface_name(name)),
                       result(RECORDED["node_delete_missing"]))
    host.initiator.logout(Connection("c1", C1.portal, IQN, initiator_name=name), timeout=10)
    host.script.done()


SYSTEM_NAME = "iqn.1993-08.org.debian:01:e427ca40a499"  # in the recorded initiatorname.iscsi


@pytest.mark.parametrize(("configured", "own", "used"), [
    (None, None, None),
    (SYSTEM_NAME, None, None),  # the default interface already presents the configured name
    ("iqn.2026-11.org.virtyard:host", None, "iqn.2026-11.org.virtyard:host"),
    ("iqn.2026-11.org.virtyard:host", "iqn.2026-11.org.virtyard:vm", "iqn.2026-11.org.virtyard:vm"),
    (SYSTEM_NAME, "iqn.2026-11.org.virtyard:vm", "iqn.2026-11.org.virtyard:vm"),
])
def test_the_name_presented_picks_the_iface(tmp_path: Path, configured: str | None,
                                            own: str | None, used: str | None) -> None:
    host = Host(tmp_path, split(SPEC, SESSION1)[1], initiator_name=configured)
    iface = ki.iface_name(used)
    assert (iface == "default") == (used is None)
    host.script.expect(node("192.0.2.10:3260,1", "--op=delete", iface=iface))
    host.initiator.logout(Connection("c1", C1.portal, IQN, initiator_name=own), timeout=10)
    host.script.done()


def test_read_initiator_name(tmp_path: Path) -> None:
    path = tmp_path / "initiatorname.iscsi"
    path.write_text(RECORDED["initiatorname_file"]["stdout"])
    assert ki.read_initiator_name(path) == SYSTEM_NAME
    path.write_text("## InitiatorName=commented\nInitiatorName=\n")
    assert ki.read_initiator_name(path) is None
    assert ki.read_initiator_name(tmp_path / "missing") is None


def test_logout_falls_back_to_the_session_id(host: Host) -> None:
    # no node record (deleted by hand) but the session lives: iscsiadm cannot match the node
    portal = "192.0.2.10:3260,1"
    host.script.expect(node(portal, "-u"), result(RECORDED["node_logout_no_session"]))
    host.script.expect(["iscsiadm", "-m", "session", "-r", "1", "-u"])
    host.script.expect(node(portal, "--op=delete"), result(RECORDED["node_delete_missing"]))
    host.initiator.logout(C1, timeout=10)
    host.script.done()


def test_logout_failure_is_reported(host: Host) -> None:
    portal = "192.0.2.10:3260,1"
    host.script.expect(node(portal, "-u"), CommandResult(10, "", "iscsiadm: Could not logout "
                                                                 "of all requested sessions\n"))
    with pytest.raises(InitiatorError, match="ISCSI_ERR_LOGOUT"):
        host.initiator.logout(C1, timeout=10)
    host.script.done()


# --- devices -----------------------------------------------------------------------------------

DMSETUP = ["dmsetup", "status", "--target", "multipath"]
# In the format of the recorded vdsm/RHEL outputs, for the fixture's maps: sdd (8:48) failed.
DM_STATUS = (f"{W1}: 0 131072 multipath 2 0 0 0 2 1 A 0 1 0 8:16 A 0 E 0 1 0 8:48 F 3 \n"
             f"{W2}: 0 65536 multipath 2 0 0 0 1 1 A 0 2 0 8:32 A 0 8:64 A 0 \n"
             "mpathb: 0 32768 multipath 2 0 0 0 1 1 A 0 1 0 8:80 A 0 \n"
             "35000c500a1b2c3d4: 0 488397168 multipath 2 0 0 0 1 1 A 0 1 0 8:0 A 0 \n")


def scsi_id(host: Host, dm: str) -> list[str]:
    return [SCSI_ID, "--page=0x80", "--whitelisted", "--export", "--replace-whitespace",
            f"--device={host.dev / dm}"]


def test_devices_through_two_portals(host: Host) -> None:
    host.script.expect(DMSETUP, CommandResult(0, DM_STATUS, ""))
    host.script.expect(scsi_id(host, "dm-1"), CommandResult(0, fixture("scsi_id_sata_disk.txt"),
                                                            ""))
    host.script.expect(scsi_id(host, "dm-2"), result(RECORDED["scsi_id_virtio_disk"]))
    devices = host.initiator.devices([C1, C2], guids=None, read_head=0, timeout=30)
    assert devices == [
        Device(guid=W1, vendor_id="IET", product_id="VIRTUAL-DISK", fwrev="0001",
               serial="SATA_WDC_WD2502ABYS-1_WD-WMAT16865419", capacity=64 << 20,
               logical_block_size=512, physical_block_size=512, discard_max_bytes=0,
               paths=[PathInfo(C1, 1, "active", "sdb"), PathInfo(C2, 1, "failed", "sdd")]),
        Device(guid=W2, vendor_id="IET", product_id="VIRTUAL-DISK", fwrev="0001", serial="",
               capacity=32 << 20, logical_block_size=512, physical_block_size=512,
               discard_max_bytes=1073741824,
               paths=[PathInfo(C1, 2, "active", "sdc"), PathInfo(C2, 2, "active", "sde")]),
    ]  # mpathb (another target) and the local SATA map are not listed
    host.script.done()


def test_devices_filtered_by_guid_and_connection(host: Host) -> None:
    host.script.expect(DMSETUP, CommandResult(0, DM_STATUS, ""))
    host.script.expect(scsi_id(host, "dm-2"), result(RECORDED["scsi_id_loop_device"]))
    [device] = host.initiator.devices([C2], guids=frozenset({W2, "3600nosuch"}), read_head=0,
                                      timeout=30)
    assert device.guid == W2
    assert device.paths == [PathInfo(C2, 2, "active", "sde")]
    host.script.done()


def test_devices_by_host_name(tmp_path: Path) -> None:
    def resolver(host: str) -> frozenset[str]:
        return frozenset({host, "192.0.2.12"}) if host == "other.example" else frozenset({host})
    host = Host(tmp_path, resolver=resolver)
    other = Connection("c3", Portal("other.example", 3260), "iqn.2026-11.org.virtyard.lab:other")
    host.script.expect(DMSETUP, CommandResult(0, DM_STATUS, ""))
    host.script.expect(scsi_id(host, "dm-4"), result(RECORDED["scsi_id_virtio_disk"]))
    [device] = host.initiator.devices([other], guids=None, read_head=0, timeout=30)
    assert (device.guid, device.capacity) == (W3, 16 << 20)
    assert device.paths == [PathInfo(other, 1, "active", "sdf")]
    host.script.done()


def test_devices_without_connections_runs_nothing(host: Host) -> None:
    assert host.initiator.devices([], guids=None, read_head=512, timeout=30) == []
    assert host.script.calls == []


def test_devices_without_dm_status_reports_paths_failed(
        host: Host, caplog: pytest.LogCaptureFixture) -> None:
    host.script.expect(*_recorded("dmsetup_status_multipath"))
    host.script.expect(scsi_id(host, "dm-1"), result(RECORDED["scsi_id_virtio_disk"]))
    with caplog.at_level(logging.WARNING):
        [device] = host.initiator.devices([C1], guids=frozenset({W1}), read_head=0, timeout=30)
    assert [p.state for p in device.paths] == ["failed"]
    assert "device-mapper" in caplog.text
    host.script.done()


def test_devices_skip_non_disk_luns(host: Host) -> None:
    for sd in ("sdb", "sdd"):  # make LUN 1 report a CD-ROM (SCSI type 5)
        (host.root / "sys" / "block" / sd / "device" / "type").write_text("5\n")
    host.script.expect(DMSETUP, CommandResult(0, DM_STATUS, ""))
    host.script.expect(scsi_id(host, "dm-2"), result(RECORDED["scsi_id_virtio_disk"]))
    devices = host.initiator.devices([C1, C2], guids=None, read_head=0, timeout=30)
    assert [d.guid for d in devices] == [W2]
    host.script.done()


def test_devices_read_the_head(host: Host) -> None:
    label = b"\0" * 512 + b"LABELONE" + bytes(range(200))
    (host.dev / "mapper").mkdir()
    (host.dev / "mapper" / W1).write_bytes(label + b"\0" * 8192)
    (host.dev / "dm-2").write_bytes(b"B" * 100)  # no /dev/mapper name: the dm node is read
    host.script.expect(DMSETUP, CommandResult(0, DM_STATUS, ""))
    host.script.expect(scsi_id(host, "dm-1"), result(RECORDED["scsi_id_virtio_disk"]))
    host.script.expect(scsi_id(host, "dm-2"), result(RECORDED["scsi_id_virtio_disk"]))
    devices = host.initiator.devices([C1], guids=None, read_head=1024, timeout=30)
    assert devices[0].head == (label + b"\0" * 1024)[:1024]
    assert devices[1].head == b"B" * 100  # shorter than asked: end of device
    host.script.done()


def test_devices_unreadable_head_is_none(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    host.script.expect(DMSETUP, CommandResult(0, DM_STATUS, ""))
    host.script.expect(scsi_id(host, "dm-1"), result(RECORDED["scsi_id_virtio_disk"]))
    with caplog.at_level(logging.WARNING):
        [device] = host.initiator.devices([C1], guids=frozenset({W1}), read_head=512,
                                          timeout=30)
    assert device.head is None
    assert "cannot read the first bytes" in caplog.text
    host.script.done()


def test_devices_spent_budget_skips_serials(host: Host) -> None:
    def slow() -> None:
        host.clock.now += 31
    host.script.expect(DMSETUP, CommandResult(0, DM_STATUS, ""), then=slow)
    devices = host.initiator.devices([C1], guids=None, read_head=0, timeout=30)
    assert [(d.guid, d.serial) for d in devices] == [(W1, ""), (W2, "")]
    host.script.done()  # no scsi_id was run


# --- a dead target: failed sessions and failed paths --------------------------------------------

# Session 2 (192.0.2.11, paths sdd 8:48 and sde 8:64) lost its target: multipath failed them.
DM_STATUS_C2_DOWN = DM_STATUS.replace("8:64 A", "8:64 F")


def fail_session(host: Host, sid: int, state: str = "FAILED") -> None:
    (host.root / "sys" / "class" / "iscsi_session" / f"session{sid}" / "state").write_text(
        f"{state}\n")


def test_scan_reports_a_failed_session_and_fails_its_paths(host: Host) -> None:
    fail_session(host, 2)
    host.script.expect(DMSETUP, CommandResult(0, DM_STATUS_C2_DOWN, ""))
    host.script.expect(scsi_id(host, "dm-1"), CommandResult(0, fixture("scsi_id_sata_disk.txt"),
                                                            ""))
    host.script.expect(scsi_id(host, "dm-2"), result(RECORDED["scsi_id_virtio_disk"]))
    scan = host.initiator.scan([C1, C2], guids=None, read_head=0, timeout=30)
    [down] = scan.failures
    assert (down.connection, down.kind) == (C2, "session")
    assert "session 2 is FAILED" in down.detail and IQN in down.detail
    assert [d.guid for d in scan.devices] == [W1, W2]
    assert scan.devices[0].paths == [PathInfo(C1, 1, "active", "sdb"),
                                     PathInfo(C2, 1, "failed", "sdd", down)]
    assert scan.devices[1].paths == [PathInfo(C1, 2, "active", "sdc"),
                                     PathInfo(C2, 2, "failed", "sde", down)]
    assert scan.devices[0].serial == "SATA_WDC_WD2502ABYS-1_WD-WMAT16865419"  # still asked
    host.script.done()


def test_scan_fails_the_paths_of_a_failed_session_whatever_multipath_says(host: Host) -> None:
    fail_session(host, 2)  # multipathd's checker has not noticed yet: dm still says A
    host.script.expect(DMSETUP, CommandResult(0, DM_STATUS, ""))
    host.script.expect(scsi_id(host, "dm-2"), result(RECORDED["scsi_id_virtio_disk"]))
    [device] = host.initiator.devices([C2], guids=frozenset({W2}), read_head=0, timeout=30)
    assert [(p.state, p.failure is not None) for p in device.paths] == [("failed", True)]
    host.script.done()


@pytest.mark.parametrize("state", ["FAILED", "LOGGED_IN"])
def test_scan_does_not_read_a_map_whose_paths_all_failed(host: Host, state: str) -> None:
    """Its I/O would queue (queue_if_no_path) until a path comes back: no scsi_id, no head.
    Whether the session knows it yet (FAILED) or only multipath does (LOGGED_IN)."""
    fail_session(host, 2, state)
    (host.dev / "mapper").mkdir()
    (host.dev / "mapper" / W1).write_bytes(b"L" * 4096)
    (host.dev / "mapper" / W2).write_bytes(b"L" * 4096)
    all_down = DM_STATUS_C2_DOWN.replace("8:16 A", "8:16 F").replace("8:32 A", "8:32 F")
    host.script.expect(DMSETUP, CommandResult(0, all_down, ""))  # and nothing else
    scan = host.initiator.scan([C2], guids=None, read_head=512, timeout=30)
    assert [(d.guid, d.serial, d.head) for d in scan.devices] == [(W1, "", None), (W2, "", None)]
    down = scan.failures[0] if scan.failures else None
    assert (down is not None) == (state == "FAILED")
    assert scan.devices[0].paths == [PathInfo(C2, 1, "failed", "sdd", down)]
    assert scan.devices[0].capacity == 64 << 20  # what sysfs knows is still reported
    host.script.done()


def test_scan_reports_a_connection_without_a_session(host: Host) -> None:
    gone = Connection("c9", Portal("192.0.2.99", 3260), IQN)
    host.script.expect(DMSETUP, CommandResult(0, DM_STATUS, ""))
    host.script.expect(scsi_id(host, "dm-1"), result(RECORDED["scsi_id_virtio_disk"]))
    host.script.expect(scsi_id(host, "dm-2"), result(RECORDED["scsi_id_virtio_disk"]))
    scan = host.initiator.scan([C1, gone], guids=None, read_head=0, timeout=30)
    assert [d.guid for d in scan.devices] == [W1, W2]
    assert all(p.connection == C1 and p.failure is None
               for d in scan.devices for p in d.paths)
    assert [(f.connection, f.kind) for f in scan.failures] == [(gone, "session")]
    assert "no iSCSI session" in scan.failures[0].detail
    host.script.done()


# --- device path and reads ---------------------------------------------------------------------

def test_device_path(host: Host) -> None:
    (host.dev / "mapper").mkdir()
    (host.dev / "mapper" / W1).touch()
    (host.dev / "mapper" / "mpathb").touch()  # friendly name of W3
    assert host.initiator.device_path(W1) == str(host.dev / "mapper" / W1)
    assert host.initiator.device_path(W3) == str(host.dev / "mapper" / "mpathb")
    assert host.initiator.device_path(W2) is None  # mapped, but no device node
    assert host.initiator.device_path("3600nosuch") is None


def _device(guid: str) -> Device:
    return Device(guid, "IET", "VIRTUAL-DISK", "0001", "", 0, 512, 512, 0)


def test_read(host: Host) -> None:
    data = os.urandom(20000)
    (host.dev / "mapper").mkdir()
    (host.dev / "mapper" / W1).write_bytes(data)
    assert host.initiator.read(_device(W1), 4097, 5000, timeout=10) == data[4097:9097]
    with pytest.raises(InitiatorError) as info:
        host.initiator.read(_device(W2), 0, 512, timeout=10)
    assert info.value.kind == "not-found"


def test_read_errors_and_hangs_are_bounded(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    (host.dev / "mapper").mkdir()
    (host.dev / "mapper" / W1).mkdir()  # reading a directory fails with EISDIR
    with pytest.raises(InitiatorError) as info:
        host.initiator.read(_device(W1), 0, 512, timeout=10)
    assert info.value.kind == "io"
    release = threading.Event()

    def hang(path: object, offset: int, length: int) -> bytes:
        release.wait(30)  # a map queueing I/O with no path left
        return b""
    monkeypatch.setattr(ki, "read_at", hang)
    try:
        with pytest.raises(InitiatorError) as hung:
            host.initiator.read(_device(W1), 0, 512, timeout=0.2)
        assert hung.value.kind == "timeout"
    finally:
        release.set()


def test_read_at_uses_direct_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(10000)
    path = tmp_path / "lun"
    path.write_bytes(data)
    flags: list[int] = []
    real_open = os.open

    def spy(file: Any, flag: int, *args: Any) -> int:
        flags.append(flag)
        return real_open(file, flag, *args)
    monkeypatch.setattr(os, "open", spy)
    assert ki.read_at(path, 0, 512) == data[:512]
    assert ki.read_at(path, 4000, 5000) == data[4000:9000]  # straddles two aligned blocks
    assert ki.read_at(path, 9990, 100) == data[9990:]  # end of file
    assert ki.read_at(path, 20000, 10) == b""
    assert ki.read_head(path, 3) == data[:3]
    assert ki.read_at(path, 5, 0) == b""
    assert flags and all(f & os.O_DIRECT for f in flags)
    with pytest.raises(ValueError, match="negative"):
        ki.read_at(path, -1, 10)


def test_read_at_falls_back_without_direct_io(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(6000)
    path = tmp_path / "lun"
    path.write_bytes(data)
    real_open = os.open

    def no_direct(file: Any, flag: int, *args: Any) -> int:
        if flag & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # tmpfs, some file systems
        return real_open(file, flag, *args)
    monkeypatch.setattr(os, "open", no_direct)
    assert ki.read_at(path, 100, 5000) == data[100:5100]
    assert ki.read_at(path, 5990, 100) == data[5990:]
    monkeypatch.setattr(os, "open", real_open)

    def no_direct_read(fd: int, buffers: Any, offset: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")  # open accepted, read refused
    monkeypatch.setattr(os, "preadv", no_direct_read)
    assert ki.read_at(path, 7, 9) == data[7:16]
    with pytest.raises(FileNotFoundError):
        ki.read_at(tmp_path / "missing", 0, 10)


def test_read_head_from_a_real_block_device(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    backing = tmp_path / "backing"
    backing.write_bytes(data)
    loop = subprocess.run(["losetup", "-f", "--show", "-r", str(backing)], capture_output=True,
                          text=True, check=False)
    assert loop.returncode == 0, loop.stderr
    device = loop.stdout.strip()
    try:
        assert ki.read_head(device, 4096) == data[:4096]
        assert ki.read_at(device, 12345, 777) == data[12345:13122]
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


# --- helpers -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "normal"), [
    ("192.0.2.10", "192.0.2.10"),
    ("[FE80:0::1]", "fe80::1"),
    ("fe80::1%eth0", "fe80::1%eth0"),
    ("SAN.Example", "san.example"),
])
def test_normalize_address(text: str, normal: str) -> None:
    assert ki.normalize_address(text) == normal


def test_resolve_addresses() -> None:
    assert ki.resolve_addresses("192.0.2.10") == {"192.0.2.10"}
    assert ki.resolve_addresses("[::1]") == {"::1"}
    assert "127.0.0.1" in ki.resolve_addresses("localhost")
    assert ki.resolve_addresses("no-such-host.invalid") == {"no-such-host.invalid"}


def test_iface_name() -> None:
    assert ki.iface_name(None) == ki.iface_name("") == "default"
    assert ki.iface_name("iqn.a:1") != ki.iface_name("iqn.a:2")


def test_parse_errors_become_initiator_errors(host: Host) -> None:
    db = [*DISCOVERYDB, "192.0.2.10:3260"]
    host.script.expect([*db, "--op=new"])
    host.script.expect([*db, "--discover"], CommandResult(0, "garbage\n", ""))
    host.script.expect([*db, "--op=delete"])
    with pytest.raises(InitiatorError) as info:
        host.initiator.discover(Portal("192.0.2.10"), None, timeout=10)
    assert info.value.kind == "unexpected-output"
    host.script.done()


# --- the real tools ----------------------------------------------------------------------------

def test_real_discovery_without_iscsi_tcp(tmp_path: Path) -> None:
    """Real iscsiadm against a real tgtd on this kind of machine: discovery fails as
    'unavailable' and no discovery record is left behind."""
    port = next(p for p in range(35470, 35500) if ports.port_is_free(p))
    control = next(p for p in range(3570, 3600) if ports.port_is_free(p))
    server = TargetServer(tmp_path / "tgt", port, control)
    server.start()
    try:
        server.create_target("kernel-initiator-test", [16 << 20])
        with pytest.raises(InitiatorError) as info:
            KernelInitiator().discover(Portal("127.0.0.1", port), None, timeout=30)
        assert info.value.kind == "unavailable"
        left = subprocess.run(["iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p",
                               f"127.0.0.1:{port}"], capture_output=True, text=True, check=False)
        assert left.returncode != 0 and "not found" in left.stderr
    finally:
        server.stop()
