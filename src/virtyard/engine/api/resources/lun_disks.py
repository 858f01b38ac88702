"""``POST /disks`` (a LUN as a disk) and ``DELETE /disks/{id}``."""

from __future__ import annotations

from typing import Any

from virtyard.engine.api.faults import bad_request, incomplete
from virtyard.engine.api.routing import ASYNC, ROUTES, ApiRequest
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.disks import DISK
from virtyard.engine.commands.base import run
from virtyard.engine.commands.image_disks import AddIsoDisk
from virtyard.engine.commands.lun_disks import AddLunDisk, RemoveDisk
from virtyard.engine.commands.storage import DEFAULT_PORT, Portal
from virtyard.engine.queries import disks as queries


def unit_portal(unit: dict[str, Any], storage: dict[str, Any]) -> Portal | None:
    """The target a ``<logical_unit>`` names (its own fields, else its ``<storage>``'s), or
    None when it names none (the engine may know the LUN's target already)."""
    address = unit.get("address") or storage.get("address")
    target = unit.get("target") or storage.get("target")
    if not (address or target):
        return None
    return Portal(
        address=address or "", port=unit.get("port") or storage.get("port") or DEFAULT_PORT,
        target=target or "", portal=str(unit.get("portal") or storage.get("portal") or "1"),
        user=unit.get("username") or storage.get("username") or "",
        password=unit.get("password") or storage.get("password") or "")


def lun_disk_command(body: dict[str, Any]) -> AddLunDisk:
    """The command for a ``<disk>`` with a ``<lun_storage>`` (here or inside an attachment)."""
    storage = body.get("lun_storage")
    if not storage:
        raise bad_request("Only LUN disks can be added here: give lun_storage (image disks "
                          "are uploaded to a storage domain)", "DISK_TYPE_UNSUPPORTED")
    if storage.get("type") not in (None, "iscsi"):
        raise bad_request(f"Storage type {storage.get('type')} is not supported: iscsi",
                          "STORAGE_TYPE_UNSUPPORTED")
    units = storage.get("logical_units") or []
    if len(units) != 1 or not units[0].get("id"):
        raise incomplete("Disk", "lun_storage.logical_units[0].id")
    unit = units[0]
    portal = unit_portal(unit, storage)
    portals = [portal] if portal is not None else []
    host = storage.get("host") or {}
    sgio = body.get("sgio")
    return AddLunDisk(wwid=unit["id"], portals=portals, alias=body.get("alias") or
                      body.get("name"), description=body.get("description") or "",
                      shareable=body.get("shareable"), sgio=sgio,
                      propagate_errors=bool(body.get("propagate_errors")),
                      host_id=host.get("id"), host_name=host.get("name"))


@ROUTES.post("/disks", body=DISK, returns=DISK, status=201, query=(ASYNC,))
def add_disk(req: ApiRequest) -> Model:
    """Add a SAN LUN (by WWID) as a disk (the same WWID again, with nothing that disagrees,
    answers with the existing disk), or an empty ISO disk on a storage domain
    (``content_type=iso``, ``provisioned_size``, ``storage_domains``) to upload into."""
    body = req.body or {}
    if not body.get("lun_storage") and body.get("content_type") == "iso":
        disk_id = run(iso_disk_command(body), req.ctx())
        with req.services.db.read() as tx:
            return queries.get_disk(tx, disk_id)
    added = run(lun_disk_command(body), req.ctx())
    with req.services.db.read() as tx:
        return queries.get_disk(tx, added.disk_id)


def iso_disk_command(body: dict[str, Any]) -> AddIsoDisk:
    """The command for an ISO ``<disk>``: a size and one storage domain (upload_disk.py's)."""
    if body.get("provisioned_size") is None:
        raise incomplete("Disk", "provisioned_size")
    domains = body.get("storage_domains") or ([body["storage_domain"]]
                                              if body.get("storage_domain") else [])
    if len(domains) != 1 or not (domains[0].get("id") or domains[0].get("name")):
        raise incomplete("Disk", "storage_domains.storage_domain[0].id|name")
    return AddIsoDisk(alias=body.get("alias") or body.get("name") or "",
                      provisioned_size=int(body["provisioned_size"]),
                      domain_id=str(domains[0].get("id") or ""),
                      domain_name=str(domains[0].get("name") or ""),
                      description=body.get("description") or "",
                      disk_format=body.get("format") or "raw",
                      wipe_after_delete=bool(body.get("wipe_after_delete")),
                      disk_id=str(body.get("id") or ""))


@ROUTES.delete("/disks/{id}", query=(ASYNC,))
def remove_disk(req: ApiRequest) -> None:
    """Remove a disk that no running VM has plugged (its attachments go with it)."""
    run(RemoveDisk(req.path["id"]), req.ctx())
