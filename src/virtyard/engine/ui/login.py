"""Logging in and out of the web UI with engine users (the SSO's checks, events and tokens)."""

from __future__ import annotations

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from virtyard.engine import audit
from virtyard.engine.auth import AuthError
from virtyard.engine.ui import security
from virtyard.engine.ui.web import (
    PREFIX,
    SECURITY_HEADERS,
    read_form,
    render_template,
    session_of,
)


def _login_page(request: Request, error: str = "", username: str = "",
                status: int = 200) -> Response:
    nonce = security.login_nonce()
    response = render_template("login.html", status, error=error, username=username,
                               nonce=nonce,
                               next=security.safe_next(request.query_params.get("next", ""),
                                                       PREFIX))
    response.headers.append("Set-Cookie", security.login_cookie(nonce, PREFIX))
    return response


async def login_form(request: Request) -> Response:
    if await session_of(request) is not None:
        return RedirectResponse(PREFIX + "/", status_code=303, headers=SECURITY_HEADERS)
    return _login_page(request)


async def login(request: Request) -> Response:
    services = request.app.state.services
    if not security.same_origin(request.headers, request.url.scheme,
                                request.headers.get("host", "")):
        return _login_page(request, "The form did not come from this site.", status=403)
    form = await read_form(request)
    username = form.get("username", "").strip()[:255]
    if not security.login_csrf_ok(request.cookies.get(security.LOGIN_COOKIE, ""),
                                  form.get(security.CSRF_FIELD, "")):
        return _login_page(request, "The login form was out of date: try again.", username,
                           status=403)
    if not username:
        return _login_page(request, "Enter a user name.", status=400)
    try:
        session = await anyio.to_thread.run_sync(services.auth.login, username,
                                                 form.get("password", ""))
    except AuthError:
        await anyio.to_thread.run_sync(services.record_event, audit.USER_LOGIN_FAILED,
                                       {"user": username})
        return _login_page(request, f"Cannot log in as {username}: bad user name or "
                           "password.", username, status=401)
    await anyio.to_thread.run_sync(services.record_event, audit.USER_LOGIN,
                                   {"user": session.principal.name})
    target = security.safe_next(form.get("next", ""), PREFIX)
    response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    response.headers.append("Set-Cookie", security.session_cookie(session.token, PREFIX))
    response.headers.append("Set-Cookie", security.cleared_cookie(security.LOGIN_COOKIE,
                                                                  PREFIX))
    return response


async def logout(request: Request) -> Response:
    services = request.app.state.services
    token = request.cookies.get(security.SESSION_COOKIE, "")
    form = await read_form(request)
    if token and security.same_origin(request.headers, request.url.scheme,
                                      request.headers.get("host", "")) and \
            security.csrf_ok(token, form.get(security.CSRF_FIELD, "")):
        principal = await anyio.to_thread.run_sync(services.auth.logout, token)
        if principal is not None:
            await anyio.to_thread.run_sync(services.record_event, audit.USER_LOGOUT,
                                           {"user": principal.name})
    response = RedirectResponse(PREFIX + "/login", status_code=303, headers=SECURITY_HEADERS)
    response.headers.append("Set-Cookie", security.cleared_cookie(security.SESSION_COOKIE,
                                                                  PREFIX))
    return response
