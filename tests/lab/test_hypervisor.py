"""Real libvirtd hosts side by side: isolation, live migration, clean stop, idempotence."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libvirt
import pytest

from virtyard.lab import hypervisor
from virtyard.lab.errors import PortBusyError, ServiceStartError
from virtyard.lab.hypervisor import HypervisorHost
from virtyard.lab.ports import LOOPBACK, port_is_free
from virtyard.lab.process import wait_until

pytestmark = pytest.mark.lab

# Migration flags the lab uses: live, daemon-to-daemon (the client only talks to the source),
# and the guest's definition moves with it (persistent on the destination, gone on the source),
# as a manager moving a VM between hosts expects.
MIGRATE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)

_taken: set[int] = set()


def free_port() -> int:
    """A loopback TCP port the OS says is free, never handed out twice in this run."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if port not in _taken:
            _taken.add(port)
            return port


def free_port_range(size: int = 10) -> tuple[int, int]:
    """``size`` consecutive free loopback ports below the ephemeral range (QEMU migration)."""
    rng = random.Random()
    for _ in range(200):
        low = rng.randrange(20000, 30000 - size)
        ports = range(low, low + size)
        if not _taken.intersection(ports) and all(port_is_free(p) for p in ports):
            _taken.update(ports)
            return low, low + size - 1
    raise RuntimeError("no free port range found")


def make_host(lab_dir: Path, name: str) -> HypervisorHost:
    return HypervisorHost(
        name=name,
        root=lab_dir / name,
        tcp_port=free_port(),
        migration_ports=free_port_range(),
        host_uuid=str(uuid.uuid4()),
    )


def mount_references(root: Path) -> list[int]:
    """Pids whose mount table mentions ``root`` (bind mounts of the host's folders)."""
    needle = str(root)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/mountinfo").read_text()
        except OSError:
            continue
        if needle in text:
            pids.append(int(entry))
    return pids


def processes_naming(root: Path) -> list[int]:
    """Pids whose command line names ``root`` (libvirtd's config path, QEMU's files)."""
    needle = os.fsencode(str(root))
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(entry))
    return pids


def assert_host_gone(host: HypervisorHost) -> None:
    assert not host.is_running()
    assert host.pid() is None
    assert host.processes() == []
    assert processes_naming(host.root) == []
    assert mount_references(host.root) == []
    assert not host.socket_path.exists()
    run_dir = host.root / "run"
    assert not run_dir.exists() or list(run_dir.iterdir()) == []


@pytest.fixture
def lab_dir() -> Iterator[Path]:
    # Short on purpose: tmp_path can be too deep for a Unix socket path.
    path = Path(tempfile.mkdtemp(prefix="vy-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def two_hosts(lab_dir: Path) -> Iterator[tuple[HypervisorHost, HypervisorHost]]:
    hosts = (make_host(lab_dir, "h1"), make_host(lab_dir, "h2"))
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            for future in [pool.submit(h.start) for h in hosts]:
                future.result()
        yield hosts
    finally:
        for host in hosts:
            host.stop()


def host_uuid_of(conn: libvirt.virConnect) -> str:
    caps = ET.fromstring(conn.getCapabilities())
    text = caps.findtext("./host/uuid")
    assert text
    return text


def domain_xml(name: str, serial_log: Path) -> str:
    return f"""
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>96</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{serial_log}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def domain_names(conn: libvirt.virConnect) -> set[str]:
    return {d.name() for d in conn.listAllDomains()}


def test_two_hosts_live_migration_and_clean_stop(
    two_hosts: tuple[HypervisorHost, HypervisorHost], lab_dir: Path
) -> None:
    h1, h2 = two_hosts
    assert h1.is_running() and h2.is_running()
    assert h1.pid() != h2.pid()

    c1 = h1.connect()
    c2 = h2.connect()
    try:
        u1, u2 = host_uuid_of(c1), host_uuid_of(c2)
        assert u1 == h1.host_uuid
        assert u2 == h2.host_uuid
        assert u1 != u2

        dom = c1.defineXML(domain_xml("vy-mig", lab_dir / "vy-mig.serial"))
        dom.create()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        # The QEMU process is seen as belonging to host 1 only.
        assert any(_is_qemu(p) for p in h1.processes())
        assert not any(_is_qemu(p) for p in h2.processes())

        started = time.monotonic()
        dom.migrateToURI3(h2.migration_uri, {}, MIGRATE_FLAGS)
        elapsed = time.monotonic() - started
        print(f"live migration took {elapsed:.2f} s")

        moved = c2.lookupByName("vy-mig")
        assert moved.isActive()
        assert moved.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert moved.isPersistent()
        assert "vy-mig" not in domain_names(c1)
        assert h2.status()["domains"] == ["vy-mig"]
        assert h1.status()["domains"] == []
        assert any(_is_qemu(p) for p in h2.processes())
        assert not any(_is_qemu(p) for p in h1.processes())
    finally:
        c1.close()
        c2.close()

    h1.stop()
    h2.stop()
    assert_host_gone(h1)
    assert_host_gone(h2)


def _is_qemu(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("qemu")
    except OSError:
        return False


def test_busy_port_is_named_and_nothing_starts(lab_dir: Path) -> None:
    host = make_host(lab_dir, "busy")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind((LOOPBACK, host.tcp_port))
        blocker.listen(1)
        with pytest.raises(PortBusyError) as info:
            host.start()
    assert info.value.port == host.tcp_port
    assert str(host.tcp_port) in str(info.value)
    assert_host_gone(host)


def test_start_and_stop_are_idempotent(lab_dir: Path) -> None:
    host = make_host(lab_dir, "idem")
    try:
        host.stop()  # never started: a no-op
        assert_host_gone(host)
        host.start()
        pid = host.pid()
        assert pid is not None
        host.start()
        assert host.pid() == pid
        conn = host.connect()
        try:
            assert conn.getLibVersion() > 0
        finally:
            conn.close()
        host.stop()
        assert_host_gone(host)
        host.stop()
        assert_host_gone(host)
        # A stopped host starts again (capabilities are cached now, so this is quick).
        started = time.monotonic()
        host.start()
        print(f"restart took {time.monotonic() - started:.2f} s")
        assert host.is_running()
    finally:
        host.stop()
    assert_host_gone(host)


def test_stop_cleans_domains_left_running(lab_dir: Path) -> None:
    host = make_host(lab_dir, "dirty")
    try:
        host.start()
        conn = host.connect()
        try:
            conn.defineXML(domain_xml("vy-left", lab_dir / "left.serial")).create()
            conn.createXML(domain_xml("vy-transient", lab_dir / "transient.serial"), 0)
        finally:
            conn.close()
        domains = host.status()["domains"]
        assert isinstance(domains, list)
        assert set(domains) == {"vy-left", "vy-transient"}
        host.stop()
        assert_host_gone(host)
        host.start()
        conn = host.connect()
        try:
            assert domain_names(conn) == set()  # undefined too, not just destroyed
        finally:
            conn.close()
    finally:
        host.stop()
    assert_host_gone(host)


def test_stop_after_libvirtd_crash_kills_orphaned_qemu(lab_dir: Path) -> None:
    host = make_host(lab_dir, "crash")
    try:
        host.start()
        conn = host.connect()
        try:
            conn.createXML(domain_xml("vy-orphan", lab_dir / "orphan.serial"), 0)
        finally:
            conn.close()
        pid = host.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not host.is_running(), timeout=10)
        # QEMU outlives its daemon, still inside the host's mount namespace.
        assert any(_is_qemu(p) for p in host.processes())
        host.stop()
        assert_host_gone(host)
    finally:
        host.stop()


def test_failed_start_leaves_nothing_and_shows_log(
    lab_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = make_host(lab_dir, "broken")

    def bad_qemu_conf(*, migration_ports: tuple[int, int]) -> str:
        # libvirt refuses this value at QEMU driver start, after libvirtd daemonized.
        return 'migration_address = "127.0.0.1"\n'

    monkeypatch.setattr(hypervisor, "qemu_conf", bad_qemu_conf)
    try:
        with pytest.raises(ServiceStartError) as info:
            host.start(timeout=30)
        assert "migration_address" in str(info.value)
        assert_host_gone(host)
    finally:
        host.stop()
