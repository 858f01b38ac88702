"""What one host reported about its VMs, written into the database (batched, only changes).

The input is untrusted (a broken or hostile agent): VM ids must be UUIDs, statuses known,
guest names device paths, lists bounded; anything else is dropped and logged, never stored
and never fatal. VMs with a flow in progress (run, stop, migrate, plug) belong to that flow
and are left alone. VMs the engine does not know are external: counted, logged once, never
touched. A VM the database has on this host that the host no longer reports (a complete
report only) is down: its storage connections there are released.
"""

from __future__ import annotations

import datetime
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands.cd_media import iso_of_volume
from virtyard.engine.db.models import Flow, Vm, VmDevice, VmDynamic, utcnow
from virtyard.engine.hosts import connections as conns
from virtyard.engine.hosts.vm_spec import DiskPlace

log = logging.getLogger("virtyard.engine.monitoring")

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                     r"[0-9a-fA-F]{12}$")
# What a guest may call a disk: a device path (Linux), or a Windows physical drive.
GUEST_NAME_RE = re.compile(r"^(/dev/[A-Za-z0-9_./:-]{1,100}|\\\\\.\\PHYSICALDRIVE\d{1,4})$")
MAX_VMS_PER_HOST = 20000
MAX_DEVICES_PER_VM = 512
MAX_HASH = 128
# The agent's statuses → the API's.
STATUS = {"up": "up", "powering up": "powering_up", "paused": "paused", "down": "down",
          "powering down": "powering_down", "migration source": "migrating",
          "migration destination": "migrating", "not responding": "not_responding",
          "reboot in progress": "reboot_in_progress", "saving state": "saving_state",
          "restoring state": "restoring_state", "wait for launch": "wait_for_launch"}
ACTIVE = ("up", "powering_up", "powering_down", "migrating", "paused", "wait_for_launch",
          "reboot_in_progress", "not_responding", "unknown", "saving_state",
          "restoring_state")


@dataclass(frozen=True)
class VmReport:
    vm_id: str
    status: str  # the API's
    hash: str
    reason: str = ""


@dataclass
class DeviceReport:
    """A VM's disks as the host's full list shows them: disk id → (guest name, address)."""

    vm_id: str
    hash: str
    disks: dict[str, tuple[str, dict[str, str] | None, int | None]]
    # The volume the CD-ROM drive holds ("" empty), None when no drive was reported.
    cd: str | None = None


@dataclass
class SyncResult:
    went_down: list[tuple[str, str]] = field(default_factory=list)  # (vm id, name)
    changed_vms: int = 0
    changed_devices: int = 0
    external: list[str] = field(default_factory=list)
    dropped: int = 0
    # VMs whose device report was written (others were busy or stale: read them again).
    devices_applied: list[str] = field(default_factory=list)


def parse_stats(raw: Any) -> tuple[list[VmReport], int]:
    """Valid VM reports from ``Host.getAllVmStats`` (or events); the number dropped."""
    out: list[VmReport] = []
    dropped = 0
    for item in raw[:MAX_VMS_PER_HOST] if isinstance(raw, list) else []:
        if not isinstance(item, dict):
            dropped += 1
            continue
        vm_id, status, hash_ = item.get("vmId"), item.get("status"), item.get("hash", "")
        api_status = STATUS.get(status.lower()) if isinstance(status, str) else None
        if not isinstance(vm_id, str) or not UUID_RE.match(vm_id) or api_status is None \
                or not isinstance(hash_, str) or len(hash_) > MAX_HASH:
            dropped += 1
            continue
        reason = item.get("reason", "")
        out.append(VmReport(vm_id.lower(), api_status, hash_,
                            reason[:500] if isinstance(reason, str) else ""))
    if isinstance(raw, list) and len(raw) > MAX_VMS_PER_HOST:
        dropped += len(raw) - MAX_VMS_PER_HOST
    return out, dropped


def parse_full_list(raw: Any) -> tuple[list[DeviceReport], int]:
    """Valid device reports from ``Host.getVMFullList``; the number of entries dropped."""
    out: list[DeviceReport] = []
    dropped = 0
    for vm in raw[:MAX_VMS_PER_HOST] if isinstance(raw, list) else []:
        if not isinstance(vm, dict) or not isinstance(vm.get("vmId"), str) \
                or not UUID_RE.match(vm["vmId"]):
            dropped += 1
            continue
        disks: dict[str, tuple[str, dict[str, str] | None, int | None]] = {}
        devices = vm.get("devices")
        cd: str | None = None
        for dev in devices[:MAX_DEVICES_PER_VM] if isinstance(devices, list) else []:
            if isinstance(dev, dict) and dev.get("device") == "cdrom":
                pdiv = dev.get("PDIV")
                volume = pdiv.get("volumeID") if isinstance(pdiv, dict) else ""
                cd = volume if isinstance(volume, str) and (
                    not volume or UUID_RE.match(volume)) else ""
                continue
            disk_id = dev.get("diskId") if isinstance(dev, dict) else None
            if not isinstance(disk_id, str) or not UUID_RE.match(disk_id):
                continue
            name = dev.get("guestName") or ""
            if not isinstance(name, str) or (name and not GUEST_NAME_RE.match(name)):
                log.warning("VM %s: dropped a guest name that is not a device path: %r",
                            vm["vmId"], str(name)[:80])
                dropped += 1
                name = ""
            address = dev.get("address")
            address = {str(k)[:32]: str(v)[:64] for k, v in list(address.items())[:8]} \
                if isinstance(address, dict) else None
            index = dev.get("index")
            disks[disk_id.lower()] = (name, address,
                                      index if isinstance(index, int) and 0 <= index < 1024
                                      else None)
        hash_ = vm.get("hash", "")
        out.append(DeviceReport(vm["vmId"].lower(),
                                hash_ if isinstance(hash_, str) and len(hash_) <= MAX_HASH
                                else "", disks, cd))
    return out, dropped


def unchanged(tx: Session, host_id: str, stats: list[VmReport], devices: list[DeviceReport],
              *, complete: bool, asked_at: datetime.datetime | None = None) -> SyncResult | None:
    """What :func:`apply` would return if it would write nothing; ``None`` if it would write.

    A read (columns, no ORM objects): a quiet host's report then costs no write transaction,
    which SQLite runs one at a time (``BEGIN IMMEDIATE``): with a hundred hosts those waits,
    not the work, made the cycle's wall time. The conditions are :func:`apply`'s."""
    if devices:
        return None
    reported = {r.vm_id: r for r in stats}
    rows = tx.execute(select(VmDynamic.vm_id, VmDynamic.status, VmDynamic.run_on_host_id,
                             VmDynamic.status_changed_at)
                      .join(Vm, Vm.id == VmDynamic.vm_id)
                      .where(_scope(host_id, list(reported), complete))).all()
    known = {row[0] for row in rows}
    busy = set(tx.scalars(select(Flow.vm_id).where(Flow.vm_id.in_(list(known)))))
    for vm_id, status, on_host, changed_at in rows:
        if vm_id in busy or (asked_at is not None and _aware(changed_at) > asked_at):
            continue
        report = reported.get(vm_id)
        if report is None or report.status == "down":
            if status in ACTIVE and on_host in (host_id, None):
                return None
        elif status != report.status or on_host != host_id:
            return None
    return SyncResult(external=sorted(set(reported) - known))


def _scope(host_id: str, reported: list[str], complete: bool) -> Any:
    """The VMs a report speaks for: those it lists, and (complete) all on the host."""
    listed = VmDynamic.vm_id.in_(reported)
    if not complete:
        return listed
    return or_(listed, (VmDynamic.run_on_host_id == host_id) & VmDynamic.status.in_(ACTIVE))


def apply(tx: Session, host_id: str, stats: list[VmReport], devices: list[DeviceReport], *,
          complete: bool, asked_at: datetime.datetime | None = None) -> SyncResult:
    """Write what changed; ``complete``: ``stats`` lists every VM the host runs.

    ``asked_at``: when the host was asked. A VM whose state the engine changed after that (a
    flow that ended meanwhile) is left alone: the report is older than what the database
    knows, and applying it would bring back a VM just stopped."""
    result = SyncResult()
    reported = {r.vm_id: r for r in stats}
    stmt = select(VmDynamic, Vm.name).join(Vm, Vm.id == VmDynamic.vm_id) \
        .where(_scope(host_id, list(reported), complete))
    known = {d.vm_id: (d, name) for d, name in tx.execute(stmt)}
    busy = set(tx.scalars(select(Flow.vm_id).where(Flow.vm_id.in_(list(known)))))
    result.external = sorted(set(reported) - set(known))
    stale = {vm_id for vm_id, (dynamic, _n) in known.items()
             if asked_at is not None and _aware(dynamic.status_changed_at) > asked_at}
    busy |= stale
    for vm_id, (dynamic, name) in known.items():
        if vm_id in busy:
            continue
        report = reported.get(vm_id)
        if report is None or report.status == "down":
            if dynamic.status in ACTIVE and (dynamic.run_on_host_id == host_id
                                             or dynamic.run_on_host_id is None):
                _went_down(tx, dynamic, name, host_id,
                           report.reason if report and report.reason else
                           "it no longer runs on its host")
                result.went_down.append((vm_id, name))
            continue
        if dynamic.status != report.status or dynamic.run_on_host_id != host_id:
            if dynamic.run_on_host_id not in (None, host_id) and dynamic.status in ACTIVE:
                log.warning("VM %s reported by host %s but runs on %s: left as it is", name,
                            host_id, dynamic.run_on_host_id)
                continue
            dynamic.status = report.status
            dynamic.run_on_host_id = host_id
            dynamic.status_changed_at = utcnow()
            result.changed_vms += 1
    for listed in devices:
        if listed.vm_id not in known or listed.vm_id in busy:
            continue
        result.changed_devices += _apply_devices(tx, listed)
        dynamic = known[listed.vm_id][0]
        dynamic.devices_hash = listed.hash
        if listed.cd is not None:  # what the drive really holds (after a crash, say)
            held = iso_of_volume(tx, listed.cd)
            if dynamic.current_cd != held:
                dynamic.current_cd = held
                result.changed_devices += 1
        result.devices_applied.append(listed.vm_id)
    return result


def _aware(when: datetime.datetime) -> datetime.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


def _went_down(tx: Session, dynamic: VmDynamic, name: str, host_id: str, reason: str) -> None:
    dynamic.status = "down"
    dynamic.run_on_host_id = None
    dynamic.migrating_to_host_id = None
    dynamic.exit_reason = reason
    dynamic.devices_hash = ""
    dynamic.current_cd = ""
    dynamic.status_changed_at = utcnow()
    conns.drop_owner(tx, conns.vm_owner(dynamic.vm_id))
    audit.record(tx, audit.VM_DOWN, audit.Ids(vm_id=dynamic.vm_id, host_id=host_id),
                 vm=name, reason=reason)


def _apply_devices(tx: Session, report: DeviceReport) -> int:
    """The VM's disk devices as the host has them: plugged, guest name, place."""
    changed = 0
    for device in tx.scalars(select(VmDevice).where(VmDevice.vm_id == report.vm_id,
                                                    VmDevice.type == "disk")):
        found = report.disks.get(device.device_id)
        plugged = found is not None
        name = found[0] if found else ""
        if device.is_plugged != plugged or device.logical_name != name:
            device.is_plugged = plugged
            device.logical_name = name
            changed += 1
        if found is not None and found[2] is not None:
            place = DiskPlace(found[2], found[1]).dumps()
            if device.address != place:
                device.address = place
    return changed


def mark_unknown(tx: Session, host_id: str) -> int:
    """A host that stopped answering: its VMs' state is unknown (never ``down``: they may
    well run, and the HA rules rely on that)."""
    rows = tx.scalars(select(VmDynamic).where(VmDynamic.run_on_host_id == host_id,
                                              VmDynamic.status.in_(ACTIVE),
                                              VmDynamic.status != "unknown"))
    count = 0
    for dynamic in rows:
        dynamic.status = "unknown"
        dynamic.status_changed_at = utcnow()
        count += 1
    return count
