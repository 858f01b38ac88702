"""The operator's commands of ``virtyard-engine``: certificates, users, the database schema.

They touch only what they need (the users commands open the database, never the host TLS
files), refuse clearly (one line, exit 1) and never print or log a password or its hash.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
import shutil
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from virtyard.common.pki import create_ca, issue
from virtyard.engine.auth import Authenticator, split_user
from virtyard.engine.config import EngineConfig, load_config
from virtyard.engine.db.database import Database
from virtyard.engine.db.models import Session, User


class OperatorError(Exception):
    """What the operator asked cannot be done (said in one line)."""


def open_database(config: EngineConfig) -> Database:
    """The engine's database, migrated; the state folder and an SQLite file private to root."""
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = Database(config.database_url, echo=config.database.echo)
    db.migrate()
    if db.is_sqlite:
        path = Path(config.database_url.removeprefix("sqlite:///"))
        for candidate in (path, path.with_name(path.name + "-wal"),
                          path.with_name(path.name + "-shm")):
            if candidate.exists():
                os.chmod(candidate, 0o600)
    return db


def _authenticator(config: EngineConfig) -> Authenticator:
    return Authenticator(open_database(config), token_lifetime=datetime.timedelta(
        minutes=config.auth.token_lifetime_minutes))


def _read_password(args: argparse.Namespace) -> str:
    if getattr(args, "password_file", None):
        password = str(args.password_file.read_text().strip())
    else:
        password = getpass.getpass(f"password for {args.name}: ")
    if len(password) < 8:
        raise OperatorError("the password must have at least 8 characters")
    return password


def pki_init(args: argparse.Namespace) -> int:
    ca = create_ca(args.dir, "Virtyard engine CA")
    issue(ca, args.dir, "engine-server", common_name=args.address[0],
          addresses=tuple(args.address), server=True, client=False)
    issue(ca, args.dir, "engine", common_name="virtyard-engine", server=False, client=True)
    print(f"CA: {ca.cert}\nREST API certificate: {args.dir / 'engine-server.pem'}\n"
          f"client certificate for host agents: {args.dir / 'engine.pem'}")
    return 0


def pki_enrol(args: argparse.Namespace) -> int:
    ca = create_ca(args.dir, "Virtyard engine CA")
    args.out.mkdir(parents=True, exist_ok=True)
    pair = issue(ca, args.out, "host", common_name=args.name, addresses=tuple(args.address),
                 server=True, client=True)
    shutil.copyfile(ca.cert, args.out / "ca.pem")
    print(f"host certificate: {pair.cert}\nkey: {pair.key}\nCA the agent trusts: "
          f"{args.out / 'ca.pem'}\nCopy these to the host (e.g. /etc/virtyard/pki/).")
    return 0


def users_add(args: argparse.Namespace) -> int:
    auth = _authenticator(load_config(args.config))
    password = _read_password(args)
    try:
        auth.add_user(args.name, password, args.role)
    except IntegrityError:
        raise OperatorError(f"user {args.name} exists already") from None
    print(f"user {args.name} ({args.role}) added")
    return 0


def users_password(args: argparse.Namespace) -> int:
    auth = _authenticator(load_config(args.config))
    name, domain = split_user(args.name)
    with auth.db.read() as tx:
        if tx.scalars(select(User).where(User.name == name, User.domain == domain)).first() \
                is None:
            raise OperatorError(f"no user {args.name}")
    auth.set_password(args.name, _read_password(args))
    print(f"password of {args.name} changed")
    return 0


def users_list(args: argparse.Namespace) -> int:
    db = open_database(load_config(args.config))
    with db.read() as tx:
        for user in tx.scalars(select(User).order_by(User.domain, User.name)):
            print(f"{user.name}@{user.domain}\t{user.role}")
    return 0


def users_remove(args: argparse.Namespace) -> int:
    db = open_database(load_config(args.config))
    name, domain = split_user(args.name)
    with db.transaction() as tx:
        user = tx.scalars(select(User).where(User.name == name, User.domain == domain)).first()
        if user is None:
            raise OperatorError(f"no user {args.name}")
        admins = tx.scalars(select(User).where(User.role == "admin")).all()
        if user.role == "admin" and len(admins) == 1:
            raise OperatorError(f"{args.name} is the last administrator")
        tx.execute(delete(Session).where(Session.user_id == user.id))
        tx.delete(user)
    print(f"user {args.name} removed (its sessions ended)")
    return 0


def db_upgrade(args: argparse.Namespace) -> int:
    open_database(load_config(args.config))
    print("database schema is current")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pki = sub.add_parser("pki", help="certificates").add_subparsers(dest="pki", required=True)
    init = pki.add_parser("init", help="CA + the engine's server and client certificates")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument("--address", action="append", required=True,
                      help="name or IP the REST API is reached at (repeatable)")
    init.set_defaults(handler=pki_init)
    enrol = pki.add_parser("enrol-host", help="a certificate for a host agent")
    enrol.add_argument("--dir", type=Path, required=True, help="the engine's PKI folder")
    enrol.add_argument("--name", required=True)
    enrol.add_argument("--address", action="append", required=True)
    enrol.add_argument("--out", type=Path, required=True)
    enrol.set_defaults(handler=pki_enrol)
    users = sub.add_parser("users", help="engine users").add_subparsers(dest="users",
                                                                         required=True)
    for name, handler, helptext in (
            ("add", users_add, "add a user of the internal domain"),
            ("password", users_password, "set a user's password"),
            ("list", users_list, "list the users and their roles"),
            ("remove", users_remove, "remove a user and end its sessions")):
        p = users.add_parser(name, help=helptext)
        if name != "list":
            p.add_argument("name", help="e.g. viewer@internal")
        if name == "add":
            p.add_argument("--role", choices=("admin", "readonly"), default="readonly")
        if name in ("add", "password"):
            p.add_argument("--password-file", type=Path,
                           help="read the password from this file (else: a prompt)")
        p.add_argument("--config", type=Path, required=True)
        p.set_defaults(handler=handler)
    db = sub.add_parser("db", help="database").add_subparsers(dest="db", required=True)
    upgrade = db.add_parser("upgrade", help="migrate the schema to the newest version")
    upgrade.add_argument("--config", type=Path, required=True)
    upgrade.set_defaults(handler=db_upgrade)
