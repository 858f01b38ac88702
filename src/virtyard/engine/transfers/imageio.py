"""The data URL of an image transfer, ``/ovirt-engine/images/<ticket>``: the part of the
ovirt-imageio HTTP protocol that ``ovirt_imageio.client.upload()`` speaks.

- ``OPTIONS``: ``{"features": ["zero", "flush"], "max_readers": 0, "max_writers": N}``; no
  ``extents`` (uploads do not need them) and no ``unix_socket``.
- ``PUT`` with ``Content-Length`` and ``Content-Range: bytes a-b/*`` (none: from byte 0), and
  ``?flush=y|n``: the bytes at that offset. 416 past the disk's declared size, 400 for a
  request that ends before its length.
- ``PATCH`` with JSON ``{"op": "zero", "offset", "size"}`` or ``{"op": "flush"}``.
- ``GET`` (downloads) is refused: these tickets are for uploads only.

The ticket in the path is the only credential (unguessable, made per transfer, gone when the
transfer ends), as with oVirt's imageio; it is never logged. Errors answer ``text/plain`` with
one line, which the client shows as the reason of its ``http.Error``.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from virtyard.engine.transfers.service import TransferError, transfer_service

log = logging.getLogger("virtyard.engine.transfers.imageio")

PATH = "/ovirt-engine/images/{ticket}"
CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
MAX_PATCH = 4096
MAX_DRAIN = 256 << 20
ALLOW = "OPTIONS,PUT,PATCH"


def error(status: int, message: str) -> Response:
    return Response(message.rstrip() + "\n", status_code=status, media_type="text/plain")


def parse_range(request: Request) -> tuple[int, int]:
    """(offset, length) of a PUT, from Content-Range and Content-Length."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        raise TransferError(411, "Content-Length is required")
    length = int(declared)
    raw = request.headers.get("content-range")
    if raw is None:
        return 0, length
    match = CONTENT_RANGE.match(raw.strip())
    if not match:
        raise TransferError(400, f"invalid Content-Range {raw[:64]!r}: bytes first-last/*")
    first, last = int(match.group(1)), int(match.group(2))
    if last < first or last - first + 1 != length:
        raise TransferError(400, f"Content-Range {raw[:64]!r} does not match Content-Length "
                            f"{length}")
    return first, length


async def images(request: Request) -> Response:
    services = request.app.state.services
    service = transfer_service(services)
    upload = service.upload(str(request.path_params.get("ticket", "")))
    method = request.method
    if upload is None:
        return error(403, "You are not allowed to access this resource: no such ticket "
                          "(unknown, expired or finished)")
    try:
        if method == "OPTIONS":
            return JSONResponse({"features": ["zero", "flush"], "max_readers": 0,
                                 "max_writers": services.config.transfers.max_writers},
                                headers={"Allow": ALLOW})
        if method == "PUT":
            return await put(service, upload, request)
        if method == "PATCH":
            return await patch(service, upload, request)
        return error(403, "You are not allowed to access this resource: the ticket is for an "
                          "upload; it does not allow reading")
    except TransferError as exc:
        return error(exc.status, exc.message)
    except ClientDisconnect:
        log.info("transfer %s: the client went away during a %s", upload.transfer_id, method)
        return error(400, "the client disconnected")
    except Exception:
        log.exception("transfer %s: %s failed", upload.transfer_id, method)
        return error(500, "the engine failed; see its log")


async def put(service: Any, upload: Any, request: Request) -> Response:
    chunks = request.stream()
    try:
        offset, length = parse_range(request)
        await service.put(upload, offset, length, chunks)
    except TransferError as exc:
        # Read what the client still sends (within reason) so that it gets the answer
        # instead of a reset connection.
        drained = 0
        try:
            async for piece in chunks:
                drained += len(piece)
                if drained > MAX_DRAIN:
                    break
        except ClientDisconnect:
            pass
        return error(exc.status, exc.message)
    return Response(status_code=200)


async def patch(service: Any, upload: Any, request: Request) -> Response:
    body = b""
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_PATCH:
            raise TransferError(413, "the PATCH body is too large")
    try:
        msg = json.loads(body)
    except ValueError:
        raise TransferError(400, "the PATCH body is not JSON") from None
    if not isinstance(msg, dict):
        raise TransferError(400, "the PATCH body is not a JSON object")
    op = msg.get("op")
    if op == "flush":
        upload.touch()  # every Volume.write is durable when it returns
        return Response(status_code=200)
    if op == "zero":
        offset, size = msg.get("offset", 0), msg.get("size")
        if not isinstance(offset, int) or not isinstance(size, int) or \
                isinstance(offset, bool) or isinstance(size, bool):
            raise TransferError(400, "zero needs integer offset and size")
        await service.zero(upload, offset, size)
        return Response(status_code=200)
    raise TransferError(400, f"unsupported operation {str(op)[:32]!r}: zero or flush")


def routes() -> list[Route]:
    return [Route(PATH, images, methods=["OPTIONS", "PUT", "PATCH", "GET"],
                  name="imageio")]
