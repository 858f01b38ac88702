"""Host-agent errors: each has a stable numeric code and name, as JSON-RPC error objects carry.

Domain codes reuse oVirt's host agent (vdsm) codes where one exists, so that anyone who knows
oVirt reads them at once; JSON-RPC's own codes cover protocol errors.
"""

from __future__ import annotations

from typing import Any, ClassVar


class HostError(Exception):
    """Base of every error a verb returns to its caller."""

    code: ClassVar[int] = 100
    name: ClassVar[str] = "GeneralException"
    default_message: ClassVar[str] = "General exception"

    def __init__(self, message: str | None = None, **data: Any) -> None:
        self.message = message or self.default_message
        self.data = data
        super().__init__(self.message)

    def to_error_object(self) -> dict[str, Any]:
        """The JSON-RPC 2.0 error object."""
        data: dict[str, Any] = {"name": self.name, **self.data}
        return {"code": self.code, "message": self.message, "data": data}


# -- JSON-RPC protocol errors -----------------------------------------------------------------

class ParseError(HostError):
    code, name, default_message = -32700, "ParseError", "Parse error"


class InvalidRequestError(HostError):
    code, name, default_message = -32600, "InvalidRequest", "Invalid request"


class MethodNotFoundError(HostError):
    code, name, default_message = -32601, "MethodNotFound", "Method not found"


class InvalidParamsError(HostError):
    code, name, default_message = -32602, "InvalidParams", "Invalid params"


class InternalError(HostError):
    code, name, default_message = -32603, "InternalError", "Internal error"


# -- Domain errors (oVirt host-agent codes) -----------------------------------------------------

class GeneralError(HostError):
    code, name, default_message = 100, "GeneralException", "General exception"


class InvalidParameterError(HostError):
    code, name, default_message = 1000, "InvalidParameterException", "Invalid parameter"


class StorageServerConnectionError(HostError):
    code, name = 451, "StorageServerConnectionError"
    default_message = "Could not connect to storage server"


class StorageServerDisconnectionError(HostError):
    code, name = 452, "StorageServerDisconnectionError"
    default_message = "Could not disconnect from storage server"


class IscsiSetupError(HostError):
    code, name, default_message = 465, "iSCSISetupError", "Failed to setup iSCSI subsystem"


class IscsiDiscoveryError(HostError):
    code, name, default_message = 475, "iSCSIDiscoveryError", "Failed discovery of iSCSI targets"


class IscsiLoginAuthError(HostError):
    code, name = 476, "iSCSILoginAuthError"
    default_message = "Failed to login to iSCSI node due to authorization failure"


class BlockDeviceActionError(HostError):
    code, name, default_message = 600, "BlockDeviceActionError", "Error block device action"


ALL_ERRORS: tuple[type[HostError], ...] = (
    ParseError, InvalidRequestError, MethodNotFoundError, InvalidParamsError, InternalError,
    GeneralError,
    InvalidParameterError, StorageServerConnectionError, StorageServerDisconnectionError,
    IscsiSetupError, IscsiDiscoveryError, IscsiLoginAuthError, BlockDeviceActionError,
)


# -- VM errors (oVirt host-agent codes) ----------------------------------------------------------

class NoSuchVmError(HostError):
    code, name, default_message = 1, "noVM", "Virtual machine does not exist"


class VmExistsError(HostError):
    code, name, default_message = 4, "exist", "Virtual machine already exists"


class VmDownError(HostError):
    code, name, default_message = 6, "down", "Virtual machine is down"


class VmCreateError(HostError):
    code, name, default_message = 9, "createErr", "Error creating the requested virtual machine"


class PeerUnreachableError(HostError):
    code, name, default_message = 10, "noConPeer", "Could not connect to peer host"


class MigrationError(HostError):
    code, name, default_message = 12, "migrateErr", "Fatal error during migration"


class ImageFileNotFoundError(HostError):
    code, name, default_message = 13, "imageErr", "Drive image file could not be found"


class ChangeDiskError(HostError):
    code, name, default_message = 41, "changeDisk", "Failed to change disk image"


class HotplugDiskError(HostError):
    code, name, default_message = 45, "hotplugDisk", "Failed to hotplug disk"


class HotunplugDiskError(HostError):
    code, name, default_message = 46, "hotunplugDisk", "Failed to hotunplug disk"


class MigrationInProgressError(HostError):
    code, name, default_message = 51, "migInProgress", "Command not supported during migration"


# -- Block storage domain and volume errors (oVirt storage codes) --------------------------------

class VolumeDoesNotExistError(HostError):
    code, name, default_message = 201, "VolumeDoesNotExist", "Volume does not exist"


class IncorrectFormatError(HostError):
    code, name, default_message = 202, "IncorrectFormat", "Incorrect Volume format"


class VolumeIsBusyError(HostError):
    code, name, default_message = 203, "VolumeIsBusy", "Volume is busy"


class VolumeCreationError(HostError):
    code, name, default_message = 205, "VolumeCreationError", "Error creating a new volume"


class VolumeAlreadyExistsError(HostError):
    code, name, default_message = 212, "VolumeAlreadyExists", "Volume already exists"


class VolumeNonWritableError(HostError):
    code, name, default_message = 213, "VolumeNonWritable", "Volume cannot be access to writes"


class CannotDeleteVolumeError(HostError):
    code, name, default_message = 222, "CannotDeleteVolume", "Volume deletion error"


class ImagePathError(HostError):
    code, name = 254, "ImagePathError"
    default_message = "Image path does not exist or cannot be accessed/created"


class StorageDomainCreationError(HostError):
    code, name = 351, "StorageDomainCreationError"
    default_message = "Error creating a storage domain"


class StorageDomainDoesNotExistError(HostError):
    code, name = 358, "StorageDomainDoesNotExist"
    default_message = "Storage domain does not exist"


class StorageDomainNotEmptyError(HostError):
    code, name = 361, "StorageDomainNotEmpty"
    default_message = "Storage domain is not empty - requires cleaning"


class StorageDomainAlreadyExistsError(HostError):
    code, name = 365, "StorageDomainAlreadyExists"
    default_message = "Storage domain already exists"


class StorageDomainAccessError(HostError):
    code, name = 379, "StorageDomainAccessError"
    default_message = "Domain is either partially accessible or entirely inaccessible"


class NoSpaceLeftOnDomainError(HostError):
    code, name, default_message = 397, "NoSpaceLeftOnDomain", "No space left on domain"


class ImageVerificationError(HostError):
    code, name, default_message = 484, "ImageVerificationError", "Image verification failed"


class VolumeGroupRemoveError(HostError):
    code, name, default_message = 508, "VolumeGroupRemoveError", "Volume Group remove error"


class VolumeGroupHasDomainTagError(HostError):
    code, name = 515, "VolumeGroupHasDomainTag"
    default_message = "Volume Group has domain tag - requires cleaning"


class CannotDeactivateLogicalVolumeError(HostError):
    code, name = 552, "CannotDeactivateLogicalVolume"
    default_message = "Cannot deactivate Logical Volume"


class CannotActivateLogicalVolumeError(HostError):
    code, name = 558, "CannotActivateLogicalVolume"
    default_message = "Cannot activate Logical Volume"


class LogicalVolumeReplaceTagError(HostError):
    code, name = 572, "LogicalVolumeReplaceTagError"
    default_message = "Replace Logical Volume tag error"


class PhysDevInitializationError(HostError):
    code, name = 601, "PhysDevInitializationError"
    default_message = "Failed to initialize physical device"


class InaccessiblePhysDevError(HostError):
    code, name = 606, "InaccessiblePhysDev"
    default_message = "Multipath cannot access physical device(s)"


class MiscBlockReadError(HostError):
    code, name = 2003, "MiscBlockReadException"
    default_message = "Internal block device read failure"


class MiscBlockWriteError(HostError):
    code, name = 2004, "MiscBlockWriteException"
    default_message = "Internal block device write failure"
