"""A small client of the engine's REST API (``/ovirt-engine/api``) for the CLI.

**JSON, through httpx.** The engine answers XML or JSON with the same structure (JSON when the
request says ``Accept: application/json``, bodies as ``Content-Type: application/json``). The
CLI speaks JSON: it turns into plain dicts with the standard library, needs no schema and no
XML parser, and its faults carry the same ``reason``/``detail``/``key``. It does not use the
oVirt SDK (an sdist with a C extension over libxml2 and pycurl: a heavy install for a
command-line tool, and the SDK parses XML into objects the CLI would flatten again anyway).
httpx is already a dependency of Virtyard (the engine and the host agent's client use it); it
gives HTTP/1.1 keep-alive, timeouts per phase and TLS through the standard ``ssl`` module, so
one ``--ca-file`` is all the trust configuration there is.

**Tokens.** ``virtyard login`` makes the OAuth password grant at
``/ovirt-engine/sso/oauth/token`` that oVirt's SSO answers and keeps the bearer token
(``session.py``). Every request sends it; the engine refuses an expired token with 401, and as
the password is never kept, the only way on is ``virtyard login`` again (the error says so).

The CLI is a REST client only: it imports nothing of the engine.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from virtyard.cli.errors import AUTH, UNREACHABLE, USAGE, CliError, exit_code_for
from virtyard.cli.session import Login

API = "/ovirt-engine/api"
SSO_TOKEN = "/ovirt-engine/sso/oauth/token"
SSO_LOGOUT = "/ovirt-engine/services/sso-logout"
JSON = "application/json"
USER_AGENT = "virtyard-cli"


def tls_context(ca_file: str) -> ssl.SSLContext:
    """Trust ``ca_file`` (a PEM bundle), or the system's CAs when it is empty."""
    if not ca_file:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CliError("Cannot read the CA file", f"{ca_file}: {exc}", "CA_FILE_UNREADABLE",
                       exit_code=USAGE) from None


def timeouts(read: float) -> httpx.Timeout:
    return httpx.Timeout(connect=10.0, read=read, write=60.0, pool=10.0)


def transport_error(base: str, exc: httpx.HTTPError, read_timeout: float) -> CliError:
    """A network, TLS or timeout failure as one line (exit code 4)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, httpx.ReadTimeout):
        return CliError("No answer from the engine", f"{base} did not answer within "
                        f"{read_timeout:g} s", "ENGINE_TIMEOUT", exit_code=UNREACHABLE,
                        hint="it may still be working on it: see 'virtyard events'")
    if isinstance(exc, httpx.TimeoutException):
        return CliError("Cannot reach the engine", f"{base}: timed out ({text})",
                        "ENGINE_UNREACHABLE", exit_code=UNREACHABLE)
    hint = ""
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate" in text.lower():
        hint = "give the engine's CA with 'virtyard login URL --ca-file CA.pem'"
    return CliError("Cannot reach the engine", f"{base}: {text}", "ENGINE_UNREACHABLE",
                    exit_code=UNREACHABLE, hint=hint)


def fault_of(response: httpx.Response, relogin: str = "virtyard login") -> CliError:
    """The engine's fault in ``response`` (reason, detail, key) with its exit code; a refused
    token says to run ``relogin``."""
    status = response.status_code
    reason, detail, key = f"HTTP {status} {response.reason_phrase}".strip(), "", ""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner = data.get("fault")
        fault: dict[str, Any] = inner if isinstance(inner, dict) else data
        reason = str(fault.get("reason") or reason)
        detail = str(fault.get("detail") or "")
        key = str(fault.get("key") or "")
    elif response.text:
        detail = response.text[:300]
    error = CliError(reason, detail, key, exit_code=exit_code_for(status, key), status=status)
    if status == 401 and error.exit_code == AUTH:
        error.hint = f"run: {relogin}"
    return error


class Engine:
    """The engine's API with one login's token: JSON in, JSON out, faults as CliError."""

    def __init__(self, login: Login, *, timeout: float = 300.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.login = login
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=login.url + API, verify=tls_context(login.ca_file),
            timeout=timeouts(timeout), transport=transport,
            headers={"Accept": JSON, "Version": "4", "User-Agent": USER_AGENT,
                     "Authorization": f"Bearer {login.token}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                body: Any = None) -> Any:
        """One request below ``/ovirt-engine/api``; the answer's JSON (``{}`` when empty)."""
        content = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": JSON} if content is not None else None
        try:
            response = self._http.request(method, path, params=params, content=content,
                                          headers=headers)
        except httpx.HTTPError as exc:
            raise transport_error(self.login.url, exc, self.timeout) from None
        if response.status_code >= 400:
            raise fault_of(response, f"virtyard login {self.login.url} --user {self.login.user}")
        if not response.content.strip():
            return {}
        try:
            return response.json()
        except ValueError:
            raise CliError("Unexpected answer", f"{method} {path} answered something that is "
                           "not JSON", "BAD_ANSWER") from None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items()
                                                 if v is not None} or None)

    def post(self, path: str, body: Any = None, **params: Any) -> Any:
        return self.request("POST", path, body={} if body is None else body,
                            params={k: v for k, v in params.items() if v is not None} or None)

    def put(self, path: str, body: Any, **params: Any) -> Any:
        return self.request("PUT", path, body=body,
                            params={k: v for k, v in params.items() if v is not None} or None)

    def delete(self, path: str, **params: Any) -> Any:
        return self.request("DELETE", path, params={k: v for k, v in params.items()
                                                    if v is not None} or None)


def items(data: Any, tag: str) -> list[dict[str, Any]]:
    """The list in ``{"tag": [...]}`` (the engine's JSON lists), or a bare list."""
    if isinstance(data, dict):
        data = data.get(tag, [])
    return [x for x in data if isinstance(x, dict)] if isinstance(data, list) else []


def password_grant(url: str, user: str, password: str, ca_file: str, *,
                   timeout: float = 60.0) -> tuple[str, int]:
    """Log in (the SSO password grant); the bearer token and its first expiry (ms)."""
    try:
        with httpx.Client(verify=tls_context(ca_file), timeout=timeouts(timeout),
                          headers={"Accept": JSON, "User-Agent": USER_AGENT}) as client:
            response = client.post(url + SSO_TOKEN, data={
                "grant_type": "password", "scope": "ovirt-app-api", "username": user,
                "password": password})
    except httpx.HTTPError as exc:
        raise transport_error(url, exc, timeout) from None
    try:
        data = response.json()
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    if response.status_code == 200 and data.get("access_token"):
        try:
            expires = int(data.get("exp") or 0)
        except (TypeError, ValueError):
            expires = 0
        return str(data["access_token"]), expires
    if response.status_code == 404:
        raise CliError("Not an engine", f"{url} has no {SSO_TOKEN}", "NOT_AN_ENGINE",
                       exit_code=UNREACHABLE)
    code = str(data.get("error_code") or "")
    message = str(data.get("error") or f"HTTP {response.status_code}")
    if code == "access_denied" or response.status_code in (400, 401, 403):
        raise CliError("Login refused", message, code.upper() or "ACCESS_DENIED",
                       exit_code=AUTH)
    raise CliError("Login failed", message, code.upper() or "LOGIN_FAILED",
                   exit_code=exit_code_for(response.status_code))


def revoke(login: Login, *, timeout: float = 30.0) -> None:
    """End the token at the engine (the SSO logout the SDK's ``close()`` sends)."""
    try:
        with httpx.Client(verify=tls_context(login.ca_file), timeout=timeouts(timeout),
                          headers={"Accept": JSON, "User-Agent": USER_AGENT}) as client:
            client.post(login.url + SSO_LOGOUT, data={"scope": "ovirt-app-api",
                                                      "token": login.token})
    except httpx.HTTPError as exc:
        raise transport_error(login.url, exc, timeout) from None


def read_secret_file(path: str, what: str) -> str:
    """A secret from a file (its first line, surrounding whitespace stripped)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CliError(f"Cannot read the {what} file", f"{path}: {exc.strerror or exc}",
                       "SECRET_FILE_UNREADABLE", exit_code=USAGE) from None
    lines = text.splitlines()
    return lines[0].strip() if lines else ""
