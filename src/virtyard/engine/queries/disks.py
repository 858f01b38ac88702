"""Disks as the API shows them: a LUN disk with its LUN and the first connection that reaches
it (never the CHAP password), an image disk with its storage domain.

A list costs two statements (disks joined with their LUN; the LUNs' connections), whatever
its length; so does filling ``disk`` into any number of attachments (``follow``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from virtyard.engine.api import follow
from virtyard.engine.api.faults import not_found
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.disks import DISK
from virtyard.engine.db.models import (
    BaseDisk,
    DiskVmElement,
    Lun,
    LunConnection,
    StorageServerConnection,
)
from virtyard.engine.queries.batch import AnyRow, AnySelect, gc_paused, ids_in
from virtyard.engine.queries.common import searched
from virtyard.engine.queries.vms import vm_models

DISK_SEARCH: dict[str, Any] = {
    "name": BaseDisk.alias, "alias": BaseDisk.alias, "id": BaseDisk.id,
    "description": BaseDisk.description, "disk_type": BaseDisk.storage_type,
    "storage_type": BaseDisk.storage_type, "content_type": BaseDisk.content_type,
    "status": BaseDisk.status, "lun_id": Lun.lun_id,
    "storage_domain.id": BaseDisk.storage_domain_id,
}

_COLUMNS = (BaseDisk.id, BaseDisk.alias, BaseDisk.description, BaseDisk.shareable,
            BaseDisk.sgio, BaseDisk.storage_type, BaseDisk.content_type,
            BaseDisk.wipe_after_delete, BaseDisk.propagate_errors, BaseDisk.storage_domain_id,
            BaseDisk.image_id, BaseDisk.provisioned_size, BaseDisk.status, Lun.lun_id,
            Lun.storage_domain_id.label("lun_storage_domain_id"), Lun.volume_group_id,
            Lun.serial, Lun.vendor_id, Lun.product_id, Lun.lun_mapping, Lun.device_size,
            Lun.discard_max_size)
_LUN_ID = next(i for i, c in enumerate(_COLUMNS) if c is Lun.lun_id)


def _disk_select() -> AnySelect:
    return select(*_COLUMNS).outerjoin(Lun, Lun.disk_id == BaseDisk.id)


_SSC = StorageServerConnection
_CONNECTIONS = (select(LunConnection.lun_id, _SSC.storage_type, _SSC.connection, _SSC.port,
                       _SSC.iqn, _SSC.portal, _SSC.user_name)
                .join(_SSC, _SSC.id == LunConnection.connection_id)
                .order_by(_SSC.connection, _SSC.port, _SSC.iqn, _SSC.portal, _SSC.id))
# Single objects run prebuilt statements: building a SELECT costs more than running it here.
_CONNECTIONS_OF_LUN = _CONNECTIONS.where(LunConnection.lun_id == bindparam("lun_id"))
_DISK_BY_ID = _disk_select().where(BaseDisk.id == bindparam("disk_id"))


def _connections(tx: Session, lun_ids: list[str]) -> dict[str, AnyRow]:
    """The first connection of each LUN (by address, port, IQN, portal), in one statement."""
    if not lun_ids:
        return {}
    if len(lun_ids) == 1:
        rows = tx.execute(_CONNECTIONS_OF_LUN, {"lun_id": lun_ids[0]})
    else:
        rows = tx.execute(_CONNECTIONS.where(ids_in(tx, LunConnection.lun_id, lun_ids)))
    first: dict[str, AnyRow] = {}
    for row in rows:
        first.setdefault(row[0], row)
    return first


def disk_model(row: AnyRow, conn: AnyRow | None) -> Model:
    """One disk (a row of ``_COLUMNS``; unpacked by position, which is ten times cheaper than
    by name). LUN disks, as oVirt's, have no size, format or storage domain of their own: the
    LUN's size is ``lun_storage.logical_units[0].size``; the CHAP password is never read."""
    (disk_id, alias, description, shareable, sgio, storage_type, content_type, wipe,
     propagate, storage_domain_id, image_id, provisioned_size, status, lun_id,
     lun_storage_domain_id, volume_group_id, serial, vendor_id, product_id, lun_mapping,
     device_size, discard_max_size) = row
    model: Model = {
        "id": disk_id, "name": alias, "alias": alias, "description": description,
        "shareable": shareable, "storage_type": storage_type, "content_type": content_type,
        "status": status, "wipe_after_delete": wipe, "propagate_errors": propagate,
    }
    if storage_type == "lun":
        if sgio:
            model["sgio"] = sgio
        if lun_id is None:
            return model
        # As oVirt's StorageLogicalUnitMapper.
        unit: Model = {"id": lun_id, "status": "used", "discard_zeroes_data": False,
                       "discard_max_size": discard_max_size, "lun_mapping": lun_mapping,
                       "disk_id": disk_id}
        for name, value in (("serial", serial), ("vendor_id", vendor_id),
                            ("product_id", product_id), ("volume_group_id", volume_group_id),
                            ("size", device_size),
                            ("storage_domain_id", lun_storage_domain_id)):
            if value:
                unit[name] = value
        kind = "fcp"
        if conn is not None:
            _, kind, address, port, target, portal, username = conn
            unit.update(address=address, port=port, target=target, portal=portal)
            if username:
                unit["username"] = username
        model["lun_storage"] = {"id": lun_id, "type": kind, "logical_units": [unit]}
        return model
    model.update(provisioned_size=provisioned_size, format="raw", sparse=False)
    if image_id:
        model["image_id"] = image_id
    if storage_domain_id:
        model["storage_domain"] = {"id": storage_domain_id}
        model["storage_domains"] = [{"id": storage_domain_id}]
    return model


def _disk_models(tx: Session, rows: list[AnyRow]) -> list[Model]:
    conns = _connections(tx, [r[_LUN_ID] for r in rows if r[_LUN_ID] is not None])
    return [disk_model(r, conns.get(r[_LUN_ID])) for r in rows]


def list_disks(tx: Session, query: str = "", *, case_sensitive: bool = True,
               limit: int | None = None, tree: follow.Tree | None = None) -> list[Model]:
    """The disks by alias (``search=name=…``, ``disk_type=lun``, ``max``)."""
    stmt = searched(_disk_select().order_by(BaseDisk.alias, BaseDisk.id), query, DISK_SEARCH,
                    case_sensitive=case_sensitive, limit=limit)
    with gc_paused():
        models = _disk_models(tx, list(tx.execute(stmt)))
        follow.apply(tx, DISK, models, tree or {})
    return models


def disk_models(tx: Session, disk_ids: Iterable[str]) -> dict[str, Model]:
    """Disk models by id (the ones that exist), in two statements."""
    ids = list(dict.fromkeys(disk_ids))
    if not ids:
        return {}
    rows = list(tx.execute(_disk_select().where(ids_in(tx, BaseDisk.id, ids))))
    return {m["id"]: m for m in _disk_models(tx, rows)}


def get_disk(tx: Session, disk_id: str, tree: follow.Tree | None = None) -> Model:
    rows = list(tx.execute(_DISK_BY_ID, {"disk_id": disk_id}))
    if not rows:
        raise not_found("Disk", disk_id[:64])
    model = _disk_models(tx, rows)[0]
    follow.apply(tx, DISK, [model], tree or {})
    return model


@follow.filler("disk_attachment", "disk")
def _fill_disk(tx: Session, models: list[Model]) -> None:
    disks = disk_models(tx, [m["disk"]["id"] for m in models if m.get("disk")])
    for m in models:
        if m.get("disk") and m["disk"]["id"] in disks:
            m["disk"] = disks[m["disk"]["id"]]


@follow.filler("disk", "vms")
def _fill_vms(tx: Session, models: list[Model]) -> None:
    pairs = list(tx.execute(select(DiskVmElement.disk_id, DiskVmElement.vm_id)
                            .where(ids_in(tx, DiskVmElement.disk_id,
                                          [m["id"] for m in models]))))
    vms = vm_models(tx, [vm_id for _, vm_id in pairs])
    by_disk: dict[str, list[Model]] = {}
    for disk_id, vm_id in pairs:
        if vm_id in vms:
            by_disk.setdefault(disk_id, []).append(vms[vm_id])
    for m in models:
        m["vms"] = by_disk.get(m["id"], [])
