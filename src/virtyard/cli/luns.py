"""``virtyard luns --host H``: the LUNs a host sees, used ones marked with the reason; with
``--discover`` (SendTargets at a portal) and ``--login``/``--login-all`` first.

CHAP: ``--chap-user U`` and the password from ``--chap-password-file F`` or
``VIRTYARD_CHAP_PASSWORD``, never from the command line.
"""

from __future__ import annotations

import os
from typing import Any

import click

from virtyard.cli.app import HOSTS, App, output_options, pass_app
from virtyard.cli.client import items, read_secret_file
from virtyard.cli.completion import complete_hosts
from virtyard.cli.errors import NOT_FOUND, USAGE, CliError
from virtyard.cli.output import Column

CHAP_ENV = "VIRTYARD_CHAP_PASSWORD"
ISCSI_PORT = 3260

TARGET_COLUMNS = [Column("target"), Column("address"), Column("port"), Column("portal")]
COLUMNS = [Column("wwid", "WWID"), Column("size", kind="size"), Column("target"),
           Column("lun", "LUN"), Column("paths"), Column("status", kind="status"),
           Column("used_by", "USED BY", wrap=True)]


def lun_row(storage: dict[str, Any], host_name: str) -> dict[str, Any]:
    """One LUN as the CLI shows it (the JSON shape of ``luns``)."""
    units = items(storage.get("logical_units"), "logical_unit")
    unit = units[0] if units else {}
    return {
        "wwid": unit.get("id") or storage.get("id"), "size": unit.get("size"),
        "vendor": unit.get("vendor_id"), "product": unit.get("product_id"),
        "serial": unit.get("serial"), "address": unit.get("address"),
        "port": unit.get("port"), "target": unit.get("target"), "portal": unit.get("portal"),
        "lun": unit.get("lun_mapping"), "paths": unit.get("paths"),
        "active_paths": unit.get("active_paths"), "status": unit.get("status"),
        "used_by": unit.get("used_by"), "disk_id": unit.get("disk_id"),
        "storage_domain_id": unit.get("storage_domain_id"), "host": host_name,
    }


def parse_portal(text: str) -> tuple[str, int]:
    """``ADDR[:PORT]`` (``[v6]:PORT`` for IPv6) → address and port (3260 by default)."""
    text = text.strip()
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        address, _, port_text = text.partition(":")
    else:
        address, port_text = text, ""
    if not address:
        raise CliError("Bad portal", f"'{text}' is not ADDR[:PORT]", "BAD_PORTAL",
                       exit_code=USAGE)
    if not port_text:
        return address, ISCSI_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise CliError("Bad portal", f"'{text}': the port must be 1-65535", "BAD_PORTAL",
                       exit_code=USAGE)
    return address, int(port_text)


def chap(user: str | None, password_file: str | None) -> dict[str, str]:
    """The CHAP fields of an ``iscsi`` element ({} without CHAP)."""
    if not user:
        if password_file:
            raise CliError("CHAP password without a user", "give --chap-user too",
                           "CHAP_USER_MISSING", exit_code=USAGE)
        return {}
    if password_file:
        password = read_secret_file(password_file, "CHAP password")
    elif os.environ.get(CHAP_ENV):
        password = os.environ[CHAP_ENV]
    else:
        raise CliError("No CHAP password", f"give --chap-password-file or set {CHAP_ENV}",
                       "CHAP_PASSWORD_MISSING", exit_code=USAGE)
    return {"username": user, "password": password}


def chap_options(f: Any) -> Any:
    f = click.option("--chap-password-file", type=click.Path(dir_okay=False),
                     help=f"CHAP password file (else ${CHAP_ENV}).")(f)
    return click.option("--chap-user", metavar="USER", help="CHAP user name.")(f)


def _login(app: App, host: dict[str, Any], targets: list[dict[str, Any]],
           portal: tuple[str, int], secret: dict[str, str]) -> None:
    """Log ``host`` in to each of ``targets`` (a bar counts them)."""
    with app.progress("logging in", total=len(targets)) as bar:
        for target in targets:
            bar.update(f"logging {host['name']} in to {target.get('target')}")
            app.engine.post(f"/hosts/{host['id']}/iscsilogin", {"iscsi": {
                "address": target.get("address") or portal[0],
                "port": target.get("port") or portal[1], "target": target.get("target"),
                "portal": target.get("portal"), **secret}})
            bar.update(advance=1)
            app.output.note(f"logged in to {target.get('target')}")


@click.command("luns")
@click.option("--host", "host", required=True, shell_complete=complete_hosts,
              help="The host that looks (name or id).")
@click.option("--discover", metavar="ADDR[:PORT]",
              help="SendTargets discovery at this portal first (port 3260 by default).")
@click.option("--login", "targets", multiple=True, metavar="TARGET",
              help="Log the host in to this discovered target (repeatable).")
@click.option("--login-all", is_flag=True, help="Log the host in to every discovered target.")
@chap_options
@click.option("--targets", "show_targets", is_flag=True,
              help="Print the discovered targets (after any login) instead of the LUNs.")
@click.option("--no-status", is_flag=True,
              help="Do not probe LUNs for data (fast; used/free only for the engine's own).")
@output_options
@pass_app
def luns(app: App, *, host: str, discover: str | None, targets: tuple[str, ...],
         login_all: bool, chap_user: str | None, chap_password_file: str | None,
         show_targets: bool, no_status: bool) -> None:
    """List the LUNs HOST sees; used ones say why (a disk, a storage domain, data on it)."""
    if (targets or login_all) and not discover:
        raise CliError("Missing portal", "--login and --login-all need --discover "
                       "ADDR[:PORT] (the portal to log in through)", "PORTAL_MISSING",
                       exit_code=USAGE)
    if show_targets and not discover:
        raise CliError("Missing portal", "--targets needs --discover ADDR[:PORT]",
                       "PORTAL_MISSING", exit_code=USAGE)
    if targets and login_all:
        raise CliError("Conflicting options", "give --login TARGET or --login-all, not both",
                       "CONFLICTING_OPTIONS", exit_code=USAGE)
    secret = chap(chap_user, chap_password_file)
    found = app.find(HOSTS, host)
    host_path = f"/hosts/{found['id']}"
    if discover:
        address, port = parse_portal(discover)
        iscsi = {"address": address, "port": port, **secret}
        with app.progress(f"discovering targets at {address}:{port} from {found['name']}"):
            answer = app.engine.post(f"{host_path}/iscsidiscover", {"iscsi": iscsi})
        discovered = items(answer.get("discovered_targets"), "iscsi_details")
        if not show_targets:
            for target in discovered:
                app.output.note(f"discovered {target.get('target')} at "
                                f"{target.get('address')}:{target.get('port')} "
                                f"(portal group {target.get('portal')})")
            if not discovered:
                app.output.note(f"no targets at {address}:{port}")
        chosen = list(discovered) if login_all else []
        for name in targets:
            match = [t for t in discovered if t.get("target") == name]
            if not match:
                raise CliError("Not found", f"target {name} was not discovered at "
                               f"{address}:{port}", "TARGET_NOT_FOUND", exit_code=NOT_FOUND)
            chosen.append(match[0])
        if chosen:
            _login(app, found, chosen, (address, port), secret)
        if show_targets:
            app.output.rows([{"target": t.get("target"), "address": t.get("address"),
                              "port": t.get("port"), "portal": t.get("portal")}
                             for t in discovered],
                            TARGET_COLUMNS, empty=f"No targets at {address}:{port}.")
            return
    with app.progress(f"listing the LUNs {found['name']} sees"):
        storage = items(app.engine.get(f"{host_path}/storage",
                                       report_status="false" if no_status else None),
                        "host_storage")
    app.output.rows([lun_row(s, str(found["name"])) for s in storage], COLUMNS,
                    empty=f"Host {found['name']} sees no LUNs.")
