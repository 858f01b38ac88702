"""Power management of hosts: ``hosts/{id}/fenceagents``, ``PUT hosts/{id}``
(``power_management.enabled``) and ``POST hosts/{id}/fence``."""

from __future__ import annotations

from typing import Any

from virtyard.engine.api.routing import ASYNC, ROUTES, ApiRequest
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.common import ACTION
from virtyard.engine.api.types.hosts import HOST
from virtyard.engine.api.types.power import AGENT
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import run
from virtyard.engine.commands.errors import CommandError
from virtyard.engine.commands.power import (
    FENCE_TYPES,
    AddFenceAgent,
    AgentFields,
    ConfirmHostOff,
    PowerHost,
    RemoveFenceAgent,
    SetPowerManagement,
    UpdateFenceAgent,
)
from virtyard.engine.queries import fence_agents as queries
from virtyard.engine.queries import hosts as host_queries


def _fields(body: Model) -> AgentFields:
    options: dict[str, str] | None = None
    if body.get("options") is not None:
        options = {str(o.get("name") or ""): str(o.get("value") or "")
                   for o in body["options"] if isinstance(o, dict)}
    values: dict[str, Any] = {
        "type": body.get("type"), "address": body.get("address"), "port": body.get("port"),
        "user_name": body.get("username"), "password": body.get("password"),
        "options": options, "order": body.get("order")}
    return AgentFields(**values)


@ROUTES.get("/hosts/{id}/fenceagents", returns=AGENT, many=True)
def list_agents(req: ApiRequest) -> list[Model]:
    """The host's fence agents, in order (passwords are never shown)."""
    with req.services.db.read() as tx:
        return queries.list_agents(tx, req.path["id"])


@ROUTES.get("/hosts/{id}/fenceagents/{agent_id}", returns=AGENT)
def get_agent(req: ApiRequest) -> Model:
    """One fence agent."""
    with req.services.db.read() as tx:
        return queries.get_agent(tx, req.path["id"], req.path["agent_id"])


@ROUTES.post("/hosts/{id}/fenceagents", body=AGENT, returns=AGENT, status=201)
def add_agent(req: ApiRequest) -> Model:
    """Add a fence agent: type (redfish, ipmilan, or a fence-agents program), address, port,
    username, password, options."""
    agent = run(AddFenceAgent(req.path["id"], _fields(req.body or {})), req.ctx())
    with req.services.db.read() as tx:
        return queries.get_agent(tx, req.path["id"], agent.id)


@ROUTES.put("/hosts/{id}/fenceagents/{agent_id}", body=AGENT, returns=AGENT)
def update_agent(req: ApiRequest) -> Model:
    """Change a fence agent (only what the body names)."""
    run(UpdateFenceAgent(req.path["id"], req.path["agent_id"], _fields(req.body or {})),
        req.ctx())
    with req.services.db.read() as tx:
        return queries.get_agent(tx, req.path["id"], req.path["agent_id"])


@ROUTES.delete("/hosts/{id}/fenceagents/{agent_id}")
def remove_agent(req: ApiRequest) -> None:
    """Remove a fence agent (not the last one while power management is enabled)."""
    run(RemoveFenceAgent(req.path["id"], req.path["agent_id"]), req.ctx())


@ROUTES.put("/hosts/{id}", body=HOST, returns=HOST, query=(ASYNC,))
def update_host(req: ApiRequest) -> Model:
    """Update a host: ``power_management.enabled`` (needs a fence agent)."""
    pm = (req.body or {}).get("power_management") or {}
    if pm.get("enabled") is not None:
        run(SetPowerManagement(req.path["id"], bool(pm["enabled"])), req.ctx())
    with req.services.db.read() as tx:
        return host_queries.get_host(tx, req.path["id"])


@ROUTES.post("/hosts/{id}/fence", body=ACTION, returns=ACTION)
def fence_host(req: ApiRequest) -> Model:
    """``fence_type``: manual (an administrator confirms the host is off: its VMs go down and
    HA VMs restart elsewhere), stop / start / restart (through its fence agents), status."""
    fence_type = str((req.body or {}).get("fence_type") or "").lower()
    if fence_type not in FENCE_TYPES:
        raise CommandError(errors.FENCE_TYPE_INVALID, "fence", "Host",
                           fence_type=fence_type[:32] or "(none)")
    if fence_type == "manual":
        run(ConfirmHostOff(req.path["id"]), req.ctx())
        return {"status": "complete"}
    result = run(PowerHost(req.path["id"], fence_type), req.ctx())
    return {"status": "complete", "power_management": {"status": result.state}}
