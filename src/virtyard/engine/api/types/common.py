"""Types every part of the API shares: faults, actions, versions, small nested values."""

from __future__ import annotations

from virtyard.engine.api.types.base import (
    BOOLEAN,
    INTEGER,
    STRING,
    Enum,
    Field,
    ListOf,
    Type,
    register,
    struct,
)

FAULT = struct("fault", "Why a request failed: a short reason and the detail.", [
    Field("reason", STRING, "What failed, e.g. 'Operation Failed'."),
    Field("detail", STRING, "Why, e.g. '[Cannot remove Host. Host is not in maintenance.]'."),
    Field("key", STRING, "The stable error key (e.g. ACTION_TYPE_FAILED_NAME_ALREADY_USED)."),
])

VERSION = struct("version", "A version number.", [
    Field("build", INTEGER), Field("full_version", STRING), Field("major", INTEGER),
    Field("minor", INTEGER), Field("revision", INTEGER),
])

ACTION_STATUS = Enum("action_status", ("complete", "failed", "pending", "in_progress"))

IDENTIFIED_REF_FIELDS = [
    Field("name", STRING), Field("description", STRING), Field("comment", STRING),
]


def ref_type(tag: str, collection: str, doc: str) -> Type:
    """A minimal identified type whose fields a later module completes (cross references)."""
    t = Type(tag, doc, list(IDENTIFIED_REF_FIELDS), identified=True, collection=collection)
    register(t)
    return t


ACTION = struct("action", "Parameters and outcome of an action (start, deactivate, ...).", [
    Field("async", BOOLEAN, "Answer before the action completes."),
    Field("force", BOOLEAN, "Act even where a check would refuse."),
    Field("reason", STRING, "Why the user does this (kept in the event)."),
    Field("status", ACTION_STATUS, "complete once done.", read_only=True),
    Field("fault", FAULT, "Why it failed.", read_only=True),
])

PROPERTY = struct("property", "A name/value pair.", [Field("name", STRING),
                                                     Field("value", STRING)])
PROPERTIES = ListOf(PROPERTY, "property")
