"""``virtyard login URL`` and ``virtyard logout``.

The password never goes on the command line: ``--password-file F``, the environment variable
``VIRTYARD_PASSWORD``, or a prompt (no echo). Only the token is kept (``session.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from virtyard.cli.app import App, output_options, pass_app
from virtyard.cli.client import password_grant, read_secret_file, revoke
from virtyard.cli.errors import USAGE, CliError
from virtyard.cli.session import Login, normalize_url

PASSWORD_ENV = "VIRTYARD_PASSWORD"
DEFAULT_USER = "admin@internal"


def _password(password_file: str | None, user: str) -> str:
    if password_file:
        return read_secret_file(password_file, "password")
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if not sys.stdin.isatty():
        raise CliError("No password", f"give --password-file or set {PASSWORD_ENV} (stdin is "
                       "not a terminal to ask on)", "NO_PASSWORD", exit_code=USAGE)
    return str(click.prompt(f"Password for {user}", hide_input=True, err=True))


@click.command("login")
@click.argument("url")
@click.option("--user", "-u", "login_user", default=DEFAULT_USER, show_default=True,
              help="User name (name@domain).")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False),
              help="The engine's CA certificate (PEM); default: the system's trusted CAs.")
@click.option("--password-file", type=click.Path(dir_okay=False),
              help=f"Read the password from this file (else ${PASSWORD_ENV}, else a prompt).")
@output_options
@pass_app
def login(app: App, url: str, login_user: str, ca_file: str | None,
          password_file: str | None) -> None:
    """Log in to the engine at URL and keep the token for the next commands.

    URL is https://HOST[:PORT] (the API's URL, .../ovirt-engine/api, works too). The token is
    kept in ~/.config/virtyard/HOST:PORT-USER.json, readable only by you; this login becomes
    the current one.
    """
    base = normalize_url(url.split("/ovirt-engine", 1)[0])
    ca = str(Path(ca_file).resolve()) if ca_file else ""
    password = _password(password_file, login_user)
    with app.progress(f"logging in to {base}"):
        token, expires = password_grant(base, login_user, password, ca, timeout=app.timeout)
    saved = Login(url=base, user=login_user, token=token, ca_file=ca, expires_ms=expires)
    path = app.store.save(saved)
    app.output.done(f"Logged in to {base} as {login_user} (token in {path})",
                    {"url": base, "user": login_user, "session_file": str(path)})


@click.command("logout")
@output_options
@pass_app
def logout(app: App) -> None:
    """End the current login (or the one --engine/--user name) and forget its token."""
    current = app.login()
    app.store.remove(current)
    try:
        revoke(current, timeout=min(app.timeout, 30.0))
    except CliError as exc:
        exc.hint = "the token is forgotten here; the engine ends it after its idle lifetime"
        raise
    app.output.done(f"Logged out of {current.url} ({current.user})",
                    {"url": current.url, "user": current.user})
