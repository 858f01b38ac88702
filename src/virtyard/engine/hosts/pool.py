"""The one client pool through which the engine calls every host agent.

One persistent HTTPS connection set per host (mutual TLS with the engine's client certificate),
per-call timeouts, a cap on concurrent calls per host and for the whole engine, so that a
thousand hosts or a slow one cannot exhaust the engine. Asynchronous (the monitoring runs on the
event loop); commands running in worker threads use :meth:`HostPool.call_sync`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import anyio.from_thread
import httpx

from virtyard.host.client import ClientTls, HostCallError, HostUnreachableError

log = logging.getLogger("virtyard.engine.hosts")

# The agent's reply size limit: a broken or hostile agent cannot make the engine buffer more.
MAX_REPLY = 64 << 20
KEEPALIVE_EXPIRY = 50.0  # seconds; the agent closes idle connections after 60 (KEEP_ALIVE)


@dataclass(frozen=True)
class HostAddress:
    """Where a host's agent listens."""

    host_id: str
    address: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"https://{host}:{self.port}/jsonrpc"


class HostPool:
    """Calls verbs on host agents; see the module docstring."""

    def __init__(self, tls: ClientTls, *, timeout: float = 60.0, connect_timeout: float = 5.0,
                 per_host: int = 8, total: int = 256) -> None:
        self._context: ssl.SSLContext = tls.context()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.per_host = per_host
        self._total = asyncio.Semaphore(total)
        self._clients: dict[str, tuple[HostAddress, httpx.AsyncClient]] = {}
        self._ids = itertools.count(1)

    def _client(self, host: HostAddress) -> httpx.AsyncClient:
        known = self._clients.get(host.host_id)
        if known is not None and known[0] == host:
            return known[1]
        if known is not None:  # the host's address changed
            asyncio.get_running_loop().create_task(known[1].aclose())
        client = httpx.AsyncClient(
            verify=self._context, http2=False,
            timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
            # Idle connections are dropped before the agent's server (60 s) closes them, so a
            # request never goes out on a connection the other side is closing — but kept
            # longer than the heartbeat and poll intervals, or every ping and poll would pay a
            # new TCP + TLS handshake (10-15 % of the engine's CPU at 100 hosts).
            limits=httpx.Limits(max_connections=self.per_host,
                                max_keepalive_connections=self.per_host,
                                keepalive_expiry=KEEPALIVE_EXPIRY))
        self._clients[host.host_id] = (host, client)
        return client

    async def call(self, host: HostAddress, method: str,
                   params: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Run ``method`` on ``host``'s agent; :class:`HostCallError` if the agent refused,
        :class:`HostUnreachableError` if it did not answer (in time, or sensibly)."""
        payload = {"jsonrpc": "2.0", "id": next(self._ids), "method": method,
                   "params": params or {}}
        client = self._client(host)
        extra: dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = httpx.Timeout(timeout, connect=min(timeout, self.connect_timeout))
        async with self._total:
            try:
                response = await client.post(host.url, json=payload, **extra)
            except httpx.HTTPError as exc:
                raise HostUnreachableError(
                    f"{host.address}:{host.port}: {type(exc).__name__}: {exc}".rstrip(": ")
                ) from exc
        if len(response.content) > MAX_REPLY:
            raise HostUnreachableError(f"{host.address}:{host.port}: reply over {MAX_REPLY} "
                                       "bytes")
        try:
            body = json.loads(response.content)
        except ValueError:
            raise HostUnreachableError(f"{host.address}:{host.port}: HTTP "
                                       f"{response.status_code}, not JSON-RPC") from None
        if not isinstance(body, dict):
            raise HostUnreachableError(f"{host.address}:{host.port}: not a JSON-RPC reply")
        if "error" in body:
            err = body["error"] if isinstance(body["error"], dict) else {}
            raw_data = err.get("data")
            data: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
            code = err.get("code")
            raise HostCallError(code if isinstance(code, int) else -1,
                                str(data.get("name", "")), str(err.get("message", "")), data)
        if "result" not in body:
            raise HostUnreachableError(f"{host.address}:{host.port}: reply without a result")
        return body["result"]

    def call_sync(self, host: HostAddress, method: str, params: dict[str, Any] | None = None,
                  *, timeout: float | None = None) -> Any:
        """:meth:`call` from a worker thread of the engine's event loop (commands)."""
        async def go() -> Any:
            return await self.call(host, method, params, timeout=timeout)
        return anyio.from_thread.run(go)

    def known(self) -> set[str]:
        """The hosts the pool holds connections for."""
        return set(self._clients)

    async def forget(self, host_id: str) -> None:
        """Close the connections to a removed host."""
        known = self._clients.pop(host_id, None)
        if known is not None:
            await known[1].aclose()

    async def close(self) -> None:
        for _host, client in list(self._clients.values()):
            await client.aclose()
        self._clients.clear()


__all__ = ["HostAddress", "HostCallError", "HostPool", "HostUnreachableError"]
