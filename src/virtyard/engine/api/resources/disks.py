"""``/disks``: list (search by name/alias, disk_type, ...) and get."""

from __future__ import annotations

from virtyard.engine.api import follow
from virtyard.engine.api.routing import GET_QUERY, LIST_QUERY, ROUTES, ApiRequest
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.disks import DISK
from virtyard.engine.queries import disks as queries


@ROUTES.get("/disks", returns=DISK, many=True, query=LIST_QUERY)
def list_disks(req: ApiRequest) -> list[Model]:
    """The disks by alias (``search=name=…``, ``disk_type=lun``, ``max``)."""
    tree = follow.parse(DISK, req.text("follow"))
    with req.services.db.read() as tx:
        return queries.list_disks(tx, req.text("search"),
                                  case_sensitive=req.flag("case_sensitive", True),
                                  limit=req.integer("max"), tree=tree)


@ROUTES.get("/disks/{id}", returns=DISK, query=GET_QUERY)
def get_disk(req: ApiRequest) -> Model:
    """One disk."""
    tree = follow.parse(DISK, req.text("follow"))
    with req.services.db.read() as tx:
        return queries.get_disk(tx, req.path["id"], tree)
