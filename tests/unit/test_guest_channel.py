"""The host end of our guest agent's channel against hostile guests, over real sockets.

A socketpair stands in for QEMU's channel socket; a fake clock makes the rate limits exact.
The poller is run against a real listening unix socket, as QEMU offers it.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtyard.host.virt import guest_channel as gc
from virtyard.host.virt.guest_channel import (
    ChannelLimits,
    ChannelPoller,
    GuestChannel,
    GuestMessageError,
    MappingReport,
    nested_deeper_than,
    parse_message,
    validate_mapping,
)

MAPPING = {"0QEMU_QEMU_HARDDISK_S1": {"name": "/dev/sda"}, "vyvirtio": {"name": "/dev/vda"},
           "360000000000000000e00000000010004": {"name": "/dev/sdb"}}


def line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


USAGE = line({"__name__": "disks-usage", "disks": [], "mapping": MAPPING})
HEARTBEAT = line({"__name__": "heartbeat", "apiVersion": 1})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Pair:
    """A channel over one end of a socketpair; ``guest`` is the other end."""

    def __init__(self, limits: ChannelLimits | None = None) -> None:
        self.clock = Clock()
        host, self.guest = socket.socketpair()
        self.guest.settimeout(5)
        self.channel = GuestChannel.from_socket(host, name="vm1", limits=limits,
                                                clock=self.clock)

    def send(self, data: bytes) -> None:
        self.guest.sendall(data)
        self.pump()

    def pump(self, rounds: int = 1000) -> None:
        """Let the channel read everything that is there (as the poller would)."""
        for _ in range(rounds):
            sock = self.channel.sock
            if sock is None or not self.channel.wants_read(self.clock.now):
                return
            sock.setblocking(False)
            try:
                if not sock.recv(1, socket.MSG_PEEK):
                    self.channel.on_readable(self.clock.now)  # EOF
                    return
            except BlockingIOError:
                return
            self.channel.on_readable(self.clock.now)

    def close(self) -> None:
        self.channel.close()
        self.guest.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    made = Pair()
    yield made
    made.close()


# -- parsing and validation ---------------------------------------------------------------------


def test_parse_accepts_protocol_messages() -> None:
    assert parse_message(USAGE)["mapping"] == MAPPING
    assert parse_message(HEARTBEAT) == {"__name__": "heartbeat", "apiVersion": 1}


@pytest.mark.parametrize("raw, why", [
    (b"\xff\xfe\x00binary", "not UTF-8"),
    (b"{not json", "not JSON"),
    (b'{"__name__": "x", "n": NaN}', "constant NaN"),
    (b'{"__name__": "x", "n": 1' + b"0" * 5000 + b"}", "not JSON"),  # int digit limit
    (b"[" * 30000 + b"]" * 30000, "nested deeper"),
    (b'{"__name__": "x", "a": {"b": {"c": {"d": {}}}}}', "nested deeper"),
    (b'["__name__"]', "not an object"),
    (b'{"name": "heartbeat"}', "no valid __name__"),
    (b'{"__name__": 7}', "no valid __name__"),
    (b'{"__name__": "heart\\u0000beat"}', "no valid __name__"),
    (b'{"__name__": "' + b"x" * 65 + b'"}', "no valid __name__"),
])
def test_parse_refuses_hostile_lines(raw: bytes, why: str) -> None:
    with pytest.raises(GuestMessageError, match=why):
        parse_message(raw)


def test_parse_refuses_an_oversized_line() -> None:
    with pytest.raises(GuestMessageError, match="over"):
        parse_message(b'{"__name__": "x", "p": "' + b"a" * 70000 + b'"}')


def test_depth_ignores_brackets_in_strings() -> None:
    assert not nested_deeper_than('{"a": "[[[[[[{{{{", "b": "\\"[[[["}', 1)
    assert nested_deeper_than('{"a": [[]]}', 2)
    assert not nested_deeper_than('{"a": [[]]}', 3)
    assert not nested_deeper_than('{"a": "ends in a backslash \\\\", "b": "[[[["}', 1)
    started = time.monotonic()
    assert nested_deeper_than("[" * 60000, 4)
    assert nested_deeper_than("[]" * 30000 + "[[[[[" + "]" * 5, 4)
    assert time.monotonic() - started < 0.5


def test_validate_keeps_good_entries_and_says_why_others_went() -> None:
    raw: dict[str, Any] = {
        **MAPPING,
        "extra": {"name": "/dev/cciss/c0d0", "size": 5},
        "": {"name": "/dev/sdx"},
        "bell\x07": {"name": "/dev/sdx"},
        "rtl\u202e": {"name": "/dev/sdx"},
        "x" * 300: {"name": "/dev/sdx"},
        "no-dev": {"name": "sdb"},
        "traversal": {"name": "/dev/../etc/shadow"},
        "dot": {"name": "/dev/./sda"},
        "bare": {"name": "/dev/"},
        "newline": {"name": "/dev/sd\nb"},
        "long": {"name": "/dev/" + "a" * 200},
        "number": {"name": 5},
        "list": ["/dev/sda"],
        "none": None,
    }
    mapping, problems = validate_mapping(raw)
    assert mapping == {**MAPPING, "extra": {"name": "/dev/cciss/c0d0"}}
    assert len(problems) == len(raw) - len(mapping)
    assert all("\x07" not in p and "\u202e" not in p for p in problems)


@pytest.mark.parametrize("raw, why", [
    (None, "not an object"), ([], "not an object"), ("x", "not an object"),
    ({f"s{i}": {"name": "/dev/sda"} for i in range(513)}, "513 entries"),
])
def test_validate_refuses_a_mapping_that_is_no_mapping(raw: object, why: str) -> None:
    with pytest.raises(GuestMessageError, match=why):
        validate_mapping(raw)


# -- one channel over a socketpair --------------------------------------------------------------


def test_a_report_is_kept_with_its_arrival_time(pair: Pair) -> None:
    seen: list[MappingReport] = []
    pair.channel.on_report = lambda _ch, report: seen.append(report)
    assert pair.channel.report is None and not pair.channel.responsive()
    pair.send(HEARTBEAT)
    assert pair.channel.responsive() and pair.channel.report is None
    pair.clock.now += 1
    pair.send(USAGE)
    report = pair.channel.report
    assert report is not None and seen == [report]
    assert report.mapping == MAPPING and report.received == pair.clock.now
    assert report.names()["vyvirtio"] == "/dev/vda"
    assert report.sequence == 1
    pair.clock.now += gc.HEARTBEAT_TIMEOUT + 1
    assert not pair.channel.responsive()
    assert pair.channel.report is report  # names stay as last known


def test_connecting_asks_for_a_refresh_and_refresh_can_be_asked(pair: Pair) -> None:
    pair.channel.tick(pair.clock.now)
    assert pair.guest.recv(4096) == gc.REFRESH_REQUEST
    pair.channel.request_refresh()
    pair.channel.request_refresh()  # asked twice before it went out: sent once
    pair.channel.tick(pair.clock.now)
    pair.guest.settimeout(0.2)
    assert pair.guest.recv(4096) == gc.REFRESH_REQUEST
    with pytest.raises(TimeoutError):
        pair.guest.recv(4096)


def test_refresh_never_piles_up_when_the_guest_does_not_read(pair: Pair) -> None:
    for _ in range(100000):
        pair.channel.request_refresh()
        pair.channel.tick(pair.clock.now)
        if pair.channel._out:
            break  # the socket buffer is full: one request waits, no more queue behind it
    for _ in range(1000):
        pair.channel.request_refresh()
        pair.channel.tick(pair.clock.now)
    assert len(pair.channel._out) <= len(gc.REFRESH_REQUEST)


def test_oversized_lines_are_dropped_as_they_stream(pair: Pair,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    limit = pair.channel.limits.max_line
    for _ in range(10):  # 10 x 20 KiB without a newline
        pair.send(b"A" * 20000)
        assert len(pair.channel._buffer) <= limit
        pair.clock.now += 0.2  # within the byte budget
    pair.send(b"B" * 1000 + b"\n" + USAGE)
    assert pair.channel.report is not None and pair.channel.report.mapping == MAPPING
    assert pair.channel.dropped == 1
    assert caplog.text.count("line over") == 1


def test_garbage_and_hostile_messages_are_dropped_and_reading_goes_on(
        pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    hostile = [
        b"\x00\x01\x02\xff\xfe" * 100,
        b"[" * 50000,
        b'{"__name__": "disks-usage", "mapping": [1, 2]}',
        b'{"__name__": "disks-usage", "mapping": {"s": {"name": "/etc/passwd"}}}',
        b'{"__name__": "disks-usage"}',
        b'{"__name__": "disks-usage", "mapping": {"a": {"name": {"b": {"c": 1}}}}}',
        b'"just a string"',
        b'{"__name__": "exec", "cmd": "rm -rf /"}',
    ]
    pair.send(b"\n".join(hostile) + b"\n")
    assert pair.channel.report is not None  # the 4th message: a valid, empty mapping
    assert pair.channel.report.mapping == {}
    pair.clock.now += 1
    pair.send(USAGE)
    assert pair.channel.report.mapping == MAPPING
    assert pair.channel.dropped == 6
    assert "ignored message 'exec'" in caplog.text
    assert "\x00" not in caplog.text and "\xff" not in caplog.text


def test_slow_drip_is_assembled_without_blocking(pair: Pair) -> None:
    for byte in USAGE:
        pair.send(bytes([byte]))
        pair.clock.now += 0.001
    assert pair.channel.report is not None and pair.channel.report.mapping == MAPPING
    # A drip that never ends a line costs one line of memory at most.
    for _ in range(200):
        pair.send(b"x" * 400)
        pair.clock.now += 0.01
    assert len(pair.channel._buffer) <= pair.channel.limits.max_line


def test_flood_is_rate_limited_logged_briefly_and_followed_by_a_refresh(
        caplog: pytest.LogCaptureFixture) -> None:
    pair = Pair(ChannelLimits(messages_per_second=10, message_burst=20))
    try:
        pair.channel.tick(pair.clock.now)
        assert pair.guest.recv(4096) == gc.REFRESH_REQUEST
        with caplog.at_level(logging.WARNING):
            pair.send(HEARTBEAT * 2000)
        assert pair.channel.dropped == 2000 - 20
        assert len(caplog.records) <= pair.channel.limits.log_lines_per_minute
        pair.clock.now += 0.5
        pair.send(USAGE)  # 5 tokens back: taken
        assert pair.channel.report is not None
        pair.clock.now += 1.0
        pair.channel.tick(pair.clock.now)  # a second without drops: ask for the whole state
        assert pair.guest.recv(4096) == gc.REFRESH_REQUEST
        pair.clock.now += 60
        pair.send(b"junk\n")
        assert "similar lines suppressed" in caplog.records[-1].getMessage()
    finally:
        pair.close()


def test_byte_budget_stops_reading_until_it_refills() -> None:
    pair = Pair(ChannelLimits(bytes_per_second=4096, read_chunk=1024))
    try:
        pair.guest.sendall(HEARTBEAT * 1000)
        pair.pump()
        assert not pair.channel.wants_read(pair.clock.now)
        deadline = pair.channel.tick(pair.clock.now)
        assert pair.clock.now < deadline <= pair.clock.now + 1.0
        pair.clock.now = deadline
        assert pair.channel.wants_read(pair.clock.now)
    finally:
        pair.close()


def test_eof_disconnects_without_error(pair: Pair) -> None:
    pair.send(USAGE)
    pair.guest.close()
    pair.pump()
    assert not pair.channel.connected and pair.channel.sock is None
    assert pair.channel.report is not None  # last known names stay
    pair.channel.tick(pair.clock.now + 10)  # no path: nothing to reconnect to
    assert pair.channel.fileno() == -1


def test_a_failing_report_callback_does_not_stop_reading(pair: Pair) -> None:
    def broken(_channel: GuestChannel, _report: MappingReport) -> None:
        raise RuntimeError("bug")

    pair.channel.on_report = broken
    pair.send(USAGE + HEARTBEAT)
    assert pair.channel.report is not None and pair.channel.responsive()


# -- the poller against a listening socket, as QEMU offers the channel --------------------------


class FakeQemu:
    """A unix socket server that accepts one client at a time, like QEMU's chardev."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.server.settimeout(5)

    def accept(self) -> socket.socket:
        conn, _ = self.server.accept()
        conn.settimeout(5)
        return conn

    def close(self) -> None:
        self.server.close()
        self.path.unlink(missing_ok=True)


def _wait(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_poller_follows_reconnects_and_many_channels(tmp_path: Path) -> None:
    poller = ChannelPoller()
    qemus = [FakeQemu(tmp_path / f"vm{i}.sock") for i in range(3)]
    try:
        poller.start()
        channels = [poller.add(f"vm{i}", str(q.path)) for i, q in enumerate(qemus)]
        conns = [q.accept() for q in qemus]
        for conn in conns:
            assert conn.recv(4096) == gc.REFRESH_REQUEST
        for i, conn in enumerate(conns):
            conn.sendall(line({"__name__": "disks-usage",
                               "mapping": {f"S{i}": {"name": f"/dev/vd{'abc'[i]}"}}}))
        _wait(lambda: all(ch.report is not None for ch in channels))
        assert [ch.report.names() for ch in channels if ch.report] == [
            {"S0": "/dev/vda"}, {"S1": "/dev/vdb"}, {"S2": "/dev/vdc"}]

        # QEMU drops the client (say, the VM migrated away and back): we come back and ask.
        conns[0].close()
        again = qemus[0].accept()
        assert again.recv(4096) == gc.REFRESH_REQUEST
        poller.refresh("vm1")
        assert conns[1].recv(4096) == gc.REFRESH_REQUEST
        again.sendall(HEARTBEAT)
        _wait(channels[0].responsive)

        # A hostile guest on one channel does not stop the others.
        conns[2].sendall(b"[" * 100000 + b"\n" + b"\xff" * 100000)
        conns[1].sendall(line({"__name__": "disks-usage", "mapping": {"T": {"name": "/dev/x"}}}))
        _wait(lambda: channels[1].report is not None and "T" in channels[1].report.mapping)

        poller.remove("vm2")
        _wait(lambda: conns[2].recv(1 << 20) == b"")  # its socket was closed
        assert poller.get("vm2") is None
        again.close()
        for conn in conns[1:]:
            conn.close()
    finally:
        poller.stop()
        for qemu in qemus:
            qemu.close()
    assert all(ch.sock is None for ch in channels)


def test_poller_retries_a_socket_that_is_not_there_yet(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    poller = ChannelPoller()
    path = tmp_path / "late.sock"
    try:
        with caplog.at_level(logging.INFO):
            poller.start()
            channel = poller.add("late", str(path))
            time.sleep(0.5)
            assert not channel.connected
            qemu = FakeQemu(path)
            conn = qemu.accept()
            assert conn.recv(4096) == gc.REFRESH_REQUEST
            conn.close()
            qemu.close()
        assert caplog.text.count("No such file") == 1  # not one line per retry
    finally:
        poller.stop()
