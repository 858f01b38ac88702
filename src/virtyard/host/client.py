"""A JSON-RPC client for the host agent over mutual TLS (used by the engine and `virtyard-hostctl`).

One :class:`HostClient` keeps one HTTP/1.1 connection pool to one agent; calls are thread-safe.
"""

from __future__ import annotations

import itertools
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


class HostCallError(Exception):
    """The agent answered with a JSON-RPC error object."""

    def __init__(self, code: int, name: str, message: str, data: dict[str, Any]) -> None:
        super().__init__(f"{code} {name}: {message}")
        self.code = code
        self.name = name
        self.message = message
        self.data = data


class HostUnreachableError(Exception):
    """No answer from the agent (connection refused, TLS refused, timeout)."""


@dataclass(frozen=True)
class ClientTls:
    """The client certificate, its key, and the CA that signed the agent's certificate."""

    cert: Path
    key: Path
    ca: Path

    def context(self) -> ssl.SSLContext:
        """A client TLS context: verify the agent against ``ca``, present ``cert``."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


class HostClient:
    """Calls verbs on the agent at ``address`` (``host:port``)."""

    def __init__(self, address: str, tls: ClientTls, *, timeout: float = 120.0) -> None:
        self.address = address
        self.url = f"https://{address}/jsonrpc"
        self._http = httpx.Client(verify=tls.context(), timeout=timeout)
        self._ids = itertools.count(1)
        self._id_lock = threading.Lock()

    def call(self, method: str, params: dict[str, Any] | list[Any] | None = None) -> Any:
        """Run ``method`` on the agent and return its result; raise :class:`HostCallError`."""
        with self._id_lock:
            request_id = next(self._ids)
        payload = {"jsonrpc": "2.0", "id": request_id, "method": method,
                   "params": params if params is not None else {}}
        try:
            response = self._http.post(self.url, json=payload)
        except httpx.HTTPError as exc:
            raise HostUnreachableError(f"{self.address}: {exc}") from exc
        body = response.json()
        if "error" in body:
            err = body["error"]
            data = err.get("data") or {}
            raise HostCallError(int(err["code"]), str(data.get("name", "")),
                                str(err.get("message", "")), data)
        return body["result"]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HostClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
