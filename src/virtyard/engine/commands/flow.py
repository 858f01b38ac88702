"""Commands whose execution spans host calls (run, stop, migrate, plug, unplug, change CD).

Same shape as every command — validate → execute → events — with the execution cut where a
host is called, because a host call must never run inside a database transaction:

1. ``validate`` and ``begin`` in one transaction: all checks, then a :class:`Flow` row (one per
   VM: the database refuses a second, which is the VM's lock) and the state that says "in
   progress" (e.g. ``wait_for_launch``);
2. ``perform``: the host calls, outside any transaction; each step is recorded on the flow row
   (:meth:`FlowCommand.step`; not when recovery does not need it) — and is where a crash test
   can kill the engine (``die_at``);
3. ``finish`` and the events in one transaction, which also deletes the flow row;
   on failure ``undo`` (then the flow row goes, with a failure event).

An engine that dies in step 2 finds the flow row at start; ``recovery.py`` asks the hosts what
really happened and completes or undoes it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from abc import abstractmethod
from typing import Any, ClassVar, TypeVar

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Command, Context, conflict_key
from virtyard.engine.commands.errors import CommandError
from virtyard.engine.db.models import Flow, utcnow

log = logging.getLogger("virtyard.engine.flows")

R = TypeVar("R")


def die_point(ctx: Context, point: str) -> None:
    """Crash tests: the engine dies here (as ``kill -9`` would) when configured to."""
    services = ctx.services
    if services is not None and services.config.debug.die_at == point:
        log.warning("debug.die_at=%s: dying now", point)
        logging.shutdown()
        os._exit(137)


class FlowCommand(Command[R]):
    """A command with host calls in its execution; see the module docstring."""

    kind: ClassVar[str] = "flow"

    def run_in(self, ctx: Context) -> R:
        """How :func:`commands.base.run` runs a flow."""
        return run_flow(self, ctx)

    @abstractmethod
    def begin(self, tx: Session, ctx: Context) -> Flow:
        """After validate, in its transaction: the flow row and the "in progress" state."""

    @abstractmethod
    def perform(self, ctx: Context, flow: Flow) -> R:
        """The host calls (no transaction open); raise to fail."""

    @abstractmethod
    def finish(self, tx: Session, ctx: Context, flow: Flow, result: R) -> None:
        """Record the outcome and write the events (one transaction)."""

    @abstractmethod
    def undo(self, ctx: Context, flow: Flow, error: BaseException) -> None:
        """Put things back after a failure in ``perform`` (its own transactions, host calls)."""

    def failed_event(self, tx: Session, ctx: Context, flow: Flow,
                     error: BaseException) -> None:
        """The audit event of a failure (default: none)."""

    def execute(self, tx: Session, ctx: Context) -> R:  # pragma: no cover - not used
        raise NotImplementedError("a flow runs through run_flow")

    def new_flow(self, vm_id: str | None, ctx: Context, **fields: Any) -> Flow:
        data = fields.pop("data", {})
        return Flow(kind=self.kind, vm_id=vm_id, user_name=ctx.principal.name,
                    correlation_id=ctx.correlation_id, data=json.dumps(data), **fields)

    def step(self, ctx: Context, flow: Flow, name: str, *, journal: bool = True,
             **data: Any) -> None:
        """Record that the flow reached ``name`` (with more data), then maybe die there.
        ``journal=False``: a step whose row recovery does not need (it asks the hosts either
        way) costs no commit; it and its data are written with the next journaled step, and
        its die point stays."""
        flow.step = name
        if data:
            merged = {**json.loads(flow.data or "{}"), **data}
            flow.data = json.dumps(merged)
        if not journal:
            die_point(ctx, f"{self.kind}:{name}")
            return
        with ctx.db.transaction() as tx:
            row = tx.get(Flow, flow.id)
            if row is not None:
                row.step = name
                row.data = flow.data
                row.updated_at = utcnow()
        die_point(ctx, f"{self.kind}:{name}")


def flow_data(flow: Flow) -> dict[str, Any]:
    data = json.loads(flow.data or "{}")
    return data if isinstance(data, dict) else {}


def run_flow(command: FlowCommand[R], ctx: Context) -> R:
    """Run a flow command: all of it, or nothing (see the module docstring)."""
    if command.writes and not ctx.principal.can_write:
        raise command.fail(errors.NOT_AUTHORIZED)
    try:
        with ctx.db.transaction() as tx:
            command.validate(tx, ctx)
            flow = command.begin(tx, ctx)
            tx.add(flow)
            tx.flush()
    except IntegrityError as exc:
        if "flows" in str(exc.orig) or "uq_flows_vm_id" in str(exc.orig):
            raise command.fail(errors.VM_IS_LOCKED) from None
        raise
    die_point(ctx, f"{command.kind}:begun")
    try:
        result = command.perform(ctx, flow)
    except BaseException as exc:
        log.info("%s %s failed: %s", command.kind, flow.vm_id, exc)
        try:
            command.undo(ctx, flow, exc)
        finally:
            with ctx.db.transaction() as tx:
                tx.execute(delete(Flow).where(Flow.id == flow.id))
                command.failed_event(tx, ctx, flow, exc)
        raise
    with ctx.db.transaction() as tx:
        command.finish(tx, ctx, flow, result)
        tx.execute(delete(Flow).where(Flow.id == flow.id))
    command.after_commit(ctx, result)
    return result


def flow_age(flow: Flow) -> datetime.timedelta:
    return utcnow() - flow.updated_at


__all__ = ["CommandError", "FlowCommand", "die_point", "flow_data", "run_flow"]


class HostCommand(Command[R]):
    """A command that asks a host something between its checks and its change, without a
    journal because nothing it does needs recovering (discovery, a login whose desired state
    is committed first and reconciled, a visibility check before adding a disk):
    ``validate`` (read transaction) → ``perform`` (host calls) → ``record`` (one transaction,
    with the events)."""

    def run_in(self, ctx: Context) -> R:
        if self.writes and not ctx.principal.can_write:
            raise self.fail(errors.NOT_AUTHORIZED)
        with ctx.db.transaction() as tx:
            self.validate(tx, ctx)
        found = self.perform(ctx)
        try:
            with ctx.db.transaction() as tx:
                result = self.record(tx, ctx, found)
                tx.flush()
                self.events(tx, ctx, result)
        except IntegrityError as exc:
            error = conflict_key(self, exc)
            if error is None:
                raise
            raise self.fail(error, **self.conflict_values()) from None
        self.after_commit(ctx, result)
        return result

    def perform(self, ctx: Context) -> Any:
        """The host calls; their findings go to :meth:`record`. Default: none."""
        return None

    @abstractmethod
    def record(self, tx: Session, ctx: Context, found: Any) -> R:
        """The change, in one transaction, from what ``perform`` found."""

    def execute(self, tx: Session, ctx: Context) -> R:  # pragma: no cover - not used
        raise NotImplementedError("a host command runs through run_in")
