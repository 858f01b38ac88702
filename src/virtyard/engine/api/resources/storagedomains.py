"""``/storagedomains`` and a data center's ``/datacenters/{id}/storagedomains``: block domains
added on a LUN, attached, put in maintenance, activated, detached, removed."""

from __future__ import annotations

from typing import Any

from virtyard.engine.api.faults import bad_request, incomplete
from virtyard.engine.api.resources.lun_disks import unit_portal
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
from virtyard.engine.api.types.vms import STORAGE_DOMAIN
from virtyard.engine.commands.base import run
from virtyard.engine.commands.storage_domains import (
    AddStorageDomain,
    AttachStorageDomain,
    RemoveStorageDomain,
    SetDomainState,
)
from virtyard.engine.queries import storage_domains as queries

HOST = QueryParam("host", "string", "The host (name or id) that formats the domain.")
FORMAT = QueryParam("format", "boolean", "Also remove the volume group (the LUN is free).")
DESTROY = QueryParam("destroy", "boolean", "Only forget the domain (nothing on storage).")


def add_command(body: dict[str, Any]) -> AddStorageDomain:
    """The command for a ``<storage_domain>`` as the SDK's iSCSI example sends it."""
    storage = body.get("storage") or {}
    if not body.get("name"):
        raise incomplete("StorageDomain", "name")
    if not storage:
        raise incomplete("StorageDomain", "storage")
    units = (storage.get("volume_group") or {}).get("logical_units") \
        or storage.get("logical_units") or []
    if not units or not all(u.get("id") for u in units):
        raise incomplete("StorageDomain", "storage.volume_group.logical_units[].id")
    portals = [p for p in (unit_portal(u, storage) for u in units) if p is not None]
    host = body.get("host") or {}
    return AddStorageDomain(
        name=body["name"], wwids=[u["id"] for u in units], portals=portals,
        host_ref=host.get("id") or host.get("name"), description=body.get("description") or "",
        domain_type=body.get("type") or "data", storage_type=storage.get("type") or "iscsi")


@ROUTES.get("/storagedomains", returns=STORAGE_DOMAIN, many=True, query=LIST_QUERY)
def list_domains(req: ApiRequest) -> list[Model]:
    """The storage domains."""
    with req.services.db.read() as tx:
        return queries.list_domains(tx, req.text("search"),
                                    case_sensitive=req.flag("case_sensitive", True),
                                    limit=req.integer("max"))


@ROUTES.post("/storagedomains", body=STORAGE_DOMAIN, returns=STORAGE_DOMAIN, status=201,
             query=(ASYNC,))
def add_domain(req: ApiRequest) -> Model:
    """Make a block storage domain on a free LUN through a host; it is ``unattached``."""
    domain_id = run(add_command(req.body or {}), req.ctx())
    with req.services.db.read() as tx:
        return queries.get_domain(tx, domain_id)


@ROUTES.get("/storagedomains/{id}", returns=STORAGE_DOMAIN, query=GET_QUERY)
def get_domain(req: ApiRequest) -> Model:
    """One storage domain."""
    with req.services.db.read() as tx:
        return queries.get_domain(tx, req.path["id"])


@ROUTES.delete("/storagedomains/{id}", query=(HOST, FORMAT, DESTROY, ASYNC))
def remove_domain(req: ApiRequest) -> None:
    """Remove an unattached (or maintenance) domain: ``format`` also wipes its volume group
    through a host; ``destroy`` (or neither) only forgets it."""
    fmt = req.flag("format")
    if fmt and req.flag("destroy"):
        raise bad_request("format and destroy exclude each other", "BAD_REQUEST")
    run(RemoveStorageDomain(req.path["id"], format=fmt, host_ref=req.text("host") or None),
        req.ctx())


@ROUTES.get("/datacenters/{id}/storagedomains", returns=STORAGE_DOMAIN, many=True,
            query=LIST_QUERY)
def list_attached(req: ApiRequest) -> list[Model]:
    """The domains attached to a data center."""
    with req.services.db.read() as tx:
        return queries.list_domains(tx, req.text("search"),
                                    case_sensitive=req.flag("case_sensitive", True),
                                    limit=req.integer("max"), data_center_id=req.path["id"])


@ROUTES.post("/datacenters/{id}/storagedomains", body=STORAGE_DOMAIN, returns=STORAGE_DOMAIN,
             status=201, query=(ASYNC,))
def attach_domain(req: ApiRequest) -> Model:
    """Attach an unattached domain (by id or name): it becomes ``active`` and every Up host
    of the data center connects to it."""
    body = req.body or {}
    ref = body.get("id") or body.get("name")
    if not ref:
        raise incomplete("StorageDomain", "id|name", action="attach")
    domain = run(AttachStorageDomain(req.path["id"], str(ref)), req.ctx())
    with req.services.db.read() as tx:
        return queries.get_domain(tx, domain.id, data_center_id=req.path["id"])


@ROUTES.get("/datacenters/{id}/storagedomains/{domain_id}", returns=STORAGE_DOMAIN,
            query=GET_QUERY)
def get_attached(req: ApiRequest) -> Model:
    """One attached domain, with its status in the data center."""
    with req.services.db.read() as tx:
        return queries.get_domain(tx, req.path["domain_id"], data_center_id=req.path["id"])


def _move(req: ApiRequest, move: str) -> Model:
    run(SetDomainState(req.path["id"], req.path["domain_id"], move), req.ctx())
    return {"status": "complete"}


@ROUTES.post("/datacenters/{id}/storagedomains/{domain_id}/activate", body=ACTION,
             returns=ACTION)
def activate_domain(req: ApiRequest) -> Model:
    """A domain in maintenance becomes active again (its hosts reconnect)."""
    return _move(req, "activate")


@ROUTES.post("/datacenters/{id}/storagedomains/{domain_id}/deactivate", body=ACTION,
             returns=ACTION)
def deactivate_domain(req: ApiRequest) -> Model:
    """Maintenance: refused while a VM's CD is one of its ISOs; its hosts disconnect."""
    return _move(req, "deactivate")


@ROUTES.delete("/datacenters/{id}/storagedomains/{domain_id}", query=(ASYNC,))
def detach_domain(req: ApiRequest) -> None:
    """Detach a domain in maintenance from the data center (it becomes unattached)."""
    _move(req, "detach")
