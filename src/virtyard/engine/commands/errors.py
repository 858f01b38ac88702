"""Stable error keys (oVirt's ``EngineMessage`` names where one exists) with their HTTP status.

A failed check raises :class:`CommandError` with a key; the REST layer turns it into oVirt's
fault (reason "Operation Failed", detail "[Cannot <action> <type>. <message>]") with the key's
status, and the key itself travels in the fault so scripts need not parse English.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorKey:
    key: str
    status: int
    message: str


class CommandError(Exception):
    """A command refused: which key, and the detail text built from it."""

    def __init__(self, error: ErrorKey, action: str, entity: str, **values: object) -> None:
        self.error = error
        self.message = error.message.format(**values) if values else error.message
        self.detail = f"[Cannot {action} {entity}. {self.message}]"
        super().__init__(f"{error.key}: {self.detail}")

    @property
    def status(self) -> int:
        return self.error.status

    @property
    def key(self) -> str:
        return self.error.key


def _k(key: str, status: int, message: str) -> ErrorKey:
    return ErrorKey(key, status, message)


# Permissions and existence.
NOT_AUTHORIZED = _k("USER_NOT_AUTHORIZED_TO_PERFORM_ACTION", 403,
                    "User is not authorized to perform this action.")
HOST_NOT_FOUND = _k("ACTION_TYPE_FAILED_HOST_NOT_EXIST", 404, "Host does not exist.")
CLUSTER_NOT_FOUND = _k("ACTION_TYPE_FAILED_CLUSTER_IS_NOT_VALID", 400,
                       "Cluster {name} does not exist.")
# Names and addresses.
NAME_ALREADY_USED = _k("ACTION_TYPE_FAILED_NAME_ALREADY_USED", 409,
                       "The name {name} is already in use, please choose a unique name and "
                       "try again.")
NAME_EMPTY = _k("ACTION_TYPE_FAILED_NAME_MAY_NOT_BE_EMPTY", 400, "The name may not be empty.")
NAME_INVALID = _k("ACTION_TYPE_FAILED_NAME_MAY_NOT_CONTAIN_SPECIAL_CHARS", 400,
                  "The name may contain only letters, digits, '_', '-' and '.', "
                  "at most {max} characters.")
HOST_SAME_ADDRESS = _k("ACTION_TYPE_FAILED_VDS_WITH_SAME_HOST_EXIST", 409,
                       "A host with the same address and port ({address}:{port}) already "
                       "exists.")
HOST_SAME_UUID = _k("ACTION_TYPE_FAILED_VDS_WITH_SAME_UUID_EXIST", 409,
                    "A host with the same hardware UUID already exists.")
HOST_ADDRESS_INVALID = _k("VDS_INVALID_SERVER_ADDRESS", 400,
                          "The address '{address}' is not a valid host name or IP address.")
PORT_INVALID = _k("VDS_INVALID_PORT", 400, "The port {port} is not between 1 and 65535.")
# Host status.
HOST_REMOVE_STATUS = _k("VDS_CANNOT_REMOVE_VDS_STATUS_ILLEGAL", 409,
                        "Host {name} is {status}; move it to maintenance first.")
HOST_REMOVE_HAS_VMS = _k("VDS_CANNOT_REMOVE_HOST_WITH_RUNNING_VMS", 409,
                         "Host {name} still runs VMs.")
HOST_ALREADY_UP = _k("VDS_ALREADY_UP", 409, "Host {name} is already up.")
HOST_ALREADY_MAINTENANCE = _k("VDS_CANNOT_MAINTENANCE_VDS_IS_IN_MAINTENANCE", 409,
                              "Host {name} is already in maintenance.")
HOST_MAINTENANCE_RUNNING_VMS = _k("VDS_CANNOT_MAINTENANCE_VDS_RUNNING_VMS", 409,
                                  "Host {name} runs {count} VM(s); stop or migrate them first.")
HOST_STATUS_ILLEGAL = _k("VDS_STATUS_ILLEGAL", 409, "Host {name} is {status}.")
# Generic input.
MISSING_PARAMETER = _k("ACTION_TYPE_FAILED_MISSING_PARAMETER", 400,
                       "The parameter {name} is required.")
