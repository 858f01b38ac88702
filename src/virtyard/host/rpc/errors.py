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
