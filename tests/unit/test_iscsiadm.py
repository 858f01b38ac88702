"""The iscsiadm wrapper against real recorded output.

Fixtures (``tests/data/kernel``):

* ``recorded_here.json`` — recorded on this lab machine (open-iscsi 2.1.8, Debian 12) against
  the lab's tgtd. The machine has no ``iscsi_tcp`` module and no device-mapper, so
  discovery, login and everything about sessions could only record their failures.
* ``*.txt`` and ``public_failures.json`` — real output recorded by others and published
  (vdsm's test data, open-iscsi / vdsm / multipath-tools / CSI driver issues); each file's
  ``## `` header names its source.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from virtyard.host.storage import iscsiadm as ia
from virtyard.host.storage.initiator import Chap, DiscoveredTarget, Portal, Secret
from virtyard.host.storage.iscsiadm import CommandResult, ExitCode, Iscsiadm
from virtyard.host.storage.libiscsi import ErrorKind

DATA = Path(__file__).resolve().parent.parent / "data" / "kernel"
RECORDED: dict[str, dict[str, Any]] = json.loads(
    (DATA / "recorded_here.json").read_text())["cases"]
PUBLIC: dict[str, dict[str, Any]] = json.loads(
    (DATA / "public_failures.json").read_text())["cases"]
LAB_PORTAL = Portal("127.0.0.1", 35417)
LAB_IQN = "iqn.2026-11.org.virtyard.lab:rec"


def fixture(name: str) -> str:
    """A text fixture without its ``## `` source header."""
    text = (DATA / name).read_text()
    header, sep, body = text.partition("## ---\n")
    assert sep and all(line.startswith("##") for line in header.splitlines()), name
    return body


def result(case: dict[str, Any]) -> CommandResult:
    return CommandResult(case["returncode"], case["stdout"], case["stderr"])


class Script:
    """A runner that checks each command against the expected argv and answers with a result."""

    def __init__(self, *steps: tuple[list[str], CommandResult | Exception]) -> None:
        self.steps = list(steps)
        self.calls: list[tuple[list[str], float, tuple[str, ...]]] = []

    def __call__(self, argv: Sequence[str], *, timeout: float,
                 secrets: tuple[str, ...] = ()) -> CommandResult:
        self.calls.append((list(argv), timeout, secrets))
        assert self.steps, f"unexpected command {list(argv)}"
        expected, answer = self.steps.pop(0)
        assert list(argv) == expected
        if isinstance(answer, Exception):
            raise answer
        return answer

    def done(self) -> None:
        assert not self.steps, f"commands not run: {[s[0] for s in self.steps]}"


def recorded_step(name: str) -> tuple[list[str], CommandResult]:
    case = RECORDED[name]
    return case["argv"], result(case)


OK = CommandResult(0, "", "")


# --- exit codes --------------------------------------------------------------------------------

def test_exit_codes_are_open_iscsis() -> None:
    # include/iscsi_err.h: 0..31, in order; the ones callers depend on, by value.
    assert [c.value for c in ExitCode] == list(range(32))
    by_value = {c.name: c.value for c in ExitCode}
    assert by_value["ISCSI_ERR_TRANS"] == 4
    assert by_value["ISCSI_ERR_TRANS_TIMEOUT"] == 8
    assert by_value["ISCSI_ERR_SESS_EXISTS"] == 15
    assert by_value["ISCSI_ERR_ISCSID_NOTCONN"] == 20
    assert by_value["ISCSI_ERR_NO_OBJS_FOUND"] == 21
    assert by_value["ISCSI_ERR_LOGIN_AUTH_FAILED"] == 24
    assert ia.code_name(24) == "ISCSI_ERR_LOGIN_AUTH_FAILED"
    assert ia.code_name(99) == "exit 99"


# --- parsers -----------------------------------------------------------------------------------

def test_parse_iface_list_recorded_here() -> None:
    ifaces = ia.parse_iface_list(RECORDED["iface_list_with_custom"]["stdout"])
    assert ifaces == [ia.Iface("vy-rec", "tcp"), ia.Iface("default", "tcp"),
                      ia.Iface("iser", "iser")]


def test_parse_iface_list_with_bound_network_devices() -> None:
    ifaces = ia.parse_iface_list(fixture("iface_list_vdsm.txt"))
    assert [i.name for i in ifaces] == ["default", "iser", "eth1", "eth2"]
    assert ifaces[2] == ia.Iface("eth1", "tcp", None, None, "SAN1", None)
    assert ifaces[3].net_ifacename == "eth2"


def test_parse_iface_list_rejects_garbage() -> None:
    with pytest.raises(ia.IscsiadmParseError, match="iface"):
        ia.parse_iface_list("default\n")
    with pytest.raises(ia.IscsiadmParseError):
        ia.parse_iface_list("x tcp,1,2,3,4,5,6\n")


def test_parse_discovery_3par_tpgt() -> None:
    assert ia.parse_discovery(fixture("discovery_3par.txt")) == [
        DiscoveredTarget(Portal("192.168.68.203", 3260), 1024,
                         "iqn.2000-05.com.3pardata:20210002ac01db31")]


def test_parse_discovery_ipv6_portal_is_unbracketed() -> None:
    found = ia.parse_discovery(fixture("discovery_synology_ipv6.txt"))
    assert [t.portal for t in found] == [Portal("192.168.20.240", 3260),
                                         Portal("fe80::211:32ff:fe8a:51d9", 3260)]
    assert [t.portal.is_ipv6 for t in found] == [False, True]
    assert {t.iqn for t in found} == {
        "iqn.2000-01.com.synology:synology-0.Target-1.76fd697e949"}
    # oVirt's fullTargets string puts the brackets back.
    assert found[1].full() == ("[fe80::211:32ff:fe8a:51d9]:3260,1 "
                               "iqn.2000-01.com.synology:synology-0.Target-1.76fd697e949")


def test_parse_discovery_empty_and_malformed() -> None:
    assert ia.parse_discovery("") == []
    with pytest.raises(ia.IscsiadmParseError, match="unexpected discovery line"):
        ia.parse_discovery("iscsiadm: No portals found\n")
    with pytest.raises(ia.IscsiadmParseError, match="not a portal"):
        ia.parse_discovery("10.0.0.1,1 iqn.x\n")
    with pytest.raises(ia.IscsiadmParseError, match="not a portal"):
        ia.parse_discovery("10.0.0.1:port,1 iqn.x\n")


@pytest.mark.parametrize(("text", "portal", "tpgt"), [
    ("10.1.53.160:3260,1", Portal("10.1.53.160", 3260), 1),
    ("[::1]:35417,1", Portal("::1", 35417), 1),
    ("truenas.[REDACTED]:3260,1", Portal("truenas.[REDACTED]", 3260), 1),
    ("::ffff:10.0.0.1:3260,2", Portal("::ffff:10.0.0.1", 3260), 2),  # printed unbracketed
    ("127.0.0.1:35417,-1", Portal("127.0.0.1", 35417), -1),
])
def test_parse_portal(text: str, portal: Portal, tpgt: int) -> None:
    assert ia.parse_portal(text) == (portal, tpgt)


def test_parse_session_list_hostname_portals() -> None:
    sessions = ia.parse_session_list(fixture("session_list_truenas.txt"))
    assert [s.sid for s in sessions] == [1, 2, 3]
    first = sessions[0]
    assert first.transport == "tcp"
    assert first.portal == Portal("truenas.[REDACTED]", 3260)
    assert first.tpgt == 1
    assert first.iqn == ("iqn.2005-10.org.freenas.ctl:"
                         "csi-pvc-1224c988-4198-47cb-85a1-66d4755c94e9-main-k8s")
    assert first.flash is False


def test_parse_session_list_without_flash_suffix_and_garbage() -> None:
    # The line format of older open-iscsi (no "(non-flash)"), as in vdsm PR #259.
    sessions = ia.parse_session_list("tcp: [27] 192.168.122.34:3260,1 iqn.2003-01.org.alpine.01\n")
    assert sessions == [ia.SessionInfo("tcp", 27, Portal("192.168.122.34", 3260), 1,
                                       "iqn.2003-01.org.alpine.01", None)]
    with pytest.raises(ia.IscsiadmParseError, match="session line"):
        ia.parse_session_list("iscsiadm: No active sessions.\n")


def test_parse_session_details_flatcar() -> None:
    [s] = ia.parse_session_details(fixture("session_details_flatcar.txt"))
    assert s.iqn == "iqn.1992-04.com.emc:cx.apm00191923511.a4"  # "(non-flash)" dropped
    assert s.current_portal == s.persistent_portal == Portal("10.1.53.160", 3260)
    assert s.tpgt == 1
    assert s.sid == 1
    assert s.iface_name == "default"
    assert s.iface_transport == "tcp"
    assert s.initiator_name == ("iqn.2016-04.com.flatcar.iscsi:"
                                "05c4437a5af8466eb19bbe2c1bad2903")
    assert s.iface_ipaddress == "172.16.160.122"
    assert s.connection_state == "LOGGED IN"
    assert s.session_state == "LOGGED_IN"
    assert s.internal_state == "NO CHANGE"
    assert (s.host_number, s.host_state) == (7, "running")
    assert s.devices == [ia.AttachedDevice(7, 0, 0, 0, "sdb", "running")]
    assert "********" not in repr(s)  # CHAP lines are not kept


def test_parse_session_details_3par_without_devices() -> None:
    [s] = ia.parse_session_details(fixture("session_details_3par.txt"))
    assert (s.sid, s.tpgt) == (10, 1024)
    assert s.persistent_portal == Portal("10.37.120.10", 3260)
    assert s.iface_ipaddress == "10.37.131.151"
    assert s.host_number is None
    assert s.devices == []


def test_parse_session_details_sessions_share_target_and_portal_lines() -> None:
    """Assembled from the recorded Flatcar block: open-iscsi prints "Target:" once per target
    and the portal lines once per portal (usr/session_info.c), so a second session to the same
    target and portal starts with a blank line and its "Interface:" header. The extra LUN lines
    repeat the recorded ones with other numbers; LUN 0 without "Attached scsi disk" is what an
    array controller (no block device) looks like."""
    flatcar = fixture("session_details_flatcar.txt")
    block = flatcar[flatcar.index("\t\t**********\n\t\tInterface:"):]
    second = (block.replace("SID: 1\n", "SID: 2\n")
              .replace("Host Number: 7", "Host Number: 8")
              .replace("\t\tscsi7 Channel 00 Id 0 Lun: 0\n\t\t\tAttached scsi disk sdb",
                       "\t\tscsi8 Channel 00 Id 0 Lun: 0\n"
                       "\t\tscsi8 Channel 00 Id 0 Lun: 1\n\t\t\tAttached scsi disk sdc"))
    sessions = ia.parse_session_details(flatcar + "\n" + second)
    assert [s.sid for s in sessions] == [1, 2]
    assert {s.iqn for s in sessions} == {"iqn.1992-04.com.emc:cx.apm00191923511.a4"}
    assert sessions[1].persistent_portal == Portal("10.1.53.160", 3260)
    assert sessions[0].devices == [ia.AttachedDevice(7, 0, 0, 0, "sdb", "running")]
    assert sessions[1].devices == [ia.AttachedDevice(8, 0, 0, 0),
                                   ia.AttachedDevice(8, 0, 0, 1, "sdc", "running")]


def test_parse_session_details_rejects_orphan_lines() -> None:
    with pytest.raises(ia.IscsiadmParseError, match="before its Target"):
        ia.parse_session_details("\t\t**********\n\t\tInterface:\n")
    with pytest.raises(ia.IscsiadmParseError, match="before its SCSI device"):
        ia.parse_session_details("Target: iqn.x\n\tCurrent Portal: 1.2.3.4:3260,1\n"
                                 "\t\tSID: 3\n\t\t\tAttached scsi disk sdb\t\tState: running\n")


def test_error_detail_keeps_iscsiadms_words_only() -> None:
    detail = ia.error_detail(RECORDED["node_login"]["stderr"])
    assert "initiator reported error (20 - could not connect to iscsid)" in detail
    assert "System has not been booted with systemd" not in detail
    detail = ia.error_detail(RECORDED["discoverydb_discover"]["stderr"])
    assert "Could not load transport tcp.Dropping interface default." in detail
    assert "libkmod" not in detail
    assert ia.error_detail("", "") == "no error output"
    assert ia.error_detail("plain failure\n") == "plain failure"


# --- classification ----------------------------------------------------------------------------

@pytest.mark.parametrize(("case", "error", "kind"), [
    # recorded here: no iscsi_tcp makes discovery fail with NO_OBJS_FOUND, not TRANS_NOT_FOUND
    ("discoverydb_discover", ia.IscsiTransportUnavailableError, ErrorKind.UNAVAILABLE),
    ("iface_update_initiatorname", ia.IscsiTransportUnavailableError, ErrorKind.UNAVAILABLE),
    ("node_login", ia.IscsidUnavailableError, ErrorKind.UNAVAILABLE),
    ("node_update_bad_key", ia.IscsiInvalidArgumentError, ErrorKind.SESSION),
    ("node_new_unknown_iface", ia.IscsiInterfaceNotFoundError, ErrorKind.SESSION),
    ("discoverydb_update_missing_record", ia.IscsiDatabaseError, ErrorKind.SESSION),
    ("session_rescan_sid", ia.IscsiNotFoundError, ErrorKind.SESSION),
    ("node_login_no_record", ia.IscsiNotFoundError, ErrorKind.SESSION),
])
def test_classify_recorded_here(case: str, error: type[ia.IscsiadmError],
                                kind: ErrorKind) -> None:
    rec = RECORDED[case]
    exc = ia.classify(rec["argv"], rec["returncode"], rec["stderr"], rec["stdout"])
    assert type(exc) is error
    assert exc.kind is kind
    assert exc.returncode == rec["returncode"]
    assert ia.code_name(rec["returncode"]) in str(exc)


@pytest.mark.parametrize(("case", "error", "kind"), [
    ("login_auth_failed", ia.IscsiAuthenticationError, ErrorKind.AUTHENTICATION),
    ("login_session_exists", ia.IscsiSessionExistsError, ErrorKind.SESSION),
    ("login_fatal", ia.IscsiLoginError, ErrorKind.LOGIN),
])
def test_classify_published_login_failures(case: str, error: type[ia.IscsiadmError],
                                           kind: ErrorKind) -> None:
    rec = PUBLIC[case]
    exc = ia.classify(rec["argv"], rec["returncode"], rec["stderr"], rec["stdout"])
    assert type(exc) is error
    assert exc.kind is kind


@pytest.mark.parametrize(("code", "error", "kind"), [
    (4, ia.IscsiConnectionError, ErrorKind.CONNECT),  # "encountered connection failure"
    (8, ia.IscsiConnectionError, ErrorKind.CONNECT),  # "connection timed out"
    (11, ia.IscsiConnectionError, ErrorKind.CONNECT),  # "iSCSI PDU timed out"
    (5, ia.IscsiLoginError, ErrorKind.LOGIN),
    (12, ia.IscsiTransportUnavailableError, ErrorKind.UNAVAILABLE),
    (18, ia.IscsidUnavailableError, ErrorKind.UNAVAILABLE),
    (2, ia.IscsiNotFoundError, ErrorKind.SESSION),
    (13, ia.IscsiadmError, ErrorKind.SESSION),  # access denied: nothing more specific
])
def test_classify_by_exit_code(code: int, error: type[ia.IscsiadmError],
                               kind: ErrorKind) -> None:
    # The line format iscsiadm prints for every reported error (usr/iscsi_err.c).
    stderr = f"iscsiadm: initiator reported error ({code} - {ia.code_name(code)})\n"
    exc = ia.classify(["iscsiadm", "-m", "node", "-l"], code, stderr)
    assert type(exc) is error
    assert exc.kind is kind
    assert isinstance(exc, ia.IscsiadmError)


# --- commands ----------------------------------------------------------------------------------

DISCOVERYDB = ["iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-I", "default", "-p",
               "127.0.0.1:35417"]
NODE = ["iscsiadm", "-m", "node", "-T", LAB_IQN, "-I", "default", "-p", "127.0.0.1:35417,1"]


def test_discoverydb_new_discover_delete_recorded_here() -> None:
    run = Script(recorded_step("discoverydb_new"), recorded_step("discoverydb_discover"),
                 recorded_step("discoverydb_delete"), recorded_step("discoverydb_delete_missing"))
    adm = Iscsiadm(run)
    adm.discoverydb_new(LAB_PORTAL, timeout=7)  # rc 0 despite the iscsid noise on stderr
    with pytest.raises(ia.IscsiTransportUnavailableError) as info:
        adm.discoverydb_discover(LAB_PORTAL, timeout=7)
    assert "ISCSI_ERR_NO_OBJS_FOUND" in str(info.value)
    assert "Could not load transport tcp" in str(info.value)
    assert adm.discoverydb_delete(LAB_PORTAL, timeout=7) is True
    assert adm.discoverydb_delete(LAB_PORTAL, timeout=7) is False
    assert [c[1] for c in run.calls] == [7, 7, 7, 7]  # every call bounded by the timeout
    run.done()


def test_discoverydb_discover_parses_targets_and_other_delete_errors_raise() -> None:
    run = Script(([*DISCOVERYDB, "--discover"],
                  CommandResult(0, fixture("discovery_3par.txt"), "")),
                 ([*DISCOVERYDB, "--op=delete"],
                  CommandResult(13, "", "iscsiadm: daemon access denied\n")))
    adm = Iscsiadm(run)
    [target] = adm.discoverydb_discover(LAB_PORTAL)
    assert (target.tpgt, target.iqn) == (1024, "iqn.2000-05.com.3pardata:20210002ac01db31")
    with pytest.raises(ia.IscsiadmError, match="daemon access denied"):
        adm.discoverydb_delete(LAB_PORTAL)
    run.done()


def test_chap_password_never_shows(caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-chap-pass"
    prefix = [*DISCOVERYDB, "-n"]
    echo = CommandResult(24, "", f"iscsiadm: bad password {secret}\n"
                                 "iscsiadm: initiator reported error (24 - x)\n")
    run = Script(
        ([*prefix, "discovery.sendtargets.auth.authmethod", "-v", "CHAP", "--op=update"], OK),
        ([*prefix, "discovery.sendtargets.auth.username", "-v", "alice", "--op=update"], OK),
        ([*prefix, "discovery.sendtargets.auth.password", "-v", secret, "--op=update"], echo))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ia.IscsiAuthenticationError) as info:
        Iscsiadm(run).discoverydb_set_chap(LAB_PORTAL, Chap("alice", Secret(secret)))
    exc = info.value
    # only the password update was marked secret, and the runner was told so
    assert [c[2] for c in run.calls] == [(), (), (secret,)]
    for text in (str(exc), repr(exc), " ".join(exc.argv), exc.stderr, exc.detail,
                 caplog.text):
        assert secret not in text
    assert "-v ***" in " ".join(exc.argv)
    assert "bad password ***" in exc.stderr
    assert "discovery.sendtargets.auth.password" in caplog.text  # the command is logged
    run.done()


def test_node_commands_recorded_here() -> None:
    run = Script(recorded_step("node_new"), recorded_step("node_update"),
                 recorded_step("node_logout_no_session"), recorded_step("node_delete"),
                 recorded_step("node_delete_missing"))
    adm = Iscsiadm(run)
    adm.node_new(LAB_PORTAL, LAB_IQN, 1)
    adm.node_update(LAB_PORTAL, LAB_IQN, 1, "node.startup", "manual")
    assert adm.node_logout(LAB_PORTAL, LAB_IQN, 1) is False  # no session: not an error
    assert adm.node_delete(LAB_PORTAL, LAB_IQN, 1) is True
    assert adm.node_delete(LAB_PORTAL, LAB_IQN, 1) is False
    run.done()


def test_node_new_ipv6_portal_and_unknown_iface() -> None:
    run = Script(recorded_step("node_new_ipv6"), recorded_step("node_new_unknown_iface"))
    adm = Iscsiadm(run)
    adm.node_new(Portal("::1", 35417), LAB_IQN, 1)
    assert run.calls[0][0][-2] == "[::1]:35417,1"
    with pytest.raises(ia.IscsiInterfaceNotFoundError, match="vy-nosuchiface"):
        adm.node_new(LAB_PORTAL, LAB_IQN, 1, iface="vy-nosuchiface")
    run.done()


def test_node_set_chap() -> None:
    auth = [*NODE, "-n", "node.session.auth."]
    run = Script(
        ([*NODE, "-n", "node.session.auth.authmethod", "-v", "None", "--op=update"], OK),
        ([*NODE, "-n", "node.session.auth.authmethod", "-v", "CHAP", "--op=update"], OK),
        ([*NODE, "-n", "node.session.auth.username", "-v", "chapuser", "--op=update"], OK),
        ([*NODE, "-n", "node.session.auth.password", "-v", "chapsecret12", "--op=update"], OK))
    adm = Iscsiadm(run)
    adm.node_set_chap(LAB_PORTAL, LAB_IQN, 1, None)
    adm.node_set_chap(LAB_PORTAL, LAB_IQN, 1, Chap("chapuser", Secret("chapsecret12")))
    assert [c[2] for c in run.calls] == [(), (), (), ("chapsecret12",)]
    assert all(c[0][:len(auth) - 1] == auth[:-1] for c in run.calls)
    run.done()


def test_node_login_outcomes(caplog: pytest.LogCaptureFixture) -> None:
    exists, auth, fatal = (PUBLIC[n] for n in ("login_session_exists", "login_auth_failed",
                                               "login_fatal"))
    login = [*NODE, "-l"]
    run = Script((login, OK), (login, result(exists)), recorded_step("node_login"),
                 (login, result(auth)), (login, result(fatal)),
                 (login, CommandResult(8, "", "iscsiadm: initiator reported error "
                                              "(8 - connection timed out)\n")))
    adm = Iscsiadm(run)
    assert adm.node_login(LAB_PORTAL, LAB_IQN, 1) is True
    with caplog.at_level(logging.WARNING):
        assert adm.node_login(LAB_PORTAL, LAB_IQN, 1) is False  # session exists: success
    assert "session exists" in caplog.text
    with pytest.raises(ia.IscsidUnavailableError, match="could not connect to iscsid"):
        adm.node_login(LAB_PORTAL, LAB_IQN, 1)
    with pytest.raises(ia.IscsiAuthenticationError, match="authorization failure") as info:
        adm.node_login(LAB_PORTAL, LAB_IQN, 1)
    assert isinstance(info.value, ia.IscsiLoginError)
    with pytest.raises(ia.IscsiLoginError, match="non-retryable") as fatal_info:
        adm.node_login(LAB_PORTAL, LAB_IQN, 1)
    assert not isinstance(fatal_info.value, ia.IscsiAuthenticationError)
    with pytest.raises(ia.IscsiConnectionError, match="connection timed out"):
        adm.node_login(LAB_PORTAL, LAB_IQN, 1)
    run.done()


def test_node_logout_success_and_failure() -> None:
    logout = [*NODE, "-u"]
    run = Script((logout, OK), (logout, CommandResult(10, "", "iscsiadm: logout failed\n")))
    adm = Iscsiadm(run)
    assert adm.node_logout(LAB_PORTAL, LAB_IQN, 1) is True
    with pytest.raises(ia.IscsiadmError, match="ISCSI_ERR_LOGOUT"):
        adm.node_logout(LAB_PORTAL, LAB_IQN, 1)
    run.done()


def test_sessions_recorded_here_and_published() -> None:
    run = Script(recorded_step("session_list"), recorded_step("session_details"),
                 (["iscsiadm", "-m", "session"],
                  CommandResult(0, fixture("session_list_truenas.txt"), "")),
                 (["iscsiadm", "-m", "session", "-P", "3"],
                  CommandResult(0, fixture("session_details_flatcar.txt"), "")),
                 (["iscsiadm", "-m", "session"], CommandResult(20, "", "iscsiadm: x\n")))
    adm = Iscsiadm(run)
    assert adm.session_list() == []  # "No active sessions." (rc 21)
    assert adm.session_details() == []
    assert len(adm.session_list()) == 3
    assert adm.session_details()[0].devices[0].disk == "sdb"
    with pytest.raises(ia.IscsidUnavailableError):
        adm.session_list()
    run.done()


def test_session_rescan_and_logout_recorded_here() -> None:
    rescan_all = ["iscsiadm", "-m", "session", "-R"]
    run = Script(recorded_step("session_rescan"), recorded_step("session_rescan_sid"),
                 (rescan_all, CommandResult(0, fixture("session_rescan_msa2040.txt"), "")),
                 recorded_step("session_logout_sid"),
                 (["iscsiadm", "-m", "session", "-r", "1", "-u"], OK),
                 (rescan_all, CommandResult(20, "", "iscsiadm: x\n")))
    adm = Iscsiadm(run)
    adm.session_rescan()  # no session at all: fine
    with pytest.raises(ia.IscsiNotFoundError, match="Could not get session info for sid 1"):
        adm.session_rescan(1)  # a named session that is gone is an error
    adm.session_rescan()
    assert adm.session_logout(1) is False
    assert adm.session_logout(1) is True
    with pytest.raises(ia.IscsidUnavailableError):
        adm.session_rescan()
    run.done()


def test_iface_commands_recorded_here() -> None:
    run = Script(recorded_step("iface_list"), recorded_step("iface_new"),
                 recorded_step("iface_update_initiatorname"), recorded_step("iface_delete"),
                 recorded_step("iface_delete_missing"))
    adm = Iscsiadm(run)
    assert [i.name for i in adm.iface_list()] == ["default", "iser"]
    adm.iface_new("vy-rec")
    with pytest.raises(ia.IscsiTransportUnavailableError, match="locate transport"):
        adm.iface_update("vy-rec", "iface.initiatorname", "iqn.2026-11.org.virtyard:rec")
    assert adm.iface_delete("vy-rec") is True
    assert adm.iface_delete("vy-test1") is False
    run.done()


def test_reserved_iface_names_are_refused_without_running() -> None:
    run = Script()
    adm = Iscsiadm(run)
    for name in ("default", "iser", "tcp"):
        with pytest.raises(ValueError, match="reserved"):
            adm.iface_new(name)
        with pytest.raises(ValueError, match="reserved"):
            adm.iface_delete(name)
    assert run.calls == []
    # iscsiadm's own answer, recorded here, for the record:
    assert "special interface" in RECORDED["iface_new_reserved"]["stderr"]


def test_timeouts_missing_tool_and_spent_budget() -> None:
    secret = "pw-in-argv"
    argv = [*NODE, "-n", "node.session.auth.password", "-v", secret, "--op=update"]
    masked = [a if a != secret else "***" for a in argv]
    run = Script((argv, ia.ToolTimeoutError(masked, 3)),
                 ([*NODE, "-l"], ia.ToolNotFoundError("iscsiadm", "open-iscsi")))
    adm = Iscsiadm(run)
    with pytest.raises(ia.IscsiadmTimeoutError) as info:
        adm.node_update(LAB_PORTAL, LAB_IQN, 1, "node.session.auth.password", secret,
                        timeout=3, secret=True)
    assert info.value.kind is ErrorKind.TIMEOUT
    assert secret not in str(info.value) and "timed out after 3 s" in str(info.value)
    with pytest.raises(ia.IscsiToolMissingError) as missing:
        adm.node_login(LAB_PORTAL, LAB_IQN, 1)
    assert missing.value.kind is ErrorKind.UNAVAILABLE
    assert "open-iscsi" in str(missing.value)
    with pytest.raises(ia.IscsiadmTimeoutError):
        adm.session_list(timeout=0)  # nothing is run once the budget is spent
    assert len(run.calls) == 2
    run.done()


# --- the real runner ---------------------------------------------------------------------------

def test_system_runner_returns_exit_status() -> None:
    done = ia.system_runner(["sh", "-c", "echo out; echo err >&2; exit 21"], timeout=10)
    assert done == CommandResult(21, "out\n", "err\n")


def test_system_runner_timeout_hides_secrets() -> None:
    with pytest.raises(ia.ToolTimeoutError) as info:
        ia.system_runner(["sh", "-c", "sleep 5", "hunter2"], timeout=0.2,
                         secrets=("hunter2",))
    assert "hunter2" not in str(info.value)
    assert info.value.argv == ["sh", "-c", "sleep 5", "***"]
    # the chained TimeoutExpired would carry the unmasked argv into tracebacks
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_system_runner_missing_program() -> None:
    with pytest.raises(ia.ToolNotFoundError) as info:
        ia.system_runner(["iscsiadm-does-not-exist"], timeout=5)
    assert info.value.program == "iscsiadm-does-not-exist"


def test_real_iscsiadm_iface_list() -> None:
    """The real tool (open-iscsi, installed by scripts/ensure-system-packages): its builtin
    interfaces parse."""
    names = [i.name for i in Iscsiadm().iface_list(timeout=20)]
    assert "default" in names and "iser" in names


# --- recorded for real in the lab's storage host VM (two portals to one tgt target) ----------

VM = json.loads((Path(__file__).resolve().parent.parent / "data" / "kernel"
                 / "storage_host_vm.json").read_text())
VM_IQN = "iqn.2026-11.org.virtyard.lab:rec"


def test_vm_session_list_and_none() -> None:
    sessions = ia.parse_session_list(VM["session_list"]["stdout"])
    assert [(s.portal, s.tpgt, s.iqn, s.flash) for s in sessions] == [
        (Portal("10.0.2.100", 3260), 1, VM_IQN, False),
        (Portal("10.0.2.101", 3260), 1, VM_IQN, False)]
    assert VM["session_list_none"]["rc"] == ExitCode.ISCSI_ERR_NO_OBJS_FOUND


def test_vm_session_details() -> None:
    details = ia.parse_session_details(VM["session_p3"]["stdout"])
    assert [(d.current_portal, d.iqn) for d in details] == [
        (Portal("10.0.2.100", 3260), VM_IQN), (Portal("10.0.2.101", 3260), VM_IQN)]
    assert [d.sid for d in details] == [s.sid for s in ia.parse_session_list(
        VM["session_list"]["stdout"])]
    assert {d.session_state for d in details} == {"LOGGED_IN"}
    assert {d.initiator_name for d in details} == {"iqn.2026-11.org.virtyard.lab:storage-host"}


def test_vm_discovery_names_the_portal_tgtd_saw() -> None:
    """Behind QEMU's NAT tgtd advertises the address it was reached on (this machine's
    loopback), not the portal the initiator used."""
    [found] = ia.parse_discovery(VM["discovery"]["stdout"])
    assert (found.portal.host, found.tpgt, found.iqn) == ("127.0.0.1", 1, VM_IQN)
