"""VM verbs: create, destroy, shutdown, stats, full lists, disk hot-plug, live migration.

Names and shapes follow oVirt's host agent: ``VM.create(vmParams)`` takes the design pages'
device dicts; every running VM's stats carry ``vmId``, ``status`` and a ``hash`` that changes
whenever its devices change, so the engine re-reads a VM (``Host.getVMFullList``) only then.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from virtyard.host.agent import HostAgent
from virtyard.host.rpc.errors import (
    ChangeDiskError,
    HotplugDiskError,
    HotunplugDiskError,
    ImageFileNotFoundError,
    InvalidParameterError,
    InvalidParamsError,
    MigrationError,
    MigrationInProgressError,
    NoSuchVmError,
    PeerUnreachableError,
    VmCreateError,
    VmExistsError,
)
from virtyard.host.rpc.schema import NoParams, Params
from virtyard.host.verbs.block_domains import PREPARE_ERRORS
from virtyard.host.verbs.registry import SCHEMA
from virtyard.host.virt.cdrom import change_cd, change_cd_legacy
from virtyard.host.virt.device_specs import (
    CdDriveSpec,
    DeviceItem,
    DiskSpec,
    UnplugSpec,
    disk_dict,
    disks_together,
)
from virtyard.host.virt.hotplug import hotplug_disk, hotunplug_disk
from virtyard.host.virt.migration import prepare_incoming
from virtyard.host.virt.vms import VmSnapshot, VmStatsView

VM_ID = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


class VmStats(BaseModel):
    vmId: str
    vmName: str
    status: str
    hash: str
    guestDiskMapping: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="{guest serial: {name: /dev/...}} as reported")


class VmDefinition(BaseModel):
    vmId: str
    vmName: str
    status: str
    hash: str
    memSize: int
    smp: int
    devices: list[dict[str, Any]]


def stats_of(agent: HostAgent, snap: VmSnapshot | VmStatsView) -> VmStats:
    return VmStats(vmId=snap.vm_id, vmName=snap.name, status=snap.status, hash=snap.hash,
                   guestDiskMapping=agent.guest_names.guest_disk_mapping(snap.vm_id))


def definition_of(snap: VmSnapshot) -> VmDefinition:
    """The VM as the engine sees it: every disk dict with the guest's name for it."""
    devices = []
    for disk in snap.domain.disks:
        entry = disk_dict(disk.device)
        entry["guestName"] = snap.metadata.device(disk.name).guest_name or ""
        devices.append(entry)
    return VmDefinition(vmId=snap.vm_id, vmName=snap.name, status=snap.status, hash=snap.hash,
                        memSize=snap.domain.memory_mib, smp=snap.domain.vcpus, devices=devices)


# -- VM.create ---------------------------------------------------------------------------------

class VmParams(BaseModel):
    model_config = {"extra": "allow"}

    vmId: str = Field(pattern=VM_ID, description="the VM's UUID (also libvirt's)")
    vmName: str = Field(default="", max_length=200)
    memSize: int = Field(default=256, ge=16, le=1 << 22, description="MiB")
    smp: int = Field(default=1, ge=1, le=64)
    kernel: str | None = Field(default=None, description="direct kernel boot: kernel path")
    initrd: str | None = None
    kernelArgs: str | None = None
    consoleLog: str | None = Field(default=None, description="serial console to this file")
    devices: list[DeviceItem] = Field(
        default_factory=list, description="device dicts: disks (type 'disk') are checked, "
        "alone and together (one iface/index, one LUN unless shared); other types are ignored")

    @field_validator("devices")
    @classmethod
    def _together(cls, devices: list[DiskSpec | None]) -> list[DiskSpec]:
        return disks_together(devices)


class CreateParams(Params):
    vmParams: VmParams


@SCHEMA.verb("VM.create", params=CreateParams, result=VmDefinition,
             errors=(VmExistsError, VmCreateError))
def vm_create(agent: HostAgent, p: CreateParams) -> VmDefinition:
    """Start a VM; every disk is checked (and its LUN's visibility on this host) before
    libvirt is touched, so a bad disk leaves nothing defined."""
    return definition_of(agent.vms.create(p.vmParams.model_dump(exclude_none=True)))


class VmIdParams(Params):
    vmID: str = Field(pattern=VM_ID)


@SCHEMA.verb("VM.destroy", params=VmIdParams, result=VmStats, errors=(NoSuchVmError,))
def vm_destroy(agent: HostAgent, p: VmIdParams) -> VmStats:
    """Power the VM off at once."""
    snap = agent.vms.snapshot(agent.vms.domain(p.vmID))
    agent.vms.destroy(p.vmID)
    return VmStats(vmId=snap.vm_id, vmName=snap.name, status="Down", hash=snap.hash)


class ShutdownParams(Params):
    vmID: str = Field(pattern=VM_ID)
    timeout: float = Field(default=60.0, ge=0, le=3600, description="seconds to wait")
    force: bool = Field(default=False, description="destroy when the guest does not obey")


class ShutdownResult(BaseModel):
    vmId: str
    status: str


@SCHEMA.verb("VM.shutdown", params=ShutdownParams, result=ShutdownResult,
             errors=(NoSuchVmError,))
def vm_shutdown(agent: HostAgent, p: ShutdownParams) -> ShutdownResult:
    """Graceful power-off through the guest agent, else ACPI; waits up to ``timeout``."""
    status = agent.vms.shutdown(p.vmID, timeout=p.timeout, force=p.force)
    return ShutdownResult(vmId=p.vmID, status=status)


# -- stats and lists ---------------------------------------------------------------------------

@SCHEMA.verb("VM.getStats", params=VmIdParams, result=list[VmStats], errors=(NoSuchVmError,))
def vm_get_stats(agent: HostAgent, p: VmIdParams) -> list[VmStats]:
    """The VM's status and change hash (a list of one, as oVirt returns it)."""
    return [stats_of(agent, agent.vms.stats(agent.vms.domain(p.vmID)))]


@SCHEMA.verb("Host.getAllVmStats", params=NoParams, result=list[VmStats])
def host_get_all_vm_stats(agent: HostAgent, p: NoParams) -> list[VmStats]:
    """Status and change hash of every running VM of this host."""
    out = []
    for dom in agent.vms.running():
        try:
            out.append(stats_of(agent, agent.vms.stats(dom)))
        except Exception:  # gone between list and read (destroyed, migrated away)
            continue
    return out


class VmListParams(Params):
    vmList: list[str] | None = Field(default=None, description="only these VM ids")


def _snapshots(agent: HostAgent, ids: list[str] | None) -> list[VmSnapshot]:
    out = []
    for dom in agent.vms.running():
        if ids is not None and dom.UUIDString() not in ids:
            continue
        try:
            out.append(agent.vms.snapshot(dom))
        except Exception:  # gone between list and read (destroyed, migrated away)
            continue
    return out


@SCHEMA.verb("Host.getVMFullList", params=VmListParams, result=list[VmDefinition])
def host_get_vm_full_list(agent: HostAgent, p: VmListParams) -> list[VmDefinition]:
    """Running VMs with all their disk devices (``type``, ``device``, ``GUID``/``PDIV``,
    ``iface``, ``index``, ``serial``, ``address``, ``guestName``…)."""
    return [definition_of(s) for s in _snapshots(agent, p.vmList)]


@SCHEMA.verb("Host.dumpxmls", params=VmListParams, result=dict[str, str])
def host_dumpxmls(agent: HostAgent, p: VmListParams) -> dict[str, str]:
    """The live libvirt domain XML of running VMs."""
    return {dom.UUIDString(): dom.XMLDesc(0) for dom in agent.vms.running()
            if p.vmList is None or dom.UUIDString() in p.vmList}


# -- disk hot-plug -----------------------------------------------------------------------------

class DriveParams(Params):
    vmID: str = Field(pattern=VM_ID)
    drive: DiskSpec = Field(description="the disk dict")


class UnplugParams(Params):
    vmID: str = Field(pattern=VM_ID)
    drive: UnplugSpec = Field(description="the disk: GUID, or iface + index")


@SCHEMA.verb("VM.hotplugDisk", params=DriveParams, result=VmDefinition,
             errors=(NoSuchVmError, HotplugDiskError))
def vm_hotplug_disk(agent: HostAgent, p: DriveParams) -> VmDefinition:
    """Plug a disk (a LUN by GUID) into the running VM; the LUN must be visible here."""
    return definition_of(hotplug_disk(agent.vms, p.vmID, p.drive.wire()))


@SCHEMA.verb("VM.hotunplugDisk", params=UnplugParams, result=VmDefinition,
             errors=(NoSuchVmError, HotunplugDiskError))
def vm_hotunplug_disk(agent: HostAgent, p: UnplugParams) -> VmDefinition:
    """Unplug a disk; waits (bounded) for the guest to release it."""
    return definition_of(hotunplug_disk(agent.vms, p.vmID, p.drive.wire()))


# -- CD-ROM ------------------------------------------------------------------------------------

class ChangeCdParams(Params):
    vmID: str = Field(pattern=VM_ID)
    driveSpec: CdDriveSpec = Field(description=(
        "{drive_spec: PDIV dict or empty (eject), iface, index}; legacy {path, iface, index}"))


@SCHEMA.verb("VM.changeCD", params=ChangeCdParams, result=VmDefinition,
             errors=(NoSuchVmError, ChangeDiskError, ImageFileNotFoundError,
                     InvalidParameterError, *PREPARE_ERRORS))
def vm_change_cd(agent: HostAgent, p: ChangeCdParams) -> VmDefinition:
    """Load, change or eject the CD of a running VM, atomically: on any failure the old CD
    stays in the drive and nothing new stays prepared; a crash at any step is recovered when
    the agent starts. ``drive_spec`` names an ISO volume on a block storage domain by PDIV."""
    spec = p.driveSpec
    if spec.loads_volume:
        pdiv = None if spec.drive_spec is None else spec.drive_spec.pdiv
        return definition_of(change_cd(agent.cd, p.vmID, pdiv, spec.iface, spec.index))
    if spec.path is not None:
        return definition_of(change_cd_legacy(agent.cd, p.vmID, spec.path, spec.iface, spec.index))
    raise InvalidParamsError("invalid parameter 'driveSpec': give drive_spec (a PDIV, or empty "
                             "to eject) or path")


# -- migration ---------------------------------------------------------------------------------

class MigrateOptions(BaseModel):
    model_config = {"extra": "forbid"}

    dst: str = Field(pattern=r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$",
                     description="destination host agent, host:port")
    method: str = Field(default="online", pattern="^online$")


class MigrateParams(Params):
    vmID: str = Field(pattern=VM_ID)
    params: MigrateOptions


class MigrationState(BaseModel):
    vmId: str
    destination: str
    status: str
    progress: int
    message: str = ""


@SCHEMA.verb("VM.migrate", params=MigrateParams, result=MigrationState,
             errors=(NoSuchVmError, MigrationError, MigrationInProgressError,
                     PeerUnreachableError))
def vm_migrate(agent: HostAgent, p: MigrateParams) -> MigrationState:
    """Live-migrate to another host agent; refused unless the destination sees every LUN.
    Returns at once; follow with ``VM.migrateStatus``."""
    job = agent.migrations.start(p.vmID, p.params.dst)
    return MigrationState(vmId=job.vm_id, destination=job.destination, status=job.status,
                          progress=job.progress, message=job.message)


@SCHEMA.verb("VM.migrateStatus", params=VmIdParams, result=MigrationState,
             errors=(MigrationError,))
def vm_migrate_status(agent: HostAgent, p: VmIdParams) -> MigrationState:
    """The VM's last outgoing migration: running (with progress), done or failed."""
    job = agent.migrations.status(p.vmID)
    return MigrationState(vmId=job.vm_id, destination=job.destination, status=job.status,
                          progress=job.progress, message=job.message)


class MigrationCreateParams(Params):
    xml: str = Field(max_length=1 << 20, description="the source's migratable domain XML")


class MigrationCreateResult(BaseModel):
    xml: str
    migrationUri: str


@SCHEMA.verb("VM.migrationCreate", params=MigrationCreateParams, result=MigrationCreateResult,
             errors=(VmCreateError,))
def vm_migration_create(agent: HostAgent, p: MigrationCreateParams) -> MigrationCreateResult:
    """Destination side of a migration: check every LUN is visible here and answer the domain
    XML with disk sources for this host, and where this host's libvirtd takes migrations."""
    return MigrationCreateResult(xml=prepare_incoming(agent.vms, p.xml),
                                 migrationUri=agent.migration_uri)
