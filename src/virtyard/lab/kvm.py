"""Decide between KVM and TCG by booting the real guest kernel, never by assumption.

``/dev/kvm`` existing proves little: on a nested hypervisor it can be present while a stock
kernel fails to boot under it (seen on the lab machines, which hang silently). So KVM is chosen
only when the tiny guest, booted with ``virtyard.probe=1``, prints its probe marker in time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from virtyard.lab.guest_image import DEFAULT_CMDLINE, PROBE_MARKER, PROBE_PARAM, GuestImage
from virtyard.lab.process import require

KVM_DEVICE = Path("/dev/kvm")


def kvm_usable_device(device: Path = KVM_DEVICE) -> bool:
    """True when ``device`` exists and this process may open it read-write."""
    return device.exists() and os.access(device, os.R_OK | os.W_OK)


def probe_argv(qemu: str, image: GuestImage, serial_log: Path, accel: str = "kvm") -> list[str]:
    """The probe boot: direct kernel boot, serial to a file, no reboot on panic."""
    return [
        qemu, "-accel", accel, "-nographic", "-nodefaults", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{serial_log}",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"{DEFAULT_CMDLINE} {PROBE_PARAM} panic=-1",
        "-m", "256",
    ]


def _marker_seen(log: Path) -> bool:
    try:
        return PROBE_MARKER.encode() in log.read_bytes()
    except FileNotFoundError:
        return False


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """End the probe's QEMU (its own process group) and reap it."""
    if proc.poll() is None:
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    proc.wait()


def detect_accelerator(image: GuestImage, workdir: Path, *, timeout: float = 30.0) -> str:
    """``"kvm"`` if the guest really boots under KVM within ``timeout`` seconds, else ``"tcg"``.

    A probe that hangs costs the full timeout (the nested hypervisor here never fails fast),
    so callers should remember the answer per kernel.
    """
    if not kvm_usable_device():
        return "tcg"
    qemu = require("qemu-system-x86_64")
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="kvm-probe-", dir=workdir))
    try:
        serial_log = tmp / "serial.log"
        with (tmp / "qemu.log").open("wb") as qemu_log:
            proc = subprocess.Popen(
                probe_argv(qemu, image, serial_log),
                stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if _marker_seen(serial_log):
                    return "kvm"
                if proc.poll() is not None:
                    return "kvm" if _marker_seen(serial_log) else "tcg"
                time.sleep(0.1)
            return "kvm" if _marker_seen(serial_log) else "tcg"
        finally:
            _kill(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
