"""The lab's hypervisor hosts: one real libvirtd per host, each in its own mount namespace.

A real data centre has one libvirtd per machine; the lab has one machine. Each
:class:`HypervisorHost` therefore runs its own ``libvirtd -d --listen`` inside
``unshare -m --propagation private``, with ``/etc/libvirt``, ``/run/libvirt``,
``/var/lib/libvirt``, ``/var/cache/libvirt`` and ``/var/log/libvirt`` bind-mounted from the host's
own folder. The daemon thus sees the standard paths (so its own socket and QEMU monitor paths
stay short) while nothing is shared between hosts; the mounts vanish with the namespace's last
process. Clients reach a host through its Unix socket (:attr:`HypervisorHost.uri`); hosts reach
each other over loopback TCP (:attr:`HypervisorHost.migration_uri`) for peer-to-peer migration.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import libvirt

from virtyard.lab.errors import CommandError, LabError, ServiceStartError
from virtyard.lab.ports import LOOPBACK, ensure_free
from virtyard.lab.process import pid_alive, read_pid, require, run, terminate, wait_until

T = TypeVar("T")

# sun_path in struct sockaddr_un holds 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 108

# Debian's libvirt resolves this account at QEMU driver start even when qemu.conf says root.
QEMU_ACCOUNT = "libvirt-qemu"

# (subfolder of the host's root, system path it replaces inside the host's mount namespace)
BIND_MOUNTS: tuple[tuple[str, str], ...] = (
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
)

# libvirt refuses 127.0.0.1 (and "localhost…") for migration_address and migration_host, a guard
# against real hosts telling each other "migrate to myself"; without migration_host the
# destination would advertise its hostname, which need not resolve to loopback. 127.0.0.2 is
# still loopback on Linux (lo owns 127.0.0.0/8) and libvirt accepts it.
MIGRATION_ADDRESS = "127.0.0.2"

SOCKET_NAME = "libvirt-sock"
PID_FILE = "run/libvirtd.pid"
LOG_FILE = "log/libvirtd.log"
START_LOG_FILE = "log/libvirtd-start.log"
LIBVIRTD_CONF = "etc/libvirtd.conf"
QEMU_CONF = "etc/qemu.conf"

# Undefine must also drop what would otherwise make libvirt refuse (saved state, snapshots, NVRAM).
_UNDEFINE_ALL = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
)


# --------------------------------------------------------------------------------------------
# Pure helpers (unit-tested without a daemon)
# --------------------------------------------------------------------------------------------


def socket_path(root: Path) -> Path:
    """Where the host's read-write libvirt socket appears outside its namespace."""
    return root / "run" / SOCKET_NAME


def check_socket_path(path: Path) -> None:
    """Raise :class:`LabError` when ``path`` cannot be a Unix socket address (too long).

    The kernel silently refuses longer paths, which would surface much later as an obscure
    connection failure; a lab folder that is too deep must be named up front.
    """
    size = len(os.fsencode(str(path)))
    if size >= UNIX_PATH_MAX:
        raise LabError(
            f"libvirt socket path {path} is {size} bytes; Unix socket paths must be shorter than "
            f"{UNIX_PATH_MAX} bytes — use a shorter lab state folder"
        )


def _conf_str(value: str) -> str:
    """Quote ``value`` for libvirt's config syntax; refuse what that syntax cannot carry."""
    if any(c in value for c in '"\\\n'):
        raise LabError(f"cannot write {value!r} into a libvirt config file")
    return f'"{value}"'


def check_host_uuid(host_uuid: str) -> str:
    """Return ``host_uuid`` normalised; libvirt refuses malformed or all-same-digit UUIDs."""
    try:
        text = str(uuid.UUID(host_uuid))
    except ValueError as exc:
        raise LabError(f"host UUID {host_uuid!r} is not a UUID") from exc
    if len(set(text.replace("-", ""))) == 1:
        raise LabError(f"host UUID {host_uuid!r} has all digits the same; libvirt refuses it")
    return text


def check_port_range(ports: tuple[int, int]) -> tuple[int, int]:
    """Validate a migration port range (inclusive, unprivileged, ordered)."""
    low, high = ports
    if not (1024 <= low <= high <= 65535):
        raise LabError(
            f"migration port range {low}-{high} must satisfy 1024 <= min <= max <= 65535"
        )
    return low, high


def libvirtd_conf(*, tcp_port: int, host_uuid: str, log_file: Path) -> str:
    """libvirtd.conf for one lab host: plain TCP on loopback only, its own UUID and log.

    TCP without TLS or auth is acceptable because it listens on 127.0.0.1 only; it is what
    peer-to-peer migration between the lab's hosts connects to. There is no SMBIOS UUID on
    the lab machine and all hosts share it anyway, hence the explicit ``host_uuid``.
    """
    if not 1 <= tcp_port <= 65535:
        raise LabError(f"libvirtd TCP port {tcp_port} is out of range")
    lines = [
        "# Written by virtyard.lab.hypervisor; rewritten at every start.",
        "listen_tls = 0",
        "listen_tcp = 1",
        f"tcp_port = {_conf_str(str(tcp_port))}",
        f"listen_addr = {_conf_str(LOOPBACK)}",
        'auth_tcp = "none"',
        'auth_unix_ro = "none"',
        'auth_unix_rw = "none"',
        'unix_sock_dir = "/run/libvirt"',
        'unix_sock_group = "root"',
        'unix_sock_ro_perms = "0777"',
        'unix_sock_rw_perms = "0770"',
        'unix_sock_admin_perms = "0700"',
        f"host_uuid = {_conf_str(check_host_uuid(host_uuid))}",
        'host_uuid_source = "smbios"',
        f"log_outputs = {_conf_str(f'3:file:{log_file}')}",
        "",
    ]
    return "\n".join(lines)


# How the lab's QEMUs run, on the lab hosts and in the storage host VM (the reasons: below).
QEMU_AS_ROOT: tuple[str, ...] = (
    'user = "root"',
    'group = "root"',
    "dynamic_ownership = 1",
    "remember_owner = 0",
    'stdio_handler = "file"',
    'security_driver = "none"',
    "cgroup_controllers = [ ]",
)


def qemu_conf(*, migration_ports: tuple[int, int]) -> str:
    """qemu.conf for one lab host.

    - QEMU runs as root (no ``libvirt-qemu`` file ownership games) and never restores owners
      (``remember_owner = 0``): hosts share image files, and xattr-remembered owners from one
      host would confuse the other.
    - ``stdio_handler = "file"``: no virtlogd, whose socket would be shared between hosts.
    - ``security_driver = "none"``: an AppArmor/SELinux driver would write per-domain profiles
      to system-wide places shared by all hosts (DAC stays on).
    - ``cgroup_controllers = []``: cgroupfs is shared by all hosts and libvirt names a guest's
      cgroup ``machine/qemu-<id>-<name>``; seen in the lab: a guest migrated between two hosts
      got id 1 on both, so source and destination QEMU shared one cgroup, and ``machine``
      cgroups stayed behind after the hosts stopped. Cost: cgroup-only APIs (``getCPUStats``,
      blkio/memory tuning) fail; ``getAllDomainStats`` still reports ``cpu.time``.
    - Migration and consoles use loopback only; each host gets its own migration port range so
      two hosts (or two labs) never race for the same port.
    """
    low, high = check_port_range(migration_ports)
    lines = [
        "# Written by virtyard.lab.hypervisor; rewritten at every start.",
        *QEMU_AS_ROOT,
        f"migration_address = {_conf_str(MIGRATION_ADDRESS)}",
        f"migration_host = {_conf_str(MIGRATION_ADDRESS)}",
        f"migration_port_min = {low}",
        f"migration_port_max = {high}",
        f"vnc_listen = {_conf_str(LOOPBACK)}",
        f"spice_listen = {_conf_str(LOOPBACK)}",
        "vnc_auto_unix_socket = 0",
        "",
    ]
    return "\n".join(lines)


def namespace_script(root: Path, libvirtd_argv: list[str]) -> str:
    """Shell run by ``unshare -m``: bind the host's folders over the system paths, exec libvirtd.

    ``exec`` makes libvirtd the namespace's first process; with ``-d`` it forks into the
    background and the foreground process exits once the daemon has set up its sockets.
    """
    parts = ["set -e"]
    for sub, target in BIND_MOUNTS:
        parts.append(f"mount --bind {shlex.quote(str(root / sub))} {shlex.quote(target)}")
    parts.append("exec " + " ".join(shlex.quote(a) for a in libvirtd_argv))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# System helpers
# --------------------------------------------------------------------------------------------


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def ensure_qemu_account() -> None:
    """Create the ``libvirt-qemu`` system group and user if missing (libvirt-daemon-system would).

    Safe when another lab creates it at the same moment: a failure is ignored if the account
    exists afterwards.
    """
    if not _group_exists(QEMU_ACCOUNT):
        try:
            run(["groupadd", "--system", QEMU_ACCOUNT])
        except CommandError:
            if not _group_exists(QEMU_ACCOUNT):
                raise
    if not _user_exists(QEMU_ACCOUNT):
        try:
            run(
                [
                    "useradd",
                    "--system",
                    "--gid",
                    QEMU_ACCOUNT,
                    "--no-create-home",
                    "--home-dir",
                    "/var/lib/libvirt",
                    "--shell",
                    "/usr/sbin/nologin",
                    QEMU_ACCOUNT,
                ]
            )
        except CommandError:
            if not _user_exists(QEMU_ACCOUNT):
                raise


def _call_with_timeout(func: Callable[[], T], timeout: float, what: str) -> T:
    """Run a possibly-blocking libvirt call in a thread so a hung daemon cannot hang the lab.

    On timeout the thread is abandoned; callers then kill the daemon, which ends the call.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(func())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=f"vy-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not answer within {timeout:g} s")
    if error:
        raise error[0]
    return result[0]


def _tail(path: Path, lines: int = 20, offset: int = 0) -> str:
    """The last ``lines`` lines of ``path`` written after byte ``offset``."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def is_listening(path: Path) -> bool:
    """True when something accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _all_pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


# --------------------------------------------------------------------------------------------
# The host
# --------------------------------------------------------------------------------------------


class HypervisorHost:
    """One lab hypervisor: a real libvirtd with its own config, state, UUID and TCP port."""

    def __init__(
        self,
        name: str,
        root: Path,
        tcp_port: int,
        migration_ports: tuple[int, int],
        host_uuid: str,
    ) -> None:
        self.name = name
        self.root = Path(os.path.abspath(root))
        self.tcp_port = tcp_port
        self.migration_ports = migration_ports
        self.host_uuid = host_uuid

    def __repr__(self) -> str:
        return f"HypervisorHost({self.name!r}, root={str(self.root)!r}, tcp_port={self.tcp_port})"

    # ---- addresses ------------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        """The read-write libvirt socket as seen from outside the host's namespace."""
        return socket_path(self.root)

    @property
    def uri(self) -> str:
        """Local URI for clients on this machine (the Unix socket in the host's folder)."""
        path = self.socket_path
        check_socket_path(path)
        return f"qemu:///system?socket={path}"

    @property
    def migration_uri(self) -> str:
        """URI other hosts' libvirtd use to reach this one (peer-to-peer migration)."""
        return f"qemu+tcp://{LOOPBACK}:{self.tcp_port}/system"

    @property
    def log_path(self) -> Path:
        """libvirtd's own log file."""
        return self.root / LOG_FILE

    # ---- state ----------------------------------------------------------------------------

    def pid(self) -> int | None:
        """libvirtd's pid when it runs (and really is this host's libvirtd), else ``None``."""
        pid = read_pid(self.root / PID_FILE)
        if pid is None:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        # A stale pid file whose pid was reused by an unrelated process must not count.
        if os.fsencode(str(self.root / LIBVIRTD_CONF)) not in cmdline:
            return None
        return pid

    def is_running(self) -> bool:
        """True when this host's libvirtd runs."""
        return self.pid() is not None

    def connect(self) -> Any:
        """Open a read-write :class:`libvirt.virConnect` to this host (caller closes it)."""
        return libvirt.open(self.uri)

    def status(self) -> dict[str, object]:
        """A printable summary: addresses, pid and running domains."""
        pid = self.pid()
        domains: list[str] = []
        if pid is not None:
            try:
                domains = _call_with_timeout(self._running_domains, 15.0, "libvirtd status")
            except (libvirt.libvirtError, TimeoutError):
                domains = []
        return {
            "name": self.name,
            "uri": self.uri,
            "migration_uri": self.migration_uri,
            "pid": pid,
            "running": pid is not None,
            "domains": domains,
        }

    def _running_domains(self) -> list[str]:
        conn = self.connect()
        try:
            return sorted(
                d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            )
        finally:
            conn.close()

    # ---- start ----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the host's folders and (re)write its config files."""
        for sub, _ in BIND_MOUNTS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "log" / "qemu").mkdir(exist_ok=True)
        (self.root / LIBVIRTD_CONF).write_text(
            libvirtd_conf(tcp_port=self.tcp_port, host_uuid=self.host_uuid, log_file=self.log_path)
        )
        (self.root / QEMU_CONF).write_text(qemu_conf(migration_ports=self.migration_ports))

    def start(self, timeout: float = 60.0) -> None:
        """Start libvirtd in its own mount namespace and wait until it answers API calls.

        Idempotent. Returns only after a real API call succeeded (the first one includes
        libvirt's QEMU capability probe). On failure nothing of this host is left running.
        """
        if self.is_running():
            return
        self.uri  # noqa: B018 - fails early on a too-long socket path
        check_host_uuid(self.host_uuid)
        check_port_range(self.migration_ports)
        unshare = require("unshare")
        libvirtd = require("libvirtd")
        require("mount")
        require("qemu-system-x86_64")
        ensure_free(self.tcp_port, f"libvirtd TCP of hypervisor host {self.name}")
        ensure_qemu_account()
        # Leftovers of a crashed run (orphaned QEMU) would hold ports and files.
        self._kill_leftovers()
        self.prepare()
        for _, target in BIND_MOUNTS:
            Path(target).mkdir(parents=True, exist_ok=True)  # mount points on the system

        argv = [
            libvirtd,
            "--daemon",
            "--listen",
            "--config",
            str(self.root / LIBVIRTD_CONF),
            "--pid-file",
            str(self.root / PID_FILE),
        ]
        start_log = self.root / START_LOG_FILE
        try:
            log_offset = self.log_path.stat().st_size
        except FileNotFoundError:
            log_offset = 0
        deadline = time.monotonic() + timeout
        try:
            with start_log.open("w") as out:
                proc = subprocess.Popen(
                    [
                        unshare,
                        "-m",
                        "--propagation",
                        "private",
                        "--",
                        "/bin/sh",
                        "-c",
                        namespace_script(self.root, argv),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    close_fds=True,
                )
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise ServiceStartError(
                    self._start_failure(log_offset, "did not daemonize in time")
                ) from exc
            if code != 0:
                raise ServiceStartError(self._start_failure(log_offset, f"exited with {code}"))
            # libvirtd writes its pid file and opens its sockets before the foreground exits;
            # its drivers (QEMU) start afterwards and may still make it quit.
            daemon = self.pid()
            if daemon is None:
                raise ServiceStartError(self._start_failure(log_offset, "quit right after start"))
            if not wait_until(
                lambda: not pid_alive(daemon) or is_listening(self.socket_path),
                timeout=max(0.0, deadline - time.monotonic()),
            ):
                raise ServiceStartError(self._start_failure(log_offset, "opened no socket"))
            if not pid_alive(daemon):
                raise ServiceStartError(self._start_failure(log_offset, "quit during start"))
            try:
                _call_with_timeout(
                    self._probe, max(1.0, deadline - time.monotonic()), f"libvirtd {self.name}"
                )
            except (libvirt.libvirtError, TimeoutError) as exc:
                raise ServiceStartError(
                    self._start_failure(log_offset, f"does not answer: {exc}")
                ) from exc
        except BaseException as exc:
            try:
                self._kill_leftovers()
                self._clear_runtime_dir()
            except LabError as cleanup:
                exc.add_note(f"cleaning up after the failed start failed too: {cleanup}")
            raise

    def _probe(self) -> None:
        """First real API call; warms the QEMU capability cache so later calls are fast."""
        conn = self.connect()
        try:
            conn.getCapabilities()
        finally:
            conn.close()

    def _start_failure(self, log_offset: int, what: str) -> str:
        """Message naming the failure plus the tail of what libvirtd logged during this start."""
        detail = "\n".join(
            t
            for t in (_tail(self.root / START_LOG_FILE), _tail(self.log_path, offset=log_offset))
            if t
        )
        return f"libvirtd of host {self.name} {what}" + (f"\n{detail}" if detail else "")

    # ---- stop -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Destroy and undefine every domain, end libvirtd and every process of this host.

        Idempotent. Afterwards no process (hence no mount namespace and no bind mount) of
        this host remains and its ``run`` folder is empty; config, logs and the capability
        cache stay for the next start.
        """
        pid = self.pid()
        if pid is not None:
            # A wedged daemon must not block stopping; its domains' QEMU are killed below.
            with contextlib.suppress(libvirt.libvirtError, TimeoutError):
                _call_with_timeout(self._clean_domains, 60.0, f"libvirtd {self.name} cleanup")
            terminate(pid, grace=15.0)
        self._kill_leftovers()
        self._clear_runtime_dir()

    def _clean_domains(self) -> None:
        conn = self.connect()
        try:
            for dom in conn.listAllDomains():
                try:
                    # Asked first: a transient domain no longer exists once destroyed.
                    persistent = dom.isPersistent()
                    if dom.isActive():
                        dom.destroy()
                    if persistent:
                        dom.undefineFlags(_UNDEFINE_ALL)
                except libvirt.libvirtError:
                    # Gone meanwhile (e.g. a transient domain undefined by its destroy).
                    if dom.name() in {d.name() for d in conn.listAllDomains()}:
                        raise
        finally:
            conn.close()

    def processes(self) -> list[int]:
        """Pids of every process belonging to this host.

        A process belongs to the host when, in its own mount namespace, ``/run/libvirt`` is this
        host's ``run`` folder (libvirtd, QEMU and helpers, including QEMU's private
        namespaces), or when its command line names this host's libvirtd.conf (``unshare`` and
        ``sh`` before the mounts exist).
        """
        run_dir = self.root / "run"
        try:
            st = run_dir.stat()
        except FileNotFoundError:
            return []
        key = (st.st_dev, st.st_ino)
        conf_bytes = os.fsencode(str(self.root / LIBVIRTD_CONF))
        me = os.getpid()
        found: list[int] = []
        for pid in _all_pids():
            if pid == me:
                continue
            try:
                other = os.stat(f"/proc/{pid}/root/run/libvirt")
                if (other.st_dev, other.st_ino) == key:
                    found.append(pid)
                    continue
            except OSError:
                pass
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if conf_bytes in cmdline:
                found.append(pid)
        return [p for p in found if pid_alive(p)]

    def _kill_leftovers(self) -> None:
        """Terminate every remaining process of this host; raise if one survives."""
        for _ in range(3):
            pids = self.processes()
            if not pids:
                return
            for pid in pids:
                terminate(pid, grace=5.0)
        if not wait_until(lambda: not self.processes(), timeout=5.0):
            raise LabError(f"processes of hypervisor host {self.name} survive: {self.processes()}")

    def _clear_runtime_dir(self) -> None:
        """Empty the host's ``/run/libvirt`` (sockets, pid file, runtime state).

        Like a real ``/run`` after a reboot: only called once no process of the host is left,
        so it also removes what a killed daemon could not clean up itself.
        """
        run_dir = self.root / "run"
        if not run_dir.is_dir():
            return
        for entry in run_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
