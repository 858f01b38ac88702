"""A local block device for a LUN, for the few operations that need one (LVM metadata; the
bytes of an upload go over the initiator's own session instead), on hosts that reach their
LUNs only through the user-space initiator.

With the kernel initiator the LUN already is a block device: ``/dev/mapper/<GUID>``, nothing to
do. With the user-space one there is none, so we make one for the duration of one operation:
``qemu-storage-daemon`` opens the LUN through libiscsi (portal, target and LUN of this host's own
connection; CHAP through a qemu ``secret`` object read from a pipe, so the password is never on
a command line or on disk) and exports it over FUSE as a regular file; ``losetup`` over that file
gives the block device LVM wants. Reads and writes go over iSCSI to the array.

Attachments are reference-counted per LUN (two operations on one LUN share one daemon) and are
never left behind: :meth:`LunDevices.attached` is a context manager, and detaching removes the
loop device, stops the daemon (its FUSE mount goes with it) and deletes the mount point file.
What is attached is written to ``<root>/lun-devices.json`` (atomic replace): the mount point
before anything is created (the daemon and the loop device are found again by it), then pid and
loop device as they come. After an agent crash the next agent removes exactly what the dead one
left (:meth:`LunDevices.recover`, run when the agent starts): an attachment only lives as long
as the verb that made it, so after a restart none is in use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from virtyard.common import process
from virtyard.host.storage.initiator import Device, Initiator

if TYPE_CHECKING:
    import subprocess

log = logging.getLogger("virtyard.host.storage.lun_device")

START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 10.0


class LunDeviceError(Exception):
    """A LUN could not be given (or taken back from) a local device; says which step failed."""


@dataclass
class Attachment:
    """One LUN made local: the daemon, its FUSE export file and, when asked, a loop device."""

    guid: str
    mountpoint: str
    pid: int = 0
    loop: str = ""
    refs: int = 0

    @property
    def path(self) -> str:
        """The block device when there is one, else the exported file (fine for writes)."""
        return self.loop or self.mountpoint


@dataclass(frozen=True)
class LunDevice:
    """What an operation gets: ``path`` to open (block device or export file), and
    ``block_device`` for LVM (empty when only the file was asked for)."""

    guid: str
    path: str
    block_device: str


def _pid_alive(pid: int) -> bool:
    """True for a live, non-zombie process (a daemonized qsd is reaped by init, late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _daemon_of(mountpoint: str) -> int:
    """The pid of the qemu-storage-daemon exporting at ``mountpoint`` (0: none)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _pid_alive(int(proc.name)):
            cmd = _cmdline(int(proc.name))
            if "qemu-storage-daemon" in cmd and f'"mountpoint": "{mountpoint}"' in cmd:
                return int(proc.name)
    return 0


def _mounted(path: str) -> bool:
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return False
    escaped = path.replace("\\", "\\134").replace(" ", "\\040")
    return any(line.split()[4] == escaped for line in text.splitlines() if line.strip())


def _run(argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """:func:`virtyard.common.process.run` returning any exit status; a missing program or a
    timeout is a :class:`LunDeviceError`."""
    try:
        return process.run(argv, timeout=timeout, check=False)
    except process.MissingPackageError as exc:
        raise LunDeviceError(f"{argv[0]} is missing (package {exc.package})") from None
    except process.CommandError:  # with check=False: the timeout
        raise LunDeviceError(f"{argv[0]} timed out after {timeout:g} s") from None


def _loop_devices() -> list[tuple[str, str]]:
    """Every loop device with its backing file (`` (deleted)`` suffix removed)."""
    proc = _run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"])
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    return [(d["name"], (d.get("back-file") or "").removesuffix(" (deleted)"))
            for d in json.loads(proc.stdout).get("loopdevices", [])]


def loop_devices_of(backing: str) -> list[str]:
    """Loop devices whose backing file is ``backing``."""
    return [name for name, file in _loop_devices() if file == backing]


def _loop_devices_under(prefix: str) -> list[tuple[str, str]]:
    return [(name, file) for name, file in _loop_devices() if file.startswith(prefix)]


class LunDevices:
    """Reference-counted local devices for LUNs, state in ``root``."""

    def __init__(self, root: Path, initiator: Initiator, *, initiator_name: str,
                 timeout: float = START_TIMEOUT) -> None:
        self.root = root
        self.initiator = initiator
        self.initiator_name = initiator_name
        self.timeout = timeout
        self._lock = threading.Lock()
        self._guid_locks: dict[str, threading.Lock] = {}
        self._attached: dict[str, Attachment] = {}
        self.recover()

    @property
    def _state_file(self) -> Path:
        return self.root / "lun-devices.json"

    # -- public ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def attached(self, device: Device, *, block: bool = True) -> Iterator[LunDevice]:
        """A local device for ``device`` during the ``with`` block.

        ``block``: a block device is needed (LVM); otherwise the exported file is enough
        (reading and writing bytes), which saves the loop device. A failure to detach is
        raised, unless the block itself failed (then it is logged, and the block's error
        raised); what could not be detached stays recorded and is retried.
        """
        kernel_path = self.initiator.device_path(device.guid)
        if kernel_path is not None:
            yield LunDevice(device.guid, kernel_path, kernel_path)
            return
        attachment = self._acquire(device, block)
        try:
            yield LunDevice(device.guid, attachment.path, attachment.loop)
        except BaseException:
            try:
                self._release(device.guid)
            except LunDeviceError as exc:
                log.error("detaching LUN %s after a failure: %s", device.guid, exc)
            raise
        self._release(device.guid)

    def attachments(self) -> list[Attachment]:
        """What is attached now (normally nothing between verbs)."""
        with self._lock:
            return [Attachment(**asdict(a)) for a in self._attached.values()]

    def leftovers(self) -> list[str]:
        """What is attached under :attr:`root` but in use by no operation: attachments that
        could not be removed, and daemons, FUSE mounts, loop devices and mount point files no
        attachment accounts for (after a crash). Should always be empty."""
        with self._lock:
            live = [a for a in self._attached.values() if a.refs > 0]
            failed = [a for a in self._attached.values() if a.refs <= 0]
        known_pids = {a.pid for a in live}
        known_files = {a.mountpoint for a in live}
        known_loops = {a.loop for a in live if a.loop}
        found = [f"LUN device of {a.guid} that could not be removed: {a}" for a in failed]
        prefix = str(self._mount_dir) + "/"
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) in known_pids:
                continue
            cmd = _cmdline(int(proc.name))
            if "qemu-storage-daemon" in cmd and prefix in cmd:
                found.append(f"qemu-storage-daemon {proc.name}: {cmd[:160]}")
        if self._mount_dir.exists():
            for file in sorted(self._mount_dir.iterdir()):
                if str(file) not in known_files:
                    found.append(("FUSE mount " if _mounted(str(file)) else "mount point file ")
                                 + str(file))
        found += [f"loop device {loop} over {backing}"
                  for loop, backing in _loop_devices_under(prefix) if loop not in known_loops]
        return found

    def recover(self) -> None:
        """Remove what a previous agent left attached (it died inside a verb). What cannot be
        removed stays recorded (and in :meth:`leftovers`), and is retried on the next attach
        of that LUN; the agent starts regardless."""
        try:
            raw = json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return
        except ValueError:
            log.warning("%s is damaged; cleaning up by mount point files", self._state_file)
            raw = []
        stale = [Attachment(**{**entry, "refs": 0}) for entry in raw]
        if self._mount_dir.exists():
            recorded = {a.mountpoint for a in stale}
            stale += [Attachment(guid=file.name, mountpoint=str(file))
                      for file in self._mount_dir.iterdir() if str(file) not in recorded]
        for attachment in stale:
            log.warning("removing LUN device of %s left by a previous agent: %s",
                        attachment.guid, attachment)
            try:
                self._teardown(attachment)
            except LunDeviceError as exc:
                log.error("cannot remove LUN device of %s: %s", attachment.guid, exc)
                self._attached[attachment.guid] = attachment
        for pidfile in self.root.glob("qsd-*.pid"):  # died before reading it back
            pidfile.unlink(missing_ok=True)
        self._save_locked()

    # -- attach / detach ------------------------------------------------------------------

    @property
    def _mount_dir(self) -> Path:
        return self.root / "lun-devices"

    def _guid_lock(self, guid: str) -> threading.Lock:
        with self._lock:
            return self._guid_locks.setdefault(guid, threading.Lock())

    def _acquire(self, device: Device, block: bool) -> Attachment:
        with self._guid_lock(device.guid):
            with self._lock:
                attachment = self._attached.get(device.guid)
            if attachment is not None and attachment.refs <= 0:
                self._teardown(attachment)  # a detach that failed earlier: finish it first
                self._forget(device.guid)
                attachment = None
            if attachment is None:
                attachment = Attachment(device.guid, str(self._mount_dir / device.guid), refs=1)
                try:
                    self._start(attachment, device)
                except BaseException:
                    self._detach(attachment)
                    raise
            else:
                with self._lock:
                    attachment.refs += 1
            if block and not attachment.loop:
                try:
                    self._add_loop(attachment)
                except BaseException:
                    self._release_locked_guid(device.guid)
                    raise
            return attachment

    def _release(self, guid: str) -> None:
        with self._guid_lock(guid):
            self._release_locked_guid(guid)

    def _release_locked_guid(self, guid: str) -> None:
        with self._lock:
            attachment = self._attached.get(guid)
            if attachment is None:
                return
            attachment.refs -= 1
            if attachment.refs > 0:
                return
        self._detach(attachment)

    def _detach(self, attachment: Attachment) -> None:
        """Tear down and forget; when teardown fails the attachment stays recorded (refs 0)."""
        with self._lock:
            attachment.refs = 0
        self._teardown(attachment)
        self._forget(attachment.guid)

    def _forget(self, guid: str) -> None:
        with self._lock:
            self._attached.pop(guid, None)
            self._save_locked()

    def _start(self, attachment: Attachment, device: Device) -> None:
        if not device.paths:
            raise LunDeviceError(f"LUN {device.guid} has no path on this host")
        path = device.paths[0]
        connection = path.connection
        self._mount_dir.mkdir(parents=True, exist_ok=True)
        mountpoint = Path(attachment.mountpoint)
        if mountpoint.exists():  # a leftover of ours: recover() missed it, clean it now
            self._teardown(Attachment(attachment.guid, attachment.mountpoint))
        fd = os.open(mountpoint, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        with self._lock:
            self._attached[attachment.guid] = attachment
            self._save_locked()  # the file exists: recorded before the daemon can exist
        pidfile = self.root / f"qsd-{attachment.guid}.pid"
        portal = connection.portal
        host = f"[{portal.host}]" if portal.is_ipv6 else portal.host
        blockdev: dict[str, Any] = {
            "driver": "iscsi", "node-name": "lun", "transport": "tcp",
            "portal": f"{host}:{portal.port}", "target": connection.iqn, "lun": path.lun,
            "initiator-name": connection.initiator_name or self.initiator_name}
        export = {"type": "fuse", "id": "export", "node-name": "lun",
                  "mountpoint": str(mountpoint), "writable": True}
        argv = ["qemu-storage-daemon"]
        read_fd = -1
        if connection.chap is not None:
            read_fd, write_fd = os.pipe()
            os.write(write_fd, str(connection.chap.password).encode())
            os.close(write_fd)
            argv += ["--object", f"secret,id=chap,file=/dev/fd/{read_fd}"]
            blockdev["user"] = connection.chap.username
            blockdev["password-secret"] = "chap"
        argv += ["--blockdev", json.dumps(blockdev), "--export", json.dumps(export),
                 "--pidfile", str(pidfile), "--daemonize"]
        try:
            proc = process.run(argv, timeout=self.timeout, check=False,
                               pass_fds=(read_fd,) if read_fd >= 0 else ())
        except process.CommandError:  # with check=False: the timeout
            raise LunDeviceError(f"qemu-storage-daemon for LUN {device.guid} did not start "
                                 f"in {self.timeout:g} s") from None
        except process.MissingPackageError:
            raise LunDeviceError("qemu-storage-daemon is missing (package "
                                 "qemu-system-x86)") from None
        finally:
            if read_fd >= 0:
                os.close(read_fd)
        pid = 0
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
        with self._lock:
            attachment.pid = pid
            self._save_locked()
        pidfile.unlink(missing_ok=True)
        if proc.returncode != 0 or pid == 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise LunDeviceError(f"qemu-storage-daemon could not export LUN {device.guid} "
                                 f"({connection.iqn} LUN {path.lun} at {portal}): "
                                 + (detail[-1] if detail else f"exit status {proc.returncode}"))
        log.info("LUN %s exported at %s (qemu-storage-daemon %d)", device.guid, mountpoint, pid)

    def _add_loop(self, attachment: Attachment) -> None:
        proc = _run(["losetup", "--find", "--show", attachment.mountpoint])
        loop = proc.stdout.strip()
        if proc.returncode != 0 or not loop.startswith("/dev/"):
            raise LunDeviceError(f"losetup over {attachment.mountpoint} failed: "
                                 f"{proc.stderr.strip()}")
        with self._lock:
            attachment.loop = loop
            self._save_locked()

    def _teardown(self, attachment: Attachment) -> None:
        """Loop device(s), daemon, mount, file: each step tolerates the previous being gone."""
        errors: list[str] = []
        loops = set(loop_devices_of(attachment.mountpoint))
        if attachment.loop:
            loops.add(attachment.loop)
        for loop in sorted(loops):
            proc = _run(["losetup", "--detach", loop])
            if proc.returncode != 0 and loop in loop_devices_of(attachment.mountpoint):
                errors.append(f"losetup -d {loop}: {proc.stderr.strip()}")
        pid = attachment.pid
        if not (pid and _pid_alive(pid) and attachment.mountpoint in _cmdline(pid)):
            pid = _daemon_of(attachment.mountpoint)  # crashed before the pid was recorded
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.005)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if _mounted(attachment.mountpoint):  # the daemon died without unmounting
            proc = _run(["umount", "-l", attachment.mountpoint])
            if proc.returncode != 0:
                errors.append(f"umount {attachment.mountpoint}: {proc.stderr.strip()}")
        with contextlib.suppress(FileNotFoundError):
            if not _mounted(attachment.mountpoint):
                os.unlink(attachment.mountpoint)
        if errors:
            raise LunDeviceError("; ".join(errors))
        log.info("LUN %s detached", attachment.guid)

    def _save_locked(self) -> None:
        """Write the attachments (caller holds ``_lock`` or is single-threaded)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(a) for a in self._attached.values()], indent=1))
        os.replace(tmp, self._state_file)
