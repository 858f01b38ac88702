"""``/hosts``: list, get, add, remove, activate, deactivate."""

from __future__ import annotations

from typing import Any

from virtyard.engine.api.faults import ApiError, incomplete
from virtyard.engine.api.routing import (
    ASYNC,
    GET_QUERY,
    LIST_QUERY,
    ROUTES,
    ApiRequest,
    QueryParam,
)
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.common import ACTION
from virtyard.engine.api.types.disks import HOST_STORAGE
from virtyard.engine.api.types.hosts import HOST
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import run
from virtyard.engine.commands.hosts import (
    DEFAULT_AGENT_PORT,
    ActivateHost,
    AddHost,
    DeactivateHost,
    RemoveHost,
)
from virtyard.engine.commands.storage import DEFAULT_PORT, DiscoverTargets, IscsiLogin, Portal
from virtyard.engine.db.models import Host
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostUnreachableError
from virtyard.engine.queries import hosts as queries
from virtyard.engine.queries import luns
from virtyard.engine.queries.common import get_or_404


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
    if (body.get("power_management") or {}).get("enabled"):  # agents come after the host
        raise ApiError.from_command(errors.CommandError(
            errors.HOST_NO_POWER_MANAGEMENT, "add", "Host", name=str(body["name"])[:255]))
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


REPORT_STATUS = QueryParam("report_status", "boolean",
                           "Probe each LUN for signatures (free/used); false answers fast.")


def _portal(req: ApiRequest, *, need_target: bool) -> Portal:
    iscsi = (req.body or {}).get("iscsi") or {}
    missing = [f for f in ("address", *(("target",) if need_target else ())) if not iscsi.get(f)]
    if missing:
        raise incomplete("Action", *(f"iscsi.{m}" for m in missing),
                         action="iscsi login" if need_target else "iscsi discover")
    return Portal(address=iscsi["address"], port=iscsi.get("port") or DEFAULT_PORT,
                  target=iscsi.get("target") or "", portal=iscsi.get("portal") or "1",
                  user=iscsi.get("username") or "", password=iscsi.get("password") or "")


@ROUTES.post("/hosts/{id}/iscsidiscover", body=ACTION, returns=ACTION)
def iscsi_discover(req: ApiRequest) -> Model:
    """SendTargets discovery from this host: the target names (``iscsi_targets``), and each
    target with its portal (``discovered_targets``)."""
    found = run(DiscoverTargets(req.path["id"], _portal(req, need_target=False)), req.ctx())
    return {"status": "complete", "iscsi_targets": sorted({t["target"] for t in found}),
            "discovered_targets": found}


@ROUTES.post("/hosts/{id}/discoveriscsi", body=ACTION, returns=ACTION)
def discover_iscsi(req: ApiRequest) -> Model:
    """SendTargets discovery (oVirt 4.4.6+ form): ``discovered_targets``."""
    result: dict[str, Any] = iscsi_discover(req)
    return result


@ROUTES.post("/hosts/{id}/iscsilogin", body=ACTION, returns=ACTION)
def iscsi_login(req: ApiRequest) -> Model:
    """Log this host in to a target (kept until the engine no longer needs it)."""
    run(IscsiLogin(req.path["id"], _portal(req, need_target=True)), req.ctx())
    return {"status": "complete"}


@ROUTES.get("/hosts/{id}/storage", returns=HOST_STORAGE, many=True, query=(REPORT_STATUS,))
def host_storage(req: ApiRequest) -> list[Model]:
    """Every LUN the host sees — used ones too, with why they are used."""
    report = req.flag("report_status", True)
    with req.services.db.read() as tx:
        host = get_or_404(tx, Host, req.path["id"], "Host")
        address = HostAddress(host.id, host.address, host.port)
        if host.status != "up":
            raise ApiError(409, "Operation Failed", f"[Cannot fetch storage devices, host "
                           f"{host.name} is not UP.]", errors.HOST_STATUS_ILLEGAL.key)
    try:
        devices = req.services.pool.call_sync(address, "Host.getDeviceList",
                                              {"checkStatus": report})
    except (HostCallError, HostUnreachableError) as exc:
        raise ApiError(409, "Operation Failed", f"[Cannot fetch storage devices: "
                       f"{str(exc)[:300]}]", "GET_DEVICE_LIST_FAILED") from exc
    with req.services.db.read() as tx:
        return luns.host_storage(tx, address.host_id, devices if isinstance(devices, list)
                                 else [], report_status=report)
