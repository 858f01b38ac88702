"""The one shape of every user action: validate → execute (one transaction) → events.

A command is a small class: its fields are the request, ``validate`` checks everything and
raises :class:`CommandError` with a stable key, ``execute`` changes the database inside the same
transaction, ``events`` says what to write to the audit log (committed together with the
change), and ``after_commit`` starts what must happen outside the transaction (e.g. contacting
a new host). :func:`run` is the only way to execute one: it checks the user's role, maps a
violated database constraint (a race another request won) to the same key a check would have
given, and rolls everything back on any failure. The REST layer, the web UI and the CLI all
come through here and add no rules of their own.
"""

from __future__ import annotations

import logging
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands.errors import NOT_AUTHORIZED, CommandError, ErrorKey
from virtyard.engine.db.database import Database
from virtyard.engine.db.models import Base

log = logging.getLogger("virtyard.engine.commands")

R = TypeVar("R")

ADMIN = "admin"
READONLY = "readonly"
ROLES = (ADMIN, READONLY)


@dataclass(frozen=True)
class Principal:
    """Who acts: a user, or the engine itself (monitoring, recovery)."""

    user_id: str | None
    name: str
    role: str

    @property
    def can_write(self) -> bool:
        return self.role == ADMIN


ENGINE = Principal(None, "", ADMIN)


@dataclass
class Context:
    """What a command runs with: the database, the acting user, the engine's services."""

    db: Database
    principal: Principal
    services: Any = None  # the engine's services (host pool, monitors); see engine/services.py
    correlation_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


class Command(ABC, Generic[R]):
    """Base of every command. Subclasses set ``action``/``entity`` ("add", "Host") for messages."""

    action: ClassVar[str] = "perform"
    entity: ClassVar[str] = "action"
    # Role needed: commands that change anything need an administrator.
    writes: ClassVar[bool] = True
    # A violated unique constraint (table, columns) → the key its check would have raised.
    conflicts: ClassVar[dict[tuple[str, tuple[str, ...]], ErrorKey]] = {}

    def fail(self, error: ErrorKey, **values: object) -> CommandError:
        return CommandError(error, self.action, self.entity, **values)

    @abstractmethod
    def validate(self, tx: Session, ctx: Context) -> None:
        """Every check, before anything changes; raise ``self.fail(KEY)``."""

    @abstractmethod
    def execute(self, tx: Session, ctx: Context) -> R:
        """The change, in the transaction ``tx``."""

    def events(self, tx: Session, ctx: Context, result: R) -> None:
        """Write the audit events of a success (``audit.record``); default: none."""

    def conflict_values(self) -> dict[str, object]:
        """Values for the message of a key raised from a constraint violation."""
        return {k: v for k, v in vars(self).items() if isinstance(v, str | int)}

    def after_commit(self, ctx: Context, result: R) -> None:
        """Work that follows a committed change (never part of its atomicity)."""


def run(command: Command[R], ctx: Context) -> R:
    """Run ``command`` for ``ctx.principal``: all of it, or nothing."""
    run_in = getattr(command, "run_in", None)
    if run_in is not None:  # a flow: host calls between two transactions (commands/flow.py)
        result: R = run_in(ctx)
        return result
    if command.writes and not ctx.principal.can_write:
        raise command.fail(NOT_AUTHORIZED)
    try:
        with ctx.db.transaction() as tx:
            command.validate(tx, ctx)
            result = command.execute(tx, ctx)
            tx.flush()
            command.events(tx, ctx, result)
    except IntegrityError as exc:
        error = conflict_key(command, exc)
        if error is None:
            raise
        raise command.fail(error, **command.conflict_values()) from None
    command.after_commit(ctx, result)
    return result


def record_event(tx: Session, ctx: Context, kind: audit.EventType,
                 ids: audit.Ids | None = None, **values: object) -> None:
    """An audit event by the command's user, correlated with its request."""
    audit.record(tx, kind, ids, user_id=ctx.principal.user_id, user_name=ctx.principal.name,
                 correlation_id=ctx.correlation_id, **values)


E = TypeVar("E")


def locked(command: Command[Any], tx: Session, model: type[E], ident: str,
           missing: ErrorKey, *, for_update: bool = True) -> E:
    """The row ``ident`` of ``model``, locked for this transaction (commands change what they
    read), or the command's ``missing`` failure."""
    column: Any = model.id  # type: ignore[attr-defined]
    stmt = select(model).where(column == ident)
    if for_update:
        stmt = stmt.with_for_update()
    row = tx.scalars(stmt).first()
    if row is None:
        raise command.fail(missing)
    return row


_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: ([\w., ]+)")


def violated_unique(exc: IntegrityError) -> tuple[str, tuple[str, ...]] | None:
    """The (table, columns) of the unique constraint ``exc`` reports, on SQLite or PostgreSQL."""
    orig = exc.orig
    diag = getattr(orig, "diag", None)
    name = getattr(diag, "constraint_name", None) if diag is not None else None
    if name:
        for table in Base.metadata.tables.values():
            for constraint in table.constraints:
                if constraint.name == name:
                    columns = getattr(constraint, "columns", ())
                    return table.name, tuple(c.name for c in columns)
        return None
    match = _SQLITE_UNIQUE.search(str(orig))
    if not match:
        return None
    parts = [p.strip().split(".") for p in match.group(1).split(",")]
    return parts[0][0], tuple(p[1] for p in parts if len(p) == 2)


def conflict_key(command: Command[Any], exc: IntegrityError) -> ErrorKey | None:
    where = violated_unique(exc)
    if where is None:
        log.warning("%s: integrity error not mapped: %s", type(command).__name__, exc.orig)
        return None
    return command.conflicts.get(where)
