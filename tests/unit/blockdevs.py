"""Real scratch block devices for the signature tests: sparse files, loop devices, LVM, blkid.

:class:`Scratch` makes sparse files and loop devices over them and runs the real tools on them;
``close()`` detaches every loop device and removes every file it made, whatever happened. LVM
commands see only the devices named (``--devices``), never the host's disks, write no backups,
and work without device-mapper (``--driverloaded n``, no activation), as on the lab machines.

The truth the tests compare with comes from the tools themselves: ``pvs``/``vgs``/``lvs`` JSON
reports and ``blkid -p`` (low-level probing, no cache).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MiB = 1 << 20
HEAD = 8192

LVM_CONFIG = ("devices { use_devicesfile=0 obtain_device_list_from_udev=0 hints=\"none\" "
              "scan_lvs=0 } activation { udev_sync=0 udev_rules=0 } "
              "backup { backup=0 archive=0 }")
_LVM_ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}


def require_root_and_tools(*tools: str) -> None:
    """Skip (with the reason) when loop devices or a tool are out of reach."""
    if os.geteuid() != 0 or not Path("/dev/loop-control").exists():
        pytest.fail("needs root and loop devices")
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.fail(f"needs {tool}")


@dataclass
class Device:
    """A sparse file and, once attached, its loop device."""

    path: Path
    size: int
    loop: str = ""

    @property
    def node(self) -> str:
        return self.loop or str(self.path)

    def head(self, length: int = HEAD) -> bytes:
        return self.read(0, length)

    def read(self, offset: int, length: int) -> bytes:
        with open(self.node, "rb", buffering=0) as f:
            return os.pread(f.fileno(), length, offset)


@dataclass
class Reader:
    """A ``read_more`` callback over some bytes, counting what it is asked for."""

    data: bytes
    calls: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        return self.data[offset:offset + length]

    @classmethod
    def of(cls, device: Device) -> Reader:
        with open(device.node, "rb") as f:
            return cls(f.read())


class Scratch:
    """Everything one test makes, undone by :meth:`close`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.devices: list[Device] = []
        self._count = 0

    def file(self, size: int, name: str = "") -> Device:
        self._count += 1
        path = self.directory / (name or f"dev{self._count}.img")
        with open(path, "wb") as f:
            f.truncate(size)
        device = Device(path, size)
        self.devices.append(device)
        return device

    def device(self, size: int = 64 * MiB, data: bytes = b"") -> Device:
        """A loop device over a fresh sparse file, holding ``data`` at its start."""
        device = self.file(size)
        if data:
            with open(device.path, "r+b") as f:
                f.write(data)
        device.loop = run("losetup", "-f", "--show", str(device.path)).strip()
        return device

    def close(self) -> None:
        errors = []
        for device in self.devices:
            if device.loop:
                done = subprocess.run(["losetup", "-d", device.loop], capture_output=True,
                                      text=True, check=False)
                if done.returncode != 0:
                    errors.append(f"losetup -d {device.loop}: {done.stderr.strip()}")
            device.path.unlink(missing_ok=True)
        self.devices.clear()
        if errors:
            raise RuntimeError("; ".join(errors))

    # --- LVM -------------------------------------------------------------------------------

    def lvm(self, command: str, *args: str, devices: Sequence[Device]) -> str:
        names = ",".join(d.node for d in devices)
        return run(command, "--devices", names, "--config", LVM_CONFIG, *args, env=_LVM_ENV)

    def report(self, command: str, fields: str, *args: str, devices: Sequence[Device]
               ) -> list[dict[str, str]]:
        """A ``pvs``/``vgs``/``lvs`` JSON report, sizes in bytes."""
        out = self.lvm(command, "--reportformat", "json", "--units", "b", "--nosuffix",
                       "-o", fields, *args, devices=devices)
        rows: list[dict[str, str]] = []
        for section in json.loads(out)["report"]:
            for value in section.values():
                rows.extend(value)
        return rows


def run(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, env=env, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}): "
                             f"{done.stderr.strip()}")
    return done.stdout


def blkid_p(node: str) -> tuple[int, dict[str, str]]:
    """``blkid -p -o export``: its exit status (0 found, 2 nothing, 8 ambivalent) and values."""
    done = subprocess.run(["blkid", "-p", "-o", "export", node], capture_output=True, text=True,
                          check=False)
    values: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        values[key] = value
    return done.returncode, values
