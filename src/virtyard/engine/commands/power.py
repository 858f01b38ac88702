"""Power management commands: fence agents (add, update, remove), power management on or
off, a host confirmed off by an administrator (``fence_type=manual``), and power actions
through the agents (stop, start, restart, status).

A manual confirmation is what lets a host without power management give up its VMs: the
administrator states the host is off (rebooted, unplugged); the engine then marks its VMs down
and restarts the HA ones elsewhere (``ha/fencer.confirm_off``). Passwords are write-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Command, Context, locked, record_event
from virtyard.engine.db.models import FenceAgent, Host
from virtyard.engine.fencing.agent import OPTION_KEY_RE, check_type
from virtyard.engine.fencing.power import PowerResult
from virtyard.engine.ha.fencer import confirm_off
from virtyard.engine.ha.service import ha_service

FENCE_TYPES = ("manual", "stop", "start", "restart", "status")
MAX_FIELD = 255
MAX_ORDER = 1000


def _host(command: Command[Any], tx: Session, host_id: str) -> Host:
    return locked(command, tx, Host, host_id, errors.HOST_NOT_FOUND)


def options_text(options: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


@dataclass
class AgentFields:
    """What a request sets on an agent (``None``: unchanged)."""

    type: str | None = None
    address: str | None = None
    port: int | None = None
    user_name: str | None = None
    password: str | None = field(default=None, repr=False)
    options: dict[str, str] | None = None
    order: int | None = None

    def check(self, command: Command[Any]) -> None:
        def bad(why: str) -> errors.CommandError:
            return command.fail(errors.FENCE_AGENT_INVALID, why=why)
        if self.type is not None:
            try:
                check_type(self.type)
            except ValueError as exc:
                raise bad(str(exc)) from None
        for label, value in (("address", self.address), ("username", self.user_name),
                             ("password", self.password)):
            if value is not None and (len(value) > MAX_FIELD or "\n" in value):
                raise bad(f"{label} must be one line of at most {MAX_FIELD} characters")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise command.fail(errors.PORT_INVALID, port=self.port)
        if self.order is not None and not 1 <= self.order <= MAX_ORDER:
            raise bad(f"order must be between 1 and {MAX_ORDER}")
        for key, value in (self.options or {}).items():
            if not OPTION_KEY_RE.match(key) or any(c in value for c in ",\n"):
                raise bad(f"option {key[:64]!r} is not a valid name=value")
        if self.options is not None and len(options_text(self.options)) > 4000:
            raise bad("the options are too long")

    def apply(self, agent: FenceAgent) -> None:
        for column, value in (("type", self.type), ("address", self.address),
                              ("port", self.port), ("user_name", self.user_name),
                              ("password", self.password), ("position", self.order)):
            if value is not None:
                setattr(agent, column, value)
        if self.options is not None:
            agent.options = options_text(self.options)


@dataclass
class AddFenceAgent(Command[FenceAgent]):
    action: ClassVar[str] = "add"
    entity: ClassVar[str] = "fence agent"

    host_id: str
    fields: AgentFields

    def validate(self, tx: Session, ctx: Context) -> None:
        _host(self, tx, self.host_id)
        if not self.fields.type or not self.fields.address:
            raise self.fail(errors.FENCE_AGENT_INVALID, why="type and address are required")
        self.fields.check(self)

    def execute(self, tx: Session, ctx: Context) -> FenceAgent:
        count = tx.scalar(select(func.count()).where(FenceAgent.host_id == self.host_id)) or 0
        agent = FenceAgent(host_id=self.host_id, position=count + 1, type="", address="",
                           user_name="", password="", options="", encrypt_options=False)
        self.fields.apply(agent)
        tx.add(agent)
        return agent

    def events(self, tx: Session, ctx: Context, result: FenceAgent) -> None:
        host = tx.get(Host, self.host_id)
        record_event(tx, ctx, audit.HOST_POWER, audit.Ids(host_id=self.host_id),
                     host=host.name if host else "?", action="agent added",
                     state=f"{result.type} at {result.address}")


@dataclass
class UpdateFenceAgent(Command[FenceAgent]):
    action: ClassVar[str] = "update"
    entity: ClassVar[str] = "fence agent"

    host_id: str
    agent_id: str
    fields: AgentFields

    def validate(self, tx: Session, ctx: Context) -> None:
        agent = tx.get(FenceAgent, self.agent_id)
        if agent is None or agent.host_id != self.host_id:
            raise self.fail(errors.FENCE_AGENT_NOT_FOUND)
        self.fields.check(self)

    def execute(self, tx: Session, ctx: Context) -> FenceAgent:
        agent = tx.get(FenceAgent, self.agent_id)
        assert agent is not None
        self.fields.apply(agent)
        return agent


@dataclass
class RemoveFenceAgent(Command[None]):
    action: ClassVar[str] = "remove"
    entity: ClassVar[str] = "fence agent"

    host_id: str
    agent_id: str

    def validate(self, tx: Session, ctx: Context) -> None:
        agent = tx.get(FenceAgent, self.agent_id)
        if agent is None or agent.host_id != self.host_id:
            raise self.fail(errors.FENCE_AGENT_NOT_FOUND)
        host = _host(self, tx, self.host_id)
        left = tx.scalar(select(func.count()).where(FenceAgent.host_id == self.host_id)) or 0
        if host.pm_enabled and left <= 1:
            raise self.fail(errors.HOST_NO_POWER_MANAGEMENT, name=host.name)

    def execute(self, tx: Session, ctx: Context) -> None:
        agent = tx.get(FenceAgent, self.agent_id)
        if agent is not None:
            tx.delete(agent)


@dataclass
class SetPowerManagement(Command[Host]):
    """``PUT hosts/{id}`` with ``power_management.enabled``: enabling needs an agent."""

    action: ClassVar[str] = "update"
    entity: ClassVar[str] = "Host"

    host_id: str
    enabled: bool

    def validate(self, tx: Session, ctx: Context) -> None:
        host = _host(self, tx, self.host_id)
        if self.enabled and not tx.scalar(
                select(func.count()).where(FenceAgent.host_id == self.host_id)):
            raise self.fail(errors.HOST_NO_POWER_MANAGEMENT, name=host.name)

    def execute(self, tx: Session, ctx: Context) -> Host:
        host = _host(self, tx, self.host_id)
        host.pm_enabled = self.enabled
        return host


@dataclass
class ConfirmHostOff(Command[list[str]]):
    """``POST hosts/{id}/fence`` ``fence_type=manual``: the administrator states the host is
    off. Only for a non-responsive host (an Up host answers: it is not off)."""

    action: ClassVar[str] = "fence"
    entity: ClassVar[str] = "Host"

    host_id: str

    def validate(self, tx: Session, ctx: Context) -> None:
        host = _host(self, tx, self.host_id)
        if host.status != "non_responsive":
            raise self.fail(errors.HOST_STATUS_ILLEGAL, name=host.name, status=host.status)

    def execute(self, tx: Session, ctx: Context) -> list[str]:
        host = _host(self, tx, self.host_id)
        return confirm_off(tx, host, f"confirmed off by {ctx.principal.name or 'the engine'}")

    def after_commit(self, ctx: Context, result: list[str]) -> None:
        if ctx.services is not None:
            ha_service(ctx.services).restarter.wake()


@dataclass
class PowerHost(Command[PowerResult]):
    """``POST hosts/{id}/fence`` stop | start | restart | status through the host's agents
    (``stop`` and ``restart`` confirm the host off once an agent shows it off)."""

    action: ClassVar[str] = "fence"
    entity: ClassVar[str] = "Host"

    host_id: str
    fence_type: str
    name: str = ""

    @property
    def writes(self) -> bool:  # type: ignore[override]
        return self.fence_type != "status"

    def validate(self, tx: Session, ctx: Context) -> None:
        host = tx.get(Host, self.host_id)
        if host is None:
            raise self.fail(errors.HOST_NOT_FOUND)
        self.name = host.name
        if not tx.scalar(select(func.count()).where(FenceAgent.host_id == self.host_id)):
            raise self.fail(errors.HOST_NO_POWER_MANAGEMENT, name=host.name)

    def execute(self, tx: Session, ctx: Context) -> PowerResult:  # pragma: no cover
        raise NotImplementedError("runs through run_in")

    def run_in(self, ctx: Context) -> PowerResult:
        if self.writes and not ctx.principal.can_write:
            raise self.fail(errors.NOT_AUTHORIZED)
        with ctx.db.read() as tx:
            self.validate(tx, ctx)
        action = {"stop": "off", "start": "on"}.get(self.fence_type, self.fence_type)
        result = ha_service(ctx.services).fencer.power_action(self.host_id, action,
                                                               ctx.principal.name)
        if not result.ok:
            raise self.fail(errors.FENCE_FAILED, action=action, name=self.name,
                            why=result.detail[:500])
        return result
