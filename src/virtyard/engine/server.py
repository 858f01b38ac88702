"""``virtyard-engine``: the management server, and its operator commands.

    virtyard-engine run --config engine.toml          serve the REST API (HTTPS), heartbeat
    virtyard-engine pki init --dir pki --address H    the engine's CA, server and client certs
    virtyard-engine pki enrol-host --dir pki --name N --address A --out DIR
    virtyard-engine users add NAME --role readonly --password-file F --config engine.toml
    virtyard-engine db upgrade --config engine.toml   migrate the schema (run also does it)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from virtyard.common.pki import create_ca, issue
from virtyard.engine.api.app import build_app
from virtyard.engine.commands.base import ROLES
from virtyard.engine.config import ConfigError, EngineConfig, load_config
from virtyard.engine.services import Services, build_services, ensure_admin

log = logging.getLogger("virtyard.engine")


def prepare(config: EngineConfig) -> Services:
    """Everything before serving: state folder, schema, the first admin."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    services = build_services(config)
    services.db.migrate()
    ensure_admin(services)
    return services


def make_app(services: Services) -> Starlette:
    app = build_app(services)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(services.heartbeat.run(), name="heartbeat")
        try:
            yield
        finally:
            task.cancel()
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
                h11_max_incomplete_event_size=64 * 1024)


def _pki_init(args: argparse.Namespace) -> int:
    ca = create_ca(args.dir, "Virtyard engine CA")
    issue(ca, args.dir, "engine-server", common_name=args.address[0],
          addresses=tuple(args.address), server=True, client=False)
    issue(ca, args.dir, "engine", common_name="virtyard-engine", server=False, client=True)
    print(f"CA: {ca.cert}\nREST API certificate: {args.dir / 'engine-server.pem'}\n"
          f"client certificate for host agents: {args.dir / 'engine.pem'}")
    return 0


def _pki_enrol(args: argparse.Namespace) -> int:
    ca = create_ca(args.dir, "Virtyard engine CA")
    args.out.mkdir(parents=True, exist_ok=True)
    pair = issue(ca, args.out, "host", common_name=args.name, addresses=tuple(args.address),
                 server=True, client=True)
    shutil.copyfile(ca.cert, args.out / "ca.pem")
    print(f"host certificate: {pair.cert}\nkey: {pair.key}\nCA the agent trusts: "
          f"{args.out / 'ca.pem'}\nCopy these to the host (e.g. /etc/virtyard/pki/).")
    return 0


def _users_add(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    services = prepare(config)
    password = args.password_file.read_text().strip() if args.password_file else ""
    if not password:
        password = getpass.getpass(f"password for {args.name}: ")
    services.auth.add_user(args.name, password, args.role)
    print(f"user {args.name} ({args.role}) added")
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    build_services(config).db.migrate()
    print("database schema is current")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="virtyard-engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="serve the REST API")
    run_p.add_argument("--config", type=Path, required=True)
    pki = sub.add_parser("pki", help="certificates").add_subparsers(dest="pki", required=True)
    init = pki.add_parser("init", help="CA + the engine's server and client certificates")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument("--address", action="append", required=True,
                      help="name or IP the REST API is reached at (repeatable)")
    enrol = pki.add_parser("enrol-host", help="a certificate for a host agent")
    enrol.add_argument("--dir", type=Path, required=True, help="the engine's PKI folder")
    enrol.add_argument("--name", required=True)
    enrol.add_argument("--address", action="append", required=True)
    enrol.add_argument("--out", type=Path, required=True)
    users = sub.add_parser("users", help="engine users").add_subparsers(dest="users",
                                                                         required=True)
    add = users.add_parser("add", help="add a user of the internal domain")
    add.add_argument("name", help="e.g. viewer@internal")
    add.add_argument("--role", choices=ROLES, default="readonly")
    add.add_argument("--password-file", type=Path)
    add.add_argument("--config", type=Path, required=True)
    db = sub.add_parser("db", help="database").add_subparsers(dest="db", required=True)
    upgrade = db.add_parser("upgrade", help="migrate the schema to the newest version")
    upgrade.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            serve(load_config(args.config))
            return 0
        if args.command == "pki":
            return _pki_init(args) if args.pki == "init" else _pki_enrol(args)
        if args.command == "users":
            return _users_add(args)
        return _db_upgrade(args)
    except ConfigError as exc:
        print(f"virtyard-engine: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
