"""``/templates``: the Blank template, the one VMs are made from here."""

from __future__ import annotations

from virtyard.engine.api.routing import GET_QUERY, LIST_QUERY, ROUTES, ApiRequest
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.vms import TEMPLATE
from virtyard.engine.queries import vms as queries


@ROUTES.get("/templates", returns=TEMPLATE, many=True, query=LIST_QUERY)
def list_templates(req: ApiRequest) -> list[Model]:
    """The templates (Blank only)."""
    return queries.list_templates(req.text("search"),
                                  case_sensitive=req.flag("case_sensitive", True),
                                  limit=req.integer("max"))


@ROUTES.get("/templates/{id}", returns=TEMPLATE, query=GET_QUERY)
def get_template(req: ApiRequest) -> Model:
    """One template."""
    return queries.get_template(req.path["id"])
