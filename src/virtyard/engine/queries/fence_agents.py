"""A host's fence agents as the API shows them (never the password)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from virtyard.engine.api.codec import API_PREFIX
from virtyard.engine.api.faults import not_found
from virtyard.engine.api.types.base import Model
from virtyard.engine.db.models import FenceAgent, Host
from virtyard.engine.fencing.agent import parse_options
from virtyard.engine.queries.common import get_or_404


def agent_model(agent: FenceAgent) -> Model:
    try:
        options = parse_options(agent.options)
    except ValueError:
        options = {}
    model: Model = {
        "id": agent.id, "href": f"{API_PREFIX}/hosts/{agent.host_id}/fenceagents/{agent.id}",
        "name": agent.type, "address": agent.address, "type": agent.type,
        "username": agent.user_name, "order": agent.position,
        "encrypt_options": agent.encrypt_options, "concurrent": False,
        "options": [{"name": k, "value": v} for k, v in options.items()],
        "host": {"id": agent.host_id},
    }
    if agent.port is not None:
        model["port"] = agent.port
    return model


def list_agents(tx: Session, host_id: str) -> list[Model]:
    get_or_404(tx, Host, host_id, "Host")
    return [agent_model(a) for a in tx.scalars(
        select(FenceAgent).where(FenceAgent.host_id == host_id)
        .order_by(FenceAgent.position, FenceAgent.id))]


def get_agent(tx: Session, host_id: str, agent_id: str) -> Model:
    agent = tx.get(FenceAgent, agent_id)
    if agent is None or agent.host_id != host_id:
        raise not_found("Agent", agent_id[:64])
    return agent_model(agent)
