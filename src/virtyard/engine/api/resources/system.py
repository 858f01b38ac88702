"""``GET /ovirt-engine/api``: the entry point (product, summary, time, who is logged in)."""

from __future__ import annotations

from sqlalchemy import func, select

from virtyard import __version__
from virtyard.engine.api.routing import ROUTES, ApiRequest
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.system import API
from virtyard.engine.db.models import Host, StorageDomain, User, Vm, VmDynamic, utcnow

COLLECTIONS = ("clusters", "datacenters", "disks", "events", "hosts", "storagedomains",
               "vms")


@ROUTES.get("/", returns=API, tag="system")
def get_api(req: ApiRequest) -> Model:
    """The API's entry point."""
    with req.services.db.read() as tx:
        hosts_total = tx.scalar(select(func.count()).select_from(Host)) or 0
        hosts_up = tx.scalar(select(func.count()).where(Host.status == "up")) or 0
        vms_total = tx.scalar(select(func.count()).select_from(Vm)) or 0
        vms_up = tx.scalar(select(func.count()).where(VmDynamic.status == "up")) or 0
        sds = tx.scalar(select(func.count()).select_from(StorageDomain)) or 0
        sds_up = tx.scalar(select(func.count()).where(StorageDomain.status == "active")) or 0
        users = tx.scalar(select(func.count()).select_from(User)) or 0
    major, minor, *rest = [*__version__.split("."), "0", "0"][:3]
    user = {"id": req.principal.user_id, "name": req.principal.name} \
        if req.principal.user_id else None
    return {
        "product_info": {"name": "Virtyard", "vendor": "Virtyard", "instance_id": "",
                         "version": {"major": int(major), "minor": int(minor),
                                     "build": int(rest[0]) if rest and rest[0].isdigit() else 0,
                                     "revision": 0, "full_version": __version__}},
        "summary": {"hosts": {"active": hosts_up, "total": hosts_total},
                    "vms": {"active": vms_up, "total": vms_total},
                    "storage_domains": {"active": sds_up, "total": sds},
                    "users": {"active": users, "total": users}},
        "time": utcnow(),
        "authenticated_user": user,
        "effective_user": user,
    }
