"""Image transfers and storage-domain files as the API shows them.

A transfer's URLs carry its ticket, the credential of its data: rendered only to
administrators (who may write), and only while the transfer is going on.
"""

from __future__ import annotations

import socket
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from virtyard.engine.api.faults import not_found
from virtyard.engine.api.types.base import Model
from virtyard.engine.db.models import BaseDisk, ImageTransfer, StorageDomain
from virtyard.engine.transfers.service import ACTIVE, transfer_service

IMAGES_PATH = "/ovirt-engine/images/"


def public_url(services: Any) -> str:
    """``https://host:port`` of the engine as clients reach it."""
    configured = services.config.transfers.public_url
    if configured:
        return str(configured).rstrip("/")
    server = services.config.server
    address = server.address
    if address in ("0.0.0.0", "::", ""):
        address = socket.getfqdn()
    host = f"[{address}]" if ":" in address else address
    return f"https://{host}:{server.port}"


def transfer_model(services: Any, row: ImageTransfer, *, with_url: bool) -> Model:
    active = row.phase in ACTIVE
    transferred = row.transferred
    if services is not None and active:
        live = transfer_service(services).transferred(row.id)
        transferred = live if live is not None else transferred
    model: Model = {"id": row.id, "disk": {"id": row.disk_id}, "direction": row.direction,
                    "phase": row.phase, "transferred": transferred, "active": active,
                    "inactivity_timeout": row.inactivity_timeout, "format": "raw",
                    "timeout_policy": "cancel", "shallow": False}
    if row.host_id:
        model["host"] = {"id": row.host_id}
    if row.message:
        model["description"] = row.message
    if with_url and active and services is not None:
        url = public_url(services) + IMAGES_PATH + row.ticket
        model.update(transfer_url=url, proxy_url=url)
    return model


def get_transfer(tx: Session, services: Any, transfer_id: str, *, with_url: bool) -> Model:
    row = tx.get(ImageTransfer, transfer_id)
    if row is None:
        raise not_found("Image transfer", transfer_id[:64])
    return transfer_model(services, row, with_url=with_url)


def list_transfers(tx: Session, services: Any, *, with_url: bool) -> list[Model]:
    rows = tx.scalars(select(ImageTransfer).order_by(ImageTransfer.created_at, ImageTransfer.id))
    return [transfer_model(services, row, with_url=with_url) for row in rows]


def file_model(disk: BaseDisk) -> Model:
    """An ISO disk as a file of its domain (oVirt's iso_disks_as_repo_images: id = disk id)."""
    return {"id": disk.id, "name": disk.alias, "type": "iso",
            "storage_domain": {"id": disk.storage_domain_id}}


def _domain_or_404(tx: Session, domain_id: str) -> None:
    if tx.get(StorageDomain, domain_id) is None:
        raise not_found("Storage domain", domain_id[:64])


def _iso_disks(domain_id: str) -> Any:
    return select(BaseDisk).where(BaseDisk.storage_domain_id == domain_id,
                                  BaseDisk.storage_type == "image",
                                  BaseDisk.content_type == "iso")


def list_files(tx: Session, domain_id: str) -> list[Model]:
    """The domain's ISO disks that are ``ok``, by name (as oVirt lists a data domain's ISO
    disks; one never uploaded to has ``content_size`` 0 and cannot be loaded)."""
    _domain_or_404(tx, domain_id)
    disks = tx.scalars(_iso_disks(domain_id).where(BaseDisk.status == "ok")
                       .order_by(BaseDisk.alias, BaseDisk.id))
    return [file_model(disk) for disk in disks]


def get_file(tx: Session, domain_id: str, file_id: str) -> Model:
    _domain_or_404(tx, domain_id)
    disk = tx.scalars(_iso_disks(domain_id).where(BaseDisk.id == file_id)).first()
    if disk is None:
        raise not_found("File", file_id[:64])
    return file_model(disk)
