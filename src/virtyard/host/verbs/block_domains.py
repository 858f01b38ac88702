"""Block storage domain verbs: domains on LUNs, volumes in them, ISO upload, prepare/teardown.

Volumes are named by the PDIV quartet (``poolID``, ``domainID``, ``imageID``, ``volumeID``, all
UUIDs), passed as four parameters the way oVirt's ``Image.prepare`` takes them. The layout on
disk and the reasons behind it are in :mod:`virtyard.host.storage.block_domain` and
:mod:`virtyard.host.storage.volumes`.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

from virtyard.host.agent import HostAgent
from virtyard.host.rpc.errors import (
    CannotActivateLogicalVolumeError,
    CannotDeactivateLogicalVolumeError,
    CannotDeleteVolumeError,
    ImagePathError,
    ImageVerificationError,
    InaccessiblePhysDevError,
    IncorrectFormatError,
    InvalidParameterError,
    LogicalVolumeReplaceTagError,
    MiscBlockReadError,
    MiscBlockWriteError,
    NoSpaceLeftOnDomainError,
    PhysDevInitializationError,
    StorageDomainAccessError,
    StorageDomainAlreadyExistsError,
    StorageDomainCreationError,
    StorageDomainDoesNotExistError,
    StorageDomainNotEmptyError,
    VolumeAlreadyExistsError,
    VolumeCreationError,
    VolumeDoesNotExistError,
    VolumeGroupHasDomainTagError,
    VolumeGroupRemoveError,
    VolumeIsBusyError,
    VolumeNonWritableError,
)
from virtyard.host.rpc.schema import NoParams, Params
from virtyard.host.storage.block_domain import (
    DOMAIN_NAME,
    MAX_WRITE,
    DomainInfo,
    VolumeInfo,
)
from virtyard.host.storage.pdiv import Pdiv
from virtyard.host.storage.volumes import PreparedVolume
from virtyard.host.verbs.registry import SCHEMA
from virtyard.host.verbs.storage import Wwid


def _uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"not a UUID: {value!r}") from None


def _domain_name(value: str) -> str:
    if not DOMAIN_NAME.match(value):
        raise ValueError("up to 64 of A-Z a-z 0-9 _ . + -")
    return value


def _base64(value: str) -> str:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    return value


Uuid = Annotated[str, AfterValidator(_uuid)]
DomainName = Annotated[str, AfterValidator(_domain_name)]
User = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:@/+-]{1,256}$",
                            description="who holds the volume: a VM and its device, "
                                        "e.g. '<vm-uuid>:sdc'")]


class PdivParams(Params):
    poolID: Uuid = Field(description="storage pool UUID")
    domainID: Uuid = Field(description="storage domain UUID")
    imageID: Uuid = Field(description="image UUID")
    volumeID: Uuid = Field(description="volume UUID")

    @property
    def pdiv(self) -> Pdiv:
        return Pdiv(self.poolID, self.domainID, self.imageID, self.volumeID)


def _volume_locks(p: PdivParams) -> list[str]:
    return [f"volume:{p.domainID}/{p.volumeID}"]


def _domain_volume_locks(p: PdivParams) -> list[str]:
    return [f"domain:{p.domainID}", f"volume:{p.domainID}/{p.volumeID}"]


# -- results ------------------------------------------------------------------------------------

class StorageDomainResult(BaseModel):
    domainID: str
    name: str
    vgUUID: str
    extentSize: int
    size: int = Field(description="bytes in extents")
    free: int = Field(description="bytes in free extents")
    luns: list[str] = Field(description="GUIDs of the LUNs under it")
    volumes: list[str] = Field(description="volume UUIDs")


class VolumeResult(BaseModel):
    poolID: str
    domainID: str
    imageID: str
    volumeID: str
    type: str = Field(description="ISO or DATA")
    state: str = Field(description="EMPTY, or READY once verified")
    size: int = Field(description="the LV's size (whole extents)")
    contentSize: int = Field(description="verified content bytes (READY)")
    sha256: str = Field(description="verified content checksum (READY)")
    guid: str = Field(description="the LUN holding it")
    offset: int | None = Field(description="its first byte on the LUN (null: not contiguous)")
    lvUUID: str
    users: list[str] = Field(description="who holds it prepared")


class PreparedResult(BaseModel):
    poolID: str
    domainID: str
    imageID: str
    volumeID: str
    method: Literal["lvm-activation", "block-slice", "iscsi-slice"]
    diskType: Literal["block", "network"]
    guid: str
    path: str = Field(description="block: the device QEMU opens")
    offset: int | None = Field(description="slice: first byte of the volume in the source")
    size: int = Field(description="bytes exposed (slice size)")
    host: str = Field(description="network: iSCSI portal host")
    port: int
    iqn: str
    lun: int
    connectionID: str
    chapUser: str
    chapSecretUsage: str = Field(description="usage of the libvirt iscsi secret with CHAP")
    volumeType: str
    iso: bool = Field(description="checked to hold an ISO 9660 image")
    users: list[str]


class TeardownResult(BaseModel):
    prepared: bool = Field(description="still prepared (held by other users)")
    users: list[str]


class WriteResult(BaseModel):
    offset: int
    written: int


def _domain_result(domain: DomainInfo) -> StorageDomainResult:
    return StorageDomainResult(
        domainID=domain.domain_id, name=domain.name, vgUUID=domain.vg_uuid,
        extentSize=domain.extent_size, size=domain.size, free=domain.free,
        luns=[p.guid for p in domain.pvs], volumes=[v.volume_id for v in domain.volumes])


def _volume_result(agent: HostAgent, volume: VolumeInfo) -> VolumeResult:
    users = [u for v in agent.volumes.prepared(volume.domain_id)
             if v.pdiv.volume_id == volume.volume_id for u in v.users]
    return VolumeResult(
        poolID=volume.pool_id, domainID=volume.domain_id, imageID=volume.image_id,
        volumeID=volume.volume_id, type=volume.type, state=volume.state, size=volume.size,
        contentSize=volume.content_size, sha256=volume.sha256,
        guid=volume.extent.guid if volume.extent else "",
        offset=volume.extent.offset if volume.extent else None, lvUUID=volume.lv_uuid,
        users=users)


def prepared_result(prepared: PreparedVolume) -> PreparedResult:
    """The wire form of a prepared volume."""
    return PreparedResult(
        **prepared.pdiv.to_dict(), method=prepared.method, diskType=prepared.disk_type,
        guid=prepared.guid, path=prepared.path, offset=prepared.offset, size=prepared.size,
        host=prepared.host, port=prepared.port, iqn=prepared.iqn, lun=prepared.lun,
        connectionID=prepared.connection_id, chapUser=prepared.chap_user,
        chapSecretUsage=prepared.chap_secret_usage, volumeType=prepared.volume_type,
        iso=prepared.iso, users=list(prepared.users))


_LOOKUP_ERRORS = (StorageDomainDoesNotExistError, VolumeDoesNotExistError,
                  StorageDomainAccessError, MiscBlockReadError)


# -- StorageDomain ------------------------------------------------------------------------------

class CreateDomainParams(Params):
    domainID: Uuid = Field(description="the new domain's UUID (its VG's name)")
    guid: Wwid = Field(description="the LUN to put it on (must be free)")
    name: DomainName = Field(default="", description="a name (A-Z a-z 0-9 _ . + -)")


@SCHEMA.verb("StorageDomain.create", params=CreateDomainParams, result=StorageDomainResult,
             errors=(StorageDomainAlreadyExistsError, InaccessiblePhysDevError,
                     PhysDevInitializationError, VolumeGroupHasDomainTagError,
                     StorageDomainCreationError, StorageDomainAccessError),
             locks=lambda p: [f"domain:{p.domainID}", f"lun:{p.guid}"])
def create_domain(agent: HostAgent, p: CreateDomainParams) -> StorageDomainResult:
    """Create a block storage domain on a free LUN: an LVM PV and a VG named by the domain
    UUID, tagged ``VIRTYARD_SD``, 4 MiB extents.

    Refused (nothing written) when the LUN is not visible (606), holds a storage domain (515)
    or anything else, or cannot be probed (601), or when the domain UUID exists already (365).
    """
    return _domain_result(agent.volumes.domains.create(p.domainID, p.guid, p.name))


@SCHEMA.verb("StorageDomain.list", params=NoParams, result=list[StorageDomainResult],
             errors=(StorageDomainAccessError,))
def list_domains(agent: HostAgent, p: NoParams) -> list[StorageDomainResult]:
    """Every block storage domain on the LUNs this host sees (their LVM metadata read over
    iSCSI, as ``Host.getDeviceList`` does; no device is attached)."""
    return [_domain_result(d) for d in agent.volumes.domains.list_domains()]


class RemoveDomainParams(Params):
    domainID: Uuid = Field(description="storage domain UUID")
    force: bool = Field(default=False, description="also remove its volumes")


@SCHEMA.verb("StorageDomain.remove", params=RemoveDomainParams, result=StorageDomainResult,
             errors=(*_LOOKUP_ERRORS, StorageDomainNotEmptyError, VolumeIsBusyError,
                     VolumeGroupRemoveError, InaccessiblePhysDevError),
             locks=lambda p: [f"domain:{p.domainID}"])
def remove_domain(agent: HostAgent, p: RemoveDomainParams) -> StorageDomainResult:
    """Remove a domain (VG and PV labels: its LUN is free again); returns what it was.

    Refused while any of its volumes is prepared (203), and while it has volumes unless
    ``force`` (361).
    """
    return _domain_result(agent.volumes.remove_domain(p.domainID, force=p.force))


# -- Volume -------------------------------------------------------------------------------------

class CreateVolumeParams(PdivParams):
    size: int = Field(ge=1, le=1 << 50, description="bytes (rounded up to whole extents)")
    type: Literal["ISO", "DATA"] = Field(default="ISO", description="what it will hold")


@SCHEMA.verb("Volume.create", params=CreateVolumeParams, result=VolumeResult,
             errors=(*_LOOKUP_ERRORS, VolumeAlreadyExistsError, NoSpaceLeftOnDomainError,
                     VolumeCreationError, InaccessiblePhysDevError),
             locks=_domain_volume_locks)
def create_volume(agent: HostAgent, p: CreateVolumeParams) -> VolumeResult:
    """Create a volume: a contiguous LV named by the volume UUID with its image, pool, type and
    state ``EMPTY`` in LV tags. Fill it with ``Volume.write`` and seal it with
    ``Volume.verify``."""
    return _volume_result(agent, agent.volumes.domains.create_volume(p.pdiv, p.size, p.type))


class ListVolumesParams(Params):
    domainID: Uuid = Field(description="storage domain UUID")


@SCHEMA.verb("Volume.list", params=ListVolumesParams, result=list[VolumeResult],
             errors=(StorageDomainDoesNotExistError, StorageDomainAccessError,
                     MiscBlockReadError))
def list_volumes(agent: HostAgent, p: ListVolumesParams) -> list[VolumeResult]:
    """The volumes of a domain (metadata read fresh from its LUN), with who holds them."""
    return [_volume_result(agent, v) for v in agent.volumes.domains.domain(p.domainID).volumes]


@SCHEMA.verb("Volume.remove", params=PdivParams, result=VolumeResult,
             errors=(*_LOOKUP_ERRORS, VolumeIsBusyError, CannotDeleteVolumeError,
                     InaccessiblePhysDevError),
             locks=_domain_volume_locks)
def remove_volume(agent: HostAgent, p: PdivParams) -> VolumeResult:
    """Remove a volume; refused while it is prepared for anyone (203)."""
    return _volume_result(agent, agent.volumes.remove_volume(p.pdiv))


class WriteParams(PdivParams):
    offset: int = Field(ge=0, description="byte offset in the volume")
    data: Annotated[str, AfterValidator(_base64)] = Field(
        max_length=-(-MAX_WRITE // 3) * 4, description="the bytes, base64 (at most 8 MiB)")


@SCHEMA.verb("Volume.write", params=WriteParams, result=WriteResult,
             errors=(*_LOOKUP_ERRORS, VolumeIsBusyError, VolumeNonWritableError,
                     InvalidParameterError, ImagePathError, InaccessiblePhysDevError,
                     MiscBlockWriteError),
             locks=_domain_volume_locks)
def write_volume(agent: HostAgent, p: WriteParams) -> WriteResult:
    """Write bytes into a volume: the upload of an ISO.

    Upload protocol: ``Volume.create`` (type ISO, size >= the ISO's), then ``Volume.write``
    chunks of at most 8 MiB (base64) at their offsets, in any order and retried at will (a
    write is idempotent), then ``Volume.verify`` with the ISO's size and SHA-256, which reads
    the bytes back from the array and marks the volume READY. Chosen over a streaming HTTP
    endpoint because it needs nothing beyond the JSON-RPC channel (same TLS, same errors) and
    a failed chunk is simply sent again. Each write is durable when it returns: with the
    user-space initiator it goes over the agent's own iSCSI session (WRITE(16), then
    SYNCHRONIZE CACHE; no local device), with the kernel one to the LUN's multipath device.
    Refused on a READY volume (213) and while the volume is prepared (203).
    """
    data = base64.b64decode(p.data, validate=True)
    agent.volumes.write(p.pdiv, p.offset, data)
    return WriteResult(offset=p.offset, written=len(data))


class VerifyParams(PdivParams):
    size: int = Field(ge=1, description="content bytes (the ISO's size)")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="SHA-256 of the content")


@SCHEMA.verb("Volume.verify", params=VerifyParams, result=VolumeResult,
             errors=(*_LOOKUP_ERRORS, InvalidParameterError, ImagePathError,
                     ImageVerificationError, IncorrectFormatError, InaccessiblePhysDevError,
                     LogicalVolumeReplaceTagError),
             locks=_domain_volume_locks)
def verify_volume(agent: HostAgent, p: VerifyParams) -> VolumeResult:
    """Check a volume's first ``size`` bytes against ``sha256`` (read back over iSCSI) and, for
    an ISO volume, that they hold ISO 9660; then mark it READY (484 on a mismatch, 202 when an
    ISO volume holds no ISO 9660)."""
    return _volume_result(agent, agent.volumes.domains.verify(p.pdiv, p.size, p.sha256))


# -- Image.prepare / teardown -------------------------------------------------------------------

class PrepareParams(PdivParams):
    user: User
    iso: bool = Field(default=False, description="for a CD-ROM: must be a READY ISO volume "
                                                 "holding ISO 9660")


# What preparing a volume can fail with (also VM.changeCD's, which prepares the new medium).
PREPARE_ERRORS = (*_LOOKUP_ERRORS, IncorrectFormatError, ImagePathError, VolumeIsBusyError,
                  InaccessiblePhysDevError, CannotActivateLogicalVolumeError)


@SCHEMA.verb("Image.prepare", params=PrepareParams, result=PreparedResult,
             errors=PREPARE_ERRORS, locks=_volume_locks)
def prepare_image(agent: HostAgent, p: PrepareParams) -> PreparedResult:
    """Make a volume usable by QEMU for ``user`` (reference-counted per user; preparing again
    for the same user changes nothing).

    Returns how to reach it: ``diskType`` ``block`` with a ``path`` (LV activation), or
    ``network`` with the iSCSI source and the slice (``offset``, ``size``) QEMU must read,
    which needs nothing on the host (this host's ``method`` says which).
    """
    return prepared_result(agent.volumes.prepare(p.pdiv, p.user, iso=p.iso))


class TeardownParams(PdivParams):
    user: User


@SCHEMA.verb("Image.teardown", params=TeardownParams, result=TeardownResult,
             errors=(CannotDeactivateLogicalVolumeError,), locks=_volume_locks)
def teardown_image(agent: HostAgent, p: TeardownParams) -> TeardownResult:
    """Release ``user``'s hold on a volume. Still held by others: it stays prepared (not an
    error). Not held by this user: nothing to do (idempotent, safe to retry)."""
    remaining = agent.volumes.teardown(p.pdiv, p.user)
    return TeardownResult(prepared=remaining is not None,
                          users=list(remaining.users) if remaining else [])


class ListPreparedParams(Params):
    domainID: Uuid | None = Field(default=None, description="only this domain's")


@SCHEMA.verb("Image.listPrepared", params=ListPreparedParams, result=list[PreparedResult])
def list_prepared(agent: HostAgent, p: ListPreparedParams) -> list[PreparedResult]:
    """Every prepared volume with its users, as recorded (survives agent restarts)."""
    return [prepared_result(v) for v in agent.volumes.prepared(p.domainID)]


@SCHEMA.verb("Image.leftovers", params=NoParams, result=list[str])
def leftovers(agent: HostAgent, p: NoParams) -> list[str]:
    """Local LUN devices (qemu-storage-daemon, FUSE mounts, loop devices) and LV activations
    that nothing accounts for: should always be empty."""
    return agent.volumes.leftovers()
