"""The whole lab in one directory: tgtd, N libvirtd hosts with their agents, the engine (on
SQLite in ``engine/``), the tiny guest, and their state.

``up`` is idempotent and all-or-nothing (what it started is stopped again when a later step
fails); ``down`` stops everything and leaves no process, loop device, mount or file behind.
Two labs with different state directories and ports run side by side (the demo's and the tests').
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from virtyard.host.client import ClientTls, HostClient
from virtyard.lab import ports
from virtyard.lab.agents import AgentProcess, LabPki
from virtyard.lab.engine import ADMIN, EngineProcess
from virtyard.lab.errors import LabError, MissingPackageError
from virtyard.lab.guest_image import GuestImage, build_guest_image
from virtyard.lab.hypervisor import HypervisorHost
from virtyard.lab.iscsi_target import TargetServer
from virtyard.lab.kvm import detect_accelerator
from virtyard.lab.process import PACKAGE_OF, require, run
from virtyard.lab.storage_host import StorageHostVM

# Programs `up` needs; checked together so that one error names every missing package.
REQUIRED_PROGRAMS = (
    "tgtd", "tgtadm", "libvirtd", "qemu-system-x86_64", "qemu-img", "iscsi-ls",
    "unshare", "losetup", "cpio", "udevadm", "dpkg-deb", "apt-get", "genisoimage", "pvcreate",
)


def default_cache_dir() -> Path:
    """Where built guest images are kept between labs (rebuilt only when packages change)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("VIRTYARD_CACHE", str(Path(base) / "virtyard")))


EPHEMERAL_START = 32768  # Linux's default net.ipv4.ip_local_port_range starts here


@dataclass(frozen=True)
class LabConfig:
    """Where a lab keeps its state and which loopback ports it uses."""

    state_dir: Path
    iscsi_port: int
    tgt_control_port: int
    libvirt_base_port: int
    migration_base_port: int
    agent_base_port: int
    engine_port: int
    host_count: int = 2
    cache_dir: Path | None = None
    # The storage host VM (kernel initiator, multipath, LVM activation) starts with the lab.
    storage_host: bool = False

    @classmethod
    def demo(cls, state_dir: Path) -> LabConfig:
        """The lab ``make demo`` runs."""
        return cls(state_dir, iscsi_port=13260, tgt_control_port=1326,
                   libvirt_base_port=16610, migration_base_port=17200, agent_base_port=15430,
                   engine_port=15470)

    @classmethod
    def test(cls, state_dir: Path) -> LabConfig:
        """The lab the test suite runs: its own directory and ports, so both can run at once."""
        return cls(state_dir, iscsi_port=23260, tgt_control_port=2326,
                   libvirt_base_port=26610, migration_base_port=27400, agent_base_port=25430,
                   engine_port=25470)

    def with_port_base(self, base: int) -> LabConfig:
        """The same lab on ports from ``base`` on (iSCSI, libvirtd, agents, engine, migration)."""
        # Below the kernel's ephemeral range (32768+ by default): a port there can be taken at any
        # moment by the local end of some outgoing connection, and the lab fails with port-busy.
        if not 1024 <= base <= EPHEMERAL_START - 200:
            raise LabError(f"port base {base} must be between 1024 and {EPHEMERAL_START - 200}, "
                           "below the kernel's ephemeral ports")
        return replace(self, iscsi_port=base, tgt_control_port=base % 10000,
                       libvirt_base_port=base + 10, migration_base_port=base + 100,
                       agent_base_port=base + 50, engine_port=base + 90)

    def shifted(self, offset: int) -> LabConfig:
        """The same lab with every port moved by ``offset`` (a second test run, say)."""
        return replace(self, iscsi_port=self.iscsi_port + offset,
                       tgt_control_port=self.tgt_control_port + offset,
                       libvirt_base_port=self.libvirt_base_port + offset,
                       migration_base_port=self.migration_base_port + offset,
                       agent_base_port=self.agent_base_port + offset,
                       engine_port=self.engine_port + offset)

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["state_dir"] = str(self.state_dir)
        raw["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LabConfig:
        # A lab.json written before the engine joined the lab: its port by the profiles' rule.
        raw = {"engine_port": raw["agent_base_port"] + 40, **raw}
        return cls(**{**raw, "state_dir": Path(raw["state_dir"]),
                      "cache_dir": Path(raw["cache_dir"]) if raw.get("cache_dir") else None})

    def all_ports(self) -> Iterator[tuple[int, str]]:
        """Every TCP port the lab listens on, with what it is for."""
        yield self.iscsi_port, "iSCSI portal (tgtd)"
        for i in range(self.host_count):
            yield self.libvirt_base_port + i, f"libvirtd of host{i + 1}"
            yield self.agent_base_port + i, f"host agent of host{i + 1}"
        yield self.engine_port, "engine REST API"
        if self.storage_host:
            yield self.storage_host_port, "host agent of the storage host VM"

    @property
    def storage_host_port(self) -> int:
        """The storage host VM's agent, forwarded to loopback after the hosts' agents."""
        return self.agent_base_port + 9


class Lab:
    """One lab: :meth:`up` builds it, :meth:`status` describes it, :meth:`down` removes it."""

    def __init__(self, config: LabConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir.resolve()
        self.storage = TargetServer(self.state_dir / "iscsi", config.iscsi_port,
                                    config.tgt_control_port)
        self.hosts = [self._host(i) for i in range(config.host_count)]
        self.pki = LabPki(self.state_dir / "pki")
        self.agents = [
            AgentProcess(h.name, h.root / "agent", config.agent_base_port + i, h.uri, self.pki,
                         migration_uri=h.migration_uri,
                         virt_type="kvm" if self.accelerator == "kvm" else "qemu")
            for i, h in enumerate(self.hosts)]
        # The engine on SQLite in engine/ (its state, log, admin password), with the lab's CA.
        self.engine = EngineProcess(self.state_dir / "engine", config.engine_port, self.pki)
        self.storage_host = StorageHostVM(
            self.state_dir / "storage-host", agent_port=config.storage_host_port,
            iscsi_port=config.iscsi_port, pki=self.pki, cache_dir=self.cache_dir)

    @classmethod
    def load(cls, state_dir: Path) -> Lab | None:
        """The lab whose state lives in ``state_dir``, or ``None`` when there is none."""
        try:
            raw = json.loads((state_dir / "lab.json").read_text())
        except FileNotFoundError:
            return None
        return cls(LabConfig.from_json(raw["config"]))

    def _host(self, i: int) -> HypervisorHost:
        port = self.config.libvirt_base_port + i
        first = self.config.migration_base_port + 20 * i
        # A stable host UUID per lab and host: the same host keeps its identity across up/down.
        host_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"virtyard-lab:{self.state_dir}:{i}"))
        return HypervisorHost(name=f"host{i + 1}", root=self.state_dir / "hosts" / f"host{i + 1}",
                              tcp_port=port, migration_ports=(first, first + 19),
                              host_uuid=host_uuid)

    @property
    def cache_dir(self) -> Path:
        return self.config.cache_dir or default_cache_dir()

    @property
    def console_dir(self) -> Path:
        """Serial console logs of lab guests (shared by all hosts, so migration keeps them)."""
        return self.state_dir / "consoles"

    # -- up -------------------------------------------------------------------------------

    def up(self) -> dict[str, Any]:
        """Bring every part up (idempotent) and return :meth:`status`."""
        check_prerequisites()
        self._check_ports()
        fresh = not self.storage.is_running() and not any(h.is_running() for h in self.hosts)
        started: list[HypervisorHost | TargetServer | AgentProcess | EngineProcess
                      | StorageHostVM] = []
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.console_dir.mkdir(exist_ok=True)
            image = build_guest_image(self.cache_dir / "guest")
            accelerator = self._accelerator(image)
            self._save({"accelerator": accelerator, "kernel": str(image.kernel),
                        "initrd": str(image.initrd), "kernel_version": image.kernel_version})
            if not self.storage.is_running():
                self.storage.start()
                started.append(self.storage)
            to_start = [h for h in self.hosts if not h.is_running()]
            with ThreadPoolExecutor(max_workers=max(1, len(to_start))) as pool:
                futures = {pool.submit(h.start): h for h in to_start}
                errors = []
                for future, host in futures.items():
                    try:
                        future.result()
                        started.append(host)
                    except LabError as exc:
                        errors.append(exc)
                if errors:
                    raise errors[0]
            self.pki.ensure()
            for agent in self.agents:
                agent.virt_type = "kvm" if accelerator == "kvm" else "qemu"
                if not agent.is_running():
                    agent.start()
                    started.append(agent)
            if not self.engine.is_running():
                self.engine.start()
                started.append(self.engine)
            if self.config.storage_host and not self.storage_host.is_running():
                self._save({"storage_host_boot_s": round(self.storage_host.start(), 1)})
                started.append(self.storage_host)
        except BaseException:
            for part in reversed(started):
                part.stop()
            if fresh:  # nothing ran before this call: leave nothing behind either
                shutil.rmtree(self.state_dir, ignore_errors=True)
            raise
        return self.status()

    def _check_ports(self) -> None:
        running = {self.config.iscsi_port} if self.storage.is_running() else set()
        running |= {h.tcp_port for h in self.hosts if h.is_running()}
        running |= {a.port for a in self.agents if a.is_running()}
        running |= {self.engine.port} if self.engine.is_running() else set()
        running |= {self.storage_host.agent_port} if self.storage_host.is_running() else set()
        for port, purpose in self.config.all_ports():
            if port not in running:
                ports.ensure_free(port, purpose)

    def _accelerator(self, image: GuestImage) -> str:
        """KVM only where a guest really boots with it; probed once per kernel and machine
        (kept beside the guest image cache, so every lab on this machine shares the answer)."""
        probe_file = self.cache_dir / "accelerator.json"
        key = {"kernel_version": image.kernel_version, "kvm_exists": os.path.exists("/dev/kvm"),
               "boot_id": _boot_id()}
        try:
            cached = json.loads(probe_file.read_text())
            if cached.get("key") == key:
                return str(cached["accelerator"])
        except (OSError, ValueError):
            pass
        accelerator = detect_accelerator(image, self.state_dir, timeout=20.0)
        probe_file.write_text(json.dumps({"key": key, "accelerator": accelerator}))
        return accelerator

    # -- down -----------------------------------------------------------------------------

    def down(self) -> None:
        """Stop everything and remove the state directory; safe to run twice."""
        errors: list[LabError] = []
        parts: list[HypervisorHost | TargetServer | AgentProcess | EngineProcess
                    | StorageHostVM] = [
            self.engine, self.storage_host, *self.agents, *self.hosts, self.storage]
        for part in parts:
            try:
                part.stop()
            except LabError as exc:
                errors.append(exc)
        detach_loop_devices_under(self.state_dir)
        if errors:
            raise errors[0]
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)

    # -- status ---------------------------------------------------------------------------

    @property
    def accelerator(self) -> str:
        return str(self._load().get("accelerator", "tcg"))

    @property
    def guest_image(self) -> GuestImage:
        state = self._load()
        if "kernel" not in state:
            raise LabError(f"the lab in {self.state_dir} is not up: run 'virtyard-lab up'")
        return GuestImage(kernel=Path(state["kernel"]), initrd=Path(state["initrd"]),
                          kernel_version=str(state["kernel_version"]), flavour="tiny")

    def status(self) -> dict[str, Any]:
        """What runs, where, and how to reach it."""
        state = self._load()
        return {
            "state_dir": str(self.state_dir),
            "accelerator": state.get("accelerator"),
            "guest": {"kernel": state.get("kernel"), "initrd": state.get("initrd")},
            "iscsi": self.storage.status(),
            "hosts": [h.status() for h in self.hosts],
            "agents": [a.status() for a in self.agents],
            "engine": self.engine.status(),
            "storage_host": self.storage_host.status(),
        }

    def start_storage_host(self) -> float:
        """Start the storage host VM on a running lab (no-op when it runs); the boot time."""
        self.pki.ensure()
        return self.storage_host.start()

    def agent_client(self, index: int) -> HostClient:
        """A mutual-TLS client to the agent of host ``index`` with the engine's certificate."""
        tls = ClientTls(self.pki.client.cert, self.pki.client.key, self.pki.ca.cert)
        return HostClient(self.agents[index].address, tls)

    def env(self) -> dict[str, str]:
        """The lab as shell variables, for ``demo.env``."""
        return {
            "VIRTYARD_ISCSI_PORTAL": self.storage.portal,
            "VIRTYARD_LIBVIRT_URIS": " ".join(h.uri for h in self.hosts),
            "VIRTYARD_HOSTS": " ".join(a.address for a in self.agents),
            "VIRTYARD_HOST_CERT": str(self.pki.client.cert),
            "VIRTYARD_HOST_KEY": str(self.pki.client.key),
            "VIRTYARD_HOST_CA": str(self.pki.ca.cert),
            "VIRTYARD_ENGINE_URL": self.engine.url,
            "VIRTYARD_ENGINE_USER": ADMIN,
            "VIRTYARD_ENGINE_PASSWORD": self.engine.password,
            "VIRTYARD_ENGINE_CA": str(self.engine.ca_file),
        }

    def _load(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads((self.state_dir / "lab.json").read_text())
        except FileNotFoundError:
            return {}
        return state

    def _save(self, updates: dict[str, Any]) -> None:
        state = self._load()
        state.update(updates)
        state["config"] = self.config.to_json()
        path = self.state_dir / "lab.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)


def _boot_id() -> str:
    """Changes at every boot of the machine: a KVM answer is not kept across reboots."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def leftovers(state_dir: Path) -> list[str]:
    """Anything a lab in ``state_dir`` may have left: processes, mounts, loop devices, files.

    Processes and mounts are found through every process's command line and mount table, so
    those in other mount namespaces (the hosts' libvirtd and QEMU) are seen too.
    """
    root = str(state_dir.resolve())
    names_root = _path_pattern(root)
    found: list[str] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            mounts = (proc / "mountinfo").read_text(errors="replace")
        except OSError:
            continue
        if names_root.search(cmdline):
            found.append(f"process {proc.name}: {cmdline.strip()[:200]}")
        elif f" {root}/" in mounts or f" {root} " in mounts:
            found.append(f"process {proc.name} holds mounts under {root}: {cmdline.strip()[:120]}")
    found.extend(f"loop device {dev}" for dev in loop_devices_under(state_dir))
    if state_dir.exists():
        found.append(f"directory {state_dir} still exists")
    return found


def check_prerequisites() -> None:
    """Raise one :class:`MissingPackageError` naming every missing program and its package."""
    missing = []
    for program in REQUIRED_PROGRAMS:
        try:
            require(program)
        except MissingPackageError:
            missing.append((program, PACKAGE_OF.get(program, program)))
    if missing:
        raise MissingPackageError(*missing[0], *missing[1:])


def loop_devices_under(root: Path) -> list[str]:
    """Loop devices whose backing file lies under ``root``."""
    out = run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], check=False).stdout
    if not out.strip():
        return []
    under = _path_pattern(str(root.resolve()))
    return [d["name"] for d in json.loads(out).get("loopdevices", [])
            if under.match(d.get("back-file") or "")]


def _path_pattern(root: str) -> re.Pattern[str]:
    """``root`` itself or a path under it, not a sibling sharing its prefix (``.lab`` must not
    find ``.lab-test``'s processes or loop devices)."""
    return re.compile(re.escape(root) + r"(?![^/\s,:;=])")


def detach_loop_devices_under(root: Path) -> None:
    """Detach every loop device the lab made over its own files."""
    for device in loop_devices_under(root):
        run(["losetup", "--detach", device], check=False)

