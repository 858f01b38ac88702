"""The one schema every verb module registers on."""

from __future__ import annotations

from virtyard.host.agent import HostAgent
from virtyard.host.rpc.schema import Schema

SCHEMA: Schema[HostAgent] = Schema()
