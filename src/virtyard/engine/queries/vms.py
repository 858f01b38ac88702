"""VMs, their disk attachments and CD-ROM, and the Blank template, as the API shows them.

Every function loads what a whole list needs in a fixed number of statements (columns, not ORM
objects, for lists: they are cheaper to build by the thousand); ``follow=`` paths are filled by
the fillers registered here (see ``api/follow.py``).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import and_, bindparam, select, true
from sqlalchemy.orm import Session, aliased

from virtyard.engine.api import follow
from virtyard.engine.api.codec import API_PREFIX
from virtyard.engine.api.faults import bad_request, not_found
from virtyard.engine.api.search import parse as parse_search
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.disks import CDROM, DISK_ATTACHMENT
from virtyard.engine.api.types.vms import VM
from virtyard.engine.commands.hosts import VM_ACTIVE
from virtyard.engine.commands.vms import BLANK_TEMPLATE_ID, BLANK_TEMPLATE_NAME
from virtyard.engine.db.models import (
    BaseDisk,
    Cluster,
    DiskVmElement,
    Host,
    Vm,
    VmDevice,
    VmDynamic,
    VmPlacementHost,
)
from virtyard.engine.queries.batch import AnyRow, AnySelect, gc_paused, ids_in
from virtyard.engine.queries.common import searched
from virtyard.engine.queries.hosts import cluster_model, host_model

# oVirt's CD-ROM id: every VM has exactly one drive, always this id.
CDROM_ID = "00000000-0000-0000-0000-000000000000"

_RUN_HOST = aliased(Host, name="run_host")
VM_SEARCH: dict[str, Any] = {
    "name": Vm.name, "id": Vm.id, "description": Vm.description, "comment": Vm.comment,
    "status": VmDynamic.status, "os": Vm.os_type, "cluster.id": Vm.cluster_id,
    "cluster": Cluster.name, "cluster.name": Cluster.name,
    "host": _RUN_HOST.name, "host.name": _RUN_HOST.name, "host.id": VmDynamic.run_on_host_id,
}
_NEEDS_HOST = {"host", "host.name"}
_NEEDS_CLUSTER = {"cluster", "cluster.name"}

_VM_COLUMNS = (Vm.id, Vm.name, Vm.description, Vm.comment, Vm.cluster_id, Vm.memory_bytes,
               Vm.cpu_sockets, Vm.cpu_cores, Vm.cpu_threads, Vm.os_type, Vm.kernel, Vm.initrd,
               Vm.cmdline, Vm.ha_enabled, Vm.ha_priority, Vm.created_at, VmDynamic.status,
               VmDynamic.run_on_host_id)


def _vm_select(query: str = "") -> AnySelect:
    stmt = select(*_VM_COLUMNS).outerjoin(VmDynamic, VmDynamic.vm_id == Vm.id)
    fields = {term.field for term in parse_search(query)} if query else set()
    if fields & _NEEDS_HOST:
        stmt = stmt.outerjoin(_RUN_HOST, _RUN_HOST.id == VmDynamic.run_on_host_id)
    if fields & _NEEDS_CLUSTER:
        stmt = stmt.join(Cluster, Cluster.id == Vm.cluster_id)
    return stmt


def vm_model(row: AnyRow, placement: list[str]) -> Model:
    """One VM from its row (``_VM_COLUMNS``, unpacked by position: ten times cheaper than by
    name) and its placement hosts in order."""
    (vm_id, name, description, comment, cluster_id, memory, sockets, cores, threads, os_type,
     kernel, initrd, cmdline, ha_enabled, ha_priority, created_at, status, host_id) = row
    status = status or "down"
    os: Model = {"type": os_type, "boot": {"devices": ["hd"]}}
    if kernel:
        os["kernel"] = kernel
    if initrd:
        os["initrd"] = initrd
    if cmdline:
        os["cmdline"] = cmdline
    policy: Model = {"affinity": "migratable"}
    if placement:
        policy["hosts"] = [{"id": host} for host in placement]
    model: Model = {
        "id": vm_id, "name": name, "description": description, "comment": comment,
        "status": status, "memory": memory,
        "cpu": {"architecture": "x86_64",
                "topology": {"sockets": sockets, "cores": cores, "threads": threads}},
        "os": os,
        "high_availability": {"enabled": ha_enabled, "priority": ha_priority},
        "placement_policy": policy,
        "cluster": {"id": cluster_id},
        "template": {"id": BLANK_TEMPLATE_ID},
        "stateless": False, "type": "server", "origin": "virtyard",
        "creation_time": created_at, "delete_protected": False, "start_paused": False,
    }
    if host_id and status in VM_ACTIVE:
        model["host"] = {"id": host_id}
    return model


_PLACEMENTS = select(VmPlacementHost.vm_id, VmPlacementHost.host_id).order_by(
    VmPlacementHost.vm_id, VmPlacementHost.position)
# Single objects run prebuilt statements: building a SELECT costs more than running it here.
_VM_BY_ID = _vm_select().where(Vm.id == bindparam("vm_id"))
_HOSTS_OF_VM = (select(VmPlacementHost.host_id)
                .where(VmPlacementHost.vm_id == bindparam("vm_id"))
                .order_by(VmPlacementHost.position))


def _placements(tx: Session, vm_ids: list[str]) -> dict[str, list[str]]:
    if not vm_ids:
        return {}
    rows = tx.execute(_PLACEMENTS.where(ids_in(tx, VmPlacementHost.vm_id, vm_ids)))
    out: dict[str, list[str]] = {}
    for vm_id, host_id in rows:
        out.setdefault(vm_id, []).append(host_id)
    return out


def _vm_models(tx: Session, rows: list[AnyRow]) -> list[Model]:
    placements = _placements(tx, [r[0] for r in rows])
    return [vm_model(r, placements.get(r[0], [])) for r in rows]


def list_vms(tx: Session, query: str = "", *, case_sensitive: bool = True,
             limit: int | None = None, tree: follow.Tree | None = None) -> list[Model]:
    """The VMs by name (``search``, ``max``), with the ``follow`` tree filled in bulk."""
    stmt = searched(_vm_select(query).order_by(Vm.name), query, VM_SEARCH,
                    case_sensitive=case_sensitive, limit=limit)
    with gc_paused():
        models = _vm_models(tx, list(tx.execute(stmt)))
        follow.apply(tx, VM, models, tree or {})
    return models


def vm_models(tx: Session, vm_ids: Iterable[str]) -> dict[str, Model]:
    """VM models by id (the ones that exist), in two statements."""
    ids = list(dict.fromkeys(vm_ids))
    if not ids:
        return {}
    rows = list(tx.execute(_vm_select().where(ids_in(tx, Vm.id, ids))))
    return {m["id"]: m for m in _vm_models(tx, rows)}


def get_vm(tx: Session, vm_id: str, tree: follow.Tree | None = None) -> Model:
    row = tx.execute(_VM_BY_ID, {"vm_id": vm_id}).first()
    if row is None:
        raise not_found("VM", vm_id[:64])
    model = vm_model(row, list(tx.scalars(_HOSTS_OF_VM, {"vm_id": vm_id})))
    follow.apply(tx, VM, [model], tree or {})
    return model


# ------------------------------------------------------------------ disk attachments


def attachment_model(row: Sequence[Any]) -> Model:
    """One attachment (``_ATTACHMENT_COLUMNS``, by position): the disk_vm_element row (how)
    and the vm_device row (state)."""
    (vm_id, disk_id, is_boot, interface, pass_discard, scsi_reservation, plugged, readonly,
     logical_name) = row
    model: Model = {
        "id": disk_id, "href": f"{API_PREFIX}/vms/{vm_id}/diskattachments/{disk_id}",
        "active": bool(plugged), "bootable": is_boot, "interface": interface,
        "pass_discard": pass_discard, "read_only": bool(readonly),
        "uses_scsi_reservation": scsi_reservation,
        "disk": {"id": disk_id}, "vm": {"id": vm_id},
    }
    if logical_name:
        model["logical_name"] = logical_name
    return model


_ATTACHMENT_COLUMNS = (DiskVmElement.vm_id, DiskVmElement.disk_id, DiskVmElement.is_boot,
                       DiskVmElement.disk_interface, DiskVmElement.pass_discard,
                       DiskVmElement.uses_scsi_reservation, VmDevice.is_plugged,
                       VmDevice.is_readonly, VmDevice.logical_name)
_DEVICE_OF_ATTACHMENT = and_(VmDevice.vm_id == DiskVmElement.vm_id,
                             VmDevice.device_id == DiskVmElement.disk_id)
_ATTACHMENTS = (select(*_ATTACHMENT_COLUMNS)
                .join(BaseDisk, BaseDisk.id == DiskVmElement.disk_id)
                .outerjoin(VmDevice, _DEVICE_OF_ATTACHMENT)
                .order_by(BaseDisk.alias, DiskVmElement.disk_id))


def _of_vm(attachment: Any) -> AnySelect:
    """One VM's attachments (those matching ``attachment``) and whether the VM exists, in
    one statement: a row with the VM's id and NULL attachment columns when it has none."""
    return (select(Vm.id.label("found"), *_ATTACHMENT_COLUMNS)
            .outerjoin(DiskVmElement, and_(DiskVmElement.vm_id == Vm.id, attachment))
            .outerjoin(BaseDisk, BaseDisk.id == DiskVmElement.disk_id)
            .outerjoin(VmDevice, _DEVICE_OF_ATTACHMENT)
            .where(Vm.id == bindparam("vm_id"))
            .order_by(BaseDisk.alias, DiskVmElement.disk_id))


_ATTACHMENTS_OF_VM = _of_vm(true())
_ATTACHMENT_OF_VM = _of_vm(DiskVmElement.disk_id == bindparam("disk_id"))


def attachments_by_vm(tx: Session, vm_ids: Iterable[str]) -> dict[str, list[Model]]:
    """Every attachment of the VMs ``vm_ids``, per VM, in one statement."""
    ids = list(vm_ids)
    if not ids:
        return {}
    out: dict[str, list[Model]] = {}
    for row in tx.execute(_ATTACHMENTS.where(ids_in(tx, DiskVmElement.vm_id, ids))):
        out.setdefault(row[0], []).append(attachment_model(row))
    return out


def _vm_attachments(tx: Session, stmt: AnySelect, params: dict[str, str]) -> list[Model]:
    rows = list(tx.execute(stmt, params))
    if not rows:
        raise not_found("VM", params["vm_id"][:64])
    return [attachment_model(row[1:]) for row in rows if row.disk_id is not None]


def list_attachments(tx: Session, vm_id: str, tree: follow.Tree | None = None) -> list[Model]:
    models = _vm_attachments(tx, _ATTACHMENTS_OF_VM, {"vm_id": vm_id})
    follow.apply(tx, DISK_ATTACHMENT, models, tree or {})
    return models


def get_attachment(tx: Session, vm_id: str, disk_id: str,
                   tree: follow.Tree | None = None) -> Model:
    models = _vm_attachments(tx, _ATTACHMENT_OF_VM, {"vm_id": vm_id, "disk_id": disk_id})
    if not models:
        raise not_found("Disk attachment", disk_id[:64])
    follow.apply(tx, DISK_ATTACHMENT, models, tree or {})
    return models[0]


# ------------------------------------------------------------------ CD-ROM


def cdrom_model(vm_id: str, iso: str) -> Model:
    """The VM's one drive; ``file`` only when it holds an ISO (as oVirt's CdRomMapper)."""
    model: Model = {"id": CDROM_ID, "href": f"{API_PREFIX}/vms/{vm_id}/cdroms/{CDROM_ID}",
                    "vm": {"id": vm_id}}
    if iso:
        model["file"] = {"id": iso}
    return model


def _cdrom_isos(tx: Session, vm_ids: list[str], current: bool) -> dict[str, str]:
    column = VmDynamic.current_cd if current else Vm.iso_path
    stmt = (select(Vm.id, column).outerjoin(VmDynamic, VmDynamic.vm_id == Vm.id)
            .where(ids_in(tx, Vm.id, vm_ids)))
    return {vm_id: iso or "" for vm_id, iso in tx.execute(stmt)}


def list_cdroms(tx: Session, vm_id: str, *, current: bool = False,
                tree: follow.Tree | None = None) -> list[Model]:
    """The VM's CD-ROM: the next run's ISO, or with ``current`` what the drive holds now."""
    isos = _cdrom_isos(tx, [vm_id], current)
    if vm_id not in isos:
        raise not_found("VM", vm_id[:64])
    models = [cdrom_model(vm_id, isos[vm_id])]
    follow.apply(tx, CDROM, models, tree or {})
    return models


def get_cdrom(tx: Session, vm_id: str, cdrom_id: str, *, current: bool = False,
              tree: follow.Tree | None = None) -> Model:
    cdrom = list_cdroms(tx, vm_id, current=current, tree=tree)[0]
    if cdrom_id != CDROM_ID:
        raise not_found("CD-ROM", cdrom_id[:64])
    return cdrom


# ------------------------------------------------------------------ templates

_BLANK_CREATED = datetime.datetime(2008, 4, 1, tzinfo=datetime.UTC)


def blank_template() -> Model:
    """The one template: Blank, as oVirt's (a VM definition with nothing in it)."""
    return {"id": BLANK_TEMPLATE_ID, "name": BLANK_TEMPLATE_NAME,
            "description": "Blank template", "comment": "", "status": "ok",
            "memory": 1 << 30,
            "cpu": {"architecture": "x86_64",
                    "topology": {"sockets": 1, "cores": 1, "threads": 1}},
            "os": {"type": "other", "boot": {"devices": ["hd"]}},
            "high_availability": {"enabled": False, "priority": 0},
            "stateless": False, "type": "server", "origin": "virtyard",
            "creation_time": _BLANK_CREATED}


def list_templates(query: str = "", *, case_sensitive: bool = True,
                   limit: int | None = None) -> list[Model]:
    """The templates (Blank), filtered by ``name``/``id`` the way searches are."""
    blank = blank_template()
    for term in parse_search(query):
        if term.field not in ("name", "id") or term.op not in ("=", "!="):
            raise bad_request(f"Search term '{term.field}{term.op}' is not known here (known: "
                              "id, name with = or !=)", "SEARCH_FIELD")
        pattern = ".*".join(re.escape(part) for part in term.value.split("*"))
        flags = 0 if case_sensitive else re.IGNORECASE
        if bool(re.fullmatch(pattern, str(blank[term.field]), flags)) != (term.op == "="):
            return []
    return [blank][:limit] if limit is not None else [blank]


def get_template(template_id: str) -> Model:
    if template_id != BLANK_TEMPLATE_ID:
        raise not_found("Template", template_id[:64])
    return blank_template()


# ------------------------------------------------------------------ follow


@follow.filler("vm", "disk_attachments")
def _fill_attachments(tx: Session, models: list[Model]) -> None:
    groups = attachments_by_vm(tx, [m["id"] for m in models])
    for m in models:
        m["disk_attachments"] = groups.get(m["id"], [])


@follow.filler("vm", "cdroms")
def _fill_cdroms(tx: Session, models: list[Model]) -> None:
    isos = _cdrom_isos(tx, [m["id"] for m in models], False)
    for m in models:
        m["cdroms"] = [cdrom_model(m["id"], isos.get(m["id"], ""))]


@follow.filler("vm", "cluster")
def _fill_cluster(tx: Session, models: list[Model]) -> None:
    ids = {m["cluster"]["id"] for m in models if m.get("cluster")}
    if not ids:
        return
    clusters = {c.id: cluster_model(c)
                for c in tx.scalars(select(Cluster).where(ids_in(tx, Cluster.id, ids)))}
    for m in models:
        if m.get("cluster") and m["cluster"]["id"] in clusters:
            m["cluster"] = clusters[m["cluster"]["id"]]


@follow.filler("vm", "host")
def _fill_host(tx: Session, models: list[Model]) -> None:
    ids = {m["host"]["id"] for m in models if m.get("host")}
    if not ids:
        return
    hosts = {h.id: host_model(h) for h in tx.scalars(select(Host).where(ids_in(tx, Host.id,
                                                                                 ids)))}
    for m in models:
        if m.get("host") and m["host"]["id"] in hosts:
            m["host"] = hosts[m["host"]["id"]]


@follow.filler("vm", "template")
def _fill_template(tx: Session, models: list[Model]) -> None:
    for m in models:
        m["template"] = blank_template()


def _fill_vm_refs(tx: Session, models: list[Model]) -> None:
    vms = vm_models(tx, {m["vm"]["id"] for m in models if m.get("vm")})
    for m in models:
        if m.get("vm") and m["vm"]["id"] in vms:
            m["vm"] = vms[m["vm"]["id"]]


follow.filler("disk_attachment", "vm")(_fill_vm_refs)
follow.filler("cdrom", "vm")(_fill_vm_refs)
