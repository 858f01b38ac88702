"""ISO disks and image transfers without hosts: the checks (oVirt's keys), the imageio protocol
handling (ranges, sizes, truncation), the checksum of out-of-order uploads, verify failures,
cancel and the inactivity timeout (volume and disk removed), and recovery after a crash."""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from engine_db import context, migrated
from sqlalchemy import select

from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Context, run
from virtyard.engine.commands.errors import CommandError
from virtyard.engine.commands.image_disks import AddIsoDisk, settle_locked_disks
from virtyard.engine.commands.image_transfers import AddImageTransfer, EndImageTransfer
from virtyard.engine.commands.lun_disks import RemoveDisk
from virtyard.engine.config import EngineConfig
from virtyard.engine.db.database import Database
from virtyard.engine.db.models import (
    DEFAULT_CLUSTER_ID,
    DEFAULT_DATA_CENTER_ID,
    BaseDisk,
    Event,
    Host,
    HostConnectionPin,
    ImageTransfer,
    StorageDomain,
    StorageServerConnection,
    Vm,
    utcnow,
)
from virtyard.engine.hosts.pool import HostCallError
from virtyard.engine.transfers.imageio import parse_range
from virtyard.engine.transfers.service import TransferError, transfer_service
from virtyard.engine.transfers.spool import RangeSet, Spool, describe_gaps

SD = "5d000000-0000-0000-0000-000000000001"
HOST = "40000000-0000-0000-0000-000000000001"


class FakePool:
    """The host agent's volume verbs over in-memory volumes."""

    def __init__(self) -> None:
        self.volumes: dict[str, bytearray] = {}
        self.ready: dict[str, str] = {}
        self.calls: list[str] = []
        self.fail: dict[str, HostCallError] = {}

    def call_sync(self, host: Any, method: str, params: dict[str, Any] | None = None,
                  *, timeout: float | None = None) -> Any:
        p = params or {}
        self.calls.append(method)
        if method in self.fail:
            raise self.fail[method]
        volume = p.get("volumeID", "")
        if method == "Volume.create":
            self.volumes[volume] = bytearray(p["size"])
            return {}
        if volume not in self.volumes and method.startswith("Volume.") and \
                method != "Volume.list":
            raise HostCallError(201, "VolumeDoesNotExist", "no such volume", {})
        if method == "Volume.remove":
            del self.volumes[volume]
            return {}
        if method == "Volume.write":
            data = base64.b64decode(p["data"])
            self.volumes[volume][p["offset"]:p["offset"] + len(data)] = data
            return {"offset": p["offset"], "written": len(data)}
        if method == "Volume.verify":
            content = bytes(self.volumes[volume][:p["size"]])
            if hashlib.sha256(content).hexdigest() != p["sha256"]:
                raise HostCallError(484, "ImageVerificationError", "mismatch", {})
            if content[32769:32774] != b"CD001":
                raise HostCallError(202, "IncorrectFormat", "no ISO 9660", {})
            self.ready[volume] = p["sha256"]
            return {}
        if method == "Volume.list":
            return [{"volumeID": v, "state": "READY" if v in self.ready else "EMPTY",
                     "sha256": self.ready.get(v, "")} for v in self.volumes]
        raise AssertionError(method)

    async def call(self, host: Any, method: str, params: dict[str, Any] | None = None,
                   *, timeout: float | None = None) -> Any:
        return self.call_sync(host, method, params)


class FakeServices:
    def __init__(self, db: Database, state: Path) -> None:
        self.db = db
        self.pool = FakePool()
        self.config = EngineConfig(state_dir=state)
        self.extra: dict[str, Any] = {}


def iso_bytes(size: int = 64 * 1024, fill: bytes = b"x") -> bytes:
    data = bytearray(fill * size)[:size]
    if size >= 32774:
        data[32768:32774] = b"\x01CD001"
    return bytes(data)


@pytest.fixture
def services(tmp_path: Path) -> FakeServices:
    db = migrated(tmp_path)
    with db.transaction() as tx:
        tx.add(Host(id=HOST, name="h1", address="127.0.0.1", port=1, status="up",
                    cluster_id=DEFAULT_CLUSTER_ID))
        conn = StorageServerConnection(connection="127.0.0.1", iqn="iqn.x:y")
        tx.add(conn)
        tx.add(StorageDomain(id=SD, name="isos", status="active",
                             data_center_id=DEFAULT_DATA_CENTER_ID))
        tx.flush()
        tx.add(HostConnectionPin(host_id=HOST, connection_id=conn.id, owner=f"sd:{SD}"))
    return FakeServices(db, tmp_path / "state")


def ctx(services: FakeServices) -> Context:
    c = context(services.db)
    c.services = services
    return c


def key_of(call: Any) -> str:
    with pytest.raises(CommandError) as err:
        call()
    return err.value.key


def add_disk(services: FakeServices, size: int, name: str = "a.iso") -> str:
    return run(AddIsoDisk(alias=name, provisioned_size=size, domain_id=SD), ctx(services))


def disk(services: FakeServices, disk_id: str) -> BaseDisk | None:
    with services.db.read() as tx:
        return tx.get(BaseDisk, disk_id)


def transfer(services: FakeServices, transfer_id: str) -> ImageTransfer:
    with services.db.read() as tx:
        row = tx.get(ImageTransfer, transfer_id)
    assert row is not None
    return row


def start(services: FakeServices, disk_id: str, **kwargs: Any) -> str:
    """POST imagetransfers without the event loop (after_commit opens the upload)."""
    command = AddImageTransfer(disk_id, **kwargs)
    c = ctx(services)
    c.services = None  # no event loop here: open the upload by hand
    transfer_id = run(command, c)
    transfer_service(services).open(transfer_id)
    return transfer_id


async def chunks(data: bytes, step: int = 100_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i:i + step]


def put(services: FakeServices, transfer_id: str, offset: int, data: bytes,
        length: int | None = None) -> None:
    service = transfer_service(services)
    upload = service.by_id(transfer_id)
    assert upload is not None
    anyio.run(service.put, upload, offset, len(data) if length is None else length,
              chunks(data))


def end(services: FakeServices, transfer_id: str, *, cancel: bool = False) -> ImageTransfer:
    c = ctx(services)
    c.services = None
    run(EndImageTransfer(transfer_id, cancel=cancel), c)
    service = transfer_service(services)
    upload = service.by_id(transfer_id)
    if upload is not None:
        upload.phase = transfer(services, transfer_id).phase
    service.settle(transfer_id)
    return transfer(services, transfer_id)


# -- pieces -------------------------------------------------------------------------------------

def test_range_set_merges_and_finds_gaps() -> None:
    ranges = RangeSet()
    for start, end in ((10, 20), (30, 40), (20, 25), (0, 5), (24, 31), (100, 100)):
        ranges.add(start, end)
    assert ranges.ranges() == [(0, 5), (10, 40)]
    assert ranges.covered() == 35
    assert ranges.missing(50) == [(5, 10), (40, 50)]
    assert describe_gaps(ranges.missing(50)) == "bytes 5-9, 40-49"
    ranges.add(0, 50)
    assert ranges.missing(50) == [] and ranges.ranges() == [(0, 50)]


def test_spool_hashes_out_of_order_writes(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    spool = Spool(tmp_path / "s", len(data))
    for offset in (200_000, 0, 100_000):
        spool.write(offset, data[offset:offset + 100_000])
    assert spool.sha256() == hashlib.sha256(data).hexdigest()
    spool.close()
    assert not (tmp_path / "s").exists()


class _Req:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


@pytest.mark.parametrize(("headers", "expected"), [
    ({"content-length": "10"}, (0, 10)),
    ({"content-length": "10", "content-range": "bytes 100-109/*"}, (100, 10)),
    ({"content-length": "10", "content-range": "bytes 100-109/4096"}, (100, 10)),
])
def test_put_ranges(headers: dict[str, str], expected: tuple[int, int]) -> None:
    assert parse_range(_Req(headers)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 411),
    ({"content-length": "10", "content-range": "bytes 100-108/*"}, 400),
    ({"content-length": "10", "content-range": "items 1-10/*"}, 400),
])
def test_bad_put_ranges(headers: dict[str, str], status: int) -> None:
    with pytest.raises(TransferError) as err:
        parse_range(_Req(headers))  # type: ignore[arg-type]
    assert err.value.status == status


# -- ISO disks ----------------------------------------------------------------------------------

def test_iso_disk_checks(services: FakeServices) -> None:
    c = ctx(services)
    assert key_of(lambda: run(AddIsoDisk(alias="a", provisioned_size=0, domain_id=SD), c)) \
        == errors.DISK_SIZE_ZERO.key
    assert key_of(lambda: run(AddIsoDisk(alias="a", provisioned_size=1 << 50,
                                         domain_id=SD), c)) == errors.DISK_MAX_SIZE_EXCEEDED.key
    assert key_of(lambda: run(AddIsoDisk(alias="a", provisioned_size=10), c)) == \
        errors.STORAGE_DOMAIN_MISSING.key
    assert key_of(lambda: run(AddIsoDisk(alias="a", provisioned_size=10,
                                         domain_name="nope"), c)) == \
        errors.STORAGE_DOMAIN_NOT_FOUND.key
    assert key_of(lambda: run(AddIsoDisk(alias="a", provisioned_size=10, domain_id=SD,
                                         disk_format="cow"), c)) == \
        errors.DISK_FORMAT_INVALID.key
    with services.db.transaction() as tx:
        tx.get(Host, HOST).status = "maintenance"  # type: ignore[union-attr]
    assert key_of(lambda: add_disk(services, 10)) == errors.NO_HOST_REACHES_DOMAIN.key
    with services.db.transaction() as tx:
        tx.get(StorageDomain, SD).status = "maintenance"  # type: ignore[union-attr]
    assert key_of(lambda: add_disk(services, 10)) == errors.STORAGE_DOMAIN_STATUS_ILLEGAL.key
    assert services.pool.calls == []


def test_iso_disk_is_ok_and_empty_then_removed_with_its_volume(services: FakeServices) -> None:
    disk_id = add_disk(services, 4096)
    row = disk(services, disk_id)
    assert row is not None and row.status == "ok" and row.content_size == 0
    assert row.volume_id in services.pool.volumes
    with services.db.transaction() as tx:
        tx.add(Vm(id="50000000-0000-0000-0000-000000000001", name="vm",
                  cluster_id=DEFAULT_CLUSTER_ID, iso_path=disk_id))
    assert key_of(lambda: run(RemoveDisk(disk_id), ctx(services))) == errors.DISK_IS_CD.key
    with services.db.transaction() as tx:
        tx.get(Vm, "50000000-0000-0000-0000-000000000001").iso_path = ""  # type: ignore
    run(RemoveDisk(disk_id), ctx(services))
    assert disk(services, disk_id) is None and services.pool.volumes == {}


def test_failed_volume_create_leaves_no_disk(services: FakeServices) -> None:
    services.pool.fail["Volume.create"] = HostCallError(397, "NoSpaceLeftOnDomain", "full", {})
    assert key_of(lambda: add_disk(services, 4096)) == errors.DISK_SPACE_LOW.key
    with services.db.read() as tx:
        assert tx.scalars(select(BaseDisk)).all() == []


def test_a_crash_while_adding_is_settled(services: FakeServices) -> None:
    disk_id = add_disk(services, 4096)
    with services.db.transaction() as tx:  # as if the engine died before marking it ok
        tx.get(BaseDisk, disk_id).status = "locked"  # type: ignore[union-attr]
    assert settle_locked_disks(ctx(services), utcnow() + datetime.timedelta(seconds=1)) == 1
    assert disk(services, disk_id) is None and services.pool.volumes == {}


# -- transfers ----------------------------------------------------------------------------------

def test_transfer_checks(services: FakeServices) -> None:
    disk_id = add_disk(services, 4096)
    c = ctx(services)
    c.services = None
    assert key_of(lambda: run(AddImageTransfer("nope"), c)) == errors.DISK_NOT_FOUND.key
    assert key_of(lambda: run(AddImageTransfer(disk_id, direction="download"), c)) == \
        errors.TRANSFER_DIRECTION.key
    assert key_of(lambda: run(AddImageTransfer(disk_id, inactivity_timeout=0), c)) == \
        errors.TRANSFER_TIMEOUT_INVALID.key
    assert key_of(lambda: run(AddImageTransfer(disk_id, host_id="nope"), c)) == \
        errors.HOST_NOT_FOUND.key
    with services.db.transaction() as tx:
        tx.add(BaseDisk(id="d-lun", alias="lun", storage_type="lun"))
    assert key_of(lambda: run(AddImageTransfer("d-lun"), c)) == \
        errors.TRANSFER_DISK_NOT_IMAGE.key
    first = start(services, disk_id)
    assert disk(services, disk_id).status == "locked"  # type: ignore[union-attr]
    assert key_of(lambda: run(AddImageTransfer(disk_id), c)) == errors.DISKS_LOCKED.key
    assert key_of(lambda: run(RemoveDisk(disk_id), ctx(services))) == errors.DISKS_LOCKED.key
    assert key_of(lambda: run(EndImageTransfer("nope"), c)) == errors.TRANSFER_NOT_FOUND.key
    assert transfer(services, first).phase == "transferring"


def test_out_of_order_upload_is_verified_and_the_disk_ok(services: FakeServices) -> None:
    data = iso_bytes(20 << 20)  # three Volume.write chunks per request at most
    disk_id = add_disk(services, len(data))
    transfer_id = start(services, disk_id)
    half = 10 << 20
    put(services, transfer_id, half, data[half:])
    put(services, transfer_id, 0, data[:half])
    done = end(services, transfer_id)
    assert done.phase == "finished_success" and done.active_disk_id is None
    assert done.sha256 == hashlib.sha256(data).hexdigest()
    row = disk(services, disk_id)
    assert row is not None and row.status == "ok" and row.content_size == len(data)
    assert bytes(services.pool.volumes[row.volume_id or ""]) == data
    assert services.pool.calls.count("Volume.write") == 4
    assert list((services.config.state_dir / "transfers").glob("*")) == []  # spool gone
    with services.db.read() as tx:
        codes = [e.code for e in tx.scalars(select(Event))]
    assert 1032 in codes
    assert key_of(lambda: start(services, disk_id)) == errors.TRANSFER_DISK_HAS_CONTENT.key


def test_oversize_and_truncated_requests_are_refused(services: FakeServices) -> None:
    data = iso_bytes()
    disk_id = add_disk(services, len(data))
    transfer_id = start(services, disk_id)
    with pytest.raises(TransferError) as err:
        put(services, transfer_id, 1, data)
    assert err.value.status == 416 and "declared size" in err.value.message
    with pytest.raises(TransferError) as err:
        put(services, transfer_id, 0, data[:1000], length=2000)
    assert err.value.status == 400 and "truncated" in err.value.message
    assert services.pool.calls.count("Volume.write") == 0  # a short request writes nothing


@pytest.mark.parametrize(("content", "why"), [
    (None, "incomplete: 32768 of 65536 bytes arrived (missing bytes 32768-65535)"),
    (b"y" * 65536, "not an ISO 9660 image"),
])
def test_failed_uploads_remove_volume_and_disk(services: FakeServices, content: bytes | None,
                                               why: str) -> None:
    data = iso_bytes()
    disk_id = add_disk(services, len(data))
    transfer_id = start(services, disk_id)
    put(services, transfer_id, 0, content if content is not None else data[:32768])
    done = end(services, transfer_id)
    assert done.phase == "finished_failure" and why in done.message
    assert disk(services, disk_id) is None and services.pool.volumes == {}


def test_cancel_and_timeout_clean_up(services: FakeServices) -> None:
    data = iso_bytes()
    first = add_disk(services, len(data), "first")
    transfer_id = start(services, first)
    put(services, transfer_id, 0, data)
    assert end(services, transfer_id, cancel=True).phase == "finished_cleanup"
    assert disk(services, first) is None

    second = add_disk(services, len(data), "second")
    transfer_id = start(services, second, inactivity_timeout=5)
    service = transfer_service(services)
    upload = service.by_id(transfer_id)
    assert upload is not None
    assert service.check() == []  # not idle yet
    upload.last_activity -= 10
    assert transfer_id in service.check()
    done = transfer(services, transfer_id)
    assert done.phase == "finished_cleanup" and "inactivity timeout" in done.message
    assert disk(services, second) is None and services.pool.volumes == {}
    assert service.by_id(transfer_id) is None


def test_transfers_of_a_dead_engine_are_settled(services: FakeServices) -> None:
    data = iso_bytes()
    verified, interrupted = add_disk(services, len(data), "v"), add_disk(services, len(data))
    ids = [start(services, verified), start(services, interrupted)]
    put(services, ids[0], 0, data)
    dead = transfer_service(services)
    upload = dead.by_id(ids[0])
    assert upload is not None
    sha = upload.spool.sha256()
    volume = disk(services, verified).volume_id  # type: ignore[union-attr]
    services.pool.ready[volume or ""] = sha  # the verify ran, the engine died after it
    with services.db.transaction() as tx:
        row = tx.get(ImageTransfer, ids[0])
        assert row is not None
        row.phase, row.sha256 = "finalizing_success", sha
        for transfer_id in ids:
            tx.get(ImageTransfer, transfer_id).created_at -= datetime.timedelta(  # type: ignore
                minutes=1)
    services.extra.clear()  # a new engine: nothing in memory
    fresh = transfer_service(services)
    assert sorted(fresh.check()) == sorted(ids)
    assert transfer(services, ids[0]).phase == "finished_success"
    assert disk(services, verified).status == "ok"  # type: ignore[union-attr]
    assert transfer(services, ids[1]).phase == "finished_failure"
    assert disk(services, interrupted) is None


# -- the agent's direct write (no local device) -------------------------------------------------

class _MemoryInitiator:
    """An initiator over one in-memory LUN that writes whole blocks only, as SCSI does."""

    def __init__(self, size: int) -> None:
        self.lun = bytearray(os.urandom(size))
        self.writes: list[tuple[int, int]] = []

    def read_many(self, requests: list[tuple[Any, int, int]], *, timeout: float) -> list[bytes]:
        return [bytes(self.lun[offset:offset + length]) for _d, offset, length in requests]

    def write(self, device: Any, offset: int, data: bytes, *, timeout: float) -> bool:
        assert offset % 512 == 0 and len(data) % 512 == 0
        self.lun[offset:offset + len(data)] = data
        self.writes.append((offset, len(data)))
        return True


@pytest.mark.parametrize(("offset", "length"), [(0, 4096), (100, 3), (510, 1030), (4096, 512),
                                                (1, 8191)])
def test_direct_write_completes_partial_blocks_from_the_lun(offset: int, length: int) -> None:
    from virtyard.host.storage.block_domain import BlockDomains  # noqa: PLC0415
    from virtyard.host.storage.initiator import Device  # noqa: PLC0415

    initiator = _MemoryInitiator(16384)
    before = bytes(initiator.lun)
    domains = BlockDomains(None, initiator, None, dm=False, timeout=5.0)  # type: ignore[arg-type]
    device = Device("g", "", "", "", "", 16384, 512, 512, 0)
    data = os.urandom(length)
    assert domains._write_direct(device, offset, data)
    expected = bytearray(before)
    expected[offset:offset + length] = data
    assert bytes(initiator.lun) == bytes(expected)
    start, size = initiator.writes[0]
    assert start == offset - offset % 512 and (start + size) % 512 == 0


def test_imageio_protocol_over_http(services: FakeServices) -> None:
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.testclient import TestClient  # noqa: PLC0415

    from virtyard.engine.transfers import imageio  # noqa: PLC0415

    data = iso_bytes(3 * 4096)
    disk_id = add_disk(services, len(data))
    transfer_id = start(services, disk_id)
    ticket = transfer(services, transfer_id).ticket
    app = Starlette(routes=imageio.routes())
    app.state.services = services
    url = f"/ovirt-engine/images/{ticket}"
    with TestClient(app) as http:
        assert http.request("OPTIONS", "/ovirt-engine/images/nope").status_code == 403
        options = http.request("OPTIONS", url)
        assert options.status_code == 200
        assert options.json() == {"features": ["zero", "flush"], "max_readers": 0,
                                   "max_writers": 4}
        assert http.put(url + "?flush=n", content=data[4096:8192],
                        headers={"Content-Range": "bytes 4096-8191/*"}).status_code == 200
        too_far = http.put(url, content=data[:8192],
                           headers={"Content-Range": "bytes 8192-16383/*"})
        assert too_far.status_code == 416 and "declared size" in too_far.text
        assert http.patch(url, json={"op": "zero", "offset": 8192, "size": 4096}
                          ).status_code == 200
        assert http.put(url, content=data[:4096],
                        headers={"Content-Range": "bytes 0-4095/*"}).status_code == 200
        assert http.patch(url, json={"op": "flush"}).status_code == 200
        assert http.patch(url, json={"op": "trim"}).status_code == 400
        assert http.get(url).status_code == 403
    upload = transfer_service(services).by_id(transfer_id)
    assert upload is not None and upload.written.missing(len(data)) == []
    volume = disk(services, disk_id).volume_id  # type: ignore[union-attr]
    assert bytes(services.pool.volumes[volume or ""][:len(data)]) == \
        data[:8192] + bytes(4096)
