"""The storage host VM: a TCG guest in which the host agent runs with the kernel initiator.

This machine's kernel has neither ``iscsi_tcp`` nor device-mapper, so the agent's production
path (open-iscsi sessions, dm-multipath maps, ``lvchange -ay/-an``) runs in a guest with a Debian
kernel that has them (:mod:`virtyard.lab.storage_host_image`). The guest sees this machine's
root read-only over 9p (so it runs this tree's agent with this venv) and its own lab directory
read-write at the same path (agent configuration, state, log, console).

Network: QEMU user networking with ``restrict=on`` — the guest reaches nothing but what is
forwarded, and its packets never leave the QEMU process:

* iSCSI portals ``10.0.2.100:3260`` and ``10.0.2.101:3260`` (two paths to one tgtd): each guest
  connection spawns ``busybox nc 127.0.0.1 <tgtd port>`` through a small script. A portal is
  taken away by a marker file (new connections close at once) plus ending that portal's
  running forwarders (:meth:`StorageHostVM.set_portal`), which looks to the guest like a
  path whose target went silent.
* the agent's JSON-RPC port ``10.0.2.15:54321`` is forwarded to ``127.0.0.1:<agent port>``.

A libvirtd runs in the guest (started at boot, before the agent; configuration in the guest's
RAM overlay, QEMU as root, no virtlogd, no cgroups), so the agent's VM and CD-ROM verbs run on
the kernel path too: a nested QEMU (TCG inside TCG; tiny guests that need not boot) opens the
``lvchange -ay`` volumes. Its capability probe costs a few seconds once per boot.

Commands for tests run through :mod:`virtyard.lab.storage_host_ctl` on a virtio-serial port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from virtyard.host.client import ClientTls, HostClient
from virtyard.lab import ports
from virtyard.lab.agents import LabPki
from virtyard.lab.errors import LabError
from virtyard.lab.hypervisor import QEMU_AS_ROOT
from virtyard.lab.process import read_pid, require, start_daemon, terminate, wait_until
from virtyard.lab.storage_host_image import (
    ROOT_TAG,
    SHARE_TAG,
    StorageHostImage,
    build_storage_host_image,
)

NAME = "storage-host"
GUEST_ADDRESS = "10.0.2.15"
GUEST_AGENT_PORT = 54321
PORTALS = ("10.0.2.100", "10.0.2.101")
PORTAL_PORT = 3260
READY_MARKER = "VIRTYARD-STORAGE-HOST-READY"
MEMORY_MIB = 1024

CTL_SCRIPT = Path(__file__).resolve().parent / "storage_host_ctl.py"

# dm-multipath as oVirt configures it: a map for every LUN (find_multipaths no), WWIDs as names,
# queueing bounded when every path is gone, the map flushed when its last path goes.
MULTIPATH_CONF = """\
defaults {
    polling_interval 2
    user_friendly_names no
    find_multipaths no
    no_path_retry 4
    flush_on_last_del yes
    fast_io_fail_tmo 5
    dev_loss_tmo 30
}
blacklist {
    devnode "^(ram|loop|fd|md|sr|vd)[0-9]*"
}
"""

# libvirtd in the guest: the local socket only; QEMU as root without confinement or cgroups
# (the guest has neither AppArmor nor a cgroup hierarchy mounted), its output to files.
LIBVIRTD_CONF = """\
listen_tls = 0
listen_tcp = 0
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""
QEMU_CONF = "\n".join(QEMU_AS_ROOT) + "\n"

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class StorageHostError(LabError):
    """The storage host VM did not start, or a command in it failed."""


class StorageHostVM:
    """One storage host VM of a lab: start, stop, status, commands, portal control."""

    pid_name = "qemu.pid"

    def __init__(self, root: Path, *, agent_port: int, iscsi_port: int, pki: LabPki,
                 cache_dir: Path) -> None:
        self.root = root
        self.agent_port = agent_port
        self.iscsi_port = iscsi_port
        self.pki = pki
        self.cache_dir = cache_dir
        # Extra [storage] settings for the next start (benchmarks: a longer login_timeout).
        self.storage_config = ""

    # -- paths and names --------------------------------------------------------------------

    @property
    def pidfile(self) -> Path:
        return self.root / self.pid_name

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    @property
    def agent_log(self) -> Path:
        return self.root / "hostd.log"

    @property
    def ctl_socket(self) -> Path:
        return self.root / "ctl.sock"

    @property
    def agent_config(self) -> Path:
        return self.root / "hostd.toml"

    @property
    def agent_config_once(self) -> Path:
        """Used for the agent's next start only (then renamed away): a crash test's
        ``[debug] die_at`` dies once, and the agent init starts again runs normally."""
        return self.root / "hostd.once.toml"

    @property
    def initiator_name(self) -> str:
        return f"iqn.2026-11.org.virtyard.lab:{NAME}"

    @property
    def address(self) -> str:
        """Where the agent's JSON-RPC is reached from this machine."""
        return f"{ports.LOOPBACK}:{self.agent_port}"

    def portal_script(self, index: int) -> Path:
        return self.root / f"portal{index}"

    def pid(self) -> int | None:
        return read_pid(self.pidfile)

    def is_running(self) -> bool:
        return self.pid() is not None

    # -- start ------------------------------------------------------------------------------

    def start(self, timeout: float = 240.0) -> float:
        """Build (or take from the cache) the image, boot the VM and wait for its agent;
        returns the boot time in seconds (QEMU start until the agent answers)."""
        if self.is_running():
            return 0.0
        ports.ensure_free(self.agent_port, f"{NAME} agent")
        image = build_storage_host_image(self.cache_dir / "guest")
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in (self.console_log, self.ctl_socket, self.root / "ready"):
            stale.unlink(missing_ok=True)
        self._write_files()
        started = time.monotonic()
        start_daemon(self.qemu_argv(image), pidfile=self.pidfile, log=self.root / "qemu.log",
                     timeout=timeout, what=f"{NAME} VM", ready=self._ready)
        return time.monotonic() - started

    def _ready(self) -> bool:
        if not ports.port_is_listening(self.agent_port):
            return False
        # hostfwd listens from QEMU's start: ready means the agent itself answers.
        try:
            with self.client(timeout=5.0) as client:
                client.call("Host.ping")
        except Exception:
            return False
        return True

    def qemu_argv(self, image: StorageHostImage) -> list[str]:
        forwards = ",".join(
            f"guestfwd=tcp:{addr}:{PORTAL_PORT}-cmd:{self.portal_script(i)}"
            for i, addr in enumerate(PORTALS))
        netdev = (f"user,id=n0,restrict=on,net=10.0.2.0/24,"
                  f"hostfwd=tcp:{ports.LOOPBACK}:{self.agent_port}-"
                  f"{GUEST_ADDRESS}:{GUEST_AGENT_PORT},{forwards}")
        cmdline = (f"console=ttyS0 loglevel=4 panic=-1 virtyard.share={self.root} "
                   "net.ifnames=0")
        return [
            require("qemu-system-x86_64"), "-name", f"virtyard-{NAME}",
            "-machine", "pc", "-accel", "tcg,thread=multi", "-smp", "2", "-m", str(MEMORY_MIB),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
            "-serial", f"file:{self.console_log}",
            "-fsdev", "local,id=fs0,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=fs0,mount_tag={ROOT_TAG}",
            "-fsdev", f"local,id=fs1,path={self.root},security_model=none,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=fs1,mount_tag={SHARE_TAG}",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
            "-chardev", f"socket,id=ctl,path={self.ctl_socket},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=ctl,name=org.virtyard.ctl",
        ]

    def _write_files(self) -> None:
        """The guest's inittab, start script, agent configuration and portal forwarders."""
        share = self.root
        python = Path(sys.executable)  # this venv's interpreter: the guest sees it over 9p
        (share / "inittab").write_text(
            f"::sysinit:/bin/sh {share}/rc.sh\n"
            f"::respawn:/bin/sh {share}/agent.sh\n"
            f"::respawn:/usr/bin/python3 -I {CTL_SCRIPT}\n"
            "::shutdown:/bin/sync\n")
        (share / "multipath.conf").write_text(MULTIPATH_CONF)
        (share / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        (share / "qemu.conf").write_text(QEMU_CONF)
        self.agent_config_once.unlink(missing_ok=True)
        (share / "rc.sh").write_text(_RC.format(
            path=_PATH, share=share, iqn=self.initiator_name, ready=READY_MARKER,
            address=GUEST_ADDRESS))
        (share / "agent.sh").write_text(
            f"export PATH={_PATH}\n"
            f"cd {share}\n"
            f"echo $$ > {share}/agent.pid\n"
            f"config={self.agent_config}\n"
            f'if [ -e "{self.agent_config_once}" ]; then\n'
            f'    mv "{self.agent_config_once}" "{share}/hostd.armed.toml"\n'
            f"    config={share}/hostd.armed.toml\n"
            "fi\n"
            f"exec {python} -m virtyard.host.server --config $config "
            f">>{self.agent_log} 2>&1\n")
        cert = self.pki.host_cert(NAME)
        self.agent_config.write_text(
            f'name = "{NAME}"\n'
            f'state_dir = "{share / "state"}"\n\n'
            "[server]\n"
            f'address = "0.0.0.0"\nport = {GUEST_AGENT_PORT}\n'
            f'cert = "{cert.cert}"\nkey = "{cert.key}"\nca = "{self.pki.ca.cert}"\n\n'
            "[storage]\n"
            'initiator = "kernel"\n'
            f'initiator_name = "{self.initiator_name}"\n'
            f"{self.storage_config}\n"
            "[libvirt]\n"
            'uri = "qemu:///system"\n'
            'virt_type = "qemu"\n')
        for i in range(len(PORTALS)):
            script = self.portal_script(i)
            # Not exec: this shell stays the forwarder's parent, named by its script path.
            script.write_text(
                "#!/bin/sh\n"
                f'[ -e "{script}.down" ] && exit 0\n'
                f"/bin/busybox nc {ports.LOOPBACK} {self.iscsi_port}\n")
            script.chmod(0o755)

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """End QEMU (the guest keeps nothing worth a clean shutdown: its state is in RAM and
        in the lab directory) and every portal forwarder it spawned."""
        pid = self.pid()
        forwarders = self._forwarders(None)
        if pid is not None:
            terminate(pid, grace=5)
        for fpid in forwarders:
            terminate(fpid, grace=1)
        self.pidfile.unlink(missing_ok=True)
        wait_until(lambda: ports.port_is_free(self.agent_port), timeout=10)

    # -- portals ----------------------------------------------------------------------------

    def _forwarders(self, index: int | None) -> list[int]:
        """Pids of the portal forwarders (all, or portal ``index``'s) and their children."""
        scripts = [str(self.portal_script(i)) for i in range(len(PORTALS))
                   if index is None or i == index]
        found: list[int] = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(argv) > 1 and argv[1].decode(errors="replace") in scripts:
                found.append(int(proc.name))
                found.extend(_children(int(proc.name)))
        return found

    def set_portal(self, index: int, *, up: bool) -> None:
        """Give portal ``index`` back, or take it away (open connections cut, new ones closed)."""
        marker = Path(f"{self.portal_script(index)}.down")
        if up:
            marker.unlink(missing_ok=True)
            return
        marker.touch()
        for pid in self._forwarders(index):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue

    # -- commands and clients ---------------------------------------------------------------

    def exec(self, argv: list[str], *, timeout: float = 60.0, check: bool = True,
             input: str | None = None) -> dict[str, Any]:
        """Run ``argv`` in the guest as root; its ``rc``, ``stdout`` and ``stderr``."""
        request = {"argv": argv, "timeout": timeout, "input": input}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout + 30)
            try:
                sock.connect(str(self.ctl_socket))
                sock.sendall(json.dumps(request).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError as exc:
                raise StorageHostError(f"{NAME}: cannot run {argv[0]}: {exc}") from exc
        try:
            reply: dict[str, Any] = json.loads(data)
        except ValueError as exc:
            raise StorageHostError(f"{NAME}: no answer for {argv[0]}") from exc
        if check and reply.get("rc") != 0:
            raise StorageHostError(
                f"{NAME}: {' '.join(argv)} failed ({reply.get('rc')}): "
                f"{str(reply.get('stderr', '')).strip()[-500:]}")
        return reply

    def restart_agent(self, timeout: float = 180.0, *, once: str = "",
                      drop_caches: bool = True) -> None:
        """End the guest's agent (busybox init starts it again) and wait until it answers.

        ``once``: extra configuration (``[debug] die_at = ...``) for this start only.
        ``drop_caches``: forget the 9p root's cached files (mounted ``cache=loose``) so edited
        sources are seen; slower, since Python then reads its modules over 9p again.
        """
        if once:
            self.agent_config_once.write_text(self.agent_config.read_text() + once)
        drop = "sync; echo 3 > /proc/sys/vm/drop_caches; " if drop_caches else ""
        self.exec(["sh", "-c", f'{drop}kill "$(cat {self.root}/agent.pid)"'])
        wait_until(lambda: not self._ready(), timeout=30, interval=0.2)
        self.wait_agent(timeout)

    def wait_agent(self, timeout: float = 180.0) -> None:
        """Wait until the agent answers (after init started it again: its recovery is done)."""
        if not wait_until(self._ready, timeout=timeout, interval=0.5):
            raise StorageHostError(f"{NAME}: the agent did not come back in {timeout:.0f} s")

    def client(self, *, timeout: float = 120.0) -> HostClient:
        """A mutual-TLS client to the VM's agent with the engine's certificate."""
        tls = ClientTls(self.pki.client.cert, self.pki.client.key, self.pki.ca.cert)
        return HostClient(self.address, tls, timeout=timeout)

    def status(self) -> dict[str, object]:
        return {"name": NAME, "address": self.address, "pid": self.pid(),
                "running": self.is_running(), "portals": [f"{p}:{PORTAL_PORT}" for p in PORTALS],
                "console": str(self.console_log), "log": str(self.agent_log)}


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found.append(int(child))
                found.extend(_children(int(child)))
    except OSError:
        pass
    return found


# Stage 2, in the shared root under busybox init: mounts, network, udev, iscsid, multipathd.
_RC = """\
export PATH={path}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/lock /run/lvm /run/multipathd
hostname storage-host
ip link set lo up
ip link set eth0 up
ip addr add {address}/24 dev eth0
/lib/systemd/systemd-udevd --daemon --resolve-names=never
udevadm trigger --type=subsystems --action=add
udevadm trigger --type=devices --action=add
udevadm settle --timeout=30
# This machine's iSCSI database is not the guest's.
rm -rf /etc/iscsi/nodes /etc/iscsi/send_targets /var/lib/iscsi
mkdir -p /etc/iscsi/nodes /etc/iscsi/send_targets
echo "InitiatorName={iqn}" > /etc/iscsi/initiatorname.iscsi
sed -i 's/^node.session.timeo.replacement_timeout.*/node.session.timeo.replacement_timeout = 5/' \\
    /etc/iscsi/iscsid.conf
iscsid
cp {share}/multipath.conf /etc/multipath.conf
multipathd
# libvirtd for the agent's VMs; guest-agent sockets cannot live on 9p: a tmpfs under state/.
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt /var/cache/libvirt /run/libvirt \
    {share}/state/ch
mount -t tmpfs -o mode=0700 tmpfs {share}/state/ch
cp {share}/libvirtd.conf {share}/qemu.conf /etc/libvirt/
libvirtd -d
i=0
while [ ! -S /run/libvirt/libvirt-sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo {ready} > /dev/console
"""
