"""Our libiscsi binding against a real tgtd: discovery, login errors, pages, capacity, reads, WWIDs.

The module starts its own tgtd on 127.0.0.1:24263 (control port 3463) with a few targets; it
needs the ``tgt`` and ``libiscsi7`` packages.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from virtyard.host.storage import devices as devices_module
from virtyard.host.storage import libiscsi, scsi, signatures
from virtyard.host.storage.connections import ConnectionRegistry
from virtyard.host.storage.devices import DeviceService
from virtyard.host.storage.initiator import (
    Connection,
    Device,
    Initiator,
    InitiatorReadError,
    PathInfo,
    Portal,
)
from virtyard.host.storage.libiscsi import Chap, Session
from virtyard.host.storage.userspace_initiator import UserspaceInitiator
from virtyard.lab.iscsi_target import Chap as LabChap
from virtyard.lab.iscsi_target import TargetInfo, TargetServer

pytestmark = pytest.mark.lab

PORT_OFFSET = int(os.environ.get("VIRTYARD_TEST_PORT_OFFSET", "0"))
PORT = 24263 + PORT_OFFSET
CONTROL_PORT = 3463 + PORT_OFFSET
CLOSED_PORT = 24264 + PORT_OFFSET
SILENT_PORT = 24265 + PORT_OFFSET
FULL_BACKLOG_PORT = 24266 + PORT_OFFSET
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
                assert scsi.wwid_from_page83(page) == target.wwid(lun.lun)


def test_wwid_of_tid1_lun1_matches_what_a_guest_saw(lab: Lab) -> None:
    assert lab.alpha.tid == 1  # this module's own tgtd: its first target is tid 1
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
        assert scsi.wwid_from_page83(probe.vpd[0x83]) == lab.alpha.wwid(lun.lun)
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
    assert scsi.wwid_from_page83(probes[260].vpd[0x83]) == lab.wide.wwid(260)
    assert all(probes[n].capacity() == scsi.Capacity(127, 512, 3) for n in range(1, 261))


# --- pipelined range reads ----------------------------------------------------------------------


def _write(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def _expected(path: Path, offset: int, length: int) -> bytes:
    """What a range should read as: the backing file's bytes there (clipped at its end)."""
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def _pattern(seed: int, length: int) -> bytes:
    return bytes((seed * 131 + i * 7) & 0xFF for i in range(length))


@pytest.fixture
def ranges_target(lab: Lab) -> Iterator[TargetInfo]:
    """LUN 1: 8 MiB, LUN 2: 3 MiB + 1536 (not a MiB multiple), LUN 3: 5 GiB (sparse)."""
    target = lab.server.create_target("ranges", [8 * MiB, 3 * MiB + 1536, 5 * 1024 * MiB])
    try:
        yield target
    finally:
        lab.server.delete_target("ranges")


def test_read_ranges_returns_the_bytes_at_each_offset(lab: Lab, ranges_target: TargetInfo
                                                      ) -> None:
    writes = {  # (lun, offset) -> payload
        (1, 0): _pattern(1, 500),
        (1, 510): _pattern(2, 100),  # across a block boundary
        (1, MiB - 7): _pattern(3, 20),
        (1, 6 * MiB + 4096): _pattern(4, 2 * MiB - 4096),  # up to the last byte
        (2, 3 * MiB + 1000): _pattern(5, 536),  # the last bytes of a LUN of odd size
        (3, 4 * 1024 * MiB + 123): _pattern(6, 3000),  # above 4 GiB: LBA > 2**23
    }
    for (lun, offset), data in writes.items():
        _write(ranges_target.lun(lun).backing, offset, data)
    ranges = [(lun, offset, len(data)) for (lun, offset), data in writes.items()]
    ranges += [
        (1, 3, 7),  # inside one block, unaligned at both ends
        (1, 500, 30),  # unaligned, across a block boundary
        (1, 512, 1024),  # aligned
        (1, MiB - 100, 2 * MiB + 300),  # more than one 1 MiB command, unaligned
        (1, 0, 8 * MiB),  # the whole LUN, as 8 commands
        (2, 3 * MiB + 1000, 10_000),  # past the end: clipped to 536 bytes
        (2, 3 * MiB + 1536, 512),  # starts at the end: nothing
        (2, 10 * MiB, 1),  # wholly past the end: nothing
        (2, 5, 0),  # empty
        (1, 3, 7),  # a duplicate
    ]
    with login(lab, ranges_target) as session:
        got = libiscsi.read_ranges(session, ranges)
        assert session.inquiry(1)  # the session is fine afterwards
    assert set(got) == set(ranges)
    for lun, offset, length in ranges:
        expected = _expected(ranges_target.lun(lun).backing, offset, length)
        assert got[(lun, offset, length)] == expected, (lun, offset, length)
    for (lun, offset), data in writes.items():
        assert got[(lun, offset, len(data))] == data
    assert len(got[(2, 3 * MiB + 1000, 10_000)]) == 536
    assert got[(2, 3 * MiB + 1536, 512)] == got[(2, 10 * MiB, 1)] == got[(2, 5, 0)] == b""
    assert len(got[(1, 0, 8 * MiB)]) == 8 * MiB


def test_read_ranges_of_many_luns_at_once(lab: Lab) -> None:
    size = 64 * 1024  # the wide target's 260 LUNs
    offsets = (0, 4096 + 17, 30_000, size - 700)
    for lun in lab.wide.luns:
        for n, offset in enumerate(offsets):
            _write(lun.backing, offset, _pattern(lun.lun * 8 + n, 600))
    ranges = [(lun.lun, offset, 1000) for lun in lab.wide.luns for offset in offsets]
    with login(lab, lab.wide) as session:
        started = time.monotonic()
        got = libiscsi.read_ranges(session, ranges)
        elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed  # 1040 READs plus 260 READ CAPACITY, pipelined
    assert len(got) == 260 * len(offsets)
    for lun in lab.wide.luns:
        for n, offset in enumerate(offsets):
            data = got[(lun.lun, offset, 1000)]
            assert data[:600] == _pattern(lun.lun * 8 + n, 600), (lun.lun, offset)
            assert data == _expected(lun.backing, offset, 1000)
    assert len(got[(260, size - 700, 1000)]) == 700  # clipped at the end


def test_read_ranges_aligns_to_a_4k_logical_block(lab: Lab, tmp_path: Path) -> None:
    target = lab.server.create_target("fourk", [])
    backing = tmp_path / "fourk.img"
    with backing.open("wb") as f:
        f.truncate(2 * MiB)
    try:
        subprocess.run(["tgtadm", "-C", str(CONTROL_PORT), "--lld", "iscsi", "--mode",
                        "logicalunit", "--op", "new", "--tid", str(target.tid), "--lun", "1",
                        "--backing-store", str(backing), "--blocksize", "4096"],
                       check=True, capture_output=True)
        payload = _pattern(9, 10_000)
        _write(backing, 4000, payload)  # across 4 KiB blocks 0-3
        ranges = [(1, 4000, len(payload)), (1, 4095, 2), (1, 100, 3), (1, 2 * MiB - 5, 50)]
        with login(lab, target) as session:
            assert session.capacity(1).logical_block_size == 4096
            got = libiscsi.read_ranges(session, ranges)
        assert got[(1, 4000, len(payload))] == payload
        assert got[(1, 4095, 2)] == payload[95:97]
        assert got[(1, 100, 3)] == b"\0\0\0"
        assert got[(1, 2 * MiB - 5, 50)] == bytes(5)
    finally:
        lab.server.delete_target("fourk")


def test_read_ranges_with_known_capacities_skips_read_capacity(
        lab: Lab, ranges_target: TargetInfo) -> None:
    _write(ranges_target.lun(1).backing, 8 * MiB - 4096, b"\xff" * 4096)
    told = scsi.Capacity(last_lba=(4 * MiB) // 512 - 1, logical_block_size=512)
    with login(lab, ranges_target) as session:
        got = libiscsi.read_ranges(session, [(1, 4 * MiB - 10, 100), (1, 8 * MiB - 100, 100)],
                                   capacities={1: told})
    assert got == {(1, 4 * MiB - 10, 100): bytes(10), (1, 8 * MiB - 100, 100): b""}


def test_read_ranges_failures_do_not_lose_the_other_ranges(
        lab: Lab, ranges_target: TargetInfo) -> None:
    _write(ranges_target.lun(1).backing, 0, b"still-here")
    wrong = scsi.Capacity(last_lba=(16 * MiB) // 512 - 1, logical_block_size=512)
    ranges = [(1, 0, 10), (2, 512, 512), (9, 0, 512), (0, 0, 512), (1, 12 * MiB, 512)]
    with login(lab, ranges_target) as session:
        with pytest.raises(libiscsi.IscsiPartialReadError) as caught:
            # LUN 1 said to be 16 MiB: a READ past its real 8 MiB fails, on its own
            libiscsi.read_ranges(session, ranges, capacities={1: wrong})
        assert session.inquiry(1)  # not a session failure: the session is still fine
    error = caught.value
    assert error.results == {(1, 0, 10): b"still-here", (2, 512, 512): bytes(512)}
    assert set(error.failures) == {(9, 0, 512), (0, 0, 512), (1, 12 * MiB, 512)}
    assert all(isinstance(e, libiscsi.ScsiCheckConditionError)
               for e in error.failures.values())
    past_end = error.failures[(1, 12 * MiB, 512)]
    assert isinstance(past_end, libiscsi.ScsiCheckConditionError)
    assert past_end.illegal_request and past_end.asc == 0x21  # LBA out of range
    assert error.session_error is None
    assert error.kind is libiscsi.ErrorKind.CHECK_CONDITION
    assert "3 of 5 ranges not read" in str(error)


def test_read_ranges_on_a_lost_session_fails_every_range_fast(lab: Lab) -> None:
    target = lab.server.create_target("lost", [MiB])
    session = login(lab, target)
    try:
        assert session.read(1, 0, 512) == bytes(512)
        lab.server.delete_target("lost")
        started = time.monotonic()
        with pytest.raises(libiscsi.IscsiPartialReadError) as caught:
            libiscsi.read_ranges(session, [(1, 0, 512), (1, 4096, 512)])
        assert time.monotonic() - started < 2
    finally:
        session.close()
        lab.server.delete_target("lost")
    error = caught.value
    assert isinstance(error.session_error, libiscsi.IscsiSessionError)
    assert error.kind is libiscsi.ErrorKind.SESSION and error.results == {}
    assert set(error.failures) == {(1, 0, 512), (1, 4096, 512)}


def test_read_ranges_refuses_negative_ranges(lab: Lab) -> None:
    with login(lab, lab.beta) as session:
        with pytest.raises(ValueError, match="must not be negative"):
            libiscsi.read_ranges(session, [(1, -1, 10)])
        with pytest.raises(ValueError):
            libiscsi.read_ranges(session, [(1, 0, -10)])
        assert libiscsi.read_ranges(session, []) == {}


# --- the user-space initiator and the device service over read_ranges ---------------------------


def _connection(target: TargetInfo, iqn: str = "") -> Connection:
    return Connection(id=f"c-{target.tid}", portal=Portal(target.address, target.port),
                      iqn=iqn or target.iqn)


def test_read_many_reads_every_target_with_one_session_each(lab: Lab) -> None:
    _write(lab.beta.lun(1).backing, 5 * MiB + 3, b"beta-bytes")
    _write(lab.alpha.lun(3).backing, 1000, b"alpha-bytes")
    initiator = UserspaceInitiator("iqn.2026-11.org.virtyard:test")
    devices = initiator.devices([_connection(lab.alpha), _connection(lab.beta)], guids=None,
                                read_head=0, timeout=10)
    by_lun = {(d.paths[0].connection.iqn, d.paths[0].lun): d for d in devices}
    beta, alpha = by_lun[(lab.beta.iqn, 1)], by_lun[(lab.alpha.iqn, 3)]
    requests = [(beta, 5 * MiB + 3, 10), (alpha, 1000, 11), (beta, 0, 4), (alpha, MiB - 2, 9),
                (beta, 5 * MiB + 3, 10)]
    got = initiator.read_many(requests, timeout=10)
    assert got == [b"beta-bytes", b"alpha-bytes", bytes(4), bytes(2), b"beta-bytes"]
    assert initiator.read_many([], timeout=10) == []

    lost = replace(alpha, guid="lost", paths=[PathInfo(_connection(lab.alpha, "iqn.x:none"), 3)])
    with pytest.raises(InitiatorReadError) as caught:
        initiator.read_many([(beta, 5 * MiB + 3, 10), (lost, 0, 512)], timeout=10)
    assert caught.value.results == [b"beta-bytes", None]
    assert set(caught.value.errors) == {1}
    assert caught.value.kind == caught.value.errors[1].kind == "target-not-found"


class _CountingInitiator(UserspaceInitiator):
    """Counts ``read_many`` calls; ``after_listing`` runs between the listing and the reads."""

    def __init__(self, after_listing: Callable[[], None] = lambda: None) -> None:
        super().__init__("iqn.2026-11.org.virtyard:test")
        self.calls: list[int] = []
        self.after_listing = after_listing

    def devices(self, connections: list[Connection], *, guids: frozenset[str] | None,
                read_head: int, timeout: float) -> list[Device]:
        found = super().devices(connections, guids=guids, read_head=read_head, timeout=timeout)
        self.after_listing()
        return found

    def read(self, device: Device, offset: int, length: int, *, timeout: float) -> bytes:
        raise AssertionError("reads go through read_many")

    def read_many(self, requests: list[tuple[Device, int, int]], *,
                  timeout: float) -> list[bytes]:
        self.calls.append(len(requests))
        return super().read_many(requests, timeout=timeout)


def _truth(path: Path) -> signatures.Usage:
    """signatures.probe over the backing file itself, reading whatever it asks directly."""
    size = path.stat().st_size

    def read_more(offset: int, length: int) -> bytes:
        return _expected(path, offset, length)

    return signatures.probe(_expected(path, 0, 8192), size, read_more)


def _lvm(*args: str) -> None:
    config = ("devices { use_devicesfile=0 obtain_device_list_from_udev=0 hints=\"none\" } "
              "activation { udev_sync=0 udev_rules=0 } backup { backup=0 archive=0 }")
    subprocess.run([*args, "--config", config], check=True, capture_output=True)


@pytest.fixture
def signature_target(lab: Lab) -> Iterator[TargetInfo]:
    """LUN 1 empty, 2 ext4, 3 ISO 9660 (nothing in the first 32 KiB), 4 swap, 5 an LVM PV
    whose VG metadata moved past the first 8 KiB, 6 empty and 4 KiB only."""
    for tool in ("mkfs.ext4", "genisoimage", "mkswap", "losetup", "pvcreate"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    target = lab.server.create_target("signatures", [64 * MiB] * 5 + [4096])
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "vyext", str(target.lun(2).backing)],
                       check=True, capture_output=True)
        iso = target.lun(3).backing.with_suffix(".iso.tmp")
        subprocess.run(["genisoimage", "-quiet", "-V", "VYISO", "-o", str(iso), "/etc/hostname"],
                       check=True, capture_output=True)
        _write(target.lun(3).backing, 0, iso.read_bytes())
        iso.unlink()
        subprocess.run(["mkswap", str(target.lun(4).backing)], check=True, capture_output=True)
        loop = subprocess.run(["losetup", "-f", "--show", str(target.lun(5).backing)],
                              check=True, capture_output=True, text=True).stdout.strip()
        try:
            _lvm("pvcreate", "-q", "--devices", loop, loop)
            _lvm("vgcreate", "-q", "--devices", loop, "vyvg", loop)
            for n in range(12):  # each commit writes the text further into the MDA's ring
                _lvm("vgchange", "-q", "--devices", loop, "--addtag", f"tag-{n:02d}-" + "x" * 40,
                     "vyvg")
        finally:
            subprocess.run(["losetup", "-d", loop], check=True)
        yield target
    finally:
        lab.server.delete_target("signatures")


def _service(initiator: Initiator, target: TargetInfo, tmp_path: Path) -> DeviceService:
    registry = ConnectionRegistry(tmp_path / "connections.json")
    registry.add(_connection(target))
    return DeviceService(initiator, registry, probe_bytes=8192, timeout=10)


def test_device_service_probes_in_one_batched_round(lab: Lab, signature_target: TargetInfo,
                                                    tmp_path: Path) -> None:
    initiator = _CountingInitiator()
    entries = _service(initiator, signature_target, tmp_path).listing(
        guids=None, check_status=True, refresh=True)
    usage = {e.device.paths[0].lun: e.usage for e in entries}
    assert set(usage) == {1, 2, 3, 4, 5, 6}
    for lun in signature_target.luns:
        assert usage[lun.lun] == _truth(lun.backing), lun.lun
    assert usage[1] is not None and usage[1].status == "free"
    assert usage[2] is not None and usage[2].blkid_type == "ext4"
    assert usage[3] is not None and usage[3].blkid_type == "iso9660"
    assert usage[4] is not None and usage[4].blkid_type == "swap"
    assert usage[5] is not None and usage[5].vg_name == "vyvg" and len(usage[5].vg_tags) == 12
    assert usage[6] is not None and usage[6].status == "free"
    # LUNs 1 and 3: the second look (5 ranges each); LUN 5: its VG metadata; all in one call
    assert initiator.calls == [11]


def test_device_service_finishes_leftover_probes_alone(
        lab: Lab, signature_target: TargetInfo, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices_module, "PROBE_ROUNDS", 0)
    initiator = _CountingInitiator()
    entries = _service(initiator, signature_target, tmp_path).listing(
        guids=None, check_status=True, refresh=True)
    for entry in entries:
        assert entry.usage == _truth(signature_target.lun(entry.device.paths[0].lun).backing)
    assert initiator.calls == [1] * 11  # no batching: one read at a time, the same answers


def test_device_service_reports_a_lun_it_cannot_read_without_status(
        lab: Lab, signature_target: TargetInfo, tmp_path: Path) -> None:
    def drop_lun_1() -> None:
        subprocess.run(["tgtadm", "-C", str(CONTROL_PORT), "--lld", "iscsi", "--mode",
                        "logicalunit", "--op", "delete", "--tid", str(signature_target.tid),
                        "--lun", "1"], check=True, capture_output=True)

    initiator = _CountingInitiator(after_listing=drop_lun_1)
    entries = _service(initiator, signature_target, tmp_path).listing(
        guids=None, check_status=True, refresh=True)
    usage = {e.device.paths[0].lun: e.usage for e in entries}
    assert usage[1] is None  # "unknown", not "free", and the listing still succeeds
    for lun in (2, 3, 4, 5, 6):
        assert usage[lun] == _truth(signature_target.lun(lun).backing)


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
