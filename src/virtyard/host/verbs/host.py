"""Host verbs for the engine: the heartbeat (``Host.ping``) and what it stores about a host
(``Host.getCapabilities``).

``Host.ping`` touches neither libvirt nor storage and takes no lock, so it answers while either
hangs. Capability names follow the engine's camelCase; the descriptions name oVirt's host
agent (vdsm) field where one exists.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import libvirt
from pydantic import BaseModel, Field

import virtyard
from virtyard.host.agent import HostAgent
from virtyard.host.rpc.errors import GeneralError
from virtyard.host.rpc.schema import NoParams
from virtyard.host.verbs.registry import SCHEMA

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
CPUINFO = Path("/proc/cpuinfo")

# Taken when the agent process loads its verbs, i.e. at its start: a restarted agent answers a
# later value, which is how the engine notices the restart.
AGENT_STARTED_AT = time.time()


def read_boot_id(path: Path = BOOT_ID) -> str | None:
    """The kernel's boot id (changes at every boot), or ``None`` where there is none."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


_BOOT_ID = read_boot_id()  # cannot change while this process lives


# -- Host.ping ----------------------------------------------------------------------------------

class PingResult(BaseModel):
    time: float = Field(description="the agent's clock, Unix time in seconds")
    agentStartedAt: float = Field(
        description="when this agent process started (Unix time); a new value means a restart")
    bootId: str | None = Field(
        default=None, description="the host kernel's boot id; a new value means a reboot")


@SCHEMA.verb("Host.ping", params=NoParams, result=PingResult)
def host_ping(agent: HostAgent, p: NoParams) -> PingResult:
    """The engine's heartbeat: ``time`` (the agent's Unix time), ``agentStartedAt`` (Unix time
    the agent process started; changes when the agent restarts) and ``bootId`` (the host
    kernel's boot id, null if unknown; changes when the host reboots).

    Touches neither libvirt nor storage and takes no lock, so it answers while they hang."""
    return PingResult(time=time.time(), agentStartedAt=AGENT_STARTED_AT, bootId=_BOOT_ID)


# -- Host.getCapabilities -----------------------------------------------------------------------

class Capabilities(BaseModel):
    hostUUID: str | None = Field(description=(
        "libvirt's host UUID (capabilities <host><uuid>; vdsm: uuid); null if libvirt has none"))
    hostName: str = Field(description="the agent's configured name")
    iscsiInitiatorName: str = Field(
        description="this host's iSCSI initiator IQN (vdsm: ISCSIInitiatorName)")
    initiator: Literal["userspace", "kernel"] = Field(
        description="the iSCSI initiator the agent uses")
    cpuModel: str = Field(description="processor name (vdsm: cpuModel)")
    cpuSockets: int = Field(description="CPU sockets (vdsm: cpuSockets)")
    cpuCores: int = Field(description="physical CPU cores, all sockets (vdsm: cpuCores)")
    cpuThreads: int = Field(description="logical CPUs online (vdsm: cpuThreads)")
    cpuArch: str = Field(description="CPU architecture, e.g. x86_64")
    memoryMiB: int = Field(description="the machine's memory in MiB (vdsm: memSize)")
    libvirtVersion: str = Field(description="libvirt's version, e.g. 9.0.0")
    qemuVersion: str = Field(description="the hypervisor's (QEMU's) version, e.g. 7.2.0")
    agentVersion: str = Field(description="virtyard-hostd's version")
    virtType: Literal["kvm", "qemu"] = Field(description="kvm, or qemu (TCG) without KVM")
    migrationUri: str = Field(
        description="where other hosts' libvirtd send this host VMs (peer-to-peer migration)")


@dataclass(frozen=True)
class LibvirtFacts:
    """What ``Host.getCapabilities`` asks libvirt, in one go."""

    capabilities_xml: str
    info: list[Any]  # virNodeGetInfo: arch, memory MiB, cpus, MHz, nodes, sockets, cores, threads
    lib_version: int
    hv_version: int


def libvirt_facts(conn: libvirt.virConnect) -> LibvirtFacts:
    return LibvirtFacts(conn.getCapabilities(), list(conn.getInfo()), conn.getLibVersion(),
                        conn.getVersion())


def version_string(number: int) -> str:
    """libvirt's encoded version (major * 1,000,000 + minor * 1,000 + micro) as ``M.m.u``."""
    return f"{number // 1_000_000}.{number // 1_000 % 1_000}.{number % 1_000}"


def processor_name(path: Path = CPUINFO) -> str | None:
    """The first ``model name`` of ``/proc/cpuinfo`` (absent on some architectures)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return None


def capabilities_of(agent: HostAgent, facts: LibvirtFacts, *,
                    cpu_name: str | None) -> Capabilities:
    """The host's capabilities from what libvirt said and the agent's own configuration."""
    host = ET.fromstring(facts.capabilities_xml).find("host")
    uuid = host.findtext("uuid") if host is not None else None
    libvirt_model = host.findtext("cpu/model") if host is not None else None
    arch, memory_mib, cpus, _mhz, nodes, sockets, cores, _threads = facts.info
    return Capabilities(
        hostUUID=uuid.strip() if uuid and uuid.strip() else None,
        hostName=agent.config.name,
        iscsiInitiatorName=agent.config.storage.initiator_name,
        initiator=agent.initiator.kind,
        cpuModel=cpu_name or (libvirt_model or "").strip() or arch,
        cpuSockets=nodes * sockets,
        cpuCores=nodes * sockets * cores,
        cpuThreads=cpus,
        cpuArch=arch,
        memoryMiB=memory_mib,
        libvirtVersion=version_string(facts.lib_version),
        qemuVersion=version_string(facts.hv_version),
        agentVersion=virtyard.__version__,
        virtType="kvm" if agent.vms.virt_type == "kvm" else "qemu",
        migrationUri=agent.migration_uri,
    )


@SCHEMA.verb("Host.getCapabilities", params=NoParams, result=Capabilities)
def host_get_capabilities(agent: HostAgent, p: NoParams) -> Capabilities:
    """What the engine stores about this host: ``hostUUID`` (libvirt's host UUID, null if it
    has none), ``hostName`` (the agent's configured name), ``iscsiInitiatorName`` (this host's
    IQN), ``initiator`` (``userspace`` or ``kernel``), ``cpuModel`` (processor name),
    ``cpuSockets``, ``cpuCores`` (physical cores), ``cpuThreads`` (logical CPUs online),
    ``cpuArch``, ``memoryMiB`` (the machine's memory), ``libvirtVersion``, ``qemuVersion``,
    ``agentVersion``, ``virtType`` (``kvm``, or ``qemu`` when the agent runs VMs without
    KVM) and ``migrationUri`` (where other hosts' libvirtd send this host VMs).

    Asks libvirt (fails with 100 when libvirtd cannot be reached); takes no lock."""
    try:
        facts = agent.libvirt.call(libvirt_facts)
    except libvirt.libvirtError as exc:
        raise GeneralError(f"libvirt at {agent.libvirt.uri}: {exc}") from None
    return capabilities_of(agent, facts, cpu_name=processor_name())
