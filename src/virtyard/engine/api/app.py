"""The REST layer as an ASGI application: SSO endpoints, authentication, content negotiation,
body limits, the declared operations, faults. It knows the wire and nothing of the business.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
from typing import Any

import anyio.to_thread
from sqlalchemy.exc import DataError, IntegrityError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from virtyard.engine import audit
from virtyard.engine.api import codec, resources  # noqa: F401  (registers operations)
from virtyard.engine.api.codec import DecodeError
from virtyard.engine.api.faults import ApiError, bad_request, unauthorized
from virtyard.engine.api.openapi import openapi_document
from virtyard.engine.api.routing import ROUTES, ApiRequest, Operation
from virtyard.engine.api.types.common import ACTION, FAULT
from virtyard.engine.auth import AuthError
from virtyard.engine.commands.errors import NOT_AUTHORIZED, CommandError
from virtyard.engine.transfers import imageio
from virtyard.engine.ui.routes import ui_routes

log = logging.getLogger("virtyard.engine.api")

PREFIX = "/ovirt-engine/api"
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SSO_TOKEN = "/ovirt-engine/sso/oauth/token"
SSO_LOGOUT = "/ovirt-engine/services/sso-logout"
XML = "application/xml"
JSON = "application/json"


def wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return "json" in accept and "xml" not in accept.split("json")[0]


def fault_response(error: ApiError, as_json: bool) -> Response:
    body = codec.encode(FAULT, error.model(), as_json)
    headers = {"WWW-Authenticate": 'Bearer realm="RESTAPI"'} if error.status == 401 else None
    return Response(body, status_code=error.status, media_type=JSON if as_json else XML,
                    headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "Request Entity Too Large",
                       f"The request body is over {limit} bytes", "BODY_TOO_LARGE")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "Request Entity Too Large",
                           f"The request body is over {limit} bytes", "BODY_TOO_LARGE")
        chunks.append(chunk)
    return b"".join(chunks)


def body_is_json(request: Request) -> bool:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("", "application/xml", "text/xml"):
        return False
    if ctype in ("application/json", "text/json"):
        return True
    raise ApiError(415, "Unsupported Media Type",
                   f"Content type '{ctype}' is not supported: send application/xml or "
                   "application/json", "UNSUPPORTED_MEDIA_TYPE")


async def authenticate(request: Request) -> Any:
    services = request.app.state.services
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("A bearer token is required: get one from " + SSO_TOKEN)
    try:
        return await anyio.to_thread.run_sync(services.auth.verify, token.strip())
    except AuthError as exc:
        raise unauthorized(str(exc)) from None


def endpoint(operation: Operation) -> Any:
    async def handle(request: Request) -> Response:
        as_json = wants_json(request)
        services = request.app.state.services
        try:
            principal = await authenticate(request)
            if operation.method != "GET" and not principal.can_write:
                # Before the body is even read: a read-only user learns nothing from checks.
                raise ApiError.from_command(CommandError(NOT_AUTHORIZED, "perform", "action"))
            for name, value in request.path_params.items():
                if CONTROL.search(str(value)):
                    raise ApiError(404, "Not Found", f"No object with that {name}", "NOT_FOUND")
            for name, value in request.query_params.multi_items():
                if CONTROL.search(value) or CONTROL.search(name):
                    raise bad_request(f"Query parameter '{codec.xml_safe(name)[:64]}' holds "
                                      "control characters")
            body = None
            if operation.body is not None:
                raw = await read_body(request, services.config.api.max_body_bytes)
                if not raw.strip():
                    raw = f"<{operation.body.tag}/>".encode()
                    body = codec.decode(operation.body, raw, False)
                else:
                    body = codec.decode(operation.body, raw, body_is_json(request))
            api_request = ApiRequest(services, principal, dict(request.path_params),
                                     request.query_params, body,
                                     request.headers.get("correlation-id", "")[:64])
            result = await anyio.to_thread.run_sync(operation.handler, api_request)
        except DecodeError as exc:
            return fault_response(ApiError(400, exc.reason, str(exc), "BAD_REQUEST"), as_json)
        except ApiError as exc:
            return fault_response(exc, as_json)
        except CommandError as exc:
            return fault_response(ApiError.from_command(exc), as_json)
        except (DataError, IntegrityError) as exc:
            log.info("%s %s: refused by the database: %s", request.method, request.url.path,
                     type(exc.orig).__name__)
            return fault_response(bad_request("A value does not fit: too long or out of range",
                                              "INVALID_VALUE"), as_json)
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return fault_response(ApiError(500, "Internal error",
                                           "The engine failed; see its log", "INTERNAL"),
                                  as_json)
        # Rendering a large list takes a while: off the event loop, like the handler.
        response: Response = await anyio.to_thread.run_sync(render, operation, result, as_json)
        return response

    return handle


def render(operation: Operation, result: Any, as_json: bool) -> Response:
    media = JSON if as_json else XML
    if operation.returns is None:  # DELETE: oVirt answers 200 with a completed action
        return Response(codec.encode(ACTION, {"status": "complete"}, as_json),
                        status_code=operation.status, media_type=media)
    if operation.many:
        body = codec.encode_list(operation.returns, result, as_json)
    else:
        body = codec.encode(operation.returns, result, as_json)
    return Response(body, status_code=operation.status, media_type=media)


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (small: SSO forms only)."""
    raw = await read_body(request, 16 * 1024)
    pairs = urllib.parse.parse_qsl(raw.decode("utf-8"), keep_blank_values=True,
                                   max_num_fields=16, strict_parsing=False)
    return dict(pairs)


async def sso_token(request: Request) -> Response:
    """OAuth password grant, as oVirt's SSO answers the SDK (JSON, errors as JSON too)."""
    services = request.app.state.services
    try:
        form = await read_form(request)
    except (ApiError, ValueError):
        return JSONResponse({"error_code": "invalid_request",
                             "error": "The request is not a valid form"}, status_code=400)
    grant = str(form.get("grant_type", ""))
    username = str(form.get("username", ""))
    password = str(form.get("password", ""))
    if grant != "password" or not username:
        return JSONResponse({"error_code": "unsupported_grant_type",
                             "error": "Use grant_type=password with username and password"},
                            status_code=400)
    try:
        login = await anyio.to_thread.run_sync(services.auth.login, username, password)
    except AuthError:
        await anyio.to_thread.run_sync(services.record_event, audit.USER_LOGIN_FAILED,
                                       {"user": username[:255]})
        return JSONResponse({"error_code": "access_denied",
                             "error": f"Cannot authenticate user '{username[:255]}': "
                                      "bad user name or password"}, status_code=400)
    await anyio.to_thread.run_sync(services.record_event, audit.USER_LOGIN,
                                   {"user": login.principal.name})
    return JSONResponse({"access_token": login.token, "scope": "ovirt-app-api",
                         "exp": str(int(login.expires_at.timestamp() * 1000)),
                         "token_type": "bearer"})


async def sso_logout(request: Request) -> Response:
    services = request.app.state.services
    token = ""
    if request.method == "POST":
        try:
            token = (await read_form(request)).get("token", "")
        except (ApiError, ValueError):
            token = ""
    token = token or request.query_params.get("token", "")
    header = request.headers.get("authorization", "")
    if not token and header.lower().startswith("bearer "):
        token = header[7:].strip()
    if token:
        principal = await anyio.to_thread.run_sync(services.auth.logout, token)
        if principal is not None:
            await anyio.to_thread.run_sync(services.record_event, audit.USER_LOGOUT,
                                           {"user": principal.name})
    return JSONResponse({})


async def openapi(request: Request) -> Response:
    try:
        await authenticate(request)
    except ApiError as exc:
        return fault_response(exc, wants_json(request))
    return Response(json.dumps(request.app.state.openapi, indent=1), media_type=JSON)


async def not_found_handler(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    as_json = wants_json(request)
    if status == 405:
        return fault_response(ApiError(405, "Method Not Allowed",
                                       f"{request.method} is not allowed on {request.url.path}",
                                       "METHOD_NOT_ALLOWED"), as_json)
    return fault_response(ApiError(404, "Not Found",
                                   f"No resource at {request.url.path}", "NOT_FOUND"), as_json)


def build_app(services: Any) -> Starlette:
    routes = [Route(SSO_TOKEN, sso_token, methods=["POST"]),
              Route(SSO_LOGOUT, sso_logout, methods=["GET", "POST"]),
              Route(PREFIX + "/openapi.json", openapi, methods=["GET"]),
              *imageio.routes()]  # image transfers' data URLs (the ticket is the credential)
    for operation in ROUTES.operations:
        path = PREFIX + operation.path.rstrip("/") if operation.path != "/" else PREFIX
        routes.append(Route(path, endpoint(operation), methods=[operation.method],
                            name=f"{operation.method} {operation.path}"))
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found_handler,
                                                        404: not_found_handler,
                                                        405: not_found_handler})
    app.router.routes.extend(ui_routes(services))  # the web UI at /ovirt-engine/web
    app.state.services = services
    app.state.openapi = openapi_document(ROUTES.operations, PREFIX)
    return app
