"""IPMI over LAN (RMCP+, IPMI 2.0) through ``pyghmi``: chassis power off / on / status.

pyghmi keeps one long-lived session per BMC and user (with keep-alives) and is built to be
reused: a second ``Command`` for the same BMC waits on the first one's session. So one
``Command`` per BMC, address and user is kept here and dropped when it fails.
"""

from __future__ import annotations

import threading
from typing import Any

from pyghmi.ipmi import command as ipmi

from virtyard.engine.fencing.agent import Action, AgentSpec, FenceError, redact

_sessions: dict[tuple[str, int, str, str], Any] = {}
_lock = threading.Lock()


class IpmiDriver:
    def __init__(self, spec: AgentSpec) -> None:
        self.spec = spec
        self.key = (spec.address, spec.port or 623, spec.user_name, spec.password)

    def _command(self) -> Any:
        with _lock:
            bmc = _sessions.get(self.key)
            if bmc is None:
                bmc = ipmi.Command(bmc=self.spec.address, userid=self.spec.user_name,
                                   password=self.spec.password, port=self.spec.port or 623)
                _sessions[self.key] = bmc
            return bmc

    def power(self, action: Action) -> str:
        try:
            bmc = self._command()
            if action in ("off", "on"):
                bmc.set_power(action, wait=False)
            state = bmc.get_power().get("powerstate")
        except Exception as exc:  # a BMC is outside input: any failure is a failed fence
            with _lock:
                _sessions.pop(self.key, None)
            raise FenceError(redact(f"ipmilan {action} at {self.spec.address}: {exc}"[:500],
                                    self.spec)) from None
        return "off" if state == "off" else "on"
