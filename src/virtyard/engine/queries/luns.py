"""The LUNs a host sees (``GET hosts/{id}/storage``), joined with what the engine knows.

Every LUN is listed — used ones too, never hidden (the design page: grey them out) — with
*why* it is used: a disk of ours (its alias), a storage domain (its name), or what the host
found on it (an LVM PV, a filesystem, a partition table). The host's answer is one call
(``Host.getDeviceList``); the database's is one query for all LUNs, however many there are.
``report_status=false`` skips the host's signature probing and answers fast.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from virtyard.engine.api.types.base import Model
from virtyard.engine.db.models import BaseDisk, Lun, StorageDomain

HOST_REASONS = {"lvm-pv": "LVM PV", "partition-table": "partition table",
                "filesystem": "filesystem", "other-signature": "data signature",
                "storage-domain": "storage domain"}


def known_luns(tx: Session, wwids: list[str]) -> dict[str, tuple[Lun, str | None, str | None]]:
    """WWID → (LUN row, disk alias, storage domain name), in one query."""
    if not wwids:
        return {}
    rows = tx.execute(
        select(Lun, BaseDisk.alias, StorageDomain.name)
        .outerjoin(BaseDisk, BaseDisk.id == Lun.disk_id)
        .outerjoin(StorageDomain, StorageDomain.id == Lun.storage_domain_id)
        .where(Lun.lun_id.in_(wwids)))
    return {row[0].lun_id: (row[0], row[1], row[2]) for row in rows}


def _first_path(device: dict[str, Any]) -> dict[str, Any]:
    paths = device.get("pathlist")
    return paths[0] if isinstance(paths, list) and paths and isinstance(paths[0], dict) else {}


def lun_model(device: dict[str, Any], known: tuple[Lun, str | None, str | None] | None,
              *, report_status: bool) -> Model:
    """One ``logical_unit`` from the host's device dict and the database's row."""
    wwid = str(device.get("GUID", ""))
    path = _first_path(device)
    statuses = [p for p in device.get("pathstatus", []) if isinstance(p, dict)]
    active = sum(1 for p in statuses if p.get("state") == "active")
    unit: Model = {
        "id": wwid, "address": path.get("connection"), "port": path.get("port"),
        "target": path.get("iqn"), "portal": str(path.get("tpgt", "")) or None,
        "username": path.get("user") or None,
        "serial": device.get("serial") or None, "vendor_id": device.get("vendorID") or None,
        "product_id": device.get("productID") or None,
        "lun_mapping": statuses[0].get("lun") if statuses else None,
        "size": device.get("capacity"), "paths": len(statuses), "active_paths": active,
        "discard_max_size": device.get("discard_max_bytes") or 0,
        "discard_zeroes_data": False,
        "volume_group_id": device.get("vgUUID") or None,
    }
    status, reason = None, None
    host_status = device.get("status")
    if report_status and host_status == "used":
        status = "used"
        label = HOST_REASONS.get(str(device.get("usedReason")), "in use")
        detail = str(device.get("usedDetail") or "")
        reason = f"{label}: {detail}" if detail else label
    elif report_status and host_status == "free":
        status = "free"
    if known is not None:
        lun, alias, domain = known
        if lun.disk_id:
            status, reason = "used", f"disk {alias}"
            unit["disk_id"] = lun.disk_id
        elif lun.storage_domain_id:
            status, reason = "used", f"storage domain {domain}"
            unit["storage_domain_id"] = lun.storage_domain_id
    if device.get("storageDomainID") and "storage_domain_id" not in unit:
        unit["storage_domain_id"] = device["storageDomainID"]
    if statuses and not active:
        status, reason = "unusable", "no working path: " + "; ".join(
            str((p.get("error") or {}).get("message", "failed")) for p in statuses)[:500]
    unit["status"] = status
    unit["used_by"] = reason
    return unit


def host_storage(tx: Session, host_id: str, devices: list[Any], *,
                 report_status: bool) -> list[Model]:
    """One ``host_storage`` per LUN the host listed."""
    devs = [d for d in devices if isinstance(d, dict) and d.get("GUID")]
    known = known_luns(tx, [str(d["GUID"]) for d in devs])
    out: list[Model] = []
    for device in sorted(devs, key=lambda d: str(d["GUID"])):
        unit = lun_model(device, known.get(str(device["GUID"])), report_status=report_status)
        out.append({"id": unit["id"], "type": "iscsi", "address": unit["address"],
                    "port": unit["port"], "target": unit["target"], "portal": unit["portal"],
                    "logical_units": [unit], "host": {"id": host_id},
                    "href": f"/ovirt-engine/api/hosts/{host_id}/storage/{unit['id']}"})
    return out
