"""``virtyard``: the command line of Virtyard's engine, with the habits of ``virsh``,
``openstack`` and ``kubectl``.

It is a client of the engine's REST API only (JSON over HTTPS through httpx: see
``client.py`` for why), built with Click (commands, options, shell completion) and Rich
(tables and progress bars). One module per command group: ``auth`` (login, logout),
``hosts``, ``luns``, ``disks``, ``vms``, ``events``, ``completion``; ``app`` holds what they
share, ``output`` the formats, ``errors`` the exit codes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

from virtyard import __version__
from virtyard.cli.app import App
from virtyard.cli.auth import login, logout
from virtyard.cli.completion import COMPLETE_VAR, PROG, completion
from virtyard.cli.disks import disk
from virtyard.cli.errors import EXIT_CODES, OK, REFUSED, USAGE, CliError
from virtyard.cli.events import events
from virtyard.cli.hosts import hosts
from virtyard.cli.iso import iso
from virtyard.cli.luns import luns
from virtyard.cli.output import make_consoles
from virtyard.cli.storage_domains import sd
from virtyard.cli.vms import vm

INTERRUPTED = 130

EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in
                                         EXIT_CODES.items()) + """

\b
Output: tables for people; --json (documented shapes) or -o value -c FIELD for scripts.
Errors: one line on stderr, "Reason: detail (KEY)", KEY being the engine's stable key.
Secrets are never arguments: --password-file / $VIRTYARD_PASSWORD / a prompt.
Completion: eval "$(virtyard completion bash)"   (or zsh). More: docs/cli.md.

\b
Not yet: CD-ROM insert/eject ('vm cd' only shows the drive), storage domains ('sd'),
ISO upload ('iso upload') and 'hosts fence' come when the engine has their endpoints."""


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "max_content_width": 100},
             epilog=EPILOG)
@click.option("--engine", "engine_url", envvar="VIRTYARD_ENGINE", metavar="URL",
              help="Use the login to this engine (default: the last 'virtyard login').")
@click.option("--user", envvar="VIRTYARD_USER", metavar="USER",
              help="Use this user's login (with several on one engine).")
@click.option("--timeout", type=click.FloatRange(1, 86400), default=300.0,
              envvar="VIRTYARD_TIMEOUT", show_default=True,
              help="Seconds to wait for the engine's answer.")
@click.option("--no-progress", is_flag=True, help="No progress bars (never shown off a "
                                                    "terminal anyway).")
@click.option("--no-color", is_flag=True, help="No colours (also: NO_COLOR=1).")
@click.version_option(__version__, "--version", prog_name=PROG)
@click.pass_context
def cli(ctx: click.Context, *, engine_url: str | None, user: str | None, timeout: float,
        no_progress: bool, no_color: bool) -> None:
    """Manage Virtyard's hosts, SAN LUNs, disks and VMs through the engine's REST API.

    Start with 'virtyard login https://ENGINE:PORT --ca-file ca.pem'.
    """
    out, err = make_consoles(color=not no_color)
    app = App(out, err, engine_url=engine_url, user=user, timeout=timeout,
              show_progress=not no_progress)
    ctx.obj = app
    ctx.call_on_close(app.close)


for command in (login, logout, hosts, luns, disk, sd, iso, vm, events, completion):
    cli.add_command(command)


def _say(line: str) -> None:
    click.echo(f"{PROG}: {line}", err=True)


def run(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code (errors are printed as one line on stderr)."""
    try:
        result = cli.main(args=list(argv) if argv is not None else None, prog_name=PROG,
                          complete_var=COMPLETE_VAR, standalone_mode=False)
    except CliError as exc:
        _say(exc.line())
        return exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.format_message(), err=True)
        return USAGE
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else PROG
        _say(CliError("Usage error", exc.format_message(), "USAGE",
                      hint=f"see '{command} --help'").line())
        return USAGE
    except click.ClickException as exc:
        _say(CliError("Error", exc.format_message(), "USAGE").line())
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        _say("interrupted; the engine may still do what it was asked (see 'virtyard events')")
        return INTERRUPTED
    except BrokenPipeError:
        # The reader went away (| head): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return OK
    except Exception as exc:
        if os.environ.get("VIRTYARD_DEBUG"):
            raise
        _say(CliError("Internal error", f"{type(exc).__name__}: {exc}", "CLI_INTERNAL",
                      hint="VIRTYARD_DEBUG=1 shows the traceback").line())
        return REFUSED
    return result if isinstance(result, int) else OK


def main() -> None:
    """The ``virtyard`` console script."""
    sys.exit(run())
