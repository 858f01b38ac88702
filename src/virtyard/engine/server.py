"""``virtyard-engine``: the management server, and its operator commands.

    virtyard-engine run --config engine.toml          serve the REST API (HTTPS), heartbeat
    virtyard-engine pki init --dir pki --address H    the engine's CA, server and client certs
    virtyard-engine pki enrol-host --dir pki --name N --address A --out DIR
    virtyard-engine users add|password|list|remove NAME … --config engine.toml
    virtyard-engine db upgrade --config engine.toml   migrate the schema (run also does it)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from virtyard.engine.api.app import build_app
from virtyard.engine.config import ConfigError, EngineConfig, load_config
from virtyard.engine.ha import service as ha
from virtyard.engine.monitoring.loop import Monitor
from virtyard.engine.operator import OperatorError, add_parsers, open_database
from virtyard.engine.recovery import Recovery
from virtyard.engine.services import Services, build_services, ensure_admin
from virtyard.engine.transfers.service import transfer_service

log = logging.getLogger("virtyard.engine")


def prepare(config: EngineConfig) -> Services:
    """Everything before serving: state folder, schema, the first admin."""
    services = build_services(config, open_database(config))
    ensure_admin(services)
    return services


def make_app(services: Services) -> Starlette:
    app = build_app(services)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        settings = services.config.monitoring
        services.monitor = Monitor(services, poll_interval=settings.poll_interval,
                                   push=settings.push, long_poll=settings.long_poll,
                                   concurrency=settings.concurrency, naive=settings.naive,
                                   report_interval=settings.report_interval)
        tasks = [asyncio.create_task(services.heartbeat.run(), name="heartbeat"),
                 asyncio.create_task(Recovery(services).run(), name="recovery"),
                 asyncio.create_task(services.monitor.run(), name="monitoring"),
                 asyncio.create_task(transfer_service(services).run(), name="transfers"),
                 *ha.start(services)]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await services.pool.close()

    app.router.lifespan_context = lifespan
    return app


def serve(config: EngineConfig) -> None:
    for path in (config.server.cert, config.server.key, config.hosts.ca, config.hosts.cert,
                 config.hosts.key):
        if not path.exists():
            raise ConfigError(f"TLS file {path} not found (see docs/engine.md: PKI)")
    services = prepare(config)
    log.info("virtyard-engine listening on https://%s:%d/ovirt-engine/api (database: %s)",
             config.server.address, config.server.port,
             "SQLite" if services.db.is_sqlite else "PostgreSQL")
    uvicorn.run(make_app(services), host=config.server.address, port=config.server.port,
                ssl_certfile=str(config.server.cert), ssl_keyfile=str(config.server.key),
                log_config=None, access_log=False, timeout_graceful_shutdown=5,
                # Large answers (a follow over thousands of VMs) take seconds to send.
                timeout_keep_alive=30,
                h11_max_incomplete_event_size=64 * 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="virtyard-engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="serve the REST API")
    run_p.add_argument("--config", type=Path, required=True)
    add_parsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            serve(load_config(args.config))
            return 0
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"virtyard-engine: {exc}", file=sys.stderr)
        return 2
    except OperatorError as exc:
        print(f"virtyard-engine: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
