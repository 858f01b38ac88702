"""HA wired into the engine: the restarter and the fencer, their hooks, their tasks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from virtyard.engine.ha.fencer import Fencer, clear_stale
from virtyard.engine.ha.restart import Restarter
from virtyard.engine.hosts.pool import HostAddress


@dataclass
class HaService:
    restarter: Restarter
    fencer: Fencer


def ha_service(services: Any) -> HaService:
    """The engine's one HA service (made on first use, kept in ``services.extra``)."""
    existing = services.extra.get("ha")
    if isinstance(existing, HaService):
        return existing
    config = services.config.ha
    restarter = Restarter(services, config)
    ha = HaService(restarter, Fencer(services, config, on_off=restarter.wake))
    services.extra["ha"] = ha
    return ha


def start(services: Any) -> list[asyncio.Task[None]]:
    """Hook HA into monitoring (a VM went down) and the heartbeat (a down host returns), then
    start its loops. Called in the server's lifespan, after the monitor exists."""
    ha = ha_service(services)

    async def stale_gone(host: HostAddress) -> bool:
        return await clear_stale(services, host)

    services.heartbeat.before_up.append(stale_gone)
    if services.monitor is not None:
        services.monitor.on_down.append(ha.restarter.wake)
    return [asyncio.create_task(ha.restarter.run(), name="ha-restarts"),
            asyncio.create_task(ha.fencer.run(), name="ha-fencing")]
