"""The audit log: what every command and the monitoring write (``events`` table).

Codes are oVirt's ``AuditLogType`` numbers where one exists, so tools that know oVirt's events
(e.g. waiting for event 97 after attaching a disk) read ours alike. Texts name objects, never
secrets: callers pass names and ids only.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from virtyard.engine.db.models import Event


@dataclass(frozen=True)
class EventType:
    code: int
    severity: str  # normal | warning | error | alert
    template: str


def _t(code: int, severity: str, template: str) -> EventType:
    return EventType(code, severity, template)


USER_LOGIN = _t(30, "normal", "User {user} logged in.")
USER_LOGOUT = _t(31, "normal", "User {user} logged out.")
USER_LOGIN_FAILED = _t(114, "error", "User {user} failed to log in.")
HOST_ADDED = _t(42, "normal", "Host {host} was added by {user}.")
HOST_REMOVED = _t(44, "normal", "Host {host} was removed by {user}.")
HOST_ACTIVATED = _t(16, "normal", "Host {host} was activated by {user}.")
HOST_MAINTENANCE = _t(600, "normal", "Host {host} was switched to Maintenance Mode by {user}.")
HOST_UP = _t(13, "normal", "Host {host} is up: its agent answers ({detail}).")
HOST_NOT_RESPONDING = _t(12, "error", "Host {host} is not responding: {detail}")
HOST_AGENT_RESTARTED = _t(9000, "warning", "The agent of host {host} restarted.")
HOST_UUID_CONFLICT = _t(9001, "error",
                        "Host {host} reports the hardware UUID of host {other}; it stays "
                        "non-responsive until that is resolved.")
USER_ADDED = _t(149, "normal", "User {name} was added.")


@dataclass(frozen=True)
class Ids:
    """The objects an event is about."""

    host_id: str | None = None
    vm_id: str | None = None
    disk_id: str | None = None
    storage_domain_id: str | None = None


def record(tx: Session, kind: EventType, ids: Ids | None = None, *, user_id: str | None = None,
           user_name: str = "", correlation_id: str = "", **values: object) -> Event:
    """Add one event to the transaction ``tx`` (it commits with the change it describes)."""
    event = Event(code=kind.code, severity=kind.severity,
                  description=kind.template.format(**{"user": user_name or "the engine", **values}),
                  correlation_id=correlation_id, user_id=user_id, user_name=user_name,
                  host_id=ids.host_id if ids else None, vm_id=ids.vm_id if ids else None,
                  disk_id=ids.disk_id if ids else None,
                  storage_domain_id=ids.storage_domain_id if ids else None)
    tx.add(event)
    return event
