"""Power management of hosts: fence agents (``hosts/{id}/fenceagents``), a host's
``power_management``, and the power state a ``fence`` action answers with."""

from __future__ import annotations

from virtyard.engine.api.types.base import (
    BOOLEAN,
    INTEGER,
    STRING,
    Enum,
    Field,
    ListOf,
    identified,
    struct,
)
from virtyard.engine.api.types.common import ACTION
from virtyard.engine.api.types.hosts import HOST

UNUSED = "Accepted for compatibility, not used."

OPTION = struct("option", "A fence agent option (name=value).", [
    Field("name", STRING), Field("type", STRING, UNUSED), Field("value", STRING)])

AGENT = identified("agent", "A fence agent: how the engine powers a host off and on. Types: "
                   "redfish (sushy), ipmilan (pyghmi), any other runs the fence-agents "
                   "program fence_<type> on the engine's machine.", [
    Field("address", STRING, "The BMC's address."),
    Field("port", INTEGER, "The BMC's port (type default if absent)."),
    Field("type", STRING, "redfish, ipmilan, or a fence-agents program's suffix."),
    Field("username", STRING, "The BMC user."),
    Field("password", STRING, "The BMC password. Write-only: accepted, never rendered."),
    Field("order", INTEGER, "Agents are tried in this order (1 first)."),
    Field("options", ListOf(OPTION, "option"),
          "Driver options (redfish: ssl, ssl_insecure, plug; programs: anything)."),
    Field("encrypt_options", BOOLEAN, UNUSED),
    Field("concurrent", BOOLEAN, UNUSED),
    Field("host", HOST, "The host it powers.", read_only=True),
])

POWER_MANAGEMENT = struct("power_management", "Fencing: the engine may power the host off "
                          "through its fence agents (then restart its HA VMs elsewhere).", [
    Field("enabled", BOOLEAN, "Power management is on (needs at least one agent)."),
    Field("status", Enum("power_management_status", ("off", "on", "unknown")),
          "The host's power state (fence status answers).", read_only=True),
    Field("automatic_pm_enabled", BOOLEAN, UNUSED),
    Field("kdump_detection", BOOLEAN, UNUSED),
    Field("agents", ListOf(AGENT, "agent"), "Use hosts/{id}/fenceagents.", read_only=True),
    Field("address", STRING, UNUSED), Field("username", STRING, UNUSED),
    Field("password", STRING, UNUSED), Field("port", INTEGER, UNUSED),
    Field("type", STRING, UNUSED),
    Field("options", ListOf(OPTION, "option"), UNUSED),
])

HOST.add(Field("power_management", POWER_MANAGEMENT))
ACTION.add(Field("power_management", POWER_MANAGEMENT, "fence status: the power state.",
                 read_only=True))
