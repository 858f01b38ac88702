"""A fence-agents program (``fence_<type>``, as Pacemaker and oVirt run them): options as
``key=value`` lines on standard input, ``action=off|on|status``; for ``status`` the exit code
says the state (0 on, 2 off, other: failure), for ``off``/``on`` 0 means done.

Any agent type without a built-in driver runs its program, so an installed fence-agents
package (``fence_ipmilan``, ``fence_redfish``, ``fence_apc`` …) works as it is, and the lab
speaks the same protocol (``fence_virtyard_lab``) without the engine importing the lab. The
password goes on standard input only, never on a command line (``ps`` shows those).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from virtyard.engine.fencing.agent import Action, AgentSpec, FenceError, check_type, redact

TIMEOUT = 60.0
STATUS_ON, STATUS_OFF = 0, 2


def default_dirs() -> list[Path]:
    return [Path(sys.executable).parent, Path("/usr/sbin"), Path("/usr/bin")]


def find_program(kind: str, dirs: list[Path]) -> Path:
    name = f"fence_{check_type(kind)}"
    for folder in dirs or default_dirs():
        path = folder / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    where = ", ".join(map(str, dirs or default_dirs()))
    raise FenceError(f"no fence agent program {name} in {where}")


def stdin_text(spec: AgentSpec, action: Action) -> str:
    lines = {"action": action, "ip": spec.address, **spec.options}
    if spec.port:
        lines["ipport"] = str(spec.port)
    if spec.user_name:
        lines["username"] = spec.user_name
    if spec.password:
        lines["password"] = spec.password
    return "".join(f"{k}={v}\n" for k, v in lines.items()
                   if "\n" not in k and "\n" not in v)


class ProgramDriver:
    def __init__(self, spec: AgentSpec, dirs: list[Path]) -> None:
        self.spec = spec
        self.dirs = dirs

    def power(self, action: Action) -> str:
        program = find_program(self.spec.type, self.dirs)
        try:
            done = subprocess.run([str(program)], input=stdin_text(self.spec, action),
                                  capture_output=True, text=True, timeout=TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FenceError(redact(f"{program.name} {action}: {exc}"[:500], self.spec)) from None
        if action == "status" and done.returncode in (STATUS_ON, STATUS_OFF):
            return "on" if done.returncode == STATUS_ON else "off"
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            raise FenceError(redact(f"{program.name} {action} failed ({done.returncode}): "
                                    f"{detail[0]}"[:500], self.spec))
        return "off" if action == "off" else "on"
