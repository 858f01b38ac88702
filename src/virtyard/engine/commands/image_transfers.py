"""``POST imagetransfers`` (start an upload into an ISO disk), ``finalize`` and ``cancel``.

Only the database changes here, in one transaction each; the bytes, the verification and the
cleanup are the transfer service's (``engine/transfers/service.py``), started after the commit.
Starting locks the disk (``locked``, and ``image_transfers.active_disk_id`` is unique: one
transfer per disk, even when two requests race) and makes the ticket: 32 random bytes, the only
credential of the data URL, as in oVirt.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import ClassVar

from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Command, Context, record_event
from virtyard.engine.commands.image_disks import active_domain, domain_hosts
from virtyard.engine.db.models import BaseDisk, Host, ImageTransfer, utcnow
from virtyard.engine.transfers.service import ACTIVE, transfer_service


@dataclass
class AddImageTransfer(Command[str]):
    """Start an upload into an empty ISO disk."""

    action: ClassVar[str] = "transfer"
    entity: ClassVar[str] = "disk"
    conflicts: ClassVar = {("image_transfers", ("active_disk_id",)): errors.DISKS_LOCKED}

    disk_id: str
    direction: str = "upload"
    host_id: str = ""
    inactivity_timeout: int | None = None
    alias: str = ""
    host_name: str = ""

    def validate(self, tx: Session, ctx: Context) -> None:
        disk = tx.get(BaseDisk, self.disk_id) if self.disk_id else None
        if disk is None:
            raise self.fail(errors.DISK_NOT_FOUND)
        self.alias = disk.alias
        if self.direction != "upload":
            raise self.fail(errors.TRANSFER_DIRECTION)
        if disk.storage_type != "image" or disk.content_type != "iso":
            raise self.fail(errors.TRANSFER_DISK_NOT_IMAGE, disk=disk.alias,
                            type=f"{disk.storage_type} {disk.content_type}")
        if disk.status == "locked":
            raise self.fail(errors.DISKS_LOCKED, disk=disk.alias)
        if disk.status != "ok":
            raise self.fail(errors.TRANSFER_DISK_ILLEGAL, disk=disk.alias, status=disk.status)
        if disk.content_size:
            raise self.fail(errors.TRANSFER_DISK_HAS_CONTENT, disk=disk.alias)
        limit = ctx.services.config.transfers.max_inactivity_timeout if ctx.services else 3600
        if self.inactivity_timeout is not None and not 0 < self.inactivity_timeout <= limit:
            raise self.fail(errors.TRANSFER_TIMEOUT_INVALID, max=limit)
        domain = active_domain(self, tx, disk.storage_domain_id or "")
        hosts = domain_hosts(tx, domain.id)
        if self.host_id:
            chosen = next((h for h in hosts if h.id == self.host_id), None)
            if chosen is None:
                host = tx.get(Host, self.host_id)
                if host is None:
                    raise self.fail(errors.HOST_NOT_FOUND)
                raise self.fail(errors.TRANSFER_HOST_INVALID, host=host.name)
        elif hosts:
            chosen = hosts[0]
        else:
            raise self.fail(errors.NO_HOST_REACHES_DOMAIN, domain=domain.name)
        self.host_id = chosen.id
        self.host_name = chosen.name

    def execute(self, tx: Session, ctx: Context) -> str:
        disk = tx.get(BaseDisk, self.disk_id)
        assert disk is not None
        disk.status = "locked"
        default = ctx.services.config.transfers.inactivity_timeout if ctx.services else 60
        row = ImageTransfer(disk_id=disk.id, active_disk_id=disk.id, host_id=self.host_id,
                            direction="upload", phase="transferring",
                            ticket=secrets.token_urlsafe(32), size=disk.provisioned_size,
                            inactivity_timeout=self.inactivity_timeout or default,
                            user_name=ctx.principal.name, correlation_id=ctx.correlation_id)
        tx.add(row)
        tx.flush()
        return row.id

    def events(self, tx: Session, ctx: Context, result: str) -> None:
        record_event(tx, ctx, audit.TRANSFER_STARTED, audit.Ids(disk_id=self.disk_id),
                     disk=self.alias, host=self.host_name)

    def after_commit(self, ctx: Context, result: str) -> None:
        if ctx.services is not None:
            service = transfer_service(ctx.services)
            try:
                service.open(result)
            except Exception as exc:  # the spool could not be made: the upload cannot start
                service.fail(result, f"the engine could not start the upload: {exc}")
                raise


@dataclass
class EndImageTransfer(Command[str]):
    """``finalize`` (verify and keep) or ``cancel`` (drop) an upload."""

    entity: ClassVar[str] = "image transfer"

    transfer_id: str
    cancel: bool = False
    changed: bool = False

    @property
    def action(self) -> str:  # type: ignore[override]
        return "cancel" if self.cancel else "finalize"

    def validate(self, tx: Session, ctx: Context) -> None:
        row = tx.get(ImageTransfer, self.transfer_id)
        if row is None:
            raise self.fail(errors.TRANSFER_NOT_FOUND)
        done = ("cancelled_user", "cancelled_system", "finalizing_cleanup",
                "finished_cleanup") if self.cancel else ("finalizing_success",
                                                         "finished_success")
        if row.phase in done:
            return  # again: nothing to do
        if row.phase not in ACTIVE:
            raise self.fail(errors.TRANSFER_PHASE_ILLEGAL, phase=row.phase)
        self.changed = True

    def execute(self, tx: Session, ctx: Context) -> str:
        if self.changed:
            row = tx.get(ImageTransfer, self.transfer_id)
            assert row is not None
            row.phase = "cancelled_user" if self.cancel else "finalizing_success"
            row.updated_at = utcnow()
            if self.cancel:
                row.message = f"cancelled by {ctx.principal.name or 'the engine'}"
        return self.transfer_id

    def after_commit(self, ctx: Context, result: str) -> None:
        if self.changed and ctx.services is not None:
            transfer_service(ctx.services).schedule(result)
