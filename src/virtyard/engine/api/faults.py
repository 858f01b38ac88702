"""oVirt's faults: ``<fault><reason/><detail/></fault>`` with the right HTTP status.

Every failure a client can cause ends here, as one of these, never as a stack trace.
"""

from __future__ import annotations

from virtyard.engine.api.types.base import Model
from virtyard.engine.commands.errors import CommandError

OPERATION_FAILED = "Operation Failed"


class ApiError(Exception):
    """A request the API refuses, with oVirt's reason and a detail that says why."""

    def __init__(self, status: int, reason: str, detail: str = "", key: str = "") -> None:
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail
        self.key = key

    def model(self) -> Model:
        fault: Model = {"reason": self.reason, "detail": self.detail}
        if self.key:
            fault["key"] = self.key
        return fault

    @classmethod
    def from_command(cls, error: CommandError) -> ApiError:
        return cls(error.status, OPERATION_FAILED, error.detail, error.key)


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, "Entity not found", f"{what} with id '{ident}' does not exist",
                    "ENTITY_NOT_FOUND")


def bad_request(detail: str, key: str = "BAD_REQUEST") -> ApiError:
    return ApiError(400, "Invalid input", detail, key)


def incomplete(type_name: str, *fields: str, action: str = "add") -> ApiError:
    """oVirt's "Incomplete parameters" fault naming what is missing."""
    names = ", ".join(fields)
    return ApiError(400, "Incomplete parameters",
                    f"{type_name} [{names}] required for {action}", "INCOMPLETE_PARAMS")


def unauthorized(detail: str) -> ApiError:
    return ApiError(401, "Unauthorized", detail, "UNAUTHORIZED")
