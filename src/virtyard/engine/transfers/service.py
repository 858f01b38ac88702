"""The engine side of image transfers: received bytes to the volume, finalize, cancel,
timeouts, and transfers an engine crash left behind.

One :class:`TransferService` per engine (``services.extra["transfers"]``, see
:func:`transfer_service`). An active upload is a :class:`Upload` in memory, found by its
ticket: the data endpoint (``transfers/imageio.py``) hands it the bytes of each request, which
go to the spool and, in chunks of at most 8 MiB, to the volume through the host agent
(``Volume.write``). A request is answered only when all its bytes are on the volume.

Phases, as oVirt's: ``transferring`` → (finalize) ``finalizing_success`` → ``finished_success``
(every byte of the declared size arrived, ``Volume.verify`` read the volume back and it matched
the spool's SHA-256 and holds ISO 9660; the disk is ``ok`` with ``content_size``), or →
``finalizing_failure`` → ``finished_failure`` (why in the transfer's description and an event;
the volume and the disk are removed, as oVirt removes a disk whose upload failed). Cancel
(``cancelled_user``) and the inactivity timeout (``cancelled_system``) → ``finalizing_cleanup``
→ ``finished_cleanup``, also removing volume and disk.

Crash safety: the phase lives in the database. A transfer of an earlier engine run that is not
finished is settled by the periodic check: one whose verify may have succeeded (its SHA-256 was
recorded) is finished if the host shows the volume READY with that checksum, any other is
failed and cleaned up; a cleanup that cannot reach a host is retried at the next check.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.from_thread
import anyio.to_thread
from sqlalchemy import delete, select

from virtyard.engine import audit
from virtyard.engine.commands.base import ENGINE, Context
from virtyard.engine.commands.flow import die_point
from virtyard.engine.commands.image_disks import (
    VolumeRef,
    domain_host,
    remove_volume_quietly,
    settle_locked_disks,
    volume_of,
)
from virtyard.engine.db.models import BaseDisk, Host, ImageTransfer, utcnow
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostUnreachableError
from virtyard.engine.transfers.spool import RangeSet, Spool, describe_gaps

log = logging.getLogger("virtyard.engine.transfers")

CHUNK = 8 << 20  # one Volume.write (the agent's limit)
ACTIVE = ("initializing", "transferring", "resuming", "paused_user", "paused_system")
FINAL = ("finished_success", "finished_failure", "finished_cleanup", "cancelled")
# Agent error codes (docs/host-api.md).
IMAGE_VERIFICATION_ERROR = 484
INCORRECT_FORMAT = 202
DRAIN_TIMEOUT = 60.0
# A transfer of this run without its upload in memory is settled only after this long (it may
# be one whose upload is being opened right now).
ORPHAN_AGE = datetime.timedelta(seconds=30)


class TransferError(Exception):
    """A data request refused, with the HTTP status imageio would answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """An active upload, in memory (the database has its phase)."""

    transfer_id: str
    ticket: str
    disk_id: str
    alias: str
    size: int
    host: HostAddress
    ref: VolumeRef
    spool: Spool
    inactivity_timeout: float
    phase: str = "transferring"
    written: RangeSet = field(default_factory=RangeSet)
    inflight: int = 0
    last_activity: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_activity = time.monotonic()


class TransferService:
    """See the module docstring."""

    def __init__(self, services: Any) -> None:
        self.services = services
        self.db = services.db
        self.pool = services.pool
        settings = services.config.transfers
        self.settings = settings
        configured = settings.spool_dir
        self.spool_dir: Path = configured if configured and str(configured) not in ("", ".") \
            else services.config.state_dir / "transfers"
        self.uploads: dict[str, Upload] = {}  # by ticket
        self.started_at = utcnow()
        self._busy: set[str] = set()  # transfer ids being finalized or cleaned up
        self._busy_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def ctx(self) -> Context:
        return Context(self.db, ENGINE, self.services)

    # Crash tests: ``[debug] die_at = "transfer:verified"`` kills the engine after the host
    # verified the volume and before the database says so.

    # -- starting -------------------------------------------------------------------------

    def open(self, transfer_id: str) -> Upload:
        """Make the in-memory upload of a committed transfer (its spool file)."""
        with self.db.read() as tx:
            row = tx.get(ImageTransfer, transfer_id)
            disk = tx.get(BaseDisk, row.disk_id) if row else None
            ref = volume_of(tx, disk) if disk else None
            host = tx.get(Host, row.host_id) if row and row.host_id else None
            if row is None or disk is None or ref is None or host is None:
                raise TransferError(404, "the transfer, its disk or its host is gone")
            self.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            upload = Upload(row.id, row.ticket, disk.id, disk.alias, row.size,
                            HostAddress(host.id, host.address, host.port), ref,
                            Spool(self.spool_dir / f"{row.id}.spool", row.size),
                            float(row.inactivity_timeout))
        self.uploads[upload.ticket] = upload
        return upload

    def upload(self, ticket: str) -> Upload | None:
        return self.uploads.get(ticket)

    def by_id(self, transfer_id: str) -> Upload | None:
        return next((u for u in self.uploads.values() if u.transfer_id == transfer_id), None)

    def transferred(self, transfer_id: str) -> int | None:
        """Bytes received so far by an active upload (None if not active here)."""
        upload = self.by_id(transfer_id)
        return upload.written.covered() if upload else None

    # -- data (on the event loop) ---------------------------------------------------------

    def _check_range(self, upload: Upload, offset: int, length: int) -> None:
        if upload.phase != "transferring":
            raise TransferError(403, f"the transfer is {upload.phase}: it takes no more data")
        if offset < 0 or length < 0:
            raise TransferError(400, "invalid range")
        if offset + length > upload.size:
            raise TransferError(416, f"writing {length} bytes at {offset} goes past the "
                                f"disk's declared size ({upload.size} bytes): the image is "
                                "larger than the disk's provisioned_size")

    async def put(self, upload: Upload, offset: int, length: int,
                  chunks: Any) -> int:
        """Write ``length`` bytes arriving as ``chunks`` (an async iterator) at ``offset``."""
        self._check_range(upload, offset, length)
        upload.inflight += 1
        upload.touch()
        received = 0
        try:
            buffer = bytearray()
            position = offset
            async for piece in chunks:
                if not piece:
                    continue
                received += len(piece)
                if received > length:
                    raise TransferError(400, f"the request carries more than its "
                                        f"{length} bytes")
                buffer += piece
                while len(buffer) >= CHUNK:
                    await self._write(upload, position, bytes(buffer[:CHUNK]))
                    del buffer[:CHUNK]
                    position += CHUNK
            if received < length:
                raise TransferError(400, f"truncated request: {received} of {length} bytes "
                                    "arrived")
            if buffer:
                await self._write(upload, position, bytes(buffer))
        finally:
            upload.inflight -= 1
            upload.touch()
        return received

    async def zero(self, upload: Upload, offset: int, length: int) -> None:
        """Zero a range (imageio's PATCH ``zero``): written like data, so it is verified."""
        self._check_range(upload, offset, length)
        upload.inflight += 1
        upload.touch()
        try:
            zeros = bytes(min(CHUNK, length))
            position, end = offset, offset + length
            while position < end:
                step = min(CHUNK, end - position)
                await self._write(upload, position, zeros[:step])
                position += step
                upload.touch()
        finally:
            upload.inflight -= 1
            upload.touch()

    async def _write(self, upload: Upload, offset: int, data: bytes) -> None:
        def spool_and_encode() -> str:
            upload.spool.write(offset, data)
            return base64.b64encode(data).decode("ascii")

        encoded = await anyio.to_thread.run_sync(spool_and_encode)
        if upload.phase != "transferring":
            raise TransferError(403, f"the transfer is {upload.phase}: it takes no more data")
        try:
            await self.pool.call(upload.host, "Volume.write",
                                 {**upload.ref.params(), "offset": offset, "data": encoded})
        except (HostCallError, HostUnreachableError) as exc:
            log.warning("transfer %s: writing %d bytes at %d failed: %s", upload.transfer_id,
                        len(data), offset, exc)
            raise TransferError(500, f"writing to the volume failed: {str(exc)[:300]}") from None
        upload.written.add(offset, offset + len(data))
        upload.touch()

    # -- finalize, cancel, clean up (worker threads) --------------------------------------

    def schedule(self, transfer_id: str) -> None:
        """After a committed phase change (finalize, cancel): settle the transfer in the
        background. Called from a worker thread of the engine's event loop."""
        upload = self.by_id(transfer_id)
        if upload is not None:
            with self.db.read() as tx:
                row = tx.get(ImageTransfer, transfer_id)
                if row is not None:
                    upload.phase = row.phase
        anyio.from_thread.run_sync(self._spawn, transfer_id)

    def _spawn(self, transfer_id: str) -> None:
        task = asyncio.get_running_loop().create_task(
            anyio.to_thread.run_sync(self.settle, transfer_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def settle(self, transfer_id: str) -> None:
        """Move a transfer on from its phase (finalize, fail, clean up); one at a time each."""
        with self._busy_lock:
            if transfer_id in self._busy:
                return
            self._busy.add(transfer_id)
        try:
            with self.db.read() as tx:
                row = tx.get(ImageTransfer, transfer_id)
                phase = row.phase if row else ""
                sha = row.sha256 if row else ""
            if phase == "finalizing_success":
                if self.by_id(transfer_id) is not None:
                    self._finalize(transfer_id)
                elif sha:
                    self._recover_verified(transfer_id, sha)
                else:
                    self.fail(transfer_id, "the engine restarted before the upload was "
                                           "verified")
            elif phase in ("finalizing_failure", "cancelled_user", "cancelled_system",
                           "finalizing_cleanup"):
                self._cleanup(transfer_id)
            elif phase in ACTIVE and self.by_id(transfer_id) is None:
                self.fail(transfer_id, "the engine restarted during the upload")
        except Exception:
            log.exception("transfer %s: settling failed (retried at the next check)",
                          transfer_id)
        finally:
            with self._busy_lock:
                self._busy.discard(transfer_id)

    def _drain(self, upload: Upload) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while upload.inflight and time.monotonic() < deadline:
            time.sleep(0.05)

    def _finalize(self, transfer_id: str) -> None:
        upload = self.by_id(transfer_id)
        assert upload is not None
        upload.phase = "finalizing_success"
        self._drain(upload)
        gaps = upload.written.missing(upload.size)
        if gaps:
            got = upload.written.covered()
            self.fail(transfer_id, f"the upload is incomplete: {got} of {upload.size} bytes "
                                   f"arrived (missing {describe_gaps(gaps)})")
            return
        sha = upload.spool.sha256()
        with self.db.transaction() as tx:
            row = tx.get(ImageTransfer, transfer_id)
            if row is None:
                return
            row.sha256 = sha
            row.transferred = upload.size
            row.updated_at = utcnow()
        try:
            self.pool.call_sync(upload.host, "Volume.verify",
                                {**upload.ref.params(), "size": upload.size, "sha256": sha})
        except HostCallError as exc:
            self.fail(transfer_id, verify_failure(exc))
            return
        except HostUnreachableError as exc:
            self.fail(transfer_id, f"the host could not verify the volume: {str(exc)[:300]}")
            return
        die_point(self.ctx(), "transfer:verified")
        self._succeeded(transfer_id, sha)

    def _succeeded(self, transfer_id: str, sha: str) -> None:
        with self.db.transaction() as tx:
            row = tx.get(ImageTransfer, transfer_id)
            if row is None:
                return
            disk = tx.get(BaseDisk, row.disk_id)
            if disk is not None:
                disk.status = "ok"
                disk.content_size = row.size
            row.phase = "finished_success"
            row.active_disk_id = None
            row.transferred = row.size
            row.updated_at = utcnow()
            audit.record(tx, audit.TRANSFER_SUCCEEDED, audit.Ids(disk_id=row.disk_id),
                         user_name=row.user_name, correlation_id=row.correlation_id,
                         disk=disk.alias if disk else row.disk_id, size=row.size, sha256=sha)
        self._close(transfer_id)
        log.info("transfer %s: %s verified", transfer_id, row.disk_id)

    def _recover_verified(self, transfer_id: str, sha: str) -> None:
        """After a crash in finalizing: finished if the volume is READY with our checksum."""
        with self.db.read() as tx:
            row = tx.get(ImageTransfer, transfer_id)
            disk = tx.get(BaseDisk, row.disk_id) if row else None
            ref = volume_of(tx, disk) if disk else None
            host = domain_host(tx, ref.domain_id) if ref else None
        if ref is None:
            self.fail(transfer_id, "the disk is gone")
            return
        if host is None:
            return  # no host reaches the domain now: try again later
        try:
            volumes = self.pool.call_sync(host, "Volume.list", {"domainID": ref.domain_id})
        except (HostCallError, HostUnreachableError) as exc:
            log.info("transfer %s: cannot list volumes yet: %s", transfer_id, exc)
            return
        for volume in volumes if isinstance(volumes, list) else []:
            if isinstance(volume, dict) and volume.get("volumeID") == ref.volume_id and \
                    volume.get("state") == "READY" and volume.get("sha256") == sha:
                self._succeeded(transfer_id, sha)
                return
        self.fail(transfer_id, "the engine restarted before the upload was verified")

    def fail(self, transfer_id: str, why: str) -> None:
        """``finalizing_failure`` with the reason, then clean up."""
        log.info("transfer %s failed: %s", transfer_id, why)
        with self.db.transaction() as tx:
            row = tx.get(ImageTransfer, transfer_id)
            if row is None or row.phase in FINAL:
                return
            row.phase = "finalizing_failure"
            row.message = why[:1000]
            row.updated_at = utcnow()
        upload = self.by_id(transfer_id)
        if upload is not None:
            upload.phase = "finalizing_failure"
        self._cleanup(transfer_id)

    def _cleanup(self, transfer_id: str) -> None:
        """Remove the volume and the disk; the transfer ends failed or cleaned up."""
        upload = self.by_id(transfer_id)
        if upload is not None:
            self._drain(upload)
        with self.db.read() as tx:
            row = tx.get(ImageTransfer, transfer_id)
            if row is None or row.phase in FINAL:
                self._close(transfer_id)
                return
            disk = tx.get(BaseDisk, row.disk_id)
            ref = volume_of(tx, disk) if disk is not None else None
            host = domain_host(tx, ref.domain_id) if ref else None
            failed = row.phase == "finalizing_failure"
        if ref is not None and (host is None or
                                not remove_volume_quietly(self.ctx(), host, ref)):
            log.info("transfer %s: the volume is not removed yet (retried)", transfer_id)
            return
        with self.db.transaction() as tx:
            row = tx.get(ImageTransfer, transfer_id)
            if row is None:
                return
            disk = tx.get(BaseDisk, row.disk_id)
            alias = disk.alias if disk else row.disk_id
            if disk is not None and disk.status == "locked":
                tx.delete(disk)
            why = row.message or ("cancelled by " + (row.user_name or "the user")
                                  if row.phase == "cancelled_user" else "")
            row.phase = "finished_failure" if failed else "finished_cleanup"
            row.active_disk_id = None
            row.updated_at = utcnow()
            audit.record(tx, audit.TRANSFER_FAILED if failed else audit.TRANSFER_CANCELLED,
                         audit.Ids(disk_id=row.disk_id), user_name=row.user_name,
                         correlation_id=row.correlation_id, disk=alias, why=why)
        self._close(transfer_id)

    def _close(self, transfer_id: str) -> None:
        upload = self.by_id(transfer_id)
        if upload is not None:
            self.uploads.pop(upload.ticket, None)
            upload.spool.close()

    # -- the periodic check (on the event loop) -------------------------------------------

    def check(self) -> list[str]:
        """One round (worker thread): time out idle uploads, settle what an earlier run left,
        forget old finished transfers. Returns the transfer ids it settled."""
        now = time.monotonic()
        settled = []
        for upload in list(self.uploads.values()):
            idle = now - upload.last_activity
            if upload.phase == "transferring" and not upload.inflight and \
                    idle > upload.inactivity_timeout:
                self.cancel_idle(upload, idle)
                settled.append(upload.transfer_id)
        young = utcnow() - ORPHAN_AGE
        with self.db.read() as tx:
            stale = list(tx.execute(select(ImageTransfer.id, ImageTransfer.phase,
                                           ImageTransfer.created_at).where(
                ImageTransfer.phase.not_in(FINAL))))
        for transfer_id, phase, created_at in stale:
            active = self.by_id(transfer_id)
            if active is None and phase in ACTIVE and created_at >= self.started_at and \
                    created_at > young:
                continue  # being opened now
            if active is None or active.phase not in ("transferring", "finalizing_success"):
                self.settle(transfer_id)
                settled.append(transfer_id)
        settle_locked_disks(self.ctx(), self.started_at)
        cutoff = utcnow() - datetime.timedelta(seconds=self.settings.keep_finished)
        with self.db.transaction() as tx:
            tx.execute(delete(ImageTransfer).where(ImageTransfer.phase.in_(FINAL),
                                                   ImageTransfer.updated_at < cutoff))
        self._remove_stray_spools()
        return settled

    def cancel_idle(self, upload: Upload, idle: float) -> None:
        why = (f"no data for {idle:.0f} s (inactivity timeout {upload.inactivity_timeout:.0f} "
               "s): the transfer was not finalized")
        with self.db.transaction() as tx:
            row = tx.get(ImageTransfer, upload.transfer_id)
            if row is None or row.phase != "transferring":
                return
            row.phase = "cancelled_system"
            row.message = why
            row.updated_at = utcnow()
        upload.phase = "cancelled_system"
        log.info("transfer %s: %s", upload.transfer_id, why)
        self.settle(upload.transfer_id)

    def _remove_stray_spools(self) -> None:
        if not self.spool_dir.is_dir():
            return
        mine = {u.spool.path.name for u in self.uploads.values()}
        for path in self.spool_dir.glob("*.spool"):
            if path.name not in mine:
                path.unlink(missing_ok=True)

    async def run(self) -> None:
        """The periodic check, forever (a task of the engine's lifespan)."""
        self._loop = asyncio.get_running_loop()
        while True:
            try:
                await anyio.to_thread.run_sync(self.check)
            except Exception:
                log.exception("image transfer check failed")
            await asyncio.sleep(self.settings.check_interval)


def verify_failure(exc: HostCallError) -> str:
    """Why ``Volume.verify`` refused, for a person."""
    if exc.code == IMAGE_VERIFICATION_ERROR:
        return ("the volume does not hold what was sent (its SHA-256 read back from the "
                f"storage differs): {str(exc)[:200]}")
    if exc.code == INCORRECT_FORMAT:
        return "the uploaded image is not an ISO 9660 image (no CD001 at byte 32769)"
    return f"the host could not verify the volume: {str(exc)[:300]}"


def transfer_service(services: Any) -> TransferService:
    """The engine's one :class:`TransferService` (made on first use)."""
    service = services.extra.get("transfers")
    if service is None:
        service = TransferService(services)
        services.extra["transfers"] = service
    assert isinstance(service, TransferService)
    return service
