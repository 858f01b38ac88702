"""New disk → Direct LUN: pick a host, discover targets (optional CHAP), log in to one or all,
choose a LUN from the host's list (used ones greyed out with the reason, never hidden), and
add it as a disk — optionally attached to a VM and activated at once.

Each step is the engine command the REST API runs for it (``DiscoverTargets``, ``IscsiLogin``,
``hosts/{id}/storage``, ``AddLunDisk``, ``AttachDisk`` + ``PlugDisk``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session
from starlette.responses import Response

from virtyard.engine.commands.attachments import INTERFACES
from virtyard.engine.commands.lun_disks import AddLunDisk
from virtyard.engine.commands.storage import DEFAULT_PORT, DiscoverTargets, IscsiLogin, Portal
from virtyard.engine.queries import hosts as host_queries
from virtyard.engine.queries import vms as vm_queries
from virtyard.engine.ui.inventory import host_luns
from virtyard.engine.ui.vm_actions import attach_and_plug
from virtyard.engine.ui.web import Fault, Ui, fault_of, page

SEP = "|"


@dataclass(frozen=True)
class TargetRef:
    """A discovered target as the forms carry it: ``address|port|portal|iqn``."""

    address: str
    port: int
    portal: str
    target: str

    @property
    def value(self) -> str:
        return SEP.join((self.address, str(self.port), self.portal, self.target))

    @classmethod
    def parse(cls, value: str) -> TargetRef | None:
        parts = value.split(SEP)
        if len(parts) != 4 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2] or "1", parts[3])


def _port(text: str) -> int:
    return int(text) if text.isdigit() and len(text) < 6 else DEFAULT_PORT if not text else -1


def _wizard(tx: Session) -> dict[str, Any]:
    return {"hosts": [h for h in host_queries.list_hosts(tx) if h["status"] == "up"],
            "vms": vm_queries.list_vms(tx), "interfaces": INTERFACES}


@page
async def wizard(ui: Ui) -> Response:
    ui.require_write()
    values = await ui.read(_wizard)
    return ui.render("new_lun.html", selected_vm=ui.field("vm"), **values)


def _chap(ui: Ui) -> tuple[str, str]:
    if not ui.flag("chap"):
        return "", ""
    return ui.field("chap_user"), ui.form.get("chap_password", "")


@page
async def discover(ui: Ui) -> Response:
    user, password = _chap(ui)
    portal = Portal(address=ui.field("address"), port=_port(ui.field("port")),
                    user=user, password=password)
    found = await ui.run(DiscoverTargets(ui.field("host"), portal))
    targets = [TargetRef(t["address"], int(t["port"]), str(t["portal"]), t["target"])
               for t in found]
    return ui.render("_targets.html", targets=targets, logged_in=set(), failures={},
                     host=ui.field("host"))


@page
async def login(ui: Ui) -> Response:
    """Log in to the targets named (one, or all of those discovered)."""
    user, password = _chap(ui)
    every = [t for t in (TargetRef.parse(v) for v in ui.values("discovered")) if t is not None]
    chosen = every if ui.field("all") else \
        [t for t in (TargetRef.parse(v) for v in ui.values("target")) if t is not None]
    logged_in = {t.value for t in (TargetRef.parse(v) for v in ui.values("logged_in")) if t}
    failures: dict[str, Fault] = {}
    for ref in chosen:
        try:
            await ui.run(IscsiLogin(ui.field("host"), Portal(
                address=ref.address, port=ref.port, target=ref.target, portal=ref.portal,
                user=user, password=password)))
            logged_in.add(ref.value)
        except Exception as exc:  # each target's own result, shown on its row
            failures[ref.value] = fault_of(exc)
    response = ui.render("_targets.html", targets=every or chosen, logged_in=logged_in,
                         failures=failures, host=ui.field("host"))
    if len(failures) < len(chosen):
        response.headers["HX-Trigger"] = "luns-changed"
    return response


@page
async def luns(ui: Ui) -> Response:
    host_id = ui.field("host")
    if not host_id:
        return ui.render("_luns.html", units=[], host="", lun_value=lun_value,
                         empty="Pick a host first.")
    units = await ui.call(host_luns, ui, host_id, True)
    return ui.render("_luns.html", units=units, host=host_id, lun_value=lun_value,
                     empty="The host sees no LUN: discover and log in to a target.")


def lun_value(unit: dict[str, Any]) -> str:
    """A LUN row's radio value: ``wwid|address|port|portal|iqn`` (the portal to reach it)."""
    return SEP.join((str(unit.get("id", "")), str(unit.get("address") or ""),
                     str(unit.get("port") or DEFAULT_PORT), str(unit.get("portal") or "1"),
                     str(unit.get("target") or "")))


def sgio_of(passthrough: bool, privileged: bool) -> str:
    """oVirt's two check boxes → ``sgio``: off, filtered, or unfiltered (privileged I/O)."""
    if not passthrough:
        return "disabled"
    return "unfiltered" if privileged else "filtered"


def _vm_name(tx: Session, vm_id: str) -> str:
    return str(vm_queries.get_vm(tx, vm_id)["name"])


@page
async def create(ui: Ui) -> Response:
    parts = ui.field("lun").split(SEP)
    if len(parts) != 5 or not parts[0]:
        return ui.failure(Fault("Incomplete parameters", "Choose a LUN from the table.",
                                "INCOMPLETE_PARAMS", 400))
    wwid, address, port, portal, target = parts
    user, password = _chap(ui)
    alias = ui.field("alias") or None
    added = await ui.run(AddLunDisk(
        wwid=wwid, portals=[Portal(address=address, port=_port(port), target=target,
                                   portal=portal, user=user, password=password)],
        alias=alias, description=ui.field("description"), shareable=ui.flag("shareable"),
        sgio=sgio_of(ui.flag("passthrough"), ui.flag("privileged")),
        host_id=ui.field("host") or None))
    text = f"Disk {alias or wwid} added."
    vm_id = ui.field("vm")
    if vm_id:
        name = await ui.read(_vm_name, vm_id)
        try:
            await attach_and_plug(ui, vm_id, added.disk_id,
                                  interface=ui.field("interface", "virtio_scsi"),
                                  active=ui.flag("activate"))
        except Exception as exc:
            return ui.failure(fault_of(exc), prefix_text=f"{text} Attaching it to VM {name} "
                              "failed:")
        text += f" Attached to VM {name}" + (" and activated." if ui.flag("activate") else ".")
    response = ui.message(text, link=f"/vms/{vm_id}" if vm_id else "/disks",
                          link_text=f"VM {name} → Disks" if vm_id else "Disks")
    response.headers["HX-Trigger"] = "luns-changed"
    return response
