"""The host end of our guest agent's virtio-serial channel: read it, distrust it, remember it.

QEMU listens on a unix socket for each VM's ``org.virtyard.guest_agent.0`` channel; we connect
and read newline-delimited JSON objects named by ``__name__`` (oVirt's guest agent protocol).
The guest is untrusted: whatever it writes, the host agent must neither crash, block, nor spend
unbounded memory or CPU on it. Hence:

* sockets are non-blocking and driven by one selector thread (:class:`ChannelPoller`) for all
  VMs, never by a blocking read;
* a line may hold at most ``max_line`` bytes: a longer one is dropped as it streams in (its
  bytes are never kept), so a slow drip or an endless line costs at most one line of memory;
* reading is paced by a byte budget per second (the channel is not read while it is spent, so
  QEMU and then the guest are held back instead of us), and messages beyond a rate are dropped;
* every message is parsed and validated (:func:`parse_message`, :func:`validate_mapping`):
  non-UTF-8, non-JSON, too deep, non-object, unknown shapes, oversized mappings, non-string or
  control-character serials, names not under ``/dev/`` are dropped with one log line each, and
  log lines themselves are rate limited per channel so a hostile guest cannot flood the log.

Only a validated ``disks-usage`` mapping is kept (:attr:`GuestChannel.report`, with its arrival
time); any valid message counts as a sign of life (:meth:`GuestChannel.responsive`). On every
(re)connection we ask for a ``refresh``: the guest may not notice that we went away and came back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("virtyard.host.virt.guest_channel")

CHANNEL_NAME = "org.virtyard.guest_agent.0"
HEARTBEAT_TIMEOUT = 30.0  # the agent sends a heartbeat every 5 s
REFRESH_REQUEST = b'{"__name__":"refresh","apiVersion":1}\n'

# A device name as a guest may report it: /dev/ and path components of safe characters, none
# starting with a dot (so no "." or ".." components).
_DEVICE_NAME = re.compile(r"/dev(?:/[A-Za-z0-9_+:@-][A-Za-z0-9._+:@-]*)+")
# C0 and C1 controls, DEL, and the format characters that can reorder or hide text in logs.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


@dataclass(frozen=True)
class ChannelLimits:
    """What one guest may make us hold or do. The defaults fit far more disks than a VM has
    (a 512-entry mapping is about 40 KiB of JSON) while bounding a hostile guest."""

    max_line: int = 64 * 1024
    read_chunk: int = 16 * 1024  # per wake-up, so one busy channel cannot starve the others
    bytes_per_second: int = 256 * 1024
    messages_per_second: float = 20.0
    message_burst: int = 40
    max_depth: int = 4  # {"mapping": {serial: {"name": …}}} is depth 3
    max_entries: int = 512
    max_serial: int = 256
    max_name: int = 128
    max_message_name: int = 64
    log_lines_per_minute: int = 10
    reconnect_backoff: tuple[float, float] = (0.2, 5.0)


class GuestMessageError(ValueError):
    """A message from the guest was dropped; the text says why (for one log line)."""


_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_INNERMOST = re.compile(r"[\[{][\]}]")


def nested_deeper_than(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests brackets deeper than ``limit``, checked before parsing.

    Strings are cut out, then each pass removes the innermost bracket pairs; all in the regex
    engine, so a line of 60 000 ``[`` costs a few linear passes rather than a deep recursion
    in the parser.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if re.search(rf"[\[{{]{{{limit + 1}}}", brackets):  # openers in a row, closed or not
        return True
    for _ in range(limit):
        brackets, removed = _INNERMOST.subn("", brackets)
        if not removed:
            return False
    return _INNERMOST.search(brackets) is not None


def _reject_constant(name: str) -> Any:
    raise GuestMessageError(f"non-standard JSON constant {name}")


def parse_message(line: bytes, limits: ChannelLimits = ChannelLimits()) -> dict[str, Any]:
    """One protocol line as a JSON object with a string ``__name__``, or GuestMessageError."""
    if len(line) > limits.max_line:
        raise GuestMessageError(f"line of {len(line)} bytes is over {limits.max_line}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GuestMessageError(f"not UTF-8 (byte {exc.start})") from None
    if nested_deeper_than(text, limits.max_depth):
        raise GuestMessageError(f"JSON nested deeper than {limits.max_depth}")
    try:
        message = json.loads(text, parse_constant=_reject_constant)
    except GuestMessageError:
        raise
    except (ValueError, RecursionError) as exc:
        raise GuestMessageError(f"not JSON ({str(exc)[:80]})") from None
    if not isinstance(message, dict):
        raise GuestMessageError(f"a JSON {type(message).__name__}, not an object")
    name = message.get("__name__")
    if not isinstance(name, str) or not name or len(name) > limits.max_message_name \
            or _CONTROL.search(name):
        raise GuestMessageError("no valid __name__")
    return message


def _printable(value: str, limit: int = 60) -> str:
    """A guest string made safe for one log line."""
    return _CONTROL.sub("?", value[:limit]) + ("…" if len(value) > limit else "")


def validate_mapping(raw: object, limits: ChannelLimits = ChannelLimits()
                     ) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The valid entries of a ``mapping`` field and why each other entry was left out.

    The whole field is refused (GuestMessageError) when it is not an object or has more than
    ``max_entries`` entries; single bad entries are left out, so one odd disk does not hide
    the others. Kept values are exactly ``{"name": "/dev/…"}`` (other fields are dropped).
    """
    if not isinstance(raw, dict):
        raise GuestMessageError(f"mapping is a JSON {type(raw).__name__}, not an object")
    if len(raw) > limits.max_entries:
        raise GuestMessageError(f"mapping has {len(raw)} entries, over {limits.max_entries}")
    mapping: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    for serial, value in raw.items():
        shown = _printable(serial)
        if not serial or len(serial) > limits.max_serial or _CONTROL.search(serial):
            problems.append(f"serial {shown!r} is empty, too long or has control characters")
            continue
        name = value.get("name") if isinstance(value, dict) else None
        if not isinstance(name, str):
            problems.append(f"{shown!r}: no string name")
        elif len(name) > limits.max_name or not _DEVICE_NAME.fullmatch(name):
            problems.append(f"{shown!r}: name {_printable(name)!r} is not a /dev/ path")
        else:
            mapping[serial] = {"name": name}
    return mapping, problems


@dataclass(frozen=True)
class MappingReport:
    """A validated mapping as the guest reported it, and when it arrived."""

    mapping: Mapping[str, Mapping[str, str]]
    received: float  # time.monotonic()
    received_wall: float  # time.time(), for people
    sequence: int  # counts reports on this channel, changed or not

    def names(self) -> dict[str, str]:
        """``{guest serial: device name}``."""
        return {serial: value["name"] for serial, value in self.mapping.items()}


class _Budget:
    """A token bucket: ``rate`` per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, amount: float, now: float) -> bool:
        self.refill(now)
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    def ready_at(self, amount: float) -> float:
        """When ``amount`` tokens will be there (from the last refill)."""
        return self.stamp + max(0.0, amount - self.tokens) / self.rate


class GuestChannel:
    """One VM's channel. It owns no thread: :class:`ChannelPoller` (or a test) drives it
    through :meth:`on_readable`, :meth:`on_writable` and :meth:`tick`.

    State for other threads — :attr:`report`, :attr:`last_seen`, :attr:`connected` — is
    replaced whole, never mutated, so reading it needs no lock. ``on_report`` runs on the
    driving thread for each validated mapping: it must be quick (note, notify), never block.
    """

    def __init__(self, path: str | None, *, name: str = "", limits: ChannelLimits | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 on_report: Callable[[GuestChannel, MappingReport], None] | None = None,
                 wake: Callable[[], None] | None = None) -> None:
        self.path = path
        self.name = name or (path or "channel")
        self.limits = limits or ChannelLimits()
        self.clock = clock
        self.wall_clock = wall_clock
        self.on_report = on_report
        self._wake = wake  # tells the driving thread there is something to write
        now = clock()
        self.report: MappingReport | None = None
        self.last_seen: float | None = None
        self.connected = False
        self.dropped = 0  # messages and lines dropped, for tests and stats
        self.sock: socket.socket | None = None
        self._buffer = bytearray()
        self._discarding = False
        self._out = b""
        self._refresh_wanted = False
        self._bytes = _Budget(self.limits.bytes_per_second, self.limits.bytes_per_second, now)
        self._messages = _Budget(self.limits.messages_per_second, self.limits.message_burst,
                                 now)
        self._logs = _Budget(self.limits.log_lines_per_minute / 60.0,
                             self.limits.log_lines_per_minute, now)
        self._suppressed = 0
        self._flooded_at: float | None = None
        self._sequence = 0
        self._retry_at = now
        self._backoff = self.limits.reconnect_backoff[0]
        self._last_error = ""

    @classmethod
    def from_socket(cls, sock: socket.socket, **kwargs: Any) -> GuestChannel:
        """A channel over an already connected socket (tests; a socketpair), no reconnects."""
        channel = cls(None, **kwargs)
        channel._adopt(sock)
        return channel

    # -- what the rest of the host agent reads ------------------------------------------------

    def responsive(self, timeout: float = HEARTBEAT_TIMEOUT, now: float | None = None) -> bool:
        """Whether a valid message arrived within ``timeout`` seconds."""
        seen = self.last_seen
        return seen is not None and (self.clock() if now is None else now) - seen <= timeout

    def request_refresh(self) -> None:
        """Ask the guest to send its state now (e.g. right after a disk hot-plug). Any thread
        may ask; the request is written by the thread driving the channel, at most one at a
        time."""
        self._refresh_wanted = True
        if self._wake is not None:
            self._wake()

    # -- driving ------------------------------------------------------------------------------

    def fileno(self) -> int:
        return -1 if self.sock is None else self.sock.fileno()

    def _resume_tokens(self) -> float:
        return min(self.limits.read_chunk, self.limits.bytes_per_second / 8)

    def wants_read(self, now: float) -> bool:
        """False while the byte budget is spent: the data then waits in QEMU, not here."""
        if self.sock is None:
            return False
        self._bytes.refill(now)
        return self._bytes.tokens >= self._resume_tokens()

    def wants_write(self) -> bool:
        return self.sock is not None and (bool(self._out) or self._refresh_wanted)

    def tick(self, now: float) -> float:
        """Housekeeping (connect, refresh after a flood, flush); returns the next deadline."""
        if self.sock is None and self.path is not None and now >= self._retry_at:
            self._connect(now)
        if self._flooded_at is not None and now - self._flooded_at >= 1.0:
            self._flooded_at = None
            self.request_refresh()  # messages were dropped: get the current state again
        if self.wants_write():
            self.on_writable(now)
        deadlines = [now + 1.0]
        if self.sock is None and self.path is not None:
            deadlines.append(self._retry_at)
        if self.sock is not None and self._bytes.tokens < self._resume_tokens():
            deadlines.append(self._bytes.ready_at(self._resume_tokens()))
        if self._flooded_at is not None:
            deadlines.append(self._flooded_at + 1.0)
        return min(deadlines)

    def _connect(self, now: float) -> None:
        assert self.path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            message = f"cannot connect to {self.path}: {exc.strerror or exc}"
            if message != self._last_error:
                log.info("guest channel %s: %s", self.name, message)
                self._last_error = message
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, self.limits.reconnect_backoff[1])
            return
        self._last_error = ""
        self._backoff = self.limits.reconnect_backoff[0]
        log.info("guest channel %s: connected", self.name)
        self._adopt(sock)

    def _adopt(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.connected = True
        self._buffer = bytearray()
        self._discarding = False
        self._out = b""
        # The guest may not have noticed we were away: ask for everything again.
        self._refresh_wanted = True

    def _disconnect(self, now: float, why: str) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            log.info("guest channel %s: %s", self.name, why)
        self.connected = False
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, self.limits.reconnect_backoff[1])

    def close(self) -> None:
        """Stop for good (the VM is gone)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.connected = False
        self.path = None

    def on_writable(self, now: float) -> None:
        if self.sock is None:
            return
        if self._refresh_wanted and not self._out:
            self._out = REFRESH_REQUEST
            self._refresh_wanted = False
        if not self._out:
            return
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return  # the guest is not reading; the one request waits, no more pile up
        except OSError as exc:
            self._disconnect(now, f"write failed ({exc.strerror or exc})")
            return
        self._out = self._out[sent:]

    def on_readable(self, now: float) -> None:
        """Read what the budget allows (at most one chunk) and handle complete lines."""
        if self.sock is None:
            return
        self._bytes.refill(now)
        allowed = min(self.limits.read_chunk, int(self._bytes.tokens))
        if allowed < 1:
            return
        try:
            data = self.sock.recv(allowed)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return
            self._disconnect(now, f"read failed ({exc.strerror or exc})")
            return
        if not data:
            self._disconnect(now, "closed by QEMU (VM stopped or migrated?)")
            return
        self._bytes.take(len(data), now)
        self._feed(data, now)

    def _feed(self, data: bytes, now: float) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._discarding:
                self._discarding = False
            elif len(self._buffer) + end - start <= self.limits.max_line:
                self._buffer += data[start:end]
                self._line(bytes(self._buffer), now)
            else:
                self._drop(now, f"line over {self.limits.max_line} bytes")
            self._buffer.clear()
            start = end + 1
        rest = len(data) - start
        if self._discarding:
            return
        if len(self._buffer) + rest > self.limits.max_line:
            self._drop(now, f"line over {self.limits.max_line} bytes")
            self._buffer.clear()
            self._discarding = True  # its remaining bytes go, up to the next newline
        else:
            self._buffer += data[start:]

    def _line(self, line: bytes, now: float) -> None:
        if not line.strip():
            return  # the agent sends an empty line first on each connection
        if not self._messages.take(1, now):
            self._flooded_at = now
            self._drop(now, f"over {self.limits.messages_per_second:g} messages per second")
            return
        try:
            message = parse_message(line, self.limits)
        except GuestMessageError as exc:
            self._drop(now, str(exc))
            return
        name = message["__name__"]
        if name == "disks-usage":
            self._disks_usage(message, now)
        elif name != "heartbeat":
            self._note(now, f"ignored message {_printable(name)!r}")
        self.last_seen = now

    def _disks_usage(self, message: dict[str, Any], now: float) -> None:
        try:
            mapping, problems = validate_mapping(message.get("mapping"), self.limits)
        except GuestMessageError as exc:
            self._drop(now, str(exc))
            return
        if problems:
            self._note(now, f"left {len(problems)} mapping entries out: {problems[0]}"
                       + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        self._sequence += 1
        report = MappingReport(mapping, now, self.wall_clock(), self._sequence)
        self.report = report
        if self.on_report is not None:
            try:
                self.on_report(self, report)
            except Exception:  # a bug there must not stop reading the guest
                log.exception("guest channel %s: report callback failed", self.name)

    def _drop(self, now: float, why: str) -> None:
        self.dropped += 1
        self._note(now, f"dropped a message: {why}")

    def _note(self, now: float, text: str) -> None:
        """One log line, unless this channel has used its share of the log."""
        if not self._logs.take(1, now):
            self._suppressed += 1
            return
        if self._suppressed:
            text += f" ({self._suppressed} similar lines suppressed)"
            self._suppressed = 0
        log.warning("guest channel %s: %s", self.name, text)


class ChannelPoller:
    """One thread and one selector for the channels of every VM on the host.

    Channels are touched only by the poller's thread once added (sockets, reads, writes);
    other threads add, remove, read :attr:`GuestChannel.report` and ask for refreshes.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._channels: dict[str, GuestChannel] = {}
        self._retired: list[GuestChannel] = []
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._registered: dict[GuestChannel, tuple[socket.socket, int]] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread: threading.Thread | None = None
        self._stopping = False

    def add(self, key: str, path: str, **kwargs: Any) -> GuestChannel:
        """Follow the channel socket at ``path`` under ``key`` (replacing one with that key)."""
        channel = GuestChannel(path, name=key, clock=self.clock, wake=self.wake, **kwargs)
        with self._lock:
            old = self._channels.pop(key, None)
            self._channels[key] = channel
            if old is not None:
                self._retired.append(old)
        self.wake()
        return channel

    def get(self, key: str) -> GuestChannel | None:
        with self._lock:
            return self._channels.get(key)

    def remove(self, key: str) -> None:
        """Stop following ``key``; its socket is closed by the poller's thread."""
        with self._lock:
            channel = self._channels.pop(key, None)
            if channel is not None:
                self._retired.append(channel)
        self.wake()

    def refresh(self, key: str) -> None:
        """Ask one guest for its state now (e.g. right after a disk hot-plug)."""
        channel = self.get(key)
        if channel is not None:
            channel.request_refresh()

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="guest-channels",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close every channel; the poller cannot be started again."""
        self._stopping = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            channels = [*self._channels.values(), *self._retired]
            self._channels.clear()
            self._retired = []
        for channel in channels:
            self._unregister(channel)
            channel.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        while not self._stopping:
            try:
                self.run_once()
            except Exception:  # never let the thread die: log and go on
                log.exception("guest channel poller failed; going on")
                time.sleep(0.5)

    def run_once(self, max_wait: float = 1.0) -> None:
        """One selector round: housekeeping, (re)registration, wait, dispatch."""
        now = self.clock()
        with self._lock:
            channels = list(self._channels.values())
            retired, self._retired = self._retired, []
        for channel in retired:
            self._unregister(channel)
            channel.close()
        deadline = now + max_wait
        wanted: list[tuple[GuestChannel, int]] = []
        for channel in channels:
            deadline = min(deadline, channel.tick(now))
            wanted.append((channel, self._wanted_events(channel, now)))
        # Every stale registration goes before any new one: a reconnected socket may have been
        # given the descriptor number another channel's closed socket is still registered by.
        for channel, events in wanted:
            current = self._registered.get(channel)
            if current is not None and (current[0] is not channel.sock or not events):
                self._unregister(channel)
        for channel, events in wanted:
            self._register(channel, events)
        ready = self._selector.select(max(0.0, deadline - self.clock()))
        now = self.clock()
        for key, mask in ready:
            if key.fileobj is self._wake_r:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
                continue
            channel = key.data
            if mask & selectors.EVENT_READ:
                channel.on_readable(now)
            if mask & selectors.EVENT_WRITE:
                channel.on_writable(now)

    @staticmethod
    def _wanted_events(channel: GuestChannel, now: float) -> int:
        """What to wait for: no reading while the channel's byte budget is spent."""
        if channel.sock is None:
            return 0
        return (selectors.EVENT_READ if channel.wants_read(now) else 0) | (
            selectors.EVENT_WRITE if channel.wants_write() else 0)

    def _register(self, channel: GuestChannel, events: int) -> None:
        sock = channel.sock
        if sock is None or not events:
            return
        current = self._registered.get(channel)
        if current is None:
            self._selector.register(sock, events, channel)
        elif current[1] != events:
            self._selector.modify(sock, events, channel)
        self._registered[channel] = (sock, events)

    def _unregister(self, channel: GuestChannel) -> None:
        current = self._registered.pop(channel, None)
        if current is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(current[0])
