"""The plain values of the binding: CHAP credentials, portals, discovered targets, byte ranges.

Kept apart from the C side so callers (the initiators, the agent's verbs) can build and pass them
without loading libiscsi, and so the error types can name a :data:`ByteRange`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

DEFAULT_PORT: Final = 3260

ByteRange = tuple[int, int, int]
"""``(lun, byte offset, length)``: one range of :func:`~.pipelines.read_ranges`."""


@dataclass(frozen=True)
class Chap:
    """CHAP credentials the initiator presents. The password never shows in a repr."""

    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Chap(username={self.username!r}, password='***')"


@dataclass(frozen=True)
class Portal:
    """A network portal of a target, with its target portal group tag when discovery gave it."""

    address: str
    port: int
    tpgt: int | None = None

    def __str__(self) -> str:
        return portal_string(self.address, self.port)


@dataclass(frozen=True)
class DiscoveredTarget:
    """One SendTargets answer: a target IQN and the portals it can be reached at."""

    iqn: str
    portals: tuple[Portal, ...]


def portal_string(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def parse_portal(text: str) -> Portal:
    """libiscsi's discovered portal, ``addr:port,tpgt`` or ``[v6addr]:port,tpgt``."""
    where, _, tag = text.partition(",")
    if where.startswith("["):
        address, _, rest = where[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        address, _, port_text = where.rpartition(":")
        if not address:
            address, port_text = where, ""
    port = int(port_text) if port_text.isdigit() else DEFAULT_PORT
    return Portal(address, port, int(tag) if tag.strip().isdigit() else None)

