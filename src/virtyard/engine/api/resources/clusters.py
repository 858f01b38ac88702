"""``/clusters`` and ``/datacenters`` (read-only: the Default ones the database starts with)."""

from __future__ import annotations

from virtyard.engine.api.routing import GET_QUERY, LIST_QUERY, ROUTES, ApiRequest
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.hosts import CLUSTER, DATA_CENTER
from virtyard.engine.db.models import Cluster, DataCenter
from virtyard.engine.queries import hosts as queries
from virtyard.engine.queries.common import get_or_404


@ROUTES.get("/clusters", returns=CLUSTER, many=True, query=LIST_QUERY)
def list_clusters(req: ApiRequest) -> list[Model]:
    """The clusters."""
    with req.services.db.read() as tx:
        return queries.list_clusters(tx, req.text("search"),
                                     case_sensitive=req.flag("case_sensitive", True),
                                     limit=req.integer("max"))


@ROUTES.get("/clusters/{id}", returns=CLUSTER, query=GET_QUERY)
def get_cluster(req: ApiRequest) -> Model:
    """One cluster."""
    with req.services.db.read() as tx:
        return queries.cluster_model(get_or_404(tx, Cluster, req.path["id"], "Cluster"))


@ROUTES.get("/datacenters", returns=DATA_CENTER, many=True, query=LIST_QUERY)
def list_data_centers(req: ApiRequest) -> list[Model]:
    """The data centers."""
    with req.services.db.read() as tx:
        return queries.list_data_centers(tx, req.text("search"),
                                         case_sensitive=req.flag("case_sensitive", True),
                                         limit=req.integer("max"))


@ROUTES.get("/datacenters/{id}", returns=DATA_CENTER, query=GET_QUERY)
def get_data_center(req: ApiRequest) -> Model:
    """One data center."""
    with req.services.db.read() as tx:
        return queries.data_center_model(get_or_404(tx, DataCenter, req.path["id"],
                                                    "Data center"))
