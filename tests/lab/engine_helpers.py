"""Helpers of the engine's lab tests: what the lab hosts really do (libvirt, agents)."""

from __future__ import annotations

import time

import libvirt

from virtyard.lab import qga
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab


def target_name(target: TargetInfo) -> str:
    return target.iqn.split(":", 1)[1]


def engine_connections(lab: Lab, index: int, ids: set[str]) -> set[str]:
    """The engine's connections (by id) that lab host ``index``'s agent keeps."""
    with lab.agent_client(index) as agent:
        return {c["id"] for c in agent.call("StoragePool.getConnections")} & ids


def domain_on(lab: Lab, index: int, vm_id: str) -> libvirt.virDomain | None:
    conn = libvirt.open(lab.hosts[index].uri)
    try:
        return conn.lookupByUUIDString(vm_id)
    except libvirt.libvirtError:
        return None


def wait_guest_path(dom: libvirt.virDomain, path: str, *, present: bool = True,
                    timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (qga.run(dom, f"test -b {path}").exitcode == 0) == present:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} {'did not appear' if present else 'stayed'} in the guest")
