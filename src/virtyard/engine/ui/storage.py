"""The UI's storage views: storage domains with their ISO files, uploading an ISO (with a
progress bar), and VM → Change CD.

An upload is the REST API's sequence, as the SDK's ``upload_disk.py`` does it: an empty ISO
disk (``AddIsoDisk``), an image transfer (``AddImageTransfer``), the bytes sent by the browser
straight to the transfer's data URL (``/ovirt-engine/images/<ticket>``, in chunks, so it can
show progress), then finalize (``EndImageTransfer``) and the transfer's phase polled until it
ends. The CD dialog lists the ISO files of the active domains with "[Eject]" first and runs
``ChangeCd`` on a running VM (atomic on its host) or ``SetNextRunCd`` on a stopped one.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from sqlalchemy.orm import Session
from starlette.responses import JSONResponse, Response

from virtyard.engine.api.types.base import Model
from virtyard.engine.commands.cdrom import ChangeCd, SetNextRunCd
from virtyard.engine.commands.image_disks import AddIsoDisk
from virtyard.engine.commands.image_transfers import AddImageTransfer, EndImageTransfer
from virtyard.engine.commands.lun_disks import RemoveDisk
from virtyard.engine.queries import storage_domains as domain_queries
from virtyard.engine.queries import transfers as transfer_queries
from virtyard.engine.queries import vms as vm_queries
from virtyard.engine.ui.vm_actions import CHANGED
from virtyard.engine.ui.web import SECURITY_HEADERS, Fault, Ui, page

RUNNING = ("up", "paused")
# The browser sends an upload in pieces of this size (one progress step each).
CHUNK = 4 << 20


def domain_rows(tx: Session) -> list[dict[str, Any]]:
    """Each storage domain with its ISO files (the API's ``storagedomains/{id}/files``)."""
    rows = []
    for domain in domain_queries.list_domains(tx):
        files = transfer_queries.list_files(tx, domain["id"])
        units = domain["storage"]["volume_group"]["logical_units"]
        rows.append({"domain": domain, "files": files,
                     "wwids": [u["id"] for u in units]})
    return rows


@page
async def domains(ui: Ui) -> Response:
    rows = await ui.read(domain_rows)
    template = "_domains_table.html" if ui.field("fragment") else "storage.html"
    return ui.render(template, rows=rows, chunk=CHUNK)


def _json(value: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(value, status_code=status, headers=SECURITY_HEADERS)


@page
async def start_upload(ui: Ui) -> Response:
    """An empty ISO disk of the file's size on the domain, and a transfer into it."""
    size = ui.field("size")
    if not size.isdigit():
        return ui.failure(Fault("Incomplete parameters", "Choose a file to upload.",
                                "INCOMPLETE_PARAMS", 400))
    alias = ui.field("alias")
    disk_id = await ui.run(AddIsoDisk(alias=alias, provisioned_size=int(size),
                                      domain_id=ui.param("id")))
    try:
        transfer_id = await ui.run(AddImageTransfer(disk_id))
    except Exception:
        # The disk must not stay behind empty: the same clean-up a cancelled transfer does.
        await ui.run(RemoveDisk(disk_id))
        raise
    model = await ui.read(lambda tx: transfer_queries.get_transfer(tx, ui.services,
                                                                   transfer_id, with_url=True))
    # The data URL on this site, as the page reached it (the engine is also the proxy).
    path = urllib.parse.urlsplit(str(model.get("transfer_url", ""))).path
    return _json({"transfer": transfer_id, "disk": disk_id, "url": path, "chunk": CHUNK})


@page
async def finish_upload(ui: Ui) -> Response:
    transfer_id = ui.param("id")
    cancel = ui.field("cancel") == "1"
    await ui.run(EndImageTransfer(transfer_id, cancel=cancel))
    return _json({"ok": True})


def _transfer(tx: Session, ui: Ui, transfer_id: str) -> Model:
    return transfer_queries.get_transfer(tx, ui.services, transfer_id, with_url=False)


@page
async def upload_status(ui: Ui) -> Response:
    """The transfer's phase; when it has ended, the message to show."""
    model = await ui.read(_transfer, ui, ui.param("id"))
    phase = str(model.get("phase", ""))
    if phase == "finished_success":
        return ui.message("The ISO was uploaded and verified.")
    if phase.startswith(("finished", "cancelled")):
        return ui.failure(Fault("Operation Failed", str(model.get("description") or
                                                       f"The upload ended: {phase}."),
                                "TRANSFER_FAILED", 409))
    return _json({"phase": phase, "transferred": model.get("transferred")}, 202)


def _cd_choices(tx: Session, vm_id: str) -> dict[str, Any]:
    vm = vm_queries.get_vm(tx, vm_id)
    running = vm["status"] in RUNNING
    cds = vm_queries.list_cdroms(tx, vm_id, current=running)
    current = str(cds[0].get("file", {}).get("id", "")) if cds else ""
    files: list[dict[str, str]] = []
    for domain in domain_queries.list_domains(tx, "status=active"):
        files.extend({"id": f["id"], "name": f["name"], "domain": domain["name"]}
                     for f in transfer_queries.list_files(tx, domain["id"]))
    return {"vm": vm, "files": files, "current": current, "running": running}


@page
async def cd_dialog(ui: Ui) -> Response:
    ui.require_write()
    return ui.render("_cd_dialog.html", **await ui.read(_cd_choices, ui.param("id")))


@page
async def change_cd(ui: Ui) -> Response:
    vm_id, file_id = ui.param("id"), ui.field("file")
    values = await ui.read(_cd_choices, vm_id)
    name = values["vm"]["name"]
    if values["running"]:
        await ui.run(ChangeCd(vm_id, file_id))
    else:
        await ui.run(SetNextRunCd(vm_id, file_id))
    chosen = next((f["name"] for f in values["files"] if f["id"] == file_id), file_id)
    text = (f"Ejected the CD of VM {name}." if not file_id else
            f"VM {name} has {chosen} in its CD drive." if values["running"] else
            f"VM {name} will start with {chosen} in its CD drive.")
    response = ui.message(text)
    response.headers.update(CHANGED)
    return response
