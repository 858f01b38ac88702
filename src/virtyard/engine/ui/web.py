"""What every page and action of the web UI shares: the session check, CSRF and role gates,
templates, running engine commands off the event loop, and turning any failure into the
engine's fault (reason + detail) for the user — never a stack trace.
"""

from __future__ import annotations

import datetime
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import jinja2
from sqlalchemy.exc import DataError, IntegrityError
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from virtyard.engine.api.faults import ApiError
from virtyard.engine.auth import AuthError
from virtyard.engine.commands.base import Command, Context, Principal, run
from virtyard.engine.commands.errors import NOT_AUTHORIZED, CommandError
from virtyard.engine.hosts.pool import HostCallError, HostUnreachableError
from virtyard.engine.ui import security

log = logging.getLogger("virtyard.engine.ui")

PREFIX = "/ovirt-engine/web"
FORM_LIMIT = 64 * 1024
T = TypeVar("T")

# Sent with every UI response: no framing, no inline script, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data:; connect-src 'self'; "
                                "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Fault:
    """A failure as the user sees it: the engine's reason and detail, and the HTTP status."""

    reason: str
    detail: str
    key: str = ""
    status: int = 409


def fault_of(exc: BaseException) -> Fault:
    """The engine's fault for any exception an action raised (the REST layer's mapping)."""
    if isinstance(exc, CommandError):
        return Fault("Operation Failed", exc.detail, exc.key, exc.status)
    if isinstance(exc, ApiError):
        return Fault(exc.reason, exc.detail, exc.key, exc.status)
    if isinstance(exc, HostCallError | HostUnreachableError):
        return Fault("Operation Failed", str(exc)[:300], "HOST_CALL_FAILED", 409)
    if isinstance(exc, DataError | IntegrityError):
        return Fault("Invalid input", "A value does not fit: too long or out of range",
                     "INVALID_VALUE", 400)
    log.error("web UI action failed", exc_info=exc)
    return Fault("Internal error", "The engine failed; see its log", "INTERNAL", 500)


def _size(value: Any) -> str:
    """Bytes for people: 1.5 GiB, 64 MiB."""
    if value in (None, "", 0):
        return "—"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if number < 1024 or unit == "TiB":
            return f"{number:.0f} {unit}" if number == int(number) else f"{number:.1f} {unit}"
        number /= 1024
    return "—"


def _when(value: Any) -> str:
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value or "")


TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
TEMPLATES.filters["size"] = _size
TEMPLATES.filters["when"] = _when
TEMPLATES.globals["prefix"] = PREFIX


def html(body: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers={**SECURITY_HEADERS,
                                                           **(headers or {})})


def render_template(name: str, status: int = 200, **values: Any) -> HTMLResponse:
    return html(TEMPLATES.get_template(name).render(**values), status)


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def to_login(request: Request) -> Response:
    """Back to the login page (htmx follows ``HX-Redirect``, a browser the 303)."""
    target = PREFIX + "/login?" + urllib.parse.urlencode({"next": request.url.path})
    if is_htmx(request):
        return Response(status_code=401, headers={"HX-Redirect": target, **SECURITY_HEADERS})
    return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)


async def read_pairs(request: Request) -> list[tuple[str, str]]:
    """A small ``application/x-www-form-urlencoded`` body (UI forms only), field by field."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > FORM_LIMIT:
        return []
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > FORM_LIMIT:
            return []
        chunks.append(chunk)
    try:
        return urllib.parse.parse_qsl(b"".join(chunks).decode("utf-8", "replace"),
                                      keep_blank_values=True, max_num_fields=256)
    except ValueError:  # too many fields
        return []


async def read_form(request: Request) -> dict[str, str]:
    return dict(await read_pairs(request))


@dataclass
class Ui:
    """One request of a logged-in user: what handlers use."""

    request: Request
    principal: Principal
    token: str
    pairs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def form(self) -> dict[str, str]:
        return dict(self.pairs)

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.pairs if k == name]

    @property
    def services(self) -> Any:
        return self.request.app.state.services

    @property
    def csrf(self) -> str:
        return security.csrf_for(self.token)

    def param(self, name: str) -> str:
        return str(self.request.path_params.get(name, ""))

    def field(self, name: str, default: str = "") -> str:
        return self.form.get(name, self.request.query_params.get(name, default)).strip()

    def flag(self, name: str) -> bool:
        return self.field(name).lower() in ("on", "true", "1", "yes")

    def require_write(self) -> None:
        """For pages that only lead to changes (dialogs, the Direct LUN wizard): a read-only
        user gets the engine's refusal instead of a form that cannot work."""
        if not self.principal.can_write:
            raise CommandError(NOT_AUTHORIZED, "perform", "action")

    def ctx(self) -> Context:
        return Context(self.services.db, self.principal, self.services)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread (the database and host calls block)."""
        return await anyio.to_thread.run_sync(lambda: fn(*args))

    async def run(self, command: Command[T]) -> T:
        """Run an engine command as this user, exactly as the REST API does."""
        ctx = self.ctx()
        return await anyio.to_thread.run_sync(lambda: run(command, ctx))

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """A query ``fn(tx, *args)`` in a read transaction, in a worker thread."""
        def go() -> T:
            with self.services.db.read() as tx:
                return fn(tx, *args)
        return await anyio.to_thread.run_sync(go)

    def render(self, name: str, status: int = 200, **values: Any) -> HTMLResponse:
        return render_template(name, status, user=self.principal, csrf=self.csrf,
                               can_write=self.principal.can_write,
                               path=self.request.url.path, **values)

    def message(self, text: str, status: int = 200, **extra: Any) -> HTMLResponse:
        return self.render("_message.html", status, ok=True, text=text, fault=None, **extra)

    def failure(self, fault: Fault, **extra: Any) -> HTMLResponse:
        """The fault as a message for htmx to swap in, or as a page of its own."""
        template = "_message.html" if is_htmx(self.request) else "error.html"
        response = self.render(template, fault.status, ok=False, text="", fault=fault, **extra)
        if is_htmx(self.request) and (self.request.query_params.get("fragment") or
                                      self.request.headers.get("hx-target") == "modal"):
            # A live view's refresh or a dialog that failed: the message goes to the page's
            # status area; the view stays (and keeps refreshing).
            response.headers["HX-Retarget"] = "#flash"
            response.headers["HX-Reswap"] = "innerHTML"
        return response


async def session_of(request: Request) -> tuple[Principal, str] | None:
    token = request.cookies.get(security.SESSION_COOKIE, "")
    if not token or len(token) > 256:
        return None
    services = request.app.state.services
    try:
        principal = await anyio.to_thread.run_sync(services.auth.verify, token)
    except AuthError:
        return None
    return principal, token


Handler = Callable[[Ui], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


def page(fn: Handler) -> Endpoint:
    """An endpoint for logged-in users. A POST must come from our pages (Origin and the CSRF
    token) and from a user who may change things — checked before the form is even read, as
    the REST API does. Any failure becomes the engine's fault."""
    async def endpoint(request: Request) -> Response:
        found = await session_of(request)
        if found is None:
            return to_login(request)
        principal, token = found
        ui = Ui(request, principal, token)
        try:
            if request.method == "POST":
                if not security.same_origin(request.headers, request.url.scheme,
                                            request.headers.get("host", "")):
                    return ui.failure(Fault("Forbidden", "The request did not come from "
                                            "this site.", "CSRF", 403))
                if not principal.can_write:
                    raise CommandError(NOT_AUTHORIZED, "perform", "action")
                ui.pairs = await read_pairs(request)
                sent = request.headers.get(security.CSRF_HEADER) or \
                    ui.form.get(security.CSRF_FIELD, "")
                if not security.csrf_ok(token, sent):
                    return ui.failure(Fault("Forbidden", "The form is out of date: reload "
                                            "the page and try again.", "CSRF", 403))
            return await fn(ui)
        except Exception as exc:  # every failure is shown as the engine's fault
            return ui.failure(fault_of(exc))
    endpoint.__name__ = fn.__name__
    return endpoint
