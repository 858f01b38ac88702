"""JSON-RPC 2.0 dispatch over the verb schema: requests, batches, notifications, error objects.

Transport-free: the HTTPS server hands it request bodies, tests and benchmarks call it directly.
Each verb runs in a worker thread (libvirt, libiscsi and the LVM tools block), under the named
locks its schema entry declares.

Declared errors are enforced: a verb may fail with the errors its schema entry declares and the
common ones (:data:`COMMON_ERRORS`); any other :class:`HostError` is logged as a bug and counted
in :attr:`Dispatcher.undeclared` — and still returned as raised. Returning it keeps the code and
data a caller may act on (a missing VM stays ``noVM``); mapping it to a general error would turn
a documentation bug into a behaviour change. The fix is always to declare it (or stop raising
it), and tests assert the count is zero.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from typing import Any, Generic

import anyio
import anyio.to_thread

from virtyard.host.rpc.errors import (
    GeneralError,
    HostError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    MethodNotFoundError,
    ParseError,
)
from virtyard.host.rpc.locks import KeyedLocks
from virtyard.host.rpc.schema import Ctx, Schema, Verb

log = logging.getLogger("virtyard.host.rpc")

MAX_BODY = 16 << 20  # a request larger than this is refused unread
# Any verb may fail with these: the protocol's own, and an unexpected failure.
COMMON_ERRORS: tuple[type[HostError], ...] = (
    ParseError, InvalidRequestError, MethodNotFoundError, InvalidParamsError, InternalError,
    GeneralError)


class Dispatcher(Generic[Ctx]):
    """Runs verbs of ``schema`` against ``ctx`` (the agent's services)."""

    def __init__(self, schema: Schema[Ctx], ctx: Ctx, *, workers: int = 32,
                 locks: KeyedLocks | None = None) -> None:
        self.schema = schema
        self.ctx = ctx
        self.locks = KeyedLocks() if locks is None else locks  # the agent's one table
        self._limiter = anyio.CapacityLimiter(workers)
        # (verb, error name) -> how often a verb raised an error it does not declare
        self.undeclared: Counter[tuple[str, str]] = Counter()

    def call(self, method: str, params: object = None, *, request_id: str = "-") -> Any:
        """Run one verb synchronously and return its JSON-ready result; raise HostError."""
        verb = self.schema.verbs.get(method)
        if verb is None:
            raise MethodNotFoundError(f"unknown method '{method}'")
        parsed = verb.parse_params(params)
        start = time.monotonic()
        try:
            with self.locks.hold(verb.lock_keys(parsed)):
                result = verb.handler(self.ctx, parsed)
            out = verb.dump_result(result)
        except HostError as exc:
            log.warning("[%s] %s failed in %.3fs: %s %s", request_id, method,
                        time.monotonic() - start, exc.code, exc.message)
            self._check_declared(verb, exc, request_id)
            raise
        except Exception as exc:
            log.exception("[%s] %s crashed", request_id, method)
            raise GeneralError(f"{type(exc).__name__}: {exc}") from exc
        log.info("[%s] %s ok in %.3fs", request_id, method, time.monotonic() - start)
        return out

    def _check_declared(self, verb: Verb[Ctx], exc: HostError, request_id: str) -> None:
        if isinstance(exc, (*COMMON_ERRORS, *verb.errors)):
            return
        self.undeclared[(verb.name, exc.name)] += 1
        log.error("[%s] BUG: %s raised %s (%d), which its schema entry does not declare; "
                  "returned as raised", request_id, verb.name, exc.name, exc.code)

    async def handle_body(self, body: bytes) -> bytes | None:
        """Answer one HTTP body: a request, a notification or a batch (None: nothing to send)."""
        try:
            message = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _encode(_error_response(None, ParseError("request body is not valid JSON")))
        if isinstance(message, list):
            if not message:
                return _encode(_error_response(None, InvalidRequestError("empty batch")))
            answers: list[dict[str, Any] | None] = [None] * len(message)

            async def one(i: int, item: object) -> None:
                answers[i] = await self._handle_one(item)

            async with anyio.create_task_group() as group:
                for i, item in enumerate(message):
                    group.start_soon(one, i, item)
            replies = [a for a in answers if a is not None]
            return _encode(replies) if replies else None
        answer = await self._handle_one(message)
        return _encode(answer) if answer is not None else None

    async def _handle_one(self, message: object) -> dict[str, Any] | None:
        if not isinstance(message, dict):
            return _error_response(None, InvalidRequestError("a request must be a JSON object"))
        request_id = message.get("id")
        is_notification = "id" not in message
        if message.get("jsonrpc") != "2.0" or not isinstance(message.get("method"), str):
            return _error_response(request_id, InvalidRequestError(
                "need \"jsonrpc\": \"2.0\" and a string \"method\""))
        if request_id is not None and not isinstance(request_id, str | int):
            return _error_response(None, InvalidRequestError("id must be a string or a number"))
        method: str = message["method"]
        params = message.get("params")
        tag = str(request_id) if request_id is not None else uuid.uuid4().hex[:8]
        try:
            result = await anyio.to_thread.run_sync(
                lambda: self.call(method, params, request_id=tag), limiter=self._limiter)
        except HostError as exc:
            return None if is_notification else _error_response(request_id, exc)
        return None if is_notification else {"jsonrpc": "2.0", "id": request_id, "result": result}


def _error_response(request_id: object, error: HostError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_error_object()}


def _encode(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()
