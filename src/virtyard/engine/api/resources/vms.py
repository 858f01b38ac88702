"""``/vms``: list, get, add, remove; a VM's disk attachments and its CD-ROM (show, load, eject)."""

from __future__ import annotations

from typing import Any

from virtyard.engine.api import follow
from virtyard.engine.api.faults import bad_request, incomplete, not_found
from virtyard.engine.api.routing import (
    ALL_CONTENT,
    ASYNC,
    FOLLOW,
    GET_QUERY,
    LIST_QUERY,
    ROUTES,
    ApiRequest,
    QueryParam,
)
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.disks import CDROM, DISK_ATTACHMENT
from virtyard.engine.api.types.vms import VM
from virtyard.engine.commands.base import run
from virtyard.engine.commands.cd_media import CDROM_ID
from virtyard.engine.commands.cdrom import ChangeCd, SetNextRunCd
from virtyard.engine.commands.update_vm import UpdateVm
from virtyard.engine.commands.vms import AddVm, Ref, RemoveVm
from virtyard.engine.queries import disks as _disks  # noqa: F401  (registers follow=…disk)
from virtyard.engine.queries import vms as queries

DETACH_ONLY = QueryParam("detach_only", "boolean",
                         "Keep the VM's disks, detached (default: removed with the VM).")
FORCE = QueryParam("force", "boolean", "Accepted for compatibility.")
CURRENT = QueryParam("current", "boolean",
                     "The CD the running VM has now, instead of the one for the next run.")
FILTER = QueryParam("filter", "boolean", "Accepted for compatibility (admins see all).")
NEXT_RUN = QueryParam("next_run", "boolean", "Accepted for compatibility.")


@ROUTES.get("/vms", returns=VM, many=True, query=(*LIST_QUERY, FILTER))
def list_vms(req: ApiRequest) -> list[Model]:
    """The VMs by name (``search=name=… and status=up``, ``max``, ``follow``)."""
    tree = follow.parse(VM, req.text("follow"))
    with req.services.db.read() as tx:
        return queries.list_vms(tx, req.text("search"),
                                case_sensitive=req.flag("case_sensitive", True),
                                limit=req.integer("max"), tree=tree)


@ROUTES.get("/vms/{id}", returns=VM, query=(*GET_QUERY, FILTER, NEXT_RUN))
def get_vm(req: ApiRequest) -> Model:
    """One VM."""
    tree = follow.parse(VM, req.text("follow"))
    with req.services.db.read() as tx:
        return queries.get_vm(tx, req.path["id"], tree)


def _ref(value: Model | None) -> Ref:
    value = value or {}
    return Ref(id=value.get("id") or None, name=value.get("name") or None)


def add_vm_command(body: Model) -> AddVm:
    """The AddVm a ``<vm>`` asks for: only what the request says, the command's defaults for
    the rest."""
    if not body.get("name"):
        raise incomplete("Vm", "name")
    for name in ("disk_attachments", "cdroms"):
        if body.get(name):
            raise bad_request(f"Vm {name} cannot be given when adding a VM: add it first, then "
                              f"use /vms/{{id}}/{name.replace('_', '')}", "NOT_SUPPORTED")
    hosts = (body.get("placement_policy") or {}).get("hosts") or []
    if any(not (h.get("id") or h.get("name")) for h in hosts):
        raise incomplete("Vm", "placement_policy.hosts.id|name")
    args: dict[str, Any] = {"name": body["name"], "cluster": _ref(body.get("cluster")),
                            "template": _ref(body.get("template")),
                            "placement": [_ref(h) for h in hosts]}
    topology = (body.get("cpu") or {}).get("topology") or {}
    os = body.get("os") or {}
    ha = body.get("high_availability") or {}
    for arg, value in (("memory", body.get("memory")), ("sockets", topology.get("sockets")),
                       ("cores", topology.get("cores")), ("threads", topology.get("threads")),
                       ("os_type", os.get("type")), ("kernel", os.get("kernel")),
                       ("initrd", os.get("initrd")), ("cmdline", os.get("cmdline")),
                       ("ha_enabled", ha.get("enabled")), ("ha_priority", ha.get("priority")),
                       ("description", body.get("description")),
                       ("comment", body.get("comment"))):
        if value is not None:
            args[arg] = value
    return AddVm(**args)


@ROUTES.post("/vms", body=VM, returns=VM, status=201,
             query=(ASYNC, QueryParam("clone", "boolean", "Accepted for compatibility.")))
def add_vm(req: ApiRequest) -> Model:
    """Add a VM (status down): name; cluster by id or name (Default); template Blank; memory,
    CPU topology, OS and direct kernel boot, high availability, placement hosts."""
    vm = run(add_vm_command(req.body or {}), req.ctx())
    with req.services.db.read() as tx:
        return queries.get_vm(tx, vm.id)


@ROUTES.put("/vms/{id}", body=VM, returns=VM, query=(ASYNC, NEXT_RUN))
def update_vm(req: ApiRequest) -> Model:
    """Update a VM: name, description, comment, memory, CPU topology, high availability
    (only what the body names; memory and CPU of a running VM apply at its next run)."""
    body = req.body or {}
    topology = (body.get("cpu") or {}).get("topology") or {}
    ha = body.get("high_availability") or {}
    args = {arg: value for arg, value in (
        ("name", body.get("name")), ("description", body.get("description")),
        ("comment", body.get("comment")), ("memory", body.get("memory")),
        ("sockets", topology.get("sockets")), ("cores", topology.get("cores")),
        ("threads", topology.get("threads")), ("ha_enabled", ha.get("enabled")),
        ("ha_priority", ha.get("priority"))) if value is not None}
    run(UpdateVm(req.path["id"], **args), req.ctx())
    with req.services.db.read() as tx:
        return queries.get_vm(tx, req.path["id"])


@ROUTES.delete("/vms/{id}", query=(ASYNC, DETACH_ONLY, FORCE))
def remove_vm(req: ApiRequest) -> None:
    """Remove a VM that is down with its disks (``detach_only=true``: keep the disks; a disk
    another VM still uses is always kept)."""
    run(RemoveVm(req.path["id"], detach_only=req.flag("detach_only")), req.ctx())


@ROUTES.get("/vms/{id}/diskattachments", returns=DISK_ATTACHMENT, many=True,
            query=(FOLLOW,))
def list_disk_attachments(req: ApiRequest) -> list[Model]:
    """The VM's disk attachments (``follow=disk`` renders each disk inline)."""
    tree = follow.parse(DISK_ATTACHMENT, req.text("follow"))
    with req.services.db.read() as tx:
        return queries.list_attachments(tx, req.path["id"], tree)


@ROUTES.get("/vms/{id}/diskattachments/{attachment_id}", returns=DISK_ATTACHMENT,
            query=(FOLLOW,))
def get_disk_attachment(req: ApiRequest) -> Model:
    """One disk attachment (its id is the disk's)."""
    tree = follow.parse(DISK_ATTACHMENT, req.text("follow"))
    with req.services.db.read() as tx:
        return queries.get_attachment(tx, req.path["id"], req.path["attachment_id"], tree)


@ROUTES.get("/vms/{id}/cdroms", returns=CDROM, many=True, query=(CURRENT, FOLLOW))
def list_cdroms(req: ApiRequest) -> list[Model]:
    """The VM's CD-ROM (always exactly one)."""
    tree = follow.parse(CDROM, req.text("follow"))
    with req.services.db.read() as tx:
        return queries.list_cdroms(tx, req.path["id"], current=req.flag("current"), tree=tree)


@ROUTES.get("/vms/{id}/cdroms/{cdrom_id}", returns=CDROM, query=(CURRENT, FOLLOW, ALL_CONTENT))
def get_cdrom(req: ApiRequest) -> Model:
    """The VM's CD-ROM (id 00000000-0000-0000-0000-000000000000)."""
    tree = follow.parse(CDROM, req.text("follow"))
    with req.services.db.read() as tx:
        return queries.get_cdrom(tx, req.path["id"], req.path["cdrom_id"],
                                 current=req.flag("current"), tree=tree)


@ROUTES.put("/vms/{id}/cdroms/{cdrom_id}", body=CDROM, returns=CDROM, query=(CURRENT,))
def update_cdrom(req: ApiRequest) -> Model:
    """Load, change or eject the CD: ``current=true`` on the running VM (atomically, on its
    host), else for the next run. ``<file id=""/>`` ejects; a ``<file/>`` without an id
    leaves the next run's CD as it is (as oVirt does)."""
    body = req.body or {}
    if req.path["cdrom_id"] != CDROM_ID:
        raise not_found("CD-ROM", req.path["cdrom_id"][:64])
    if "file" not in body:
        raise incomplete("Cdrom", "file", action="update")
    file_id = (body.get("file") or {}).get("id")
    current = req.flag("current")
    if current:
        run(ChangeCd(req.path["id"], str(file_id or "")), req.ctx())
    elif file_id is not None:
        run(SetNextRunCd(req.path["id"], str(file_id)), req.ctx())
    with req.services.db.read() as tx:
        return queries.get_cdrom(tx, req.path["id"], CDROM_ID, current=current)
