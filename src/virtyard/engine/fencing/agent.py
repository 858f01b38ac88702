"""One fence agent as a driver sees it, the driver interface, and the driver for a type.

A driver is blocking (run it in a worker thread) and answers ``status`` with ``"on"`` or
``"off"``; ``off``/``on`` ask for the change and return at once or when done (the caller checks
with ``status``). The password is a secret: it is kept out of ``repr`` and out of every error
text a driver raises (:func:`redact`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Protocol

Action = Literal["off", "on", "status"]
ACTIONS: tuple[Action, ...] = ("off", "on", "status")
# Types handled by a library in the engine; any other type runs the program fence_<type>.
BUILT_IN = ("redfish", "ipmilan")
TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
OPTION_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class FenceError(Exception):
    """The agent could not do what was asked (unreachable, refused, timed out)."""


@dataclass(frozen=True)
class AgentSpec:
    """What a driver needs: type, address, port, credentials, ``k=v`` options."""

    type: str
    address: str
    port: int | None = None
    user_name: str = ""
    password: str = field(default="", repr=False)
    options: dict[str, str] = field(default_factory=dict)


class FenceDriver(Protocol):
    def power(self, action: Action) -> str:
        """Do ``action``; for ``status`` (and when known after a change): "on" or "off"."""


def parse_options(text: str) -> dict[str, str]:
    """oVirt's agent options, ``k=v,k=v`` (a bare ``k`` means ``k=1``)."""
    out: dict[str, str] = {}
    for raw in (text or "").split(","):
        item = raw.strip()
        if not item:
            continue
        key, _, value = item.partition("=")
        key = key.strip()
        if not OPTION_KEY_RE.match(key):
            raise ValueError(f"fence agent option {key[:64]!r} is not a valid name")
        out[key] = value.strip() if _ else "1"
    return out


def check_type(kind: str) -> str:
    if not TYPE_RE.match(kind or ""):
        raise ValueError(f"fence agent type {str(kind)[:64]!r} is not a valid name")
    return kind


def redact(text: str, spec: AgentSpec) -> str:
    """``text`` without the agent's password (a library may echo it in an error)."""
    return text.replace(spec.password, "***") if spec.password else text


__all__ = ["ACTIONS", "Action", "AgentSpec", "FenceDriver", "FenceError", "parse_options",
           "redact"]
