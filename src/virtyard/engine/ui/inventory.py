"""The UI's read views: hosts, VMs, one VM with its disks, disks, events. Each page has a
fragment that htmx polls for live updates; every read is one of the engine's queries (the
ones the REST API renders), so the UI shows exactly what the API says.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import QueryParams
from starlette.responses import RedirectResponse, Response

from virtyard.engine.api import follow
from virtyard.engine.api.resources import hosts as host_resource
from virtyard.engine.api.routing import ApiRequest
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.disks import DISK, DISK_ATTACHMENT
from virtyard.engine.api.types.vms import VM
from virtyard.engine.db.models import BaseDisk
from virtyard.engine.queries import disks as disk_queries
from virtyard.engine.queries import events as event_queries
from virtyard.engine.queries import hosts as host_queries
from virtyard.engine.queries import vms as vm_queries
from virtyard.engine.ui.web import PREFIX, SECURITY_HEADERS, Ui, page

EVENTS_SHOWN = 200
# VM states in which an action is offered (the commands decide; this only avoids buttons
# that can never work).
RUNNABLE = ("down",)
STOPPABLE = ("up", "paused", "powering_up", "wait_for_launch", "migrating", "unknown",
             "not_responding", "powering_down", "reboot_in_progress")
MIGRATABLE = ("up",)


def host_names(tx: Session) -> dict[str, str]:
    return {h["id"]: h["name"] for h in host_queries.list_hosts(tx)}


def iso_names(tx: Session, ids: set[str]) -> dict[str, str]:
    """ISO disk id → alias, for the CD column (a path that is no disk shows as it is)."""
    ids = {i for i in ids if i}
    if not ids:
        return {}
    rows = tx.execute(select(BaseDisk.id, BaseDisk.alias).where(BaseDisk.id.in_(ids)))
    return {row[0]: row[1] for row in rows}


def vm_rows(tx: Session) -> dict[str, Any]:
    vms = vm_queries.list_vms(tx, tree=follow.parse(VM, "cdroms"))
    current = {vm["id"]: _current_cd(tx, vm["id"]) for vm in vms if vm["status"] != "down"}
    isos = iso_names(tx, {*current.values(),
                          *(cd.get("file", {}).get("id", "") for vm in vms
                            for cd in vm.get("cdroms", []))})
    return {"vms": vms, "hosts": host_names(tx), "current_cd": current, "isos": isos}


def _current_cd(tx: Session, vm_id: str) -> str:
    cds = vm_queries.list_cdroms(tx, vm_id, current=True)
    return str(cds[0].get("file", {}).get("id", "")) if cds else ""


def vm_view(tx: Session, vm_id: str) -> dict[str, Any]:
    vm = vm_queries.get_vm(tx, vm_id, follow.parse(VM, "cdroms"))
    attachments = vm_queries.list_attachments(tx, vm_id, follow.parse(DISK_ATTACHMENT, "disk"))
    cd = _current_cd(tx, vm_id) if vm["status"] != "down" else \
        str(vm["cdroms"][0].get("file", {}).get("id", "")) if vm.get("cdroms") else ""
    return {"vm": vm, "attachments": attachments, "hosts": host_names(tx), "cd": cd,
            "isos": iso_names(tx, {cd})}


def wwid_of(disk: Model) -> str:
    units = (disk.get("lun_storage") or {}).get("logical_units") or [{}]
    return str(units[0].get("id", ""))


def disk_rows(tx: Session) -> dict[str, Any]:
    """The disks with the VMs they are attached to, and for ISO disks the VMs whose CD drive
    holds them (now, or for the next run of a stopped VM)."""
    disks = disk_queries.list_disks(tx, tree=follow.parse(DISK, "vms"))
    vms = vm_rows(tx)
    in_cd: dict[str, list[Model]] = {}
    for vm in vms["vms"]:
        cd = vms["current_cd"].get(vm["id"]) if vm["status"] != "down" else \
            (vm.get("cdroms") or [{}])[0].get("file", {}).get("id", "")
        if cd:
            in_cd.setdefault(cd, []).append(vm)
    return {"disks": disks, "in_cd": in_cd}


@page
async def home(ui: Ui) -> Response:
    return RedirectResponse(PREFIX + "/vms", status_code=303, headers=SECURITY_HEADERS)


@page
async def hosts(ui: Ui) -> Response:
    rows = await ui.read(host_queries.list_hosts)
    template = "_hosts_table.html" if ui.field("fragment") else "hosts.html"
    return ui.render(template, hosts=rows)


def host_luns(ui: Ui, host_id: str, report_status: bool) -> list[Model]:
    """The LUNs a host sees, used ones with why: the REST API's ``hosts/{id}/storage``
    handler itself (one host call joined with the database)."""
    request = ApiRequest(ui.services, ui.principal, {"id": host_id},
                         QueryParams({"report_status": str(report_status).lower()}), None)
    units: list[Model] = []
    for storage in host_resource.host_storage(request):
        units.extend(storage["logical_units"])
    return units


@page
async def host_lun_count(ui: Ui) -> Response:
    units = await ui.call(host_luns, ui, ui.param("id"), False)
    return ui.render("_text.html", text=str(len(units)))


@page
async def vms(ui: Ui) -> Response:
    values = await ui.read(vm_rows)
    template = "_vms_table.html" if ui.field("fragment") else "vms.html"
    return ui.render(template, runnable=RUNNABLE, stoppable=STOPPABLE,
                     migratable=MIGRATABLE, **values)


@page
async def vm(ui: Ui) -> Response:
    values = await ui.read(vm_view, ui.param("id"))
    fragment = ui.field("fragment")
    template = {"disks": "_vm_disks.html", "general": "_vm_general.html"}.get(fragment,
                                                                               "vm.html")
    return ui.render(template, runnable=RUNNABLE, stoppable=STOPPABLE,
                     migratable=MIGRATABLE, wwid_of=wwid_of, **values)


@page
async def disks(ui: Ui) -> Response:
    values = await ui.read(disk_rows)
    template = "_disks_table.html" if ui.field("fragment") else "disks.html"
    return ui.render(template, wwid_of=wwid_of, **values)


@page
async def events(ui: Ui) -> Response:
    rows = await ui.read(lambda tx: event_queries.list_events(tx, limit=EVENTS_SHOWN))
    template = "_events_rows.html" if ui.field("fragment") else "events.html"
    return ui.render(template, events=rows)
