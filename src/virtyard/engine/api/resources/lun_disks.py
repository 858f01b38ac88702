"""``POST /disks`` (a LUN as a disk) and ``DELETE /disks/{id}``."""

from __future__ import annotations

from typing import Any

from virtyard.engine.api.faults import bad_request, incomplete
from virtyard.engine.api.routing import ASYNC, ROUTES, ApiRequest
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.disks import DISK
from virtyard.engine.commands.base import run
from virtyard.engine.commands.lun_disks import AddLunDisk, RemoveDisk
from virtyard.engine.commands.storage import DEFAULT_PORT, Portal
from virtyard.engine.queries import disks as queries


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
    portals = []
    address = unit.get("address") or storage.get("address")
    target = unit.get("target") or storage.get("target")
    if address or target:
        portals.append(Portal(
            address=address or "", port=unit.get("port") or storage.get("port") or DEFAULT_PORT,
            target=target or "", portal=str(unit.get("portal") or storage.get("portal") or "1"),
            user=unit.get("username") or storage.get("username") or "",
            password=unit.get("password") or storage.get("password") or ""))
    host = storage.get("host") or {}
    sgio = body.get("sgio")
    return AddLunDisk(wwid=unit["id"], portals=portals, alias=body.get("alias") or
                      body.get("name"), description=body.get("description") or "",
                      shareable=body.get("shareable"), sgio=sgio,
                      propagate_errors=bool(body.get("propagate_errors")),
                      host_id=host.get("id"), host_name=host.get("name"))


@ROUTES.post("/disks", body=DISK, returns=DISK, status=201, query=(ASYNC,))
def add_disk(req: ApiRequest) -> Model:
    """Add a SAN LUN (by WWID) as a disk. The same WWID again, with nothing that disagrees,
    answers with the existing disk."""
    added = run(lun_disk_command(req.body or {}), req.ctx())
    with req.services.db.read() as tx:
        return queries.get_disk(tx, added.disk_id)


@ROUTES.delete("/disks/{id}", query=(ASYNC,))
def remove_disk(req: ApiRequest) -> None:
    """Remove a disk that no running VM has plugged (its attachments go with it)."""
    run(RemoveDisk(req.path["id"]), req.ctx())
