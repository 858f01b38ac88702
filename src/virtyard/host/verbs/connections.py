"""``StoragePool.getConnections``: the connections this agent keeps, with their references.

The engine reconciles what a host should be connected to (from its database) with what the
host really keeps, after a crash or a lost call; this verb is the host's half of that. CHAP
passwords never leave the agent: only whether a connection has one.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from virtyard.host.agent import HostAgent
from virtyard.host.rpc.schema import NoParams
from virtyard.host.verbs.registry import SCHEMA


class KeptConnection(BaseModel):
    id: str = Field(description="the engine's connection id")
    connection: str = Field(description="portal address")
    port: int
    iqn: str
    tpgt: int
    user: str = Field(description="CHAP user ('' without CHAP); the password is never shown")
    refs: int = Field(description="references taken by connectStorageServer")


@SCHEMA.verb("StoragePool.getConnections", params=NoParams, result=list[KeptConnection])
def get_connections(agent: HostAgent, _p: NoParams) -> list[KeptConnection]:
    """Every connection with at least one reference, as connectStorageServer took it."""
    registry = agent.connections
    return [KeptConnection(id=c.id, connection=c.portal.host, port=c.portal.port, iqn=c.iqn,
                           tpgt=c.tpgt, user=c.chap.username if c.chap else "",
                           refs=registry.refs(c.id))
            for c in sorted(registry.all(), key=lambda c: c.id)]
