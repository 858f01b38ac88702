"""The driver for an agent type: a library for the built-in types, else a program."""

from __future__ import annotations

from pathlib import Path

from virtyard.engine.fencing.agent import AgentSpec, FenceDriver, check_type
from virtyard.engine.fencing.ipmi import IpmiDriver
from virtyard.engine.fencing.program import ProgramDriver
from virtyard.engine.fencing.redfish import RedfishDriver


def driver_for(spec: AgentSpec, program_dirs: list[Path]) -> FenceDriver:
    check_type(spec.type)
    if spec.type == "redfish":
        return RedfishDriver(spec)
    if spec.type == "ipmilan":
        return IpmiDriver(spec)
    return ProgramDriver(spec, program_dirs)
