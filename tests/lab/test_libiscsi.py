"""Our libiscsi binding against a real tgtd: discovery, login errors, pages, capacity, reads, WWIDs.

The module starts its own tgtd on 127.0.0.1:34263 (control port 3463) with a few targets; it
needs the ``tgt`` and ``libiscsi7`` packages.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from virtyard.host.storage import libiscsi, scsi
from virtyard.host.storage.libiscsi import Chap, Session
from virtyard.lab.iscsi_target import Chap as LabChap
from virtyard.lab.iscsi_target import TargetInfo, TargetServer

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(shutil.which("tgtd") is None, reason="needs tgtd (package tgt)"),
]

PORT = 34263
CONTROL_PORT = 3463
CLOSED_PORT = 34264
SILENT_PORT = 34265
FULL_BACKLOG_PORT = 34266
MiB = 1 << 20
CHAP_USER = "vyuser"
CHAP_PASSWORD = "vy-Secret-4711"
WRONG_PASSWORD = "not-the-Secret-0815"
# lab.md: tgt's tid 1 LUN 1 appeared in a guest as by-id scsi-360000000000000000e00000000010001.
GUEST_WWID_TID1_LUN1 = "360000000000000000e00000000010001"


@dataclass(frozen=True)
class Lab:
    server: TargetServer
    alpha: TargetInfo  # three LUNs of different sizes
    beta: TargetInfo  # one bigger LUN
    secret: TargetInfo  # CHAP protected
    wide: TargetInfo  # 260 LUNs: LUN numbers above 255 use flat addressing


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    server = TargetServer(tmp_path_factory.mktemp("libiscsi") / "tgt", PORT, CONTROL_PORT)
    server.start()
    try:
        alpha = server.create_target("alpha", [8 * MiB, 3 * 1024 * MiB + 4096, 1 * MiB])
        beta = server.create_target("beta", [64 * MiB])
        secret = server.create_target("secret", [2 * MiB],
                                      chap=LabChap(CHAP_USER, CHAP_PASSWORD))
        wide = server.create_target("wide", [64 * 1024] * 260)
        yield Lab(server, alpha, beta, secret, wide)
    finally:
        server.stop()


def tgt_wwid(tid: int, lun: int) -> str:
    """tgt's NAA 6 designator is 6000000000000000 0e000000 <tid:16> <lun:16>."""
    return f"360000000000000000e000000{tid:04x}{lun:04x}"


def login(lab: Lab, target: TargetInfo, *, chap: Chap | None = None) -> Session:
    return Session.login(target.address, target.port, target.iqn, chap=chap)


# --- discovery and login ----------------------------------------------------------------------


def test_discovery_lists_every_target_with_its_portal_group(lab: Lab) -> None:
    found = libiscsi.discover("127.0.0.1", PORT)
    assert [t.iqn for t in found] == [lab.alpha.iqn, lab.beta.iqn, lab.secret.iqn, lab.wide.iqn]
    for target in found:
        assert target.portals == (libiscsi.Portal("127.0.0.1", PORT, 1),)


def test_report_luns_includes_tgt_controller_lun0(lab: Lab) -> None:
    with login(lab, lab.alpha) as session:
        assert session.report_luns() == (0, 1, 2, 3)


def test_chap_with_the_right_password(lab: Lab) -> None:
    with login(lab, lab.secret, chap=Chap(CHAP_USER, CHAP_PASSWORD)) as session:
        assert session.report_luns() == (0, 1)


@pytest.mark.parametrize("chap", [Chap(CHAP_USER, WRONG_PASSWORD), Chap("nobody", WRONG_PASSWORD),
                                  None])
def test_chap_failure_is_an_authentication_error_without_the_password(
        lab: Lab, chap: Chap | None) -> None:
    with pytest.raises(libiscsi.IscsiAuthenticationError) as caught:
        login(lab, lab.secret, chap=chap)
    error = caught.value
    assert error.kind is libiscsi.ErrorKind.AUTHENTICATION
    assert "Authentication failure" in error.detail
    shown = " ".join([str(error), repr(error), error.detail, repr(error.args), repr(chap)])
    assert WRONG_PASSWORD not in shown and CHAP_PASSWORD not in shown


def test_unknown_iqn_is_target_not_found(lab: Lab) -> None:
    with pytest.raises(libiscsi.IscsiTargetNotFoundError) as caught:
        Session.login("127.0.0.1", PORT, lab.alpha.iqn + "-nope")
    assert caught.value.kind is libiscsi.ErrorKind.TARGET_NOT_FOUND
    assert "Target not found" in caught.value.detail


def _free_port(port: int) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # fails loudly if someone else uses it
    return port


def test_closed_port_fails_fast_with_a_connect_error(lab: Lab) -> None:
    port = _free_port(CLOSED_PORT)
    started = time.monotonic()
    with pytest.raises(libiscsi.IscsiConnectError) as caught:
        Session.login("127.0.0.1", port, lab.alpha.iqn, timeout=5)
    assert time.monotonic() - started < 1
    assert caught.value.kind is libiscsi.ErrorKind.CONNECT
    assert "Connection refused" in caught.value.detail
    with pytest.raises(libiscsi.IscsiConnectError):
        libiscsi.discover("127.0.0.1", port)


def test_portal_that_never_completes_the_handshake_fails_within_the_timeout(lab: Lab) -> None:
    # A listener whose backlog is full drops further SYNs: the connect hangs like a dead host's.
    with socket.socket() as server:
        server.bind(("127.0.0.1", FULL_BACKLOG_PORT))
        server.listen(0)
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", FULL_BACKLOG_PORT))
        time.sleep(0.1)
        started = time.monotonic()
        try:
            with pytest.raises(libiscsi.IscsiConnectError, match=r"within 1\.5 s"):
                Session.login("127.0.0.1", FULL_BACKLOG_PORT, lab.alpha.iqn, timeout=1.5)
        finally:
            for filler in fillers:
                filler.close()
        assert 1.4 < time.monotonic() - started < 3


def test_portal_that_accepts_but_never_answers_times_out(lab: Lab) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", SILENT_PORT))
        server.listen(4)
        started = time.monotonic()
        with pytest.raises(libiscsi.IscsiTimeoutError, match="no answer within 1 s"):
            Session.login("127.0.0.1", SILENT_PORT, lab.alpha.iqn, timeout=1)
        assert time.monotonic() - started < 2.5


# --- pages, capacity, WWID --------------------------------------------------------------------


def test_capacity_equals_the_backing_file_size(lab: Lab) -> None:
    with login(lab, lab.alpha) as session, login(lab, lab.beta) as other:
        for target, sess in ((lab.alpha, session), (lab.beta, other)):
            for lun in target.luns:
                capacity = scsi.parse_read_capacity16(sess.read_capacity16(lun.lun))
                assert capacity.capacity_bytes == lun.size == lun.backing.stat().st_size
                assert capacity.logical_block_size == 512
                assert sess.capacity(lun.lun) == capacity


def test_wwid_of_each_lun_is_tgts_naa6_designator(lab: Lab) -> None:
    for target in (lab.alpha, lab.beta):
        with login(lab, target) as session:
            for lun in target.luns:
                page = session.inquiry(lun.lun, scsi.VPD_DEVICE_IDENTIFICATION)
                designators = scsi.parse_device_identification(page)
                naa6 = [d for d in designators if d.naa == scsi.Naa.IEEE_REGISTERED_EXTENDED]
                assert len(naa6) == 1 and len(naa6[0].value) == 16
                assert scsi.wwid(designators) == "3" + naa6[0].value.hex()
                assert scsi.wwid_from_page83(page) == tgt_wwid(target.tid, lun.lun)


def test_wwid_of_tid1_lun1_matches_what_a_guest_saw(lab: Lab) -> None:
    if lab.alpha.tid != 1:
        pytest.skip(f"the first target got tid {lab.alpha.tid}")
    with login(lab, lab.alpha) as session:
        page = session.inquiry(1, scsi.VPD_DEVICE_IDENTIFICATION)
    assert scsi.wwid_from_page83(page) == GUEST_WWID_TID1_LUN1


def test_standard_inquiry_serial_and_block_limits(lab: Lab) -> None:
    with login(lab, lab.alpha) as session:
        inquiry = scsi.parse_standard_inquiry(session.inquiry(1))
        assert (inquiry.vendor, inquiry.product) == ("IET", "VIRTUAL-DISK") and inquiry.is_disk
        controller = scsi.parse_standard_inquiry(session.inquiry(0))
        assert controller.device_type == scsi.DeviceType.STORAGE_ARRAY_CONTROLLER
        pages = scsi.parse_supported_pages(session.inquiry(1, scsi.VPD_SUPPORTED_PAGES))
        assert {0x80, 0x83, 0xB0} <= set(pages)
        serial = scsi.parse_unit_serial_number(session.inquiry(1, scsi.VPD_UNIT_SERIAL_NUMBER))
        assert serial == f"beaf{lab.alpha.tid}1"  # tgt's default scsi_sn
        limits = scsi.parse_block_limits(session.inquiry(1, scsi.VPD_BLOCK_LIMITS))
        capacity = session.capacity(1)
        assert scsi.discard_max_bytes(limits, capacity) == 0  # tgt's file LUNs: no UNMAP


def test_unsupported_page_is_a_check_condition(lab: Lab) -> None:
    with login(lab, lab.alpha) as session:
        with pytest.raises(libiscsi.ScsiCheckConditionError) as caught:
            session.inquiry(1, 0x89)  # ATA information: not a tgt page
        error = caught.value
        assert error.kind is libiscsi.ErrorKind.CHECK_CONDITION and error.illegal_request
        assert (error.sense_key, error.asc, error.ascq) == (0x5, 0x24, 0x00)
        assert session.inquiry(1)  # the session is still fine


def test_absent_lun_has_qualifier_3(lab: Lab) -> None:
    with login(lab, lab.alpha) as session:
        assert not scsi.parse_standard_inquiry(session.inquiry(9)).connected


# --- reads ------------------------------------------------------------------------------------


def test_read_returns_bytes_written_into_the_backing_file(lab: Lab) -> None:
    lun = lab.alpha.lun(2)
    offset = 2 * 1024 * MiB + 510  # across a block boundary, above 2 GiB
    payload = b"virtyard-signature-" + bytes(range(256)) * 5
    with lun.backing.open("r+b") as f:
        f.seek(offset)
        f.write(payload)
    with login(lab, lab.alpha) as session:
        assert session.read(2, offset, len(payload)) == payload
        assert session.read(2, offset + 3, 7, block_size=512) == payload[3:10]
        assert session.read(2, 0, 0) == b""
        big = session.read(2, offset - 3 * MiB, 4 * MiB)  # several pipelined 1 MiB chunks
        assert big[3 * MiB:3 * MiB + len(payload)] == payload and len(big) == 4 * MiB


def test_read_past_the_end_is_a_check_condition(lab: Lab) -> None:
    with login(lab, lab.alpha) as session, pytest.raises(libiscsi.ScsiCheckConditionError):
        session.read(3, 1 * MiB - 512, 1024)


# --- the pipelined probe ----------------------------------------------------------------------


def test_probe_luns_collects_everything_and_the_first_bytes(lab: Lab) -> None:
    header = b"LABELONE\x01\x00\x00\x00\x00\x00\x00\x00"
    for lun in lab.alpha.luns:
        with lun.backing.open("r+b") as f:
            f.seek(512)
            f.write(header)
    with login(lab, lab.alpha) as session:
        probes = libiscsi.probe_luns(session, session.report_luns(), read_bytes=4096)
    assert sorted(probes) == [0, 1, 2, 3]
    for lun in lab.alpha.luns:
        probe = probes[lun.lun]
        assert probe.errors == {}
        assert scsi.parse_standard_inquiry(probe.inquiry or b"").is_disk
        assert set(probe.vpd) == {0x80, 0x83, 0xB0}
        assert scsi.wwid_from_page83(probe.vpd[0x83]) == tgt_wwid(lab.alpha.tid, lun.lun)
        capacity = probe.capacity()
        assert capacity is not None and capacity.capacity_bytes == lun.size
        assert probe.data is not None and len(probe.data) == 4096
        assert probe.data[512:512 + len(header)] == header
    controller = probes[0]
    assert controller.inquiry and controller.data is None and controller.capacity() is None
    assert {"read capacity(16)", "read capacity(10)"} <= set(controller.errors)


def test_probe_without_vpd_and_with_a_read_larger_than_the_lun(lab: Lab) -> None:
    with login(lab, lab.wide) as session:
        probes = libiscsi.probe_luns(session, [1, 2], vpd=False, read_bytes=MiB)
    for probe in probes.values():
        assert probe.vpd == {} and probe.errors == {}
        assert probe.data is not None and len(probe.data) == 64 * 1024  # the whole LUN


def test_probe_of_hundreds_of_luns_including_flat_addressed_ones(lab: Lab) -> None:
    with login(lab, lab.wide) as session:
        luns = session.report_luns()
        assert luns == tuple(range(261))
        started = time.monotonic()
        probes = libiscsi.probe_luns(session, luns, read_bytes=512)
        elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed  # pipelined: typically a few tens of milliseconds
    wwids = {scsi.wwid_from_page83(probes[n].vpd[0x83]) for n in range(1, 261)}
    assert len(wwids) == 260
    assert scsi.wwid_from_page83(probes[260].vpd[0x83]) == tgt_wwid(lab.wide.tid, 260)
    assert all(probes[n].capacity() == scsi.Capacity(127, 512, 3) for n in range(1, 261))


# --- session life cycle -----------------------------------------------------------------------


def test_closed_session_refuses_commands(lab: Lab) -> None:
    session = login(lab, lab.beta)
    session.close()
    session.close()
    assert session.closed and "closed" in repr(session)
    with pytest.raises(libiscsi.IscsiSessionError, match="closed"):
        session.inquiry(1)


def test_lost_session_fails_fast_instead_of_reconnecting(lab: Lab) -> None:
    target = lab.server.create_target("doomed", [MiB])
    session = login(lab, target)
    try:
        assert session.inquiry(1)
        lab.server.delete_target("doomed")
        started = time.monotonic()
        with pytest.raises(libiscsi.IscsiSessionError):
            session.inquiry(1)
        with pytest.raises(libiscsi.IscsiSessionError):
            libiscsi.probe_luns(session, [1])
        assert time.monotonic() - started < 2
    finally:
        session.close()
        lab.server.delete_target("doomed")
