"""``/storagedomains/{id}/files``: the domain's ISO disks as files (file id = disk id), the
ISOs a VM's CD-ROM can hold (oVirt's ISO disks of data domains)."""

from __future__ import annotations

from virtyard.engine.api.routing import GET_QUERY, ROUTES, ApiRequest
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.disks import FILE
from virtyard.engine.queries import transfers as queries


@ROUTES.get("/storagedomains/{id}/files", returns=FILE, many=True, tag="storagedomains")
def list_files(req: ApiRequest) -> list[Model]:
    """The domain's ISO disks (those that are ok), by name."""
    with req.services.db.read() as tx:
        return queries.list_files(tx, req.path["id"])


@ROUTES.get("/storagedomains/{id}/files/{file_id}", returns=FILE, query=GET_QUERY,
            tag="storagedomains")
def get_file(req: ApiRequest) -> Model:
    """One ISO file of the domain."""
    with req.services.db.read() as tx:
        return queries.get_file(tx, req.path["id"], req.path["file_id"])
