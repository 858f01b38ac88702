"""Shell completion (bash, zsh): commands and options from Click, and the names of VMs, disks
and hosts from the engine.

``virtyard completion bash`` prints the script; ``eval "$(virtyard completion bash)"`` in
``~/.bashrc`` (or ``source <(virtyard completion zsh)`` in ``~/.zshrc``) turns it on. Names
come from the current login (or ``--engine``/``--user`` on the line being completed), with a
short timeout; when the engine cannot be asked, names are simply not offered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from click.shell_completion import CompletionItem, get_completion_class

from virtyard.cli.app import DISKS, HOSTS, VMS, Kind
from virtyard.cli.client import Engine, items
from virtyard.cli.session import SessionStore

PROG = "virtyard"
COMPLETE_VAR = "_VIRTYARD_COMPLETE"
TIMEOUT = 3.0
LIMIT = 200

Completer = Callable[[click.Context, click.Parameter, str], list[CompletionItem]]


def names(kind: Kind) -> Completer:
    """A completer of ``kind``'s names that start with what is typed."""

    def complete(ctx: click.Context, param: click.Parameter,
                 incomplete: str) -> list[CompletionItem]:
        root = ctx.find_root().params
        try:
            login = SessionStore().find(root.get("engine_url"), root.get("user"))
            params: dict[str, Any] = {"max": LIMIT}
            if incomplete and all(c.isalnum() or c in "-_.@" for c in incomplete):
                params["search"] = f"name={incomplete}*"
            with Engine(login, timeout=TIMEOUT) as engine:
                listed = items(engine.get(f"/{kind.collection}", **params), kind.tag)
        except Exception:  # completion must never fail the shell
            return []
        found = sorted({str(m.get(kind.name_field) or "") for m in listed})
        return [CompletionItem(n) for n in found if n and n.startswith(incomplete)]

    return complete


complete_vms = names(VMS)
complete_hosts = names(HOSTS)
complete_disks = names(DISKS)


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    bash:  eval "$(virtyard completion bash)"      (in ~/.bashrc)
    zsh:   source <(virtyard completion zsh)        (in ~/.zshrc, after compinit)
    """
    cls = get_completion_class(shell)
    assert cls is not None
    root = ctx.find_root().command
    click.echo(cls(root, {}, PROG, COMPLETE_VAR).source())
