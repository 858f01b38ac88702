"""Storage domains as the API shows them: the domain, its LUN and the target reaching it."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from virtyard.engine.api.faults import not_found
from virtyard.engine.api.types.base import Model
from virtyard.engine.db.models import Lun, LunConnection, StorageDomain, StorageServerConnection
from virtyard.engine.queries.common import get_or_404, searched

SEARCH = {"name": StorageDomain.name, "id": StorageDomain.id, "status": StorageDomain.status,
          "type": StorageDomain.domain_type}


def _units(tx: Session, domain_ids: list[str]) -> dict[str, list[Model]]:
    """Each domain's logical units with the first connection that reaches them (never the
    CHAP password)."""
    out: dict[str, list[Model]] = {}
    if not domain_ids:
        return out
    rows = tx.execute(
        select(Lun, StorageServerConnection)
        .outerjoin(LunConnection, LunConnection.lun_id == Lun.lun_id)
        .outerjoin(StorageServerConnection,
                   StorageServerConnection.id == LunConnection.connection_id)
        .where(Lun.storage_domain_id.in_(domain_ids)).order_by(Lun.lun_id))
    seen: set[str] = set()
    for lun, conn in rows:
        if lun.lun_id in seen:
            continue
        seen.add(lun.lun_id)
        unit: Model = {"id": lun.lun_id, "storage_domain_id": lun.storage_domain_id,
                       "volume_group_id": lun.volume_group_id, "status": "used"}
        if lun.device_size:
            unit["size"] = lun.device_size
        if conn is not None:
            unit.update(address=conn.connection, port=conn.port, target=conn.iqn,
                        portal=conn.portal)
            if conn.user_name:
                unit["username"] = conn.user_name
        out.setdefault(str(lun.storage_domain_id), []).append(unit)
    return out


def domain_model(domain: StorageDomain, units: list[Model]) -> Model:
    model: Model = {
        "id": domain.id, "name": domain.name, "description": domain.description,
        "comment": "", "type": domain.domain_type, "status": domain.status,
        "master": False, "storage_format": "v5",
        "storage": {"type": domain.storage_type,
                    "volume_group": {"id": domain.storage, "logical_units": units}},
    }
    if domain.data_center_id:
        model["data_center"] = {"id": domain.data_center_id}
        model["data_centers"] = [{"id": domain.data_center_id}]
    return model


def list_domains(tx: Session, query: str = "", *, case_sensitive: bool = True,
                 limit: int | None = None, data_center_id: str | None = None) -> list[Model]:
    stmt = select(StorageDomain).order_by(StorageDomain.name)
    if data_center_id is not None:
        stmt = stmt.where(StorageDomain.data_center_id == data_center_id)
    domains = list(tx.scalars(searched(stmt, query, SEARCH, case_sensitive=case_sensitive,
                                       limit=limit)))
    units = _units(tx, [d.id for d in domains])
    return [domain_model(d, units.get(d.id, [])) for d in domains]


def get_domain(tx: Session, domain_id: str, *, data_center_id: str | None = None) -> Model:
    domain = get_or_404(tx, StorageDomain, domain_id, "Storage domain")
    if data_center_id is not None and domain.data_center_id != data_center_id:
        raise not_found("Storage domain", domain_id[:64])
    return domain_model(domain, _units(tx, [domain.id]).get(domain.id, []))
