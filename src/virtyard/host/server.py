"""``virtyard-hostd``: the host agent's HTTPS server (JSON-RPC 2.0 at ``POST /jsonrpc``).

Mutual TLS is enforced by the TLS layer itself (``CERT_REQUIRED`` against the engine's CA), so a
peer without a valid client certificate is refused during the handshake, before any verb runs.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from virtyard.host.agent import HostAgent
from virtyard.host.config import ConfigError, HostConfig, load_config
from virtyard.host.rpc.errors import InvalidRequestError
from virtyard.host.rpc.jsonrpc import MAX_BODY, Dispatcher
from virtyard.host.verbs import SCHEMA
from virtyard.host.verbs.events import vm_events

log = logging.getLogger("virtyard.hostd")


# Seconds an idle client connection stays open. Long enough that an engine's pooled
# connections outlive its poll intervals and a client's pauses (a TLS handshake per call is the
# dearest part of a cheap verb, worse on a slow host); the engine drops its idle ones first.
KEEP_ALIVE = 60


def build_app(dispatcher: Dispatcher[HostAgent]) -> Starlette:
    """The ASGI application: one JSON-RPC endpoint."""

    async def jsonrpc(request: Request) -> Response:
        length = int(request.headers.get("content-length") or 0)
        if length > MAX_BODY:
            error = InvalidRequestError(f"request body over {MAX_BODY} bytes")
            return JSONResponse({"jsonrpc": "2.0", "id": None,
                                 "error": error.to_error_object()}, status_code=413)
        answer = await dispatcher.handle_body(await request.body())
        if answer is None:
            return Response(status_code=204)
        return Response(answer, media_type="application/json")

    return Starlette(routes=[Route("/jsonrpc", jsonrpc, methods=["POST"])])


def serve(config: HostConfig, agent: HostAgent | None = None) -> None:
    """Run the agent until interrupted."""
    agent = agent or HostAgent(config)
    agent.recover()
    vm_events(agent)  # libvirt's events followed from the start, not from the first long-poll
    dispatcher = Dispatcher(SCHEMA, agent, workers=config.server.workers, locks=agent.locks)
    for path in (config.server.cert, config.server.key, config.server.ca):
        if not path.exists():
            raise ConfigError(f"TLS file {path} not found (see docs/host-agent.md: enrolment)")
    log.info("virtyard-hostd %s listening on https://%s:%d (initiator: %s)", config.name,
             config.server.address, config.server.port, agent.initiator.kind)
    uvicorn.run(
        build_app(dispatcher),
        host=config.server.address,
        port=config.server.port,
        ssl_certfile=str(config.server.cert),
        ssl_keyfile=str(config.server.key),
        ssl_ca_certs=str(config.server.ca),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=KEEP_ALIVE,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="virtyard-hostd", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="TOML configuration file")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(load_config(args.config))
    except ConfigError as exc:
        print(f"virtyard-hostd: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
