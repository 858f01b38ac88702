"""Serving every simulated host from one process: one uvicorn server, one listening socket per
host, one event loop.

A request reaches the host whose port it came in on (the ASGI scope's ``server`` address), and
that host's :class:`SimDispatcher` answers it through the real agent's HTTP application
(:func:`virtyard.host.server.build_app`: the same endpoint, body limit and answers) and the real
JSON-RPC dispatcher's parsing, validation and error objects. TLS is the agent's: the server
certificate, and ``CERT_REQUIRED`` against the CA, so a client without a certificate that CA
signed is refused in the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import uvicorn

from virtyard.host.rpc.errors import (
    GeneralError,
    HostError,
    InvalidRequestError,
    MethodNotFoundError,
)
from virtyard.host.rpc.jsonrpc import Dispatcher, _error_response
from virtyard.host.server import KEEP_ALIVE, build_app
from virtyard.hostsim.state import SimHost, SimOptions
from virtyard.hostsim.verbs import SIM_SCHEMA

log = logging.getLogger("virtyard.hostsim")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class ServerTls:
    """The simulated hosts' server certificate and key, and the CA their clients need."""

    cert: Path
    key: Path
    ca: Path


class SimDispatcher(Dispatcher[SimHost]):
    """The agent's dispatcher, but a verb runs on the event loop instead of a worker thread:
    simulated verbs only touch memory, and ``Host.getEvents`` awaits (no thread per poll)."""

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
        try:
            result = await self.run(message["method"], message.get("params"))
        except HostError as exc:
            return None if is_notification else _error_response(request_id, exc)
        return None if is_notification else {"jsonrpc": "2.0", "id": request_id, "result": result}

    async def run(self, method: str, params: object = None) -> Any:
        """One verb, checked like the agent checks it: its JSON-ready result or HostError."""
        verb = self.schema.verbs.get(method)
        if verb is None:
            raise MethodNotFoundError(f"unknown method '{method}'")
        parsed = verb.parse_params(params)
        try:
            result = verb.handler(self.ctx, parsed)
            if inspect.isawaitable(result):
                result = await result
            return verb.dump_result(result)
        except HostError as exc:
            self._check_declared(verb, exc, self.ctx.name)
            raise
        except Exception as exc:
            log.exception("%s on %s crashed", method, self.ctx.name)
            raise GeneralError(f"{type(exc).__name__}: {exc}") from exc


class PortRouter:
    """One ASGI application for every host: the local port a request came in on picks it."""

    def __init__(self) -> None:
        self.apps: dict[int, AsgiApp] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        app = self.apps.get(server[1]) if server else None
        if app is None:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await app(scope, receive, send)


class Simulator:
    """Many simulated hosts behind one uvicorn server."""

    def __init__(self, options: SimOptions, tls: ServerTls) -> None:
        self.options = options
        self.tls = tls
        self.started_at = time.time()
        self.rng = random.Random(options.seed)
        self.hosts = [SimHost(i, options, started_at=self.started_at, rng=self.rng)
                      for i in range(options.hosts)]
        self.router = PortRouter()
        self.dispatchers: list[SimDispatcher] = []
        self.sockets: list[socket.socket] = []
        self.server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self.ticks = 0

    # -- sockets ----------------------------------------------------------------------------

    def bind(self) -> None:
        """One listening socket per host (port 0 in the options: any free port)."""
        if self.sockets:
            return
        family = socket.AF_INET6 if ":" in self.options.address else socket.AF_INET
        try:
            for host in self.hosts:
                # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so
                # (without it every answer waits 40 ms for a delayed ACK).
                sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((self.options.address, host.port))
                except OSError as exc:
                    raise OSError(exc.errno, f"{host.name}: cannot listen on "
                                  f"{self.options.address}:{host.port}: {exc.strerror}") from None
                sock.listen(128)
                host.port = sock.getsockname()[1]
        except BaseException:
            self.close_sockets()
            raise
        for host in self.hosts:
            dispatcher = SimDispatcher(SIM_SCHEMA, host)
            self.dispatchers.append(dispatcher)
            self.router.apps[host.port] = cast(AsgiApp, build_app(cast(Any, dispatcher)))

    def close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    # -- serving ----------------------------------------------------------------------------

    def config(self) -> uvicorn.Config:
        return uvicorn.Config(
            self.router, lifespan="off", log_config=None, access_log=False,
            ssl_certfile=str(self.tls.cert), ssl_keyfile=str(self.tls.key),
            ssl_ca_certs=str(self.tls.ca), ssl_cert_reqs=ssl.CERT_REQUIRED,
            timeout_graceful_shutdown=2, backlog=128, timeout_keep_alive=KEEP_ALIVE)

    async def serve(self) -> None:
        """Serve until :meth:`stop` (or SIGINT/SIGTERM when run in the main thread)."""
        self.bind()
        loop = asyncio.get_running_loop()
        for host in self.hosts:
            host.later = loop.call_later
        self.server = uvicorn.Server(self.config())
        churn = asyncio.create_task(self._churn())
        watch = asyncio.create_task(self._announce_ready())
        try:
            await self.server.serve(sockets=self.sockets)
        finally:
            churn.cancel()
            watch.cancel()
            for task in (churn, watch):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self.close_sockets()

    def run(self) -> None:
        """Serve in this thread until SIGINT or SIGTERM."""
        asyncio.run(self.serve())

    async def _announce_ready(self) -> None:
        while self.server is None or not self.server.started:
            await asyncio.sleep(0.01)
        self._ready.set()

    async def _churn(self) -> None:
        """Every ``change_interval``: each host's share of device changes and crashes."""
        options = self.options
        if options.change_rate <= 0 and options.crash_rate <= 0:
            return
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += options.change_interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            changes = crashes = 0
            for host in self.hosts:
                c, d = host.tick()
                changes += c
                crashes += d
            self.ticks += 1
            log.debug("tick %d: %d device changes, %d VMs down", self.ticks, changes, crashes)

    # -- in-process use (tests, benchmarks) ----------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Serve from a thread of its own; return once every port accepts connections."""
        self.bind()

        def run() -> None:
            try:
                asyncio.run(self.serve())
            except BaseException as exc:
                self._failed = exc
                self._ready.set()

        self._thread = threading.Thread(target=run, name="hostsim", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the simulator did not start")
        if self._failed is not None:
            raise RuntimeError(f"the simulator failed: {self._failed}") from self._failed

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

