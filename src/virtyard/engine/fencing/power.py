"""Power a host off (and prove it is off), on, or ask its state, through its agents in order.

``off`` is only a success once an agent's ``status`` says ``off``: the HA rules restart a
host's VMs elsewhere on that answer alone, so "the BMC accepted the request" is not enough.
The first agent that works is used; one that fails (unreachable, refused, never shows off in
time) hands over to the next.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from virtyard.engine.fencing.agent import AgentSpec, FenceDriver, FenceError
from virtyard.engine.fencing.drivers import driver_for

log = logging.getLogger("virtyard.engine.fencing")

DriverFactory = Callable[[AgentSpec, list[Path]], FenceDriver]


@dataclass
class PowerResult:
    ok: bool
    state: str  # on | off | unknown
    agent: str = ""  # "type at address" of the agent that answered (never a secret)
    detail: str = ""


def describe(spec: AgentSpec) -> str:
    return f"{spec.type} at {spec.address}" + (f":{spec.port}" if spec.port else "")


def power(specs: list[AgentSpec], action: str, *, dirs: list[Path] | None = None,
          timeout: float = 60.0, poll: float = 1.0, factory: DriverFactory = driver_for,
          sleep: Callable[[float], None] = time.sleep,
          clock: Callable[[], float] = time.monotonic) -> PowerResult:
    """``action``: off | on | status | restart (off, proven, then on)."""
    if not specs:
        return PowerResult(False, "unknown", detail="the host has no fence agent")
    if action == "restart":
        off = power(specs, "off", dirs=dirs, timeout=timeout, poll=poll, factory=factory,
                    sleep=sleep, clock=clock)
        if not off.ok:
            return off
        return power(specs, "on", dirs=dirs, timeout=timeout, poll=poll, factory=factory,
                     sleep=sleep, clock=clock)
    why: list[str] = []
    for spec in specs:
        try:
            driver = factory(spec, dirs or [])
            if action == "status":
                return PowerResult(True, driver.power("status"), describe(spec))
            want = "off" if action == "off" else "on"
            state = driver.power("off" if action == "off" else "on")
            deadline = clock() + timeout
            while state != want:
                if clock() >= deadline:
                    raise FenceError(f"still {state} {timeout:g} s after power {want}")
                sleep(poll)
                state = driver.power("status")
            return PowerResult(True, state, describe(spec))
        except (FenceError, ValueError) as exc:
            log.warning("fence agent %s: %s failed: %s", describe(spec), action, exc)
            why.append(f"{describe(spec)}: {exc}")
    return PowerResult(False, "unknown", detail="; ".join(why)[:1000])


__all__ = ["PowerResult", "describe", "power"]
