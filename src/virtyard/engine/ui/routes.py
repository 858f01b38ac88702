"""The web UI as a Starlette app mounted in the engine at ``/ovirt-engine/web`` (and ``/``
sending browsers there): pages, htmx fragments, actions and the vendored static files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from virtyard.engine.ui import direct_lun, inventory, login, storage, vm_actions
from virtyard.engine.ui.web import PREFIX, SECURITY_HEADERS, html

STATIC = Path(__file__).parent / "static"


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    text = "Method not allowed" if status == 405 else "No such page"
    return html(f"<!doctype html><title>{text}</title><p>{text}. "
                f'<a href="{PREFIX}/">Back to Virtyard</a></p>', status)


def _static_headers(app: Any) -> Any:
    """Static files with the UI's security headers (and a short cache)."""
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                for name, value in SECURITY_HEADERS.items():
                    if name != "Cache-Control":
                        headers.append((name.lower().encode(), value.encode()))
                headers.append((b"cache-control", b"private, max-age=300"))
                message = {**message, "headers": headers}
            await send(message)
        await app(scope, receive, send_with_headers)
    return wrapped


def build_ui(services: Any) -> Starlette:
    routes: list[BaseRoute] = [
        Route("/", inventory.home),
        Route("/login", login.login_form, methods=["GET"]),
        Route("/login", login.login, methods=["POST"]),
        Route("/logout", login.logout, methods=["POST"]),
        Route("/hosts", inventory.hosts),
        Route("/hosts/{id}/luncount", inventory.host_lun_count),
        Route("/vms", inventory.vms),
        Route("/vms/{id}", inventory.vm),
        Route("/vms/{id}/start", vm_actions.start, methods=["POST"]),
        Route("/vms/{id}/stop", vm_actions.stop, methods=["POST"]),
        Route("/vms/{id}/shutdown", vm_actions.shutdown, methods=["POST"]),
        Route("/vms/{id}/migrate", vm_actions.migrate_dialog, methods=["GET"]),
        Route("/vms/{id}/migrate", vm_actions.migrate, methods=["POST"]),
        Route("/vms/{id}/attach", vm_actions.attach_dialog, methods=["GET"]),
        Route("/vms/{id}/attach", vm_actions.attach, methods=["POST"]),
        Route("/vms/{id}/disks/{disk}/activate", vm_actions.activate, methods=["POST"]),
        Route("/vms/{id}/disks/{disk}/deactivate", vm_actions.deactivate, methods=["POST"]),
        Route("/vms/{id}/disks/{disk}/detach", vm_actions.detach, methods=["POST"]),
        Route("/disks", inventory.disks),
        Route("/disks/new-lun", direct_lun.wizard, methods=["GET"]),
        Route("/disks/new-lun", direct_lun.create, methods=["POST"]),
        Route("/disks/new-lun/discover", direct_lun.discover, methods=["POST"]),
        Route("/disks/new-lun/login", direct_lun.login, methods=["POST"]),
        Route("/disks/new-lun/luns", direct_lun.luns, methods=["GET"]),
        Route("/vms/{id}/cd", storage.cd_dialog, methods=["GET"]),
        Route("/vms/{id}/cd", storage.change_cd, methods=["POST"]),
        Route("/storage", storage.domains),
        Route("/storage/{id}/upload", storage.start_upload, methods=["POST"]),
        Route("/transfers/{id}", storage.upload_status, methods=["GET"]),
        Route("/transfers/{id}/end", storage.finish_upload, methods=["POST"]),
        Route("/events", inventory.events),
        Mount("/static", app=_static_headers(StaticFiles(directory=STATIC))),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _not_found,
                                                        404: _not_found, 405: _not_found})
    app.state.services = services
    return app


async def _to_ui(request: Request) -> Response:
    return RedirectResponse(PREFIX + "/", status_code=303)


def ui_routes(services: Any) -> list[BaseRoute]:
    """What the engine's app mounts: the UI, and ``/`` (a browser's first stop) sending there."""
    return [Route("/", _to_ui), Route(PREFIX, _to_ui), Mount(PREFIX, app=build_ui(services))]
