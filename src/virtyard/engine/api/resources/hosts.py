"""``/hosts``: list, get, add, remove, activate, deactivate."""

from __future__ import annotations

from virtyard.engine.api.faults import incomplete
from virtyard.engine.api.routing import ASYNC, GET_QUERY, LIST_QUERY, ROUTES, ApiRequest
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.common import ACTION
from virtyard.engine.api.types.hosts import HOST
from virtyard.engine.commands.base import run
from virtyard.engine.commands.hosts import (
    DEFAULT_AGENT_PORT,
    ActivateHost,
    AddHost,
    DeactivateHost,
    RemoveHost,
)
from virtyard.engine.queries import hosts as queries


@ROUTES.get("/hosts", returns=HOST, many=True, query=LIST_QUERY)
def list_hosts(req: ApiRequest) -> list[Model]:
    """The hosts, by name (``search=name=…``, ``max``)."""
    with req.services.db.read() as tx:
        return queries.list_hosts(tx, req.text("search"),
                                  case_sensitive=req.flag("case_sensitive", True),
                                  limit=req.integer("max"))


@ROUTES.get("/hosts/{id}", returns=HOST, query=GET_QUERY)
def get_host(req: ApiRequest) -> Model:
    """One host."""
    with req.services.db.read() as tx:
        return queries.get_host(tx, req.path["id"])


@ROUTES.post("/hosts", body=HOST, returns=HOST, status=201,
             query=(ASYNC,))
def add_host(req: ApiRequest) -> Model:
    """Add a host by its agent's address and port; it becomes ``up`` once the agent answers."""
    body = req.body or {}
    missing = [f for f in ("name", "address") if not body.get(f)]
    if missing:
        raise incomplete("Host", *missing)
    cluster = body.get("cluster") or {}
    host = run(AddHost(name=body["name"], address=body["address"],
                       port=body.get("port") or DEFAULT_AGENT_PORT,
                       cluster_id=cluster.get("id"), cluster_name=cluster.get("name"),
                       description=body.get("description") or "",
                       comment=body.get("comment") or ""), req.ctx())
    with req.services.db.read() as tx:
        return queries.get_host(tx, host.id)


@ROUTES.delete("/hosts/{id}", query=(ASYNC,))
def remove_host(req: ApiRequest) -> None:
    """Remove a host (it must be in maintenance)."""
    run(RemoveHost(req.path["id"]), req.ctx())


@ROUTES.post("/hosts/{id}/deactivate", body=ACTION, returns=ACTION)
def deactivate_host(req: ApiRequest) -> Model:
    """Move a host to maintenance."""
    run(DeactivateHost(req.path["id"]), req.ctx())
    return {"status": "complete"}


@ROUTES.post("/hosts/{id}/activate", body=ACTION, returns=ACTION)
def activate_host(req: ApiRequest) -> Model:
    """Activate a host in maintenance."""
    run(ActivateHost(req.path["id"]), req.ctx())
    return {"status": "complete"}
