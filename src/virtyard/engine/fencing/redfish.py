"""Redfish through the ``sushy`` library (what OpenStack Ironic uses): ``ComputerSystem``
``Reset`` with ``ForceOff``/``On``, ``PowerState`` for status.

Options: ``ssl=0`` for plain HTTP (default HTTPS), ``ssl_insecure=1`` to skip certificate
checks, ``plug`` (or ``systems_uri``) to name the system (default: the only one).
"""

from __future__ import annotations

from typing import Any

import sushy

from virtyard.engine.fencing.agent import Action, AgentSpec, FenceError, redact

TIMEOUT = 15


class RedfishDriver:
    def __init__(self, spec: AgentSpec) -> None:
        self.spec = spec

    def _system(self) -> Any:
        opts = self.spec.options
        secure = opts.get("ssl", "1") not in ("0", "false", "no")
        port = self.spec.port or (443 if secure else 80)
        base = f"{'https' if secure else 'http'}://{self.spec.address}:{port}"
        verify = opts.get("ssl_insecure", "0") in ("0", "false", "no")
        conn = sushy.Sushy(base, username=self.spec.user_name or None,
                           password=self.spec.password or None, verify=verify,
                           server_side_retries=1, server_side_retries_delay=1,
                           read_timeout=TIMEOUT, connect_timeout=5)
        plug = opts.get("plug") or opts.get("systems_uri", "")
        if plug:
            path = plug if plug.startswith("/") else f"/redfish/v1/Systems/{plug}"
            return conn.get_system(path)
        members = conn.get_system_collection().get_members()
        if len(members) != 1:
            raise FenceError(f"{len(members)} systems at {self.spec.address}: set plug=<id>")
        return members[0]

    def power(self, action: Action) -> str:
        try:
            system = self._system()
            if action == "off":
                system.reset_system(sushy.ResetType.FORCE_OFF)
            elif action == "on":
                system.reset_system(sushy.ResetType.ON)
            system.refresh(force=True)
            state = system.power_state
        except Exception as exc:  # a BMC is outside input: any failure is a failed fence
            raise FenceError(redact(f"redfish {action} at {self.spec.address}: {exc}"[:500],
                                    self.spec)) from None
        return "off" if state == sushy.PowerState.OFF else "on"
