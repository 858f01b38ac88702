"""The audit log as the API shows it: newest first, ``from=`` for "since this id"."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from virtyard.engine.api.faults import not_found
from virtyard.engine.api.types.base import Model
from virtyard.engine.db.models import Event
from virtyard.engine.queries.common import searched

EVENT_SEARCH = {"severity": Event.severity, "code": Event.code, "id": Event.id,
                "description": Event.description, "correlation_id": Event.correlation_id,
                "host.id": Event.host_id, "vm.id": Event.vm_id, "user": Event.user_name,
                "user.name": Event.user_name}


def event_model(event: Event) -> Model:
    model: Model = {
        "id": str(event.id), "code": event.code, "severity": event.severity,
        "description": event.description, "time": event.time, "origin": "virtyard",
        "custom_id": -1, "flood_rate": 30, "log_on_host": False,
        "correlation_id": event.correlation_id or None,
    }
    if event.user_id:
        model["user"] = {"id": event.user_id, "name": event.user_name}
    for name, ident in (("host", event.host_id), ("vm", event.vm_id), ("disk", event.disk_id),
                        ("storage_domain", event.storage_domain_id)):
        if ident:
            model[name] = {"id": ident}
    return model


def list_events(tx: Session, query: str = "", *, since: int | None = None,
                case_sensitive: bool = True, limit: int | None = None) -> list[Model]:
    stmt = select(Event).order_by(Event.id.desc())
    if since is not None:
        stmt = stmt.where(Event.id > since)
    stmt = searched(stmt, query, EVENT_SEARCH, case_sensitive=case_sensitive, limit=limit)
    return [event_model(e) for e in tx.scalars(stmt)]


def get_event(tx: Session, event_id: str) -> Model:
    event = tx.get(Event, int(event_id)) if event_id.isdigit() and len(event_id) < 18 else None
    if event is None:
        raise not_found("Event", event_id[:64])
    return event_model(event)
