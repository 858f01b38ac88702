"""ISO upload through image transfers, end to end on the real lab with oVirt's own clients.

A block storage domain made on a free lab LUN through the API and activated; two small ISOs made
with genisoimage are uploaded: one by ``ovirt-img upload-disk`` (ovirt-imageio's tool: the SDK
creates the disk and the transfer, ``ovirt_imageio.client`` sends the bytes, the SDK finalizes),
one by the steps of the SDK's ``upload_disk.py`` example (SDK + ``client.upload()``). Each ends
``finished_success`` with an ``ok`` disk whose volume the agent verified, listed among the
domain's files. Bad input: wrong ids, an empty disk, an image larger than its disk (refused at the
first byte past it), a truncated upload and non-ISO content (both end ``finished_failure``
with the reason, the volume and the disk removed), and a transfer left unfinalized (it times
out and cleans up). The engine killed mid-upload, and after the host verified a volume but
before the database said so: on start each transfer is settled from what the host holds. An
ISO disk is removed with its volume. ``virtyard iso upload`` does the same through the same API.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ovirtsdk4 as sdk4
import pytest
from engine_helpers import make_iso
from ovirt_imageio import client
from ovirt_imageio._internal import http as imageio_http
from ovirtsdk4 import types

from virtyard.lab.lab import Lab

# The transfers do not depend on the database kind (the unit tests cover both): SQLite only.
pytestmark = [pytest.mark.lab, pytest.mark.parametrize("engine", ["sqlite"], indirect=True)]

MiB = 1 << 20


@pytest.fixture
def iso_domain(sdk: sdk4.Connection, add_lab_host: Callable[..., types.Host],
               wait_host: Callable[..., types.Host], make_target: Any) -> Iterator[Any]:
    """An active block storage domain on a fresh lab LUN (through the API); removed after."""
    host = add_lab_host(0)
    wait_host(host.id, types.HostStatus.UP)
    target = make_target([64 * MiB])
    system = sdk.system_service()
    domain = system.storage_domains_service().add(types.StorageDomain(
        name=f"isos-{uuid.uuid4().hex[:6]}", type=types.StorageDomainType.DATA,
        host=types.Host(name=host.name), storage_format=types.StorageFormat.V5,
        storage=types.HostStorage(type=types.StorageType.ISCSI, override_luns=True,
                                  volume_group=types.VolumeGroup(logical_units=[
                                      types.LogicalUnit(id=target.wwid(1),
                                                        address=target.address,
                                                        port=target.port,
                                                        target=target.iqn)]))))
    dcs = system.data_centers_service()
    dc = dcs.list(search="name=Default")[0]
    attached = dcs.data_center_service(dc.id).storage_domains_service()
    attached.add(types.StorageDomain(id=domain.id))
    assert attached.storage_domain_service(domain.id).get().status == \
        types.StorageDomainStatus.ACTIVE
    yield domain
    transfers = system.image_transfers_service()
    for transfer in transfers.list():
        if transfer.phase == types.ImageTransferPhase.TRANSFERRING:
            with_retry(transfers.image_transfer_service(transfer.id).cancel)
    for disk in system.disks_service().list():
        if disk.storage_domains and disk.storage_domains[0].id == domain.id:
            with_retry(lambda d=disk: system.disks_service().disk_service(d.id).remove())
    with_retry(lambda: attached.storage_domain_service(domain.id).deactivate())
    with_retry(lambda: attached.storage_domain_service(domain.id).remove())
    with_retry(lambda: system.storage_domains_service().storage_domain_service(domain.id)
               .remove(host=host.name, format=True))


def with_retry(call: Callable[[], Any], timeout: float = 30.0) -> None:
    """Cleanup that may meet a transfer still settling (a locked disk)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            call()
            return
        except sdk4.NotFoundError:
            return
        except sdk4.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def add_iso_disk(sdk: sdk4.Connection, domain: Any, name: str, size: int) -> types.Disk:
    """As ``upload_disk.py`` does: add the disk, wait until it is ok."""
    disks = sdk.system_service().disks_service()
    disk = disks.add(types.Disk(name=name, content_type=types.DiskContentType.ISO,
                                description="Uploaded disk", format=types.DiskFormat.RAW,
                                provisioned_size=size, sparse=False,
                                storage_domains=[types.StorageDomain(name=domain.name)]))
    return wait(lambda: disks.disk_service(disk.id).get(),
                lambda d: d.status == types.DiskStatus.OK, "the disk to be ok")


def wait(probe: Callable[[], Any], done: Callable[[Any], bool], what: str,
         timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {value!r}")
        time.sleep(0.3)


def start_transfer(sdk: sdk4.Connection, disk: types.Disk, **kwargs: Any
                   ) -> types.ImageTransfer:
    """As the SDK examples' ``imagetransfer.create_transfer`` does."""
    transfers = sdk.system_service().image_transfers_service()
    transfer = transfers.add(types.ImageTransfer(
        disk=types.Disk(id=disk.id), direction=types.ImageTransferDirection.UPLOAD,
        format=types.DiskFormat.RAW, timeout_policy=types.ImageTransferTimeoutPolicy.CANCEL,
        **kwargs))
    service = transfers.image_transfer_service(transfer.id)
    transfer = wait(service.get, lambda t: t.phase != types.ImageTransferPhase.INITIALIZING,
                    "the transfer to start")
    assert transfer.phase == types.ImageTransferPhase.TRANSFERRING
    assert sdk.system_service().hosts_service().host_service(transfer.host.id).get().name
    return transfer


def finish(sdk: sdk4.Connection, transfer: types.ImageTransfer, *, finalize: bool = True
           ) -> types.ImageTransfer:
    service = sdk.system_service().image_transfers_service().image_transfer_service(
        transfer.id)
    if finalize:
        service.finalize()
    return wait(service.get, lambda t: t.phase in (
        types.ImageTransferPhase.FINISHED_SUCCESS, types.ImageTransferPhase.FINISHED_FAILURE,
        types.ImageTransferPhase.FINISHED_CLEANUP), "the transfer to finish")


def volumes(lab: Lab, domain_id: str) -> dict[str, dict[str, Any]]:
    with lab.agent_client(0) as agent:
        found = agent.call("Volume.list", {"domainID": domain_id})
    return {v["imageID"]: v for v in found}


def gone(sdk: sdk4.Connection, disk_id: str) -> bool:
    try:
        sdk.system_service().disks_service().disk_service(disk_id).get()
    except sdk4.NotFoundError:
        return True
    return False


def refused(call: Callable[[], Any]) -> sdk4.Error:
    with pytest.raises(sdk4.Error) as err:
        call()
    return err.value


def test_upload_two_isos_with_ovirt_img_and_the_sdk_example(
        engine: Any, sdk: sdk4.Connection, lab: Lab, iso_domain: Any,
        tmp_path: Path) -> None:
    system = sdk.system_service()
    iso1, iso2 = (tmp_path / "one.iso", tmp_path / "two.iso")
    iso1.write_bytes(make_iso(tmp_path, "one\n" * 1000))
    iso2.write_bytes(make_iso(tmp_path, "two\n" * 3000))

    # 1. ovirt-imageio's own tool: the whole SDK flow, unchanged.
    password = tmp_path / "password"
    password.write_text(engine.password)
    subprocess.run([str(Path(sys.executable).with_name("ovirt-img")), "upload-disk",
                    "--engine-url", engine.base, "--username", "admin@internal",
                    "--password-file", str(password), "--cafile", engine.ca_file,
                    "--storage-domain", iso_domain.name, "--name", "one", "--output", "json",
                    str(iso1)], check=True, capture_output=True, timeout=180)
    one = system.disks_service().list(search="name=one")[0]
    assert one.status == types.DiskStatus.OK and one.content_type == types.DiskContentType.ISO
    assert one.provisioned_size == iso1.stat().st_size

    # 2. upload_disk.py's steps: add the disk, create the transfer, client.upload, finalize.
    two = add_iso_disk(sdk, iso_domain, "two.iso", iso2.stat().st_size)
    transfer = start_transfer(sdk, two)
    assert transfer.transfer_url.startswith(engine.base + "/ovirt-engine/images/")
    assert system.disks_service().disk_service(two.id).get().status == types.DiskStatus.LOCKED
    with client.ProgressBar() as progress:
        client.upload(str(iso2), transfer.transfer_url, engine.ca_file, progress=progress,
                      proxy_url=transfer.proxy_url)
    done = finish(sdk, transfer)
    assert done.phase == types.ImageTransferPhase.FINISHED_SUCCESS
    assert done.transfer_url is None  # the ticket is gone with the transfer
    assert system.disks_service().disk_service(two.id).get().status == types.DiskStatus.OK

    # The agent verified both volumes: READY with the ISOs' checksums.
    on_host = volumes(lab, iso_domain.id)
    for disk, path in ((one, iso1), (two, iso2)):
        volume = on_host[disk.image_id]
        assert volume["state"] == "READY"
        assert volume["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    files = system.storage_domains_service().storage_domain_service(iso_domain.id) \
        .files_service()
    assert {f.id for f in files.list()} == {one.id, two.id}
    assert files.file_service(two.id).get().name == "two.iso"

    # A second upload into a verified disk is refused; an ISO disk goes with its volume.
    again = refused(lambda: system.image_transfers_service().add(types.ImageTransfer(
        disk=types.Disk(id=two.id), direction=types.ImageTransferDirection.UPLOAD)))
    assert again.code == 409 and "already holds" in str(again)
    system.disks_service().disk_service(one.id).remove()
    assert one.image_id not in volumes(lab, iso_domain.id)


def test_bad_uploads_fail_clearly_and_clean_up(engine: Any, sdk: sdk4.Connection, lab: Lab,
                                              iso_domain: Any, tmp_path: Path) -> None:
    system = sdk.system_service()
    transfers = system.image_transfers_service()
    iso = tmp_path / "x.iso"
    iso.write_bytes(make_iso(tmp_path, "x\n"))
    size = iso.stat().st_size

    # Wrong ids and wrong disks.
    assert refused(lambda: transfers.add(types.ImageTransfer(
        disk=types.Disk(id=str(uuid.uuid4()))))).code == 404
    with pytest.raises(sdk4.NotFoundError):
        transfers.image_transfer_service(str(uuid.uuid4())).get()
    assert refused(lambda: transfers.image_transfer_service(str(uuid.uuid4()))
                   .finalize()).code == 404
    assert refused(lambda: system.disks_service().add(types.Disk(
        name="nowhere", content_type=types.DiskContentType.ISO, format=types.DiskFormat.RAW,
        provisioned_size=size, storage_domains=[types.StorageDomain(
            id=str(uuid.uuid4()))]))).code == 404
    assert refused(lambda: system.disks_service().add(types.Disk(
        name="empty", content_type=types.DiskContentType.ISO, provisioned_size=0,
        storage_domains=[types.StorageDomain(id=iso_domain.id)]))).code == 400

    # An image larger than its disk: refused at the first byte past the declared size.
    small = add_iso_disk(sdk, iso_domain, "small", size - 4096)
    transfer = start_transfer(sdk, small)
    with pytest.raises(imageio_http.Error) as err:
        client.upload(str(iso), transfer.transfer_url, engine.ca_file)
    assert "past the disk's declared size" in str(err.value)
    transfers.image_transfer_service(transfer.id).cancel()
    assert finish(sdk, transfer, finalize=False).phase == \
        types.ImageTransferPhase.FINISHED_CLEANUP
    assert gone(sdk, small.id) and small.image_id not in volumes(lab, iso_domain.id)

    # Truncated: the disk is larger than what was sent.
    big = add_iso_disk(sdk, iso_domain, "big", size + 1 * MiB)
    transfer = start_transfer(sdk, big)
    client.upload(str(iso), transfer.transfer_url, engine.ca_file)
    done = finish(sdk, transfer)
    assert done.phase == types.ImageTransferPhase.FINISHED_FAILURE
    assert "incomplete" in done.description and f"{size} of {size + MiB}" in done.description
    assert gone(sdk, big.id) and big.image_id not in volumes(lab, iso_domain.id)

    # Not an ISO: the agent's verify refuses it.
    junk = tmp_path / "junk.iso"
    junk.write_bytes(b"not an iso\n" * 2048)  # 512-byte sectors, as qemu-nbd serves files
    bad = add_iso_disk(sdk, iso_domain, "junk", junk.stat().st_size)
    transfer = start_transfer(sdk, bad)
    client.upload(str(junk), transfer.transfer_url, engine.ca_file)
    done = finish(sdk, transfer)
    assert done.phase == types.ImageTransferPhase.FINISHED_FAILURE
    assert "not an ISO 9660 image" in done.description
    assert gone(sdk, bad.id) and bad.image_id not in volumes(lab, iso_domain.id)

    # Left unfinalized: times out, cancelled by the system, volume and disk removed.
    idle = add_iso_disk(sdk, iso_domain, "idle", size)
    transfer = start_transfer(sdk, idle, inactivity_timeout=2)
    client.upload(str(iso), transfer.transfer_url, engine.ca_file)
    done = finish(sdk, transfer, finalize=False)
    assert done.phase == types.ImageTransferPhase.FINISHED_CLEANUP
    assert "inactivity timeout" in done.description
    assert gone(sdk, idle.id) and idle.image_id not in volumes(lab, iso_domain.id)
    with pytest.raises(imageio_http.Error):  # its ticket is gone
        client.upload(str(iso), transfer.transfer_url, engine.ca_file)


def test_cli_iso_upload(engine: Any, sdk: sdk4.Connection, lab: Lab, iso_domain: Any,
                        tmp_path: Path) -> None:
    iso = tmp_path / "cli.iso"
    iso.write_bytes(make_iso(tmp_path, "cli\n" * 5000))
    password = tmp_path / "password"
    password.write_text(engine.password)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTYARD_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    cli = [str(Path(sys.executable).with_name("virtyard"))]

    def virtyard(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True,
                              timeout=180, check=False)

    assert virtyard("login", engine.base, "--ca-file", engine.ca_file, "--password-file",
                    str(password)).returncode == 0
    done = virtyard("iso", "upload", str(iso), "--domain", iso_domain.name, "--json")
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert row["status"] == "ok" and row["size"] == iso.stat().st_size
    disk = sdk.system_service().disks_service().disk_service(row["id"]).get()
    assert disk.name == "cli.iso" and disk.status == types.DiskStatus.OK
    assert volumes(lab, iso_domain.id)[disk.image_id]["sha256"] == \
        hashlib.sha256(iso.read_bytes()).hexdigest()

    junk = tmp_path / "junk.iso"
    junk.write_bytes(b"junk" * 20000)
    refused_cli = virtyard("iso", "upload", str(junk), "--domain", iso_domain.name)
    assert refused_cli.returncode == 2 and "NOT_AN_ISO" in refused_cli.stderr
    missing = virtyard("iso", "upload", str(iso), "--domain", "no-such-domain")
    assert missing.returncode == 3


def restart(engine: Any, die_at: str = "") -> None:
    """Kill the engine (as a crash would) and start it, with ``die_at`` armed or not."""
    process = engine.process
    process.kill()
    process.extra_config = f'\n[debug]\ndie_at = "{die_at}"\n' if die_at else ""
    process.start()


def test_engine_killed_during_uploads_settles_them(engine: Any, sdk: sdk4.Connection,
                                                   lab: Lab, iso_domain: Any,
                                                   tmp_path: Path) -> None:
    system = sdk.system_service()
    transfers = system.image_transfers_service()
    iso = tmp_path / "crash.iso"
    iso.write_bytes(make_iso(tmp_path, "crash\n" * 4000))
    data = iso.read_bytes()
    try:
        # Killed mid-upload: on start the transfer fails, its volume and disk go.
        cut = add_iso_disk(sdk, iso_domain, "cut", len(data))
        transfer = start_transfer(sdk, cut)
        with httpx.Client(verify=engine.tls()) as http:
            answer = http.put(transfer.transfer_url, content=data[:65536], headers={
                "Content-Range": "bytes 0-65535/*"})
            assert answer.status_code == 200, answer.text
        restart(engine)
        done = finish(sdk, transfer, finalize=False)
        assert done.phase == types.ImageTransferPhase.FINISHED_FAILURE
        assert "restarted" in done.description
        assert gone(sdk, cut.id) and cut.image_id not in volumes(lab, iso_domain.id)

        # Killed after the host verified the volume, before the database said so: on start
        # the host's READY volume with the engine's checksum makes it a success.
        restart(engine, "transfer:verified")
        kept = add_iso_disk(sdk, iso_domain, "kept", len(data))
        transfer = start_transfer(sdk, kept)
        client.upload(str(iso), transfer.transfer_url, engine.ca_file)
        with pytest.raises(sdk4.Error):  # the engine dies while answering or right after
            transfers.image_transfer_service(transfer.id).finalize()
            time.sleep(5)
            transfers.image_transfer_service(transfer.id).get()
        restart(engine)
        done = finish(sdk, transfer, finalize=False)
        assert done.phase == types.ImageTransferPhase.FINISHED_SUCCESS
        disk = system.disks_service().disk_service(kept.id).get()
        assert disk.status == types.DiskStatus.OK
        assert volumes(lab, iso_domain.id)[kept.image_id]["state"] == "READY"
    finally:
        if engine.process.extra_config:
            restart(engine)

