"""Hosts, clusters and data centers as the API shows them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from virtyard.engine.api.types.base import Model
from virtyard.engine.commands.hosts import VM_ACTIVE
from virtyard.engine.db.models import Cluster, DataCenter, Host, VmDynamic
from virtyard.engine.queries.common import get_or_404, searched

HOST_SEARCH = {"name": Host.name, "status": Host.status, "address": Host.address,
               "id": Host.id}
CLUSTER_SEARCH = {"name": Cluster.name, "id": Cluster.id}
DC_SEARCH = {"name": DataCenter.name, "id": DataCenter.id}


def _version(text: str) -> Model | None:
    parts = [int(p) if p.isdigit() else 0 for p in text.split(".")[:3]] if text else []
    if not parts:
        return None
    parts += [0] * (3 - len(parts))
    return {"major": parts[0], "minor": parts[1], "build": parts[2], "revision": 0,
            "full_version": text}


def host_model(host: Host, vm_counts: dict[str, int] | None = None) -> Model:
    model: Model = {
        "id": host.id, "name": host.name, "description": host.description,
        "comment": host.comment, "address": host.address, "port": host.port,
        "status": host.status, "cluster": {"id": host.cluster_id},
        "type": "rhel",
    }
    if host.status_detail:
        model["status_detail"] = host.status_detail
    if host.memory_bytes:
        model["memory"] = host.memory_bytes
    if host.cpu_cores:
        model["cpu"] = {"name": host.cpu_model,
                        "topology": {"cores": host.cpu_cores, "sockets": 1, "threads": 1}}
    if host.host_uuid:
        model["hardware_information"] = {"uuid": host.host_uuid}
    if host.iscsi_initiator_name:
        model["iscsi"] = {"initiator": host.iscsi_initiator_name}
    model["libvirt_version"] = _version(host.libvirt_version)
    model["version"] = _version(host.agent_version)
    model["power_management"] = {"enabled": bool(host.pm_enabled)}
    if vm_counts is not None:
        active = vm_counts.get(host.id, 0)
        model["summary"] = {"active": active, "migrating": 0, "total": active}
    return model


def _vm_counts(tx: Session, host_ids: list[str] | None = None) -> dict[str, int]:
    stmt = select(VmDynamic.run_on_host_id, func.count()).where(
        VmDynamic.status.in_(VM_ACTIVE), VmDynamic.run_on_host_id.is_not(None))
    if host_ids is not None:
        stmt = stmt.where(VmDynamic.run_on_host_id.in_(host_ids))
    return {str(row[0]): int(row[1]) for row in tx.execute(stmt.group_by(VmDynamic.run_on_host_id))}


def list_hosts(tx: Session, query: str = "", *, case_sensitive: bool = True,
               limit: int | None = None) -> list[Model]:
    stmt = searched(select(Host).order_by(Host.name), query, HOST_SEARCH,
                    case_sensitive=case_sensitive, limit=limit)
    hosts = list(tx.scalars(stmt))
    counts = _vm_counts(tx)
    return [host_model(h, counts) for h in hosts]


def get_host(tx: Session, host_id: str) -> Model:
    host = get_or_404(tx, Host, host_id, "Host")
    return host_model(host, _vm_counts(tx, [host.id]))


def cluster_model(cluster: Cluster) -> Model:
    return {"id": cluster.id, "name": cluster.name, "description": cluster.description,
            "data_center": {"id": cluster.data_center_id},
            "version": {"major": 4, "minor": 7}}


def data_center_model(dc: DataCenter) -> Model:
    return {"id": dc.id, "name": dc.name, "description": dc.description, "local": False,
            "status": "up", "storage_format": "v5", "version": {"major": 4, "minor": 7}}


def list_clusters(tx: Session, query: str = "", **kw: Any) -> list[Model]:
    stmt = searched(select(Cluster).order_by(Cluster.name), query, CLUSTER_SEARCH, **kw)
    return [cluster_model(c) for c in tx.scalars(stmt)]


def list_data_centers(tx: Session, query: str = "", **kw: Any) -> list[Model]:
    stmt = searched(select(DataCenter).order_by(DataCenter.name), query, DC_SEARCH, **kw)
    return [data_center_model(d) for d in tx.scalars(stmt)]
