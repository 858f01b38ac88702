"""A VM's actions and disk attachments' changes: start, stop, shutdown, migrate; attach,
activate/deactivate (hot-plug), detach. Each is one command; nothing else happens here."""

from __future__ import annotations

from typing import Any

from virtyard.engine.api.faults import bad_request, incomplete
from virtyard.engine.api.resources.lun_disks import lun_disk_command
from virtyard.engine.api.routing import ROUTES, ApiRequest, QueryParam
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.common import ACTION
from virtyard.engine.api.types.disks import DISK_ATTACHMENT
from virtyard.engine.commands.attachments import AttachDisk, DetachDisk, UpdateAttachment
from virtyard.engine.commands.base import run
from virtyard.engine.commands.lun_disks import RemoveDisk
from virtyard.engine.commands.migrate_vm import MigrateVm
from virtyard.engine.commands.plug_disk import PlugDisk, UnplugDisk
from virtyard.engine.commands.run_vm import RunVm
from virtyard.engine.commands.stop_vm import StopVm
from virtyard.engine.queries import vms as queries

DETACH_ONLY = QueryParam("detach_only", "boolean",
                         "Keep the disk (default true); false also removes it.")
DONE = {"status": "complete"}


def _hosts_of(action: dict[str, Any]) -> list[str]:
    vm = action.get("vm") or {}
    hosts = ((vm.get("placement_policy") or {}).get("hosts")) or []
    return [str(h.get("id") or h.get("name")) for h in hosts if h.get("id") or h.get("name")]


@ROUTES.post("/vms/{id}/start", body=ACTION, returns=ACTION)
def start_vm(req: ApiRequest) -> Model:
    """Run the VM on a host that proves it sees every LUN (``vm.placement_policy.hosts``:
    the hosts to try for this run, the first preferred)."""
    run(RunVm(req.path["id"], prefer=_hosts_of(req.body or {})), req.ctx())
    return DONE


@ROUTES.post("/vms/{id}/stop", body=ACTION, returns=ACTION)
def stop_vm(req: ApiRequest) -> Model:
    """Power the VM off; its host releases the VM's storage connections."""
    run(StopVm(req.path["id"]), req.ctx())
    return DONE


@ROUTES.post("/vms/{id}/shutdown", body=ACTION, returns=ACTION)
def shutdown_vm(req: ApiRequest) -> Model:
    """Ask the guest to shut down (waits for it, at most a minute)."""
    run(StopVm(req.path["id"], graceful=True), req.ctx())
    return DONE


@ROUTES.post("/vms/{id}/migrate", body=ACTION, returns=ACTION)
def migrate_vm(req: ApiRequest) -> Model:
    """Live-migrate to ``host`` (or the best other host), proven to see every LUN first."""
    host = (req.body or {}).get("host") or {}
    run(MigrateVm(req.path["id"], host_id=host.get("id"), host_name=host.get("name")),
        req.ctx())
    return DONE


@ROUTES.post("/vms/{id}/diskattachments", body=DISK_ATTACHMENT, returns=DISK_ATTACHMENT,
             status=201)
def attach_disk(req: ApiRequest) -> Model:
    """Attach a disk (``<disk id=…/>``, or a new LUN disk given whole); ``active`` on a running
    VM plugs it at once."""
    body = req.body or {}
    disk = body.get("disk") or {}
    vm_id = req.path["id"]
    if not disk:
        raise incomplete("DiskAttachment", "disk")
    disk_id = disk.get("id")
    if not disk_id:
        if not disk.get("lun_storage"):
            raise incomplete("DiskAttachment", "disk.id")
        disk_id = run(lun_disk_command(disk), req.ctx()).disk_id
    interface = body.get("interface") or disk.get("interface") or "virtio_scsi"
    active = body.get("active")
    plug_now = run(AttachDisk(
        vm_id, disk_id, interface=interface,
        bootable=bool(body.get("bootable", disk.get("bootable", False))),
        read_only=bool(body.get("read_only", disk.get("read_only", False))),
        pass_discard=bool(body.get("pass_discard", False)),
        uses_scsi_reservation=bool(body.get("uses_scsi_reservation", False)),
        active=True if active is None else bool(active)), req.ctx())
    if plug_now:
        run(PlugDisk(vm_id, disk_id), req.ctx())
    with req.services.db.read() as tx:
        return queries.get_attachment(tx, vm_id, disk_id)


@ROUTES.put("/vms/{id}/diskattachments/{attachment_id}", body=DISK_ATTACHMENT,
            returns=DISK_ATTACHMENT)
def update_disk_attachment(req: ApiRequest) -> Model:
    """Activate or deactivate (hot-plug/unplug on a running VM); change how it is attached."""
    body = req.body or {}
    vm_id, disk_id = req.path["id"], req.path["attachment_id"]
    if body.get("disk") and body["disk"].get("id") not in (None, disk_id):
        raise bad_request("The attachment's disk cannot be changed", "DISK_MISMATCH")
    active = body.get("active")
    if active is False:
        with req.services.db.read() as tx:
            plugged = queries.get_attachment(tx, vm_id, disk_id).get("active")
        if plugged:
            run(UnplugDisk(vm_id, disk_id), req.ctx())
    changes = {k: body.get(k) for k in ("interface", "bootable", "read_only", "pass_discard")}
    if any(v is not None for v in changes.values()):
        run(UpdateAttachment(vm_id, disk_id, **changes), req.ctx())
    if active is True:
        with req.services.db.read() as tx:
            plugged = queries.get_attachment(tx, vm_id, disk_id).get("active")
        if not plugged:
            run(PlugDisk(vm_id, disk_id), req.ctx())
    with req.services.db.read() as tx:
        return queries.get_attachment(tx, vm_id, disk_id)


@ROUTES.delete("/vms/{id}/diskattachments/{attachment_id}", query=(DETACH_ONLY,))
def detach_disk(req: ApiRequest) -> None:
    """Detach (deactivate it first on a running VM); ``detach_only=false`` removes it too."""
    vm_id, disk_id = req.path["id"], req.path["attachment_id"]
    run(DetachDisk(vm_id, disk_id), req.ctx())
    if not req.flag("detach_only", True):
        run(RemoveDisk(disk_id), req.ctx())
