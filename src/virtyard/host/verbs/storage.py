"""SAN verbs: iSCSI discovery, storage server connections, the device list, visibility.

Names, parameters and error codes follow oVirt's host agent, so the mapping to the Direct LUN
design page is one to one; numbers are JSON numbers (oVirt sends some as strings).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, SecretStr

from virtyard.host.agent import HostAgent
from virtyard.host.rpc.errors import (
    BlockDeviceActionError,
    HostError,
    InvalidParameterError,
    InvalidParamsError,
    IscsiDiscoveryError,
    IscsiLoginAuthError,
    IscsiSetupError,
    StorageServerConnectionError,
    StorageServerDisconnectionError,
)
from virtyard.host.rpc.schema import Params
from virtyard.host.storage.devices import DeviceEntry
from virtyard.host.storage.domain_tags import domain_of
from virtyard.host.storage.initiator import (
    Chap,
    Connection,
    ConnectionFailure,
    InitiatorAuthError,
    InitiatorError,
    Portal,
    Secret,
)
from virtyard.host.verbs.registry import SCHEMA

log = logging.getLogger("virtyard.host.storage")

ISCSI_DOMAIN = 3
FCP_DOMAIN = 2
STATUS_OK = 0

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")
_IQN = re.compile(
    r"^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:.+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")
# WWIDs as udev/multipath name them: a type digit, then hex (NAA, EUI) or a T10/name string.
_WWID = re.compile(r"^[0-9a-zA-Z][0-9A-Za-z_:.-]{1,254}$")


def _host(value: str) -> str:
    """An address or host name; IPv6 literals may come bracketed and are kept unbracketed."""
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _HOSTNAME.match(text):
        raise ValueError(f"not an IP address or host name: {value!r}")
    return text


def _iqn(value: str) -> str:
    if not _IQN.match(value):
        raise ValueError(f"not an iSCSI name (iqn.YYYY-MM.reversed.domain[:id], eui., naa.): "
                         f"{value!r}")
    return value


def _wwid(value: str) -> str:
    if not _WWID.match(value):
        raise ValueError(f"not a WWID: {value!r}")
    return value


HostName = Annotated[str, AfterValidator(_host)]
Iqn = Annotated[str, AfterValidator(_iqn)]
Wwid = Annotated[str, AfterValidator(_wwid)]
Port = Annotated[int, Field(ge=1, le=65535)]


def _chap(user: str, password: SecretStr) -> Chap | None:
    if not user and not password.get_secret_value():
        return None
    return Chap(user, Secret(password.get_secret_value()))


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


# -- ISCSIConnection.discoverSendTargets --------------------------------------------------------

class DiscoverSendTargetsParams(Params):
    host: HostName = Field(description="portal address or host name (IPv6 literal allowed)")
    port: Port = Field(default=3260, description="portal TCP port")
    user: str = Field(default="", description="CHAP user for discovery")
    password: SecretStr = Field(default=SecretStr(""), description="CHAP password (never logged)")
    ipv6_enabled: bool = Field(default=False, description="also return IPv6 portals")


@SCHEMA.verb("ISCSIConnection.discoverSendTargets", params=DiscoverSendTargetsParams,
             result=list[str], errors=(IscsiDiscoveryError,))
def discover_send_targets(agent: HostAgent, p: DiscoverSendTargetsParams) -> list[str]:
    """SendTargets discovery on one portal: every target as ``"host:port,tpgt iqn"``."""
    if _is_ipv6(p.host) and not p.ipv6_enabled:
        raise InvalidParamsError("invalid parameter 'host': an IPv6 portal needs "
                                 "ipv6_enabled=true")
    portal = Portal(p.host, p.port)
    try:
        found = agent.initiator.discover(portal, _chap(p.user, p.password),
                                         timeout=agent.config.storage.discovery_timeout)
    except InitiatorError as exc:
        raise IscsiDiscoveryError(f"portal={portal}, err={exc.kind}: {exc.detail}",
                                  portal=str(portal), reason=exc.kind) from None
    return [t.full() for t in found if p.ipv6_enabled or not t.portal.is_ipv6]


# -- StoragePool.connectStorageServer / disconnectStorageServer --------------------------------

class IscsiConnectionParams(BaseModel):
    model_config = {"extra": "forbid", "frozen": True}

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$",
                    description="connection id (the engine's UUID for it)")
    connection: HostName = Field(description="portal address or host name")
    port: Port = 3260
    iqn: Iqn
    tpgt: int = Field(default=1, ge=0, le=65535)
    user: str = ""
    password: SecretStr = SecretStr("")
    initiatorName: str | None = Field(default=None, description="override the host's IQN")
    ifaceName: str | None = Field(default=None, description="kernel initiator iface")


class ConnectStorageServerParams(Params):
    storagepoolID: str = Field(default="00000000-0000-0000-0000-000000000000",
                               description="deprecated, ignored")
    domainType: Literal[2, 3] = Field(description="3 iSCSI, 2 FCP")
    connectionParams: list[IscsiConnectionParams] = Field(description="connections")


class ConnectionStatus(BaseModel):
    id: str
    status: int


def _connection(c: IscsiConnectionParams) -> Connection:
    return Connection(id=c.id, portal=Portal(c.connection, c.port), iqn=c.iqn, tpgt=c.tpgt,
                      chap=_chap(c.user, c.password), initiator_name=c.initiatorName)


def _conn_locks(p: ConnectStorageServerParams) -> list[str]:
    return [f"connection:{c.id}" for c in p.connectionParams]


def _login_status(exc: Exception) -> int:
    if isinstance(exc, InitiatorAuthError):
        return IscsiLoginAuthError.code
    if isinstance(exc, InitiatorError):
        return IscsiSetupError.code
    if isinstance(exc, HostError):
        return exc.code
    return 100


@SCHEMA.verb("StoragePool.connectStorageServer", params=ConnectStorageServerParams,
             result=list[ConnectionStatus],
             errors=(InvalidParameterError, StorageServerConnectionError), locks=_conn_locks)
def connect_storage_server(agent: HostAgent,
                           p: ConnectStorageServerParams) -> list[ConnectionStatus]:
    """Log in to each connection; one status per connection (0 ok, 476 CHAP, 465 other).

    One failing connection does not undo the others. Each success takes a reference on its id.
    """
    if not p.connectionParams:
        raise InvalidParameterError("connectionParams must not be empty")
    statuses = []
    for params in p.connectionParams:
        if p.domainType == FCP_DOMAIN:  # FC needs no login: always connected
            statuses.append(ConnectionStatus(id=params.id, status=STATUS_OK))
            continue
        connection = _connection(params)
        try:
            agent.initiator.login(connection, timeout=agent.config.storage.login_timeout)
        except Exception as exc:  # each connection gets its own status, none raises
            status = _login_status(exc)
            log.warning("connection %s to %s %s failed: %s", params.id, connection.portal,
                        connection.iqn, exc)
            if agent.connections.refs(params.id) == 0 and not _session_in_use(agent, connection):
                _logout_quietly(agent, connection)  # a half-made login leaves nothing
            statuses.append(ConnectionStatus(id=params.id, status=status))
            continue
        agent.connections.add(connection)
        try:
            agent.devices.connected(connection)
        except InitiatorError as exc:  # logged in, but listing failed: next list retries
            log.warning("listing LUNs of %s failed after login: %s", connection.iqn, exc)
        statuses.append(ConnectionStatus(id=params.id, status=STATUS_OK))
    return statuses


def _session_in_use(agent: HostAgent, connection: Connection) -> bool:
    key = connection.session_key()
    return any(c.session_key() == key for c in agent.connections.all())


def _logout_quietly(agent: HostAgent, connection: Connection) -> None:
    try:
        agent.initiator.logout(connection, timeout=agent.config.storage.login_timeout)
    except Exception as exc:
        log.warning("cleanup logout of %s failed: %s", connection.iqn, exc)


class DisconnectStorageServerParams(Params):
    storagepoolID: str = "00000000-0000-0000-0000-000000000000"
    domainType: Literal[2, 3]
    connectionParams: list[IscsiConnectionParams] = Field(default_factory=list)


def _disconn_locks(p: DisconnectStorageServerParams) -> list[str]:
    return [f"connection:{c.id}" for c in p.connectionParams]


@SCHEMA.verb("StoragePool.disconnectStorageServer", params=DisconnectStorageServerParams,
             result=list[ConnectionStatus], errors=(StorageServerDisconnectionError,),
             locks=_disconn_locks)
def disconnect_storage_server(agent: HostAgent,
                              p: DisconnectStorageServerParams) -> list[ConnectionStatus]:
    """Drop one reference per connection; log out when the session's last user is gone.

    Idempotent: an unknown connection, or an empty list, is success.
    """
    statuses = []
    for params in p.connectionParams:
        connection, unused = agent.connections.release(params.id)
        if connection is not None and unused:
            try:
                agent.initiator.logout(connection, timeout=agent.config.storage.login_timeout)
            except Exception as exc:
                log.warning("logout of %s failed: %s", connection.iqn, exc)
                agent.connections.add(connection)
                statuses.append(ConnectionStatus(id=params.id,
                                                 status=StorageServerDisconnectionError.code))
                continue
            agent.devices.disconnected(connection)
        statuses.append(ConnectionStatus(id=params.id, status=STATUS_OK))
    return statuses


# -- Host.getDeviceList -------------------------------------------------------------------------

class IscsiPath(BaseModel):
    """A session a LUN is reached through (never with the password)."""

    connection: str
    port: int
    iqn: str
    tpgt: int
    portal: str  # oVirt's name for the portal group tag, kept for compatibility
    initiatorname: str
    user: str = ""


class PathFailure(BaseModel):
    """Why a failed path is failed: its connection could not be listed (the target is dead,
    unreachable or refuses the login; with the kernel initiator, its session is down)."""

    connection: str = Field(description="the connection's id (connectStorageServer)")
    target: str = Field(description="the target's IQN")
    portal: str = Field(description="host:port")
    kind: str = Field(description="connect, target-not-found, login, authentication, "
                                  "authorization, timeout, session, internal")
    message: str


class PathStatus(BaseModel):
    type: str = "iSCSI"
    lun: int
    state: Literal["active", "failed"]
    physdev: str = ""
    error: PathFailure | None = Field(
        default=None, exclude_if=lambda v: v is None,
        description="only on a failed path whose connection failed in the last listing")


class BlockDeviceInfo(BaseModel):
    GUID: str
    devtype: str = "iSCSI"
    vendorID: str
    productID: str
    fwrev: str
    serial: str
    capacity: int
    logicalblocksize: int
    physicalblocksize: int
    discard_max_bytes: int
    discard_zeroes_data: int = 0
    pathlist: list[IscsiPath]
    pathstatus: list[PathStatus]
    status: Literal["free", "used", "unknown"]
    usedReason: str | None = Field(
        default=None,
        description="storage-domain, lvm-pv, partition-table, filesystem, other-signature")
    usedDetail: str = ""
    pvUUID: str = ""
    vgUUID: str = ""
    vgName: str = ""
    storageDomainID: str = Field(default="", description="the block storage domain on it")


class GetDeviceListParams(Params):
    storageType: Literal["iSCSI", "FCP", 2, 3] | None = Field(
        default=None, description="only devices of this type")
    guids: list[Wwid] = Field(default_factory=list, description="only these WWIDs")
    checkStatus: bool = Field(default=True, description="probe signatures for free/used")
    refresh: bool = Field(default=True, description="rescan (false: answer from the cache)")


def _path_failure(failure: ConnectionFailure | None) -> PathFailure | None:
    if failure is None:
        return None
    c = failure.connection
    return PathFailure(connection=c.id, target=c.iqn, portal=str(c.portal), kind=failure.kind,
                       message=failure.detail)


def device_info(entry: DeviceEntry, initiator_name: str) -> BlockDeviceInfo:
    """The getDeviceList entry of one LUN."""
    d = entry.device
    usage = entry.usage
    domain = domain_of(usage.vg_name, usage.vg_tags) if usage else None
    return BlockDeviceInfo(
        GUID=d.guid, vendorID=d.vendor_id, productID=d.product_id, fwrev=d.fwrev,
        serial=d.serial, capacity=d.capacity, logicalblocksize=d.logical_block_size,
        physicalblocksize=d.physical_block_size, discard_max_bytes=d.discard_max_bytes,
        pathlist=[IscsiPath(connection=p.connection.portal.host, port=p.connection.portal.port,
                            iqn=p.connection.iqn, tpgt=p.connection.tpgt,
                            portal=str(p.connection.tpgt),
                            initiatorname=p.connection.initiator_name or initiator_name,
                            user=p.connection.chap.username if p.connection.chap else "")
                  for p in d.paths],
        pathstatus=[PathStatus(lun=p.lun, state=p.state, physdev=p.physdev,
                               error=_path_failure(p.failure)) for p in d.paths],
        status=usage.status if usage else "unknown",
        usedReason="storage-domain" if domain else usage.reason if usage else None,
        usedDetail=(f"PV of storage domain {domain}" if domain
                    else usage.detail if usage else ""),
        storageDomainID=domain or "",
        pvUUID=usage.pv_uuid if usage else "",
        vgUUID=usage.vg_uuid if usage else "",
        vgName=usage.vg_name if usage else "",
    )


@SCHEMA.verb("Host.getDeviceList", params=GetDeviceListParams, result=list[BlockDeviceInfo],
             errors=(BlockDeviceActionError,))
def get_device_list(agent: HostAgent, p: GetDeviceListParams) -> list[BlockDeviceInfo]:
    """Every disk LUN this host sees, by WWID, with paths and (checkStatus) free/used and why.

    A dead or unreachable target never fails the call: each target is listed on its own, and
    its LUNs known from the last listing stay in the list with their paths through it
    ``state: "failed"``, each such ``pathstatus`` entry carrying ``error`` (the connection id,
    target, portal, failure kind and message). A LUN with no active path has status
    ``"unknown"`` and is not visible (``Host.getDevicesVisibility``). Healthy paths have no
    ``error`` member. Targets are listed in parallel (16 at a time): one that refuses the
    login costs nothing, one that does not answer at all costs the listing 5 s (the
    listing's login bound); the kernel initiator does not read a LUN whose every path
    failed.
    """
    if p.storageType in ("FCP", FCP_DOMAIN):
        return []
    try:
        entries = agent.devices.listing(guids=frozenset(p.guids) if p.guids else None,
                                     check_status=p.checkStatus, refresh=p.refresh)
    except InitiatorError as exc:
        raise BlockDeviceActionError(f"listing devices failed: {exc}") from None
    name = agent.config.storage.initiator_name
    return [device_info(e, name) for e in entries]


# -- Host.getDevicesVisibility ------------------------------------------------------------------

class GetDevicesVisibilityParams(Params):
    guidList: list[Wwid] = Field(description="WWIDs to check")


@SCHEMA.verb("Host.getDevicesVisibility", params=GetDevicesVisibilityParams,
             result=dict[str, bool], errors=(BlockDeviceActionError,))
def get_devices_visibility(agent: HostAgent, p: GetDevicesVisibilityParams) -> dict[str, bool]:
    """Whether this host sees each LUN: known with at least one active path as of the last
    listing; any other LUN gets one rescan before the answer (so a LUN whose every path
    failed is not visible)."""
    try:
        return agent.devices.visibility(p.guidList)
    except InitiatorError as exc:
        raise BlockDeviceActionError(f"checking visibility failed: {exc}") from None
