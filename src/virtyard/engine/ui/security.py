"""The web UI's session cookie and CSRF protection.

The session is the engine's own (``auth.py``): logging in through the UI makes an ordinary
engine token, and the cookie carries it — HttpOnly (scripts never see it), Secure (the engine
only speaks HTTPS), SameSite=Strict and scoped to the UI's path. So a UI session expires,
slides and ends exactly like an API token, and nothing new is stored.

Every POST must carry a CSRF token that only a page of ours can know: an HMAC of the session
token (so it needs no storage and survives an engine restart), compared in constant time. The
login form, which has no session yet, uses a random double-submit cookie instead. Every POST's
``Origin`` (or ``Referer``) must also be this site when the browser sends one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import urllib.parse
from collections.abc import Mapping

SESSION_COOKIE = "vy_session"
LOGIN_COOKIE = "vy_login"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"
_CSRF_LABEL = b"virtyard-web-ui-csrf-v1"


def csrf_for(session_token: str) -> str:
    """The CSRF token of a session (the session's secret is the key)."""
    return hmac.new(session_token.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def csrf_ok(session_token: str, sent: str) -> bool:
    """Whether ``sent`` is the CSRF token of ``session_token``."""
    if not session_token or not sent:
        return False
    return hmac.compare_digest(csrf_for(session_token), sent)


def login_nonce() -> str:
    """A fresh value for the login form's double-submit cookie."""
    return secrets.token_urlsafe(24)


def login_csrf_ok(cookie: str, sent: str) -> bool:
    return bool(cookie) and bool(sent) and hmac.compare_digest(cookie, sent)


def same_origin(headers: Mapping[str, str], scheme: str, host: str) -> bool:
    """Whether a POST comes from a page of this site: its ``Origin`` (else ``Referer``) names
    ``scheme://host``. A request with neither passes (old clients; the token still decides)."""
    expected = f"{scheme}://{host}".lower()
    origin = headers.get("origin")
    if origin is not None:
        return origin.lower() == expected
    referer = headers.get("referer")
    if referer:
        parts = urllib.parse.urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}".lower() == expected
    return True


def session_cookie(token: str, path: str) -> str:
    """The ``Set-Cookie`` value that starts a session (no Max-Age: the engine decides expiry)."""
    return f"{SESSION_COOKIE}={token}; Path={path}; Secure; HttpOnly; SameSite=Strict"


def cleared_cookie(name: str, path: str) -> str:
    return f"{name}=; Path={path}; Max-Age=0; Secure; HttpOnly; SameSite=Strict"


def login_cookie(nonce: str, path: str) -> str:
    return f"{LOGIN_COOKIE}={nonce}; Path={path}; Secure; HttpOnly; SameSite=Strict"


def safe_next(target: str, prefix: str) -> str:
    """Where to go after login: a path of the UI, never another site (open redirects)."""
    if not target.startswith(prefix) or target.startswith("//") or "\\" in target:
        return prefix + "/"
    parts = urllib.parse.urlsplit(target)
    if parts.scheme or parts.netloc:
        return prefix + "/"
    return target
