"""The simulated hosts' verbs: the real agent's names, parameter and result models and errors
(imported from :mod:`virtyard.host.verbs`), registered on a schema of their own
(:data:`SIM_SCHEMA`) with handlers that work on a :class:`~virtyard.hostsim.state.SimHost`.

Handlers run on the simulator's event loop (they only touch memory); ``Host.getEvents`` is a
coroutine that waits without a thread, so thousands of open long-polls cost no threads.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time

import virtyard
from virtyard.host.rpc.errors import (
    HostError,
    InvalidParameterError,
    InvalidParamsError,
    IscsiSetupError,
)
from virtyard.host.rpc.schema import NoParams, Schema
from virtyard.host.storage.initiator import DiscoveredTarget, Portal
from virtyard.host.verbs import SCHEMA as AGENT_SCHEMA
from virtyard.host.verbs.connections import KeptConnection
from virtyard.host.verbs.events import GetEventsParams, HostEvents, events_result
from virtyard.host.verbs.host import Capabilities, PingResult
from virtyard.host.verbs.storage import (
    FCP_DOMAIN,
    STATUS_OK,
    BlockDeviceInfo,
    ConnectionStatus,
    ConnectStorageServerParams,
    DisconnectStorageServerParams,
    DiscoverSendTargetsParams,
    GetDeviceListParams,
    GetDevicesVisibilityParams,
)
from virtyard.host.verbs.vm import (
    CreateParams,
    DriveParams,
    ShutdownParams,
    ShutdownResult,
    UnplugParams,
    VmDefinition,
    VmIdParams,
    VmListParams,
    VmStats,
)
from virtyard.host.virt.events import EventBatch
from virtyard.hostsim.state import SAN_IQN, SimHost

SIM_SCHEMA: Schema[SimHost] = Schema()


def _errors(name: str) -> tuple[type[HostError], ...]:
    """The real verb's error classes (so the reference and the codes are the same)."""
    return AGENT_SCHEMA.verbs[name].errors


# -- Host ---------------------------------------------------------------------------------------

@SIM_SCHEMA.verb("Host.ping", params=NoParams, result=PingResult, errors=_errors("Host.ping"))
def ping(host: SimHost, p: NoParams) -> PingResult:
    """The heartbeat, as the agent answers it."""
    return PingResult(time=time.time(), agentStartedAt=host.started_at, bootId=host.boot_id)


@SIM_SCHEMA.verb("Host.getCapabilities", params=NoParams, result=Capabilities)
def get_capabilities(host: SimHost, p: NoParams) -> Capabilities:
    """A large KVM host with the user-space initiator."""
    return Capabilities(
        hostUUID=host.host_uuid, hostName=host.name, iscsiInitiatorName=host.initiator_name,
        initiator="userspace", cpuModel="Virtyard simulated CPU", cpuSockets=2, cpuCores=32,
        cpuThreads=64, cpuArch="x86_64", memoryMiB=512 * 1024, libvirtVersion="9.0.0",
        qemuVersion="7.2.0", agentVersion=virtyard.__version__, virtType="kvm",
        migrationUri=host.migration_uri)


@SIM_SCHEMA.verb("Host.getAllVmStats", params=NoParams, result=list[VmStats])
def get_all_vm_stats(host: SimHost, p: NoParams) -> list[VmStats]:
    """Status and hash of every VM."""
    return [vm.stats() for vm in host.vms.values()]


@SIM_SCHEMA.verb("Host.getVMFullList", params=VmListParams, result=list[VmDefinition])
def get_vm_full_list(host: SimHost, p: VmListParams) -> list[VmDefinition]:
    """VMs with their disks and guest names."""
    if p.vmList is None:
        return [vm.definition() for vm in host.vms.values()]
    return [host.vms[v].definition() for v in dict.fromkeys(p.vmList) if v in host.vms]


@SIM_SCHEMA.verb("Host.getEvents", params=GetEventsParams, result=HostEvents)
async def get_events(host: SimHost, p: GetEventsParams) -> HostEvents:
    """The agent's long-poll, waiting on the event loop (no thread)."""
    batch = host.events.read_now(p.since)
    if batch is None and p.timeout > 0:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        host.waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, p.timeout)
        except TimeoutError:
            pass
        finally:
            host.waiters.discard(waiter)
        batch = host.events.read_now(p.since)
    return events_result(batch or EventBatch(host.events.newest, False, []))


# -- storage ------------------------------------------------------------------------------------

@SIM_SCHEMA.verb("Host.getDeviceList", params=GetDeviceListParams, result=list[BlockDeviceInfo],
                 errors=_errors("Host.getDeviceList"))
def get_device_list(host: SimHost, p: GetDeviceListParams) -> list[BlockDeviceInfo]:
    """Every LUN of the simulated SAN this host sees."""
    if p.storageType in ("FCP", FCP_DOMAIN):
        return []
    devices = host.device_list()
    if p.guids:
        wanted = set(p.guids)
        devices = [d for d in devices if d.GUID in wanted]
    return devices


@SIM_SCHEMA.verb("Host.getDevicesVisibility", params=GetDevicesVisibilityParams,
                 result=dict[str, bool],
                 errors=_errors("Host.getDevicesVisibility"))
def get_devices_visibility(host: SimHost, p: GetDevicesVisibilityParams) -> dict[str, bool]:
    """Whether this host sees each LUN."""
    return {guid: guid in host.luns for guid in p.guidList}


@SIM_SCHEMA.verb("ISCSIConnection.discoverSendTargets", params=DiscoverSendTargetsParams,
                 result=list[str],
                 errors=_errors("ISCSIConnection.discoverSendTargets"))
def discover_send_targets(host: SimHost, p: DiscoverSendTargetsParams) -> list[str]:
    """Any portal answers with the simulated SAN's one target."""
    if _is_ipv6(p.host) and not p.ipv6_enabled:
        raise InvalidParamsError("invalid parameter 'host': an IPv6 portal needs "
                                 "ipv6_enabled=true")
    return [DiscoveredTarget(Portal(p.host, p.port), 1, SAN_IQN).full()]


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


@SIM_SCHEMA.verb("StoragePool.connectStorageServer", params=ConnectStorageServerParams,
                 result=list[ConnectionStatus],
                 errors=_errors("StoragePool.connectStorageServer"))
def connect_storage_server(host: SimHost,
                           p: ConnectStorageServerParams) -> list[ConnectionStatus]:
    """Logs in to the simulated SAN's target (status 0, a reference more); any other target
    fails as an unreachable one does (465)."""
    if not p.connectionParams:
        raise InvalidParameterError("connectionParams must not be empty")
    statuses = []
    for params in p.connectionParams:
        if p.domainType == FCP_DOMAIN:
            statuses.append(ConnectionStatus(id=params.id, status=STATUS_OK))
            continue
        if params.iqn != SAN_IQN:
            statuses.append(ConnectionStatus(id=params.id, status=IscsiSetupError.code))
            continue
        _, refs = host.connections.get(params.id, (params, 0))
        host.connections[params.id] = (params, refs + 1)
        statuses.append(ConnectionStatus(id=params.id, status=STATUS_OK))
    return statuses


@SIM_SCHEMA.verb("StoragePool.disconnectStorageServer", params=DisconnectStorageServerParams,
                 result=list[ConnectionStatus],
                 errors=_errors("StoragePool.disconnectStorageServer"))
def disconnect_storage_server(host: SimHost,
                              p: DisconnectStorageServerParams) -> list[ConnectionStatus]:
    """Drops one reference per connection (idempotent)."""
    for params in p.connectionParams:
        kept = host.connections.get(params.id)
        if kept is not None:
            if kept[1] <= 1:
                del host.connections[params.id]
            else:
                host.connections[params.id] = (kept[0], kept[1] - 1)
    return [ConnectionStatus(id=c.id, status=STATUS_OK) for c in p.connectionParams]


@SIM_SCHEMA.verb("StoragePool.getConnections", params=NoParams, result=list[KeptConnection])
def get_connections(host: SimHost, p: NoParams) -> list[KeptConnection]:
    """The connections kept, with their references."""
    return [KeptConnection(id=c.id, connection=c.connection, port=c.port, iqn=c.iqn,
                           tpgt=c.tpgt, user=c.user, refs=refs)
            for c, refs in sorted(host.connections.values(), key=lambda kept: kept[0].id)]


# -- VMs ----------------------------------------------------------------------------------------

@SIM_SCHEMA.verb("VM.create", params=CreateParams, result=VmDefinition,
                 errors=_errors("VM.create"))
def vm_create(host: SimHost, p: CreateParams) -> VmDefinition:
    """A VM that is up at once; its disks' LUNs must be visible on this host."""
    return host.create_vm(p.vmParams).definition()


@SIM_SCHEMA.verb("VM.destroy", params=VmIdParams, result=VmStats,
                 errors=_errors("VM.destroy"))
def vm_destroy(host: SimHost, p: VmIdParams) -> VmStats:
    """The VM is down at once (a status event, reason destroyed)."""
    vm = host.destroy_vm(p.vmID)
    return VmStats(vmId=vm.vm_id, vmName=vm.name, status="Down", hash=vm.hash)


@SIM_SCHEMA.verb("VM.shutdown", params=ShutdownParams, result=ShutdownResult,
                 errors=_errors("VM.shutdown"))
def vm_shutdown(host: SimHost, p: ShutdownParams) -> ShutdownResult:
    """The guest powers off at once (a status event, reason shutdown-guest)."""
    host.shutdown_vm(p.vmID)
    return ShutdownResult(vmId=p.vmID, status="Down")


@SIM_SCHEMA.verb("VM.getStats", params=VmIdParams, result=list[VmStats],
                 errors=_errors("VM.getStats"))
def vm_get_stats(host: SimHost, p: VmIdParams) -> list[VmStats]:
    """The VM's status and hash (a list of one)."""
    return [host.vm(p.vmID).stats()]


@SIM_SCHEMA.verb("VM.hotplugDisk", params=DriveParams, result=VmDefinition,
                 errors=_errors("VM.hotplugDisk"))
def vm_hotplug_disk(host: SimHost, p: DriveParams) -> VmDefinition:
    """The disk is plugged at once; the guest names it a moment later (a second change)."""
    return host.hotplug(p.vmID, p.drive.wire()).definition()


@SIM_SCHEMA.verb("VM.hotunplugDisk", params=UnplugParams, result=VmDefinition,
                 errors=_errors("VM.hotunplugDisk"))
def vm_hotunplug_disk(host: SimHost, p: UnplugParams) -> VmDefinition:
    """The disk is gone at once."""
    return host.hotunplug(p.vmID, p.drive.wire()).definition()
