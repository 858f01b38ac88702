"""``/events``: the audit log, newest first; ``from=<id>`` lists what came after that id."""

from __future__ import annotations

from virtyard.engine.api.routing import LIST_QUERY, ROUTES, ApiRequest, QueryParam
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.hosts import EVENT
from virtyard.engine.queries import events as queries

FROM = QueryParam("from", "integer", "Only events with a greater id.")


@ROUTES.get("/events", returns=EVENT, many=True, query=(*LIST_QUERY, FROM))
def list_events(req: ApiRequest) -> list[Model]:
    """The audit log."""
    with req.services.db.read() as tx:
        return queries.list_events(tx, req.text("search"), since=req.integer("from"),
                                   case_sensitive=req.flag("case_sensitive", True),
                                   limit=req.integer("max"))


@ROUTES.get("/events/{id}", returns=EVENT)
def get_event(req: ApiRequest) -> Model:
    """One event."""
    with req.services.db.read() as tx:
        return queries.get_event(tx, req.path["id"])
