"""The tiny guest really boots: built from Debian packages, started with plain QEMU under TCG.

No libvirt here: QEMU is started directly with a virtio-serial guest-agent channel, so a failure
points at the image itself. Every QEMU is killed and every temporary file removed afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtyard.lab import guest_image as gi
from virtyard.lab import kvm
from virtyard.lab.guest_image import DEFAULT_CMDLINE, READY_MARKER, GuestImage, build_guest_image
from virtyard.lab.process import require

pytestmark = pytest.mark.lab

READY_TIMEOUT = 90.0  # measured ~3.5 s under TCG; generous for a loaded machine
SHUTDOWN_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def cache_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vy-guest-cache-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def image(cache_dir: Path) -> GuestImage:
    started = time.monotonic()
    built = build_guest_image(cache_dir)
    print(f"\nguest image built in {time.monotonic() - started:.1f} s: {built.directory}")
    return built


class Guest:
    """A QEMU process booting the image, with its serial log, agent socket and QMP socket."""

    def __init__(self, image: GuestImage, workdir: Path, *, with_disks: bool = True) -> None:
        self.workdir = workdir
        self.serial_log = workdir / "serial.log"
        self.qga_socket = workdir / "qga.sock"
        self.qmp_socket = workdir / "qmp.sock"
        argv = [
            require("qemu-system-x86_64"), "-accel", "tcg", "-machine", "pc", "-m", "256",
            "-nographic", "-nodefaults", "-monitor", "none",
            "-serial", f"file:{self.serial_log}",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", DEFAULT_CMDLINE,
            "-chardev", f"socket,path={self.qga_socket},server=on,wait=off,id=qga0",
            "-device", "virtio-serial",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
        ]
        if with_disks:
            for name in ("blk.raw", "scsi.raw"):
                with (workdir / name).open("wb") as f:
                    f.truncate(8 << 20)
            content = workdir / "iso"
            content.mkdir()
            (content / "hello.txt").write_text("from the iso\n")
            subprocess.run([require("genisoimage"), "-quiet", "-V", "VYISO", "-o",
                            str(workdir / "cd.iso"), str(content)], check=True)
            argv += [
                "-drive", f"file={workdir / 'blk.raw'},if=none,id=d0,format=raw",
                "-device", "virtio-blk-pci,drive=d0,serial=VYBLK0",
                "-device", "virtio-scsi-pci,id=scsi0",
                "-drive", f"file={workdir / 'scsi.raw'},if=none,id=d1,format=raw",
                "-device", "scsi-hd,bus=scsi0.0,drive=d1,serial=VYSCSI1",
                "-drive", f"file={workdir / 'cd.iso'},if=none,id=cd0,format=raw,media=cdrom,"
                "readonly=on",
                "-device", "scsi-cd,bus=scsi0.0,drive=cd0",
            ]
        self.started = time.monotonic()
        with (workdir / "qemu.log").open("wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def console(self) -> str:
        try:
            return self.serial_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self) -> float:
        """Seconds from QEMU start to the ready marker on the serial console."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if READY_MARKER in self.console():
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"guest not ready; console:\n{self.console()[-3000:]}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"QEMU still running after {timeout} s; console:\n{self.console()[-3000:]}"
            ) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def boot(image: GuestImage) -> Iterator[Any]:
    """Factory booting guests; kills their QEMU and removes their files after the test."""
    guests: list[Guest] = []
    dirs: list[Path] = []

    def start(*, with_disks: bool = True) -> Guest:
        # Short /tmp paths: unix socket paths are limited to 108 bytes.
        workdir = Path(tempfile.mkdtemp(prefix="vy-boot-"))
        dirs.append(workdir)
        guest = Guest(image, workdir, with_disks=with_disks)
        guests.append(guest)
        return guest

    yield start
    for guest in guests:
        guest.kill()
        assert guest.proc.poll() is not None
    for workdir in dirs:
        shutil.rmtree(workdir, ignore_errors=True)


class JsonLineClient:
    """Newline-delimited JSON over a unix socket, as qemu-ga and QMP speak it."""

    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")

    def send(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()

    def receive(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "connection closed"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.send(command, arguments)
        while True:
            reply = self.receive()
            if "event" in reply:  # QMP events may come first
                continue
            assert "error" not in reply, reply
            return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _agent(guest: Guest) -> JsonLineClient:
    agent = JsonLineClient(guest.qga_socket)
    token = int(uuid.uuid4().int % (1 << 31))
    assert agent.call("guest-sync", {"id": token}) == token  # flushes any stale state
    return agent


def _guest_exec(agent: JsonLineClient, script: str) -> tuple[int, str]:
    pid = agent.call("guest-exec", {"path": "/bin/sh", "arg": ["-c", script],
                                    "capture-output": True})["pid"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = agent.call("guest-exec-status", {"pid": pid})
        if status["exited"]:
            return status["exitcode"], base64.b64decode(status.get("out-data", "")).decode()
        time.sleep(0.1)
    raise AssertionError(f"guest-exec of {script!r} did not finish")


def test_second_build_reuses_the_cache(image: GuestImage, cache_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rebuild(*_: object) -> str:
        raise AssertionError("the cached image was rebuilt")

    stamp = image.initrd.stat().st_mtime_ns
    monkeypatch.setattr(gi, "_build_into", no_rebuild)
    again = build_guest_image(cache_dir)
    assert again == image
    assert again.initrd.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cache_dir.iterdir()) == [image.directory.name]


def test_image_is_small_and_names_its_kernel(image: GuestImage) -> None:
    assert image.kernel_version.endswith("-cloud-amd64")
    assert image.kernel.stat().st_size > 1 << 20
    assert image.initrd.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert image.initrd.stat().st_size < 32 << 20
    manifest = json.loads((image.directory / "manifest.json").read_text())
    assert any(m.endswith("virtio_scsi.ko") for m in manifest["modules"])


def test_guest_boots_and_agent_answers_then_shuts_down(boot: Any) -> None:
    guest: Guest = boot()
    seconds = guest.wait_ready()
    print(f"\nboot to ready under TCG: {seconds:.1f} s")
    agent = _agent(guest)
    try:
        assert agent.call("guest-ping") == {}
        disks = agent.call("guest-get-disks")
        serials = {d.get("address", {}).get("serial") for d in disks}
        assert {"VYBLK0", "0QEMU_QEMU_HARDDISK_VYSCSI1"} <= serials, disks

        assert _guest_exec(agent, "echo hello") == (0, "hello\n")
        code, out = _guest_exec(agent, "ls /dev/disk/by-id/")
        assert code == 0
        assert {"virtio-VYBLK0", "scsi-0QEMU_QEMU_HARDDISK_VYSCSI1"} <= set(out.split())
        assert _guest_exec(agent, "exit 3")[0] == 3
        # sr_mod, cdrom and isofs are loaded: the CD-ROM mounts and reads.
        assert _guest_exec(agent, "mount -t iso9660 -o ro /dev/sr0 /mnt && cat /mnt/hello.txt"
                           " && umount /mnt") == (0, "from the iso\n")
        code, out = _guest_exec(agent, "dd if=/dev/vda bs=4096 count=1 2>/dev/null | sha256sum")
        assert (code, out.split()[0]) == (0, hashlib.sha256(bytes(4096)).hexdigest())

        agent.send("guest-shutdown")  # no reply on success: the guest goes away
    finally:
        agent.close()
    assert guest.wait_exit(SHUTDOWN_TIMEOUT) == 0


def test_acpi_power_button_powers_the_guest_off(boot: Any) -> None:
    guest: Guest = boot(with_disks=False)
    guest.wait_ready()
    qmp = JsonLineClient(guest.qmp_socket)
    try:
        assert "QMP" in qmp.receive()
        qmp.call("qmp_capabilities")
        qmp.call("system_powerdown")
    finally:
        qmp.close()
    assert guest.wait_exit(SHUTDOWN_TIMEOUT) == 0
    assert "Power down" in guest.console()


def test_probe_boot_prints_marker_and_powers_off_under_tcg(image: GuestImage) -> None:
    """The probe path itself works, so a "tcg" answer from detection means KVM failed."""
    workdir = Path(tempfile.mkdtemp(prefix="vy-probe-"))
    log = workdir / "serial.log"
    proc = subprocess.Popen(kvm.probe_argv(require("qemu-system-x86_64"), image, log, "tcg"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert proc.wait(timeout=60) == 0
        assert gi.PROBE_MARKER in log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _probe_processes(image: GuestImage) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(image.kernel).encode() in cmdline and gi.PROBE_PARAM.encode() in cmdline:
            found.append(int(entry.name))
    return found


def test_detect_accelerator_answers_and_leaves_nothing(image: GuestImage) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="vy-kvm-"))
    try:
        started = time.monotonic()
        accelerator = kvm.detect_accelerator(image, workdir, timeout=15.0)
        print(f"\naccelerator: {accelerator} ({time.monotonic() - started:.1f} s)")
        assert accelerator in {"kvm", "tcg"}
        if not kvm.kvm_usable_device():
            assert accelerator == "tcg"
        assert _probe_processes(image) == []
        assert list(workdir.iterdir()) == []
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
