"""``virtyard iso upload FILE --domain SD``: an ISO into a block storage domain, the way
oVirt's clients upload (``upload_disk.py``): ``POST disks`` (``content_type=iso``, the file's
size), wait until the disk is ok, ``POST imagetransfers``, the bytes to its ``transfer_url``
(the ovirt-imageio protocol: ``PUT`` with ``Content-Range``, several at once, as many as the
server's ``max_writers``), ``finalize``, wait for ``finished_success``. Any failure before
finalize cancels the transfer (the engine removes the disk); a failed verification is shown
with the engine's reason.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import click
import httpx

from virtyard.cli.app import STORAGE_DOMAINS, App, output_options, pass_app
from virtyard.cli.client import timeouts, tls_context, transport_error
from virtyard.cli.errors import USAGE, CliError
from virtyard.cli.output import Column

CHUNK = 8 << 20  # bytes per PUT
MAX_WORKERS = 4
ISO_MAGIC_OFFSET = 0x8000
ISO_MAGIC = b"\x01CD001\x01"
FINISHED = ("finished_success", "finished_failure", "finished_cleanup", "cancelled")
COLUMNS = [Column("name"), Column("size", kind="size"), Column("domain"), Column("status"),
           Column("id")]


def is_iso(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(ISO_MAGIC_OFFSET)
        return f.read(len(ISO_MAGIC)) == ISO_MAGIC


@click.group("iso")
def iso() -> None:
    """ISO images on block storage domains (the CD-ROM's media)."""


@iso.command("upload")
@click.argument("path", metavar="FILE",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--domain", "-d", "domain_name", required=True, metavar="SD",
              help="The storage domain (name or id).")
@click.option("--name", help="The disk's name (default: the file's name).")
@click.option("--workers", type=click.IntRange(1, 16), default=MAX_WORKERS, show_default=True,
              help="Parallel requests (at most what the engine allows).")
@output_options
@pass_app
def upload(app: App, path: Path, domain_name: str, name: str | None, workers: int) -> None:
    """Upload an ISO file as an ISO disk of a storage domain."""
    size = path.stat().st_size
    if size == 0 or not is_iso(path):
        raise CliError("Not an ISO image", f"{path} holds no ISO 9660 image (no CD001 at "
                       "byte 32769)", "NOT_AN_ISO", exit_code=USAGE)
    domain = app.find(STORAGE_DOMAINS, domain_name)
    disk = app.engine.post("/disks", {
        "name": name or path.name, "content_type": "iso", "format": "raw",
        "provisioned_size": size, "description": f"Uploaded by virtyard from {path.name}"[:4000],
        "storage_domains": {"storage_domain": [{"id": domain["id"]}]}})
    disk_id = str(disk["id"])
    with app.progress(f"creating disk {disk.get('alias', '')}"):
        app.wait_for(lambda: app.engine.get(f"/disks/{disk_id}"),
                     lambda d: d.get("status") != "locked", timeout=app.timeout)
    transfer = app.engine.post("/imagetransfers", {"disk": {"id": disk_id},
                                                   "direction": "upload", "format": "raw"})
    transfer_id = str(transfer["id"])
    try:
        send(app, path, size, str(transfer["transfer_url"]), workers)
    except BaseException:
        with contextlib.suppress(CliError):
            app.engine.post(f"/imagetransfers/{transfer_id}/cancel")
        raise
    app.engine.post(f"/imagetransfers/{transfer_id}/finalize")
    with app.progress("verifying the upload"):
        done, _ = app.wait_for(lambda: app.engine.get(f"/imagetransfers/{transfer_id}"),
                               lambda t: t.get("phase") in FINISHED, timeout=app.timeout)
    if done.get("phase") != "finished_success":
        raise CliError("Upload failed", str(done.get("description") or done.get("phase")),
                       "UPLOAD_FAILED")
    final = app.engine.get(f"/disks/{disk_id}")
    app.output.done(f"Uploaded {path.name} as ISO disk {final.get('alias')} ({disk_id})",
                    {"id": disk_id, "name": final.get("alias"), "size": size,
                     "domain": domain.get("name"), "status": final.get("status")}, COLUMNS)


def send(app: App, path: Path, size: int, url: str, workers: int) -> None:
    """The file to the transfer URL in ``CHUNK`` PUTs, ``workers`` at a time."""
    tls = tls_context(app.login().ca_file)
    origin = url.split("/ovirt-engine", maxsplit=1)[0]
    with httpx.Client(verify=tls, timeout=timeouts(120.0)) as probe:
        try:
            answer = probe.options(url)
        except httpx.HTTPError as exc:
            raise transport_error(origin, exc, 120.0) from None
        options: dict[str, Any] = answer.json() if answer.status_code == 200 else {}
    workers = max(1, min(workers, int(options.get("max_writers") or 1)))
    offsets = iter(range(0, size, CHUNK))
    lock = threading.Lock()
    stop = threading.Event()  # one worker failed: the others stop too

    def worker(bar: Any) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            with httpx.Client(verify=tls, timeout=timeouts(300.0)) as http:
                while not stop.is_set():
                    with lock:
                        offset = next(offsets, None)
                    if offset is None:
                        return
                    data = os.pread(fd, min(CHUNK, size - offset), offset)
                    end = offset + len(data) - 1
                    try:
                        response = http.put(url, content=data, headers={
                            "Content-Range": f"bytes {offset}-{end}/*",
                            "Content-Type": "application/octet-stream"})
                    except httpx.HTTPError as exc:
                        raise transport_error(origin, exc, 300.0) from None
                    if response.status_code != 200:
                        raise CliError("Upload refused", response.text.strip()[:500],
                                       f"HTTP_{response.status_code}")
                    bar.update(advance=len(data))
        finally:
            os.close(fd)

    with app.progress(f"uploading {path.name}", total=size) as bar, \
            concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(worker, bar) for _ in range(workers)]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        finally:
            stop.set()
