"""One libiscsi context: connect and login with deadlines, queued commands, the poll loop.

libiscsi's synchronous calls can block forever on an unreachable portal, so everything goes
through its asynchronous API driven by our own ``poll`` loop with a deadline (:meth:`Context.wait`).
The C callback only records each operation's outcome in an :class:`Op` (it runs inside C and must
never raise); session-level logic (login, redirects, retries, typed errors) is here, the
commands' meaning is in :mod:`.session` and :mod:`.pipelines`.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import select
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from virtyard.host.storage.libiscsi._ffi import (
    COMMAND_CB,
    HEADER_DIGEST_NONE,
    STATUS_BUSY,
    STATUS_CANCELLED,
    STATUS_CHECK_CONDITION,
    STATUS_ERROR,
    STATUS_GOOD,
    STATUS_REDIRECT,
    STATUS_TASK_SET_FULL,
    STATUS_TIMEOUT,
    DiscoveryAddress,
    Lib,
    ScsiTask,
    library,
)
from virtyard.host.storage.libiscsi.errors import (
    SENSE_UNIT_ATTENTION,
    IscsiConnectError,
    IscsiError,
    IscsiLoginError,
    IscsiSessionError,
    IscsiTimeoutError,
    ScsiCheckConditionError,
    login_error,
)
from virtyard.host.storage.libiscsi.values import (
    Chap,
    DiscoveredTarget,
    Portal,
    parse_portal,
    portal_string,
)

_RETRIES: Final = 5  # unit attentions (first command after login) and busy statuses
_POLL_SLICE: Final = 0.5  # also lets libiscsi scan for its own PDU timeouts
_LOGOUT_TIMEOUT: Final = 2.0


@dataclass(slots=True)
class Op:
    """One asynchronous libiscsi call in flight; the callback only records its outcome."""

    name: str
    lun: int = -1
    queue: Callable[[int], int | None] | None = None  # (re)queues the command: see submit()
    attempt: int = 0
    done: bool = False
    status: int = -1
    data: bytes = b""
    sense_key: int = 0
    sense_ascq: int = 0
    targets: list[DiscoveredTarget] | None = None
    on_done: Callable[[Op], None] | None = None
    task: int = 0  # the struct scsi_task * of a SCSI command, until its callback frees it
    failure: str = ""  # a bug while recording the outcome (should never happen)
    error: str = ""  # libiscsi's error text when the operation failed
    owner: object = None  # the probe that queued it; stragglers of an abandoned one are dropped


class _Handle:
    """Owns the C context and the callback thunk; destroying it is idempotent.

    Kept apart from :class:`Context` so a ``weakref.finalize`` can free the C context of a
    session that was never closed, without keeping the session alive.
    """

    def __init__(self, lib: Lib, ctx: int, callback: Any) -> None:
        self.lib = lib
        self.ctx: int | None = ctx
        self.callback = callback  # libiscsi calls it up to and during destroy: keep it alive

    def destroy(self) -> None:
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            self.lib.destroy_context(ctx)


class Context:
    """A libiscsi context: connect + login with deadlines, queued commands, and the poll loop."""

    def __init__(self, *, initiator_name: str, session_type: int, target_iqn: str | None,
                 chap: Chap | None, portal: str) -> None:
        self._lib = library()
        self.portal = portal
        self.target = target_iqn or ""
        self._secret = chap.password if chap is not None else ""
        ctx = self._lib.create_context(initiator_name.encode())
        if not ctx:
            raise IscsiSessionError("iscsi_create_context failed", portal=portal,
                                    target=self.target)
        # The thunk must not hold the context strongly, or the finalizer below (which keeps
        # the thunk alive until libiscsi is done with it) would keep the context alive forever.
        this = weakref.ref(self)

        def trampoline(_ctx: int | None, status: int, command_data: int | None,
                       private: int | None) -> None:
            context = this()
            if context is not None:
                context._on_callback(status, command_data, private)

        self._callback = COMMAND_CB(trampoline)
        self._handle = _Handle(self._lib, ctx, self._callback)
        self._finalizer = weakref.finalize(self, self._handle.destroy)
        self.ctx: int = ctx
        self._ops: dict[int, Op] = {}
        self._completed: list[Op] = []
        self._orphans: list[int] = []  # tasks whose callback came without them (timeout, cancel)
        self._next_token = 1
        self._poller = select.poll()
        self._polled: tuple[int, int] = (-1, 0)
        lib = self._lib
        lib.set_noautoreconnect(ctx, 1)
        lib.set_session_type(ctx, session_type)
        lib.set_header_digest(ctx, HEADER_DIGEST_NONE)
        if target_iqn is not None and lib.set_targetname(ctx, target_iqn.encode()) != 0:
            detail = self._error_text()
            self.close()
            raise IscsiSessionError(f"invalid target name {target_iqn!r}", detail=detail,
                                    portal=portal)
        if chap is not None and lib.set_initiator_username_pwd(
                ctx, chap.username.encode(), chap.password.encode()) != 0:
            self.close()
            raise IscsiSessionError("cannot set CHAP credentials", portal=portal,
                                    target=self.target)

    # -- plumbing --

    def _error_text(self) -> str:
        """libiscsi's last error for this context, CHAP secret masked (should it ever appear)."""
        if self.closed:
            return ""
        text = self._lib.error_text(self.ctx)
        return text.replace(self._secret, "***") if self._secret else text

    def _on_callback(self, status: int, command_data: int | None, private: int | None) -> None:
        # Runs inside iscsi_service() or iscsi_destroy_context(): only record, never raise.
        op = self._ops.pop(private or 0, None)
        if op is None:
            return  # e.g. the connect callback libiscsi repeats when the connection goes
        try:
            op.status = status
            if status != STATUS_GOOD:
                # Now, before libiscsi overwrites it (e.g. "Can not reconnect right now").
                op.error = self._error_text()
            if op.targets is not None:
                if status == STATUS_GOOD and command_data:
                    op.targets.extend(_copy_discovery(command_data))
            elif op.task and command_data:
                task = ScsiTask.from_address(command_data)
                if status == STATUS_GOOD:
                    datain = task.datain
                    if datain.data and datain.size > 0:
                        op.data = ctypes.string_at(datain.data, datain.size)
                elif status == STATUS_CHECK_CONDITION:
                    op.sense_key = task.sense.key
                    op.sense_ascq = task.sense.ascq
                self._lib.free_scsi_task(command_data)
            elif op.task:
                # Timed out or cancelled: libiscsi passes no task and frees only its PDU.
                self._orphans.append(op.task)
        except BaseException as e:  # pragma: no cover - must not unwind through C
            op.status = STATUS_ERROR
            op.failure = repr(e)
        op.done = True
        self._completed.append(op)

    def _free_orphans(self) -> None:
        while self._orphans:
            self._lib.free_scsi_task(self._orphans.pop())

    def _token(self, op: Op) -> int:
        token = self._next_token
        self._next_token += 1
        self._ops[token] = op
        return token

    def close(self) -> None:
        """Free the C context; libiscsi cancels pending commands (their tasks are freed)."""
        self._handle.destroy()
        self._finalizer.detach()
        self._free_orphans()
        self._ops.clear()

    def set_pdu_timeout(self, seconds: float) -> None:
        """libiscsi's own per-command timeout, for commands queued from now on.

        A second above our deadline: ours should fire first (with a clearer error); libiscsi's
        (whole seconds, checked only when we service the socket) is the backstop.
        """
        self._lib.set_timeout(self.ctx, math.ceil(seconds) + 1)

    @property
    def closed(self) -> bool:
        return self._handle.ctx is None

    def wait(self, finished: Callable[[], bool], deadline: float, what: str) -> None:
        """Drive libiscsi until ``finished()``, failing past ``deadline`` or on a socket error."""
        lib, ctx = self._lib, self.ctx
        while not finished():
            if self._completed:
                return  # let the caller look at completions (retries, follow-ups) first
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise IscsiTimeoutError(f"{what}: no answer in time", portal=self.portal,
                                        target=self.target)
            fd = lib.get_fd(ctx)
            if fd < 0:
                raise IscsiSessionError(f"{what}: not connected", detail=self._error_text(),
                                        portal=self.portal, target=self.target)
            events = lib.which_events(ctx)
            if (fd, events) != self._polled:
                if self._polled[0] not in (-1, fd):
                    self._poller.unregister(self._polled[0])  # libiscsi reconnected: new fd
                self._poller.register(fd, events)
                self._polled = (fd, events)
            ready = self._poller.poll(max(1, math.ceil(min(remaining, _POLL_SLICE) * 1000)))
            revents = ready[0][1] if ready else 0
            failed = lib.service(ctx, revents) < 0
            if self._orphans:
                self._free_orphans()
            if failed:
                if self._completed or finished():
                    return  # the callback already carries the failure
                raise IscsiSessionError(f"{what}: connection failed", detail=self._error_text(),
                                        portal=self.portal, target=self.target)

    def has_completions(self) -> bool:
        """Whether completed operations wait to be :meth:`drain`-ed."""
        return bool(self._completed)

    def drain(self) -> list[Op]:
        done, self._completed = self._completed, []
        return done

    def run(self, op: Op, deadline: float) -> Op:
        """Wait for one queued operation (used for connect, login, logout, sync commands)."""
        while not op.done:
            self.wait(lambda: op.done, deadline, op.name)
            self.drain()  # others (e.g. further chunks of a read) are looked at via their op
        return op

    # -- session setup --

    def connect_and_login(self, address: str, port: int, timeout: float) -> None:
        """TCP connect then login, each failure typed; follows one login redirect."""
        lib, ctx = self._lib, self.ctx
        deadline = time.monotonic() + timeout
        self.set_pdu_timeout(timeout)
        portal = portal_string(address, port)
        for _hop in range(3):
            op = Op("connect")
            if lib.connect_async(ctx, portal.encode(), self._callback, self._token(op)) != 0:
                raise IscsiConnectError(f"cannot connect to {portal}", detail=self._error_text(),
                                        portal=portal, target=self.target)
            try:
                self.run(op, deadline)
            except IscsiTimeoutError as e:
                raise IscsiConnectError(f"cannot connect to {portal} within {timeout:g} s",
                                        portal=portal, target=self.target) from e
            except IscsiSessionError as e:
                raise IscsiConnectError(f"cannot connect to {portal}", detail=e.detail,
                                        portal=portal, target=self.target) from e
            if op.status != STATUS_GOOD:
                raise IscsiConnectError(f"cannot connect to {portal}",
                                        detail=op.error or self._error_text(), portal=portal,
                                        target=self.target)
            op = Op("login")
            if lib.login_async(ctx, self._callback, self._token(op)) != 0:
                raise IscsiLoginError(f"login to {self.target or portal} failed",
                                      detail=self._error_text(), portal=portal,
                                      target=self.target)
            late = IscsiTimeoutError(
                f"login to {self.target or portal}: no answer within {timeout:g} s",
                portal=portal, target=self.target)
            try:
                self.run(op, deadline)
            except IscsiTimeoutError as e:
                raise late from e
            except IscsiSessionError as e:  # libiscsi gives no login callback for this
                raise IscsiLoginError(
                    f"login to {self.target or portal} failed: the portal dropped the connection",
                    detail=e.detail, portal=portal, target=self.target) from e
            if op.status == STATUS_GOOD:
                self.portal = portal
                return
            if op.status == STATUS_TIMEOUT:  # libiscsi's own timer went off first
                raise late
            detail = op.error or self._error_text()
            if op.status != STATUS_REDIRECT:
                raise login_error(detail)(f"login to {self.target or portal} failed",
                                          detail=detail, portal=portal, target=self.target)
            redirect = lib.get_target_address(ctx)
            lib.disconnect(ctx)
            if not redirect:
                raise IscsiLoginError("target redirected the login without an address",
                                      detail=detail, portal=portal, target=self.target)
            redirected = parse_portal(redirect.decode())
            portal = portal_string(redirected.address, redirected.port)
        raise IscsiLoginError("too many login redirects", portal=portal, target=self.target)

    def logout(self) -> None:
        """Log out politely (bounded), then drop the connection; errors are ignored."""
        if self.closed:
            return
        lib, ctx = self._lib, self.ctx
        if lib.is_logged_in(ctx):
            op = Op("logout")
            if lib.logout_async(ctx, self._callback, self._token(op)) == 0:
                with contextlib.suppress(IscsiError):
                    self.run(op, time.monotonic() + _LOGOUT_TIMEOUT)
        lib.disconnect(ctx)

    # -- commands --

    def discovery(self, deadline: float) -> list[DiscoveredTarget]:
        op = Op("SendTargets discovery", targets=[])
        if self._lib.discovery_async(self.ctx, self._callback, self._token(op)) != 0:
            raise IscsiSessionError("cannot send SendTargets", detail=self._error_text(),
                                    portal=self.portal)
        self.run(op, deadline)
        if op.status != STATUS_GOOD:
            raise IscsiSessionError("SendTargets discovery failed",
                                    detail=op.error or self._error_text(), portal=self.portal)
        # libiscsi prepends each target it parses; restore the order the target sent.
        return list(reversed(op.targets or []))

    def submit(self, name: str, lun: int, queue: Callable[[int], int | None],
               on_done: Callable[[Op], None] | None = None, owner: object = None) -> Op:
        """Queue one SCSI command; ``queue(token)`` calls the libiscsi ``*_task`` function."""
        op = Op(name, lun, queue, on_done=on_done, owner=owner)
        task = queue(self._token(op))
        if not task:
            raise IscsiSessionError(f"cannot queue {name} for LUN {lun}",
                                    detail=self._error_text(), portal=self.portal,
                                    target=self.target)
        op.task = task
        return op

    def check(self, op: Op) -> ScsiCheckConditionError | IscsiError | None:
        """None if ``op`` succeeded, else the error it ended with (not raised)."""
        if op.failure:
            return IscsiSessionError(f"{op.name} on LUN {op.lun}: {op.failure}",
                                     portal=self.portal, target=self.target)
        if op.status == STATUS_GOOD:
            return None
        if op.status == STATUS_CHECK_CONDITION:
            return ScsiCheckConditionError(op.name, op.lun, op.sense_key, op.sense_ascq >> 8,
                                           op.sense_ascq & 0xFF, portal=self.portal,
                                           target=self.target)
        if op.status == STATUS_TIMEOUT:
            return IscsiTimeoutError(f"{op.name} on LUN {op.lun}: timed out",
                                     portal=self.portal, target=self.target)
        reason = {STATUS_CANCELLED: "cancelled (session lost)", STATUS_ERROR: "failed"}.get(
            op.status, f"SCSI status 0x{op.status:x}")
        return IscsiSessionError(f"{op.name} on LUN {op.lun}: {reason}",
                                 detail=op.error or self._error_text(), portal=self.portal,
                                 target=self.target)

    @staticmethod
    def retryable(op: Op) -> bool:
        """Unit attention (e.g. power on/reset after login) or a busy LU: send it again."""
        if op.attempt >= _RETRIES:
            return False
        if op.status == STATUS_CHECK_CONDITION:
            return op.sense_key == SENSE_UNIT_ATTENTION
        return op.status in (STATUS_BUSY, STATUS_TASK_SET_FULL)

    def retry(self, op: Op) -> Op:
        assert op.queue is not None
        again = self.submit(op.name, op.lun, op.queue, op.on_done, op.owner)
        again.attempt = op.attempt + 1
        return again

    def finish(self, op: Op, deadline: float) -> Op:
        """Wait for a submitted command, sending it again while :meth:`retryable`; raises
        its error (:meth:`check`), else returns the completed op."""
        done = self.run(op, deadline)
        while self.retryable(done):
            done = self.run(self.retry(done), deadline)
        error = self.check(done)
        if error is not None:
            raise error
        return done

    # -- libiscsi task constructors (lun is already in wire encoding) --

    def q_inquiry(self, wire_lun: int, page: int | None, alloc: int) -> Callable[[int], int | None]:
        evpd, code = (0, 0) if page is None else (1, page)
        return lambda token: self._lib.inquiry_task(
            self.ctx, wire_lun, evpd, code, alloc, self._callback, token)

    def q_readcapacity16(self, wire_lun: int) -> Callable[[int], int | None]:
        return lambda token: self._lib.readcapacity16_task(
            self.ctx, wire_lun, self._callback, token)

    def q_readcapacity10(self, wire_lun: int) -> Callable[[int], int | None]:
        return lambda token: self._lib.readcapacity10_task(
            self.ctx, wire_lun, 0, 0, self._callback, token)

    def q_reportluns(self, alloc: int) -> Callable[[int], int | None]:
        return lambda token: self._lib.reportluns_task(
            self.ctx, 0, alloc, self._callback, token)

    def q_read(self, wire_lun: int, lba: int, length: int,
               block_size: int) -> Callable[[int], int | None]:
        blocks = length // block_size
        if lba + blocks <= 0xFFFFFFFF and blocks <= 0xFFFF:
            return lambda token: self._lib.read10_task(
                self.ctx, wire_lun, lba, length, block_size, 0, 0, 0, 0, 0, self._callback,
                token)
        return lambda token: self._lib.read16_task(
            self.ctx, wire_lun, lba, length, block_size, 0, 0, 0, 0, 0, self._callback, token)


    def q_write(self, wire_lun: int, lba: int, buffer: ctypes.Array[ctypes.c_ubyte],
                block_size: int) -> Callable[[int], int | None]:
        # The closure holds ``buffer`` for as long as the op (and any retry) may send it.
        return lambda token: self._lib.write16_task(
            self.ctx, wire_lun, lba, ctypes.addressof(buffer), len(buffer), block_size, 0, 0,
            0, 0, 0, self._callback, token)

    def q_sync(self, wire_lun: int) -> Callable[[int], int | None]:
        return lambda token: self._lib.synchronizecache10_task(
            self.ctx, wire_lun, 0, 0, 0, 0, self._callback, token)


def _copy_discovery(address: int) -> list[DiscoveredTarget]:
    """Copy libiscsi's SendTargets list; it is freed as soon as the callback returns."""
    targets: list[DiscoveredTarget] = []
    entry = ctypes.cast(ctypes.c_void_p(address), ctypes.POINTER(DiscoveryAddress))
    while entry:
        name = entry.contents.target_name
        portals: list[Portal] = []
        portal = entry.contents.portals
        while portal:
            if portal.contents.portal:
                portals.append(parse_portal(portal.contents.portal.decode()))
            portal = portal.contents.next
        if name:
            targets.append(DiscoveredTarget(name.decode(), tuple(reversed(portals))))
        entry = entry.contents.next
    return targets

