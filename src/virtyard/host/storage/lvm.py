"""A thin typed wrapper over the LVM tools: one function per operation, typed errors.

Every command runs with a ``--config`` that makes LVM look at the devices it is given and at
nothing else, and keeps it from doing anything behind our back:

* ``devices { use_devicesfile=0 obtain_device_list_from_udev=0 hints="none" }`` plus one
  ``--devices <dev>`` per device: no scan of the host's disks, no devices file, no udev database
  (a host with hundreds of LUNs must not pay for them, and LVM must not touch a VM's disk that
  happens to hold a PV);
* ``activation { udev_sync=N udev_rules=N }``: from the host, not assumed. Where udev runs
  (:func:`udev_running`: its control socket exists) LVM lets udev's rules create the ``/dev``
  nodes and waits for them, as on any distribution, so a node is there when ``lvchange -ay``
  returns and udev's database knows it. Where it does not (the lab's hosts, some containers)
  both are 0: libdevmapper creates the nodes itself instead of waiting for a udev that never
  answers. The agent's ``[storage] lvm_udev`` setting overrides the probe;
* ``backup { backup=0 archive=0 }``: metadata backups in ``/etc/lvm`` of a VG that lives on a
  SAN and is changed by other hosts are stale at once and only leak names.

Where device-mapper is missing (:func:`device_mapper_available`), every command also gets
``--driverloaded n`` — metadata still works, activation cannot — and new LVs are created
``-an -Zn -Wn`` (not activated, so neither zeroed nor wiped). We create them that way on every
host: a volume is activated only when prepared (``volumes.py``), never as a side effect.

Reports come as JSON (``--reportformat json``), sizes in bytes (``--units b --nosuffix``).
``LVM_SUPPRESS_FD_WARNINGS`` silences the warning LVM prints for descriptors the agent's
process happens to hold.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from virtyard.common import process

if TYPE_CHECKING:
    import subprocess

log = logging.getLogger("virtyard.host.storage.lvm")

UDEV_CONTROL: Final = Path("/run/udev/control")


def lvm_config(*, udev: bool) -> str:
    """The ``--config`` of every command; ``udev``: whether udev runs on this host."""
    flag = int(udev)
    return ('devices { use_devicesfile=0 obtain_device_list_from_udev=0 hints="none" } '
            f"activation {{ udev_sync={flag} udev_rules={flag} }} "
            "backup { backup=0 archive=0 }")


LVM_CONFIG: Final = lvm_config(udev=False)
"""The configuration on a host without udev (what :class:`Lvm` uses unless told otherwise)."""
TIMEOUT: Final = 120.0

Runner = Callable[[list[str], float], "subprocess.CompletedProcess[str]"]


class LvmError(Exception):
    """An LVM command failed: the command, its exit status and what it printed on stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()
                 and not line.strip().startswith("WARNING")]
        super().__init__(f"{argv[1] if len(argv) > 1 else 'lvm'} failed ({returncode}): "
                         + ("; ".join(lines) or self.stderr or "no output"))


def device_mapper_available(misc: Path = Path("/proc/misc"),
                            control: Path = Path("/dev/mapper/control")) -> bool:
    """Whether LVs can be activated here: the kernel's device-mapper is loaded.

    ``/dev/mapper/control`` alone proves nothing (udev or a container may create the node
    while the driver is absent, as on the lab machines: opening it fails with ENODEV); the
    driver registers the misc device ``device-mapper`` when it is loaded or built in.
    """
    try:
        loaded = any(line.split()[1:] == ["device-mapper"]
                     for line in misc.read_text().splitlines() if line.strip())
    except OSError:
        return False
    return loaded and control.exists()


def udev_running(control: Path = UDEV_CONTROL) -> bool:
    """Whether udev runs on this host: its control socket exists.

    The test libudev and libdevmapper make themselves (``udev_queue_get_udev_is_active``):
    ``systemd-udevd`` listens on ``/run/udev/control`` and removes it when it stops. A plain
    file there is not a listening udev.
    """
    return control.is_socket()


def udev_setting(setting: str, control: Path = UDEV_CONTROL) -> bool:
    """The agent's ``[storage] lvm_udev`` (``auto``, ``on``, ``off``) as a yes or no for
    :class:`Lvm`; ``auto`` asks the host (:func:`udev_running`)."""
    if setting == "auto":
        return udev_running(control)
    if setting in ("on", "off"):
        return setting == "on"
    raise ValueError(f"lvm_udev must be auto, on or off, not {setting!r}")


def run_lvm(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run an LVM command (the default :data:`Runner`) with :func:`virtyard.common.process.run`;
    a non-zero exit is returned, a timeout or a missing ``lvm`` raises :class:`LvmError`."""
    env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1", "LC_ALL": "C"}
    try:
        return process.run(argv, timeout=timeout, check=False, env=env)
    except process.MissingPackageError:
        raise LvmError(argv, -1, "the lvm program is missing (package lvm2)") from None
    except process.CommandError as exc:  # with check=False: the timeout
        raise LvmError(argv, exc.returncode, exc.stderr) from None


@dataclass(frozen=True)
class Lvm:
    """The LVM tools restricted to ``devices``; ``dm`` says whether device-mapper is usable,
    ``udev`` whether LVM works with udev (the host's answer: :func:`udev_setting`).

    ``runner`` executes a command (tests give recorded output instead).
    """

    devices: tuple[str, ...]
    dm: bool
    runner: Runner = run_lvm
    timeout: float = TIMEOUT
    udev: bool = False

    def _argv(self, command: str, args: Sequence[str]) -> list[str]:
        argv = ["lvm", command, "--config", lvm_config(udev=self.udev)]
        for device in self.devices:
            argv += ["--devices", device]
        if not self.dm:
            argv += ["--driverloaded", "n"]
        return [*argv, *args]

    def run(self, command: str, *args: str) -> str:
        """Run ``lvm <command> <args>`` and return its stdout; :class:`LvmError` on failure."""
        argv = self._argv(command, args)
        proc = self.runner(argv, self.timeout)
        if proc.returncode != 0:
            raise LvmError(argv, proc.returncode, proc.stderr or proc.stdout)
        log.debug("%s ok", " ".join(argv[:2] + list(args)))
        return proc.stdout

    # -- PVs and VGs --------------------------------------------------------------------

    def pvcreate(self, device: str) -> None:
        """Make ``device`` a PV (``-y``: LVM's own signature wiping is fine, the caller made
        sure the device was free)."""
        self.run("pvcreate", "-y", device)

    def pvremove(self, device: str) -> None:
        """Wipe the PV label off ``device``."""
        self.run("pvremove", "-y", "-ff", device)

    def vgcreate(self, vg: str, devices: Sequence[str], *, extent_size: int,
                 tags: Sequence[str] = ()) -> None:
        """A VG named ``vg`` on ``devices`` with ``extent_size`` bytes per extent."""
        args = ["-s", f"{extent_size}b"]
        for tag in tags:
            args += ["--addtag", tag]
        self.run("vgcreate", *args, vg, *devices)

    def vgremove(self, vg: str) -> None:
        """Remove ``vg`` and every LV in it (``-f``)."""
        self.run("vgremove", "-f", vg)

    # -- LVs ------------------------------------------------------------------------------

    def lvcreate(self, vg: str, lv: str, size: int, *, tags: Sequence[str] = (),
                 contiguous: bool = True) -> None:
        """An inactive LV of at least ``size`` bytes (rounded up to whole extents).

        ``contiguous``: one run of extents on one PV, so that the LV's bytes are one range of
        one LUN (what a storage slice needs).
        """
        args = ["-an", "-Zn", "-Wn", "-n", lv, "-L", f"{size}b"]
        if contiguous:
            args += ["--contiguous", "y"]
        for tag in tags:
            args += ["--addtag", tag]
        self.run("lvcreate", *args, vg)

    def lvremove(self, vg: str, lv: str) -> None:
        self.run("lvremove", "-f", f"{vg}/{lv}")

    def lvchange_tags(self, vg: str, lv: str, *, add: Sequence[str] = (),
                      delete: Sequence[str] = ()) -> None:
        """Add and delete LV tags in one metadata update."""
        args: list[str] = []
        for tag in delete:
            args += ["--deltag", tag]
        for tag in add:
            args += ["--addtag", tag]
        if args:
            self.run("lvchange", *args, f"{vg}/{lv}")

    def activate(self, vg: str, lv: str) -> None:
        """``lvchange -ay``: needs device-mapper (refused here rather than silently ignored:
        with ``--driverloaded n`` LVM reports success and activates nothing)."""
        if not self.dm:
            raise LvmError(["lvm", "lvchange"], -1, "device-mapper is not available on this host")
        self.run("lvchange", "-ay", f"{vg}/{lv}")

    def deactivate(self, vg: str, lv: str) -> None:
        """``lvchange -an`` (fails while the LV is open, e.g. by a running QEMU)."""
        if not self.dm:
            raise LvmError(["lvm", "lvchange"], -1, "device-mapper is not available on this host")
        self.run("lvchange", "-an", f"{vg}/{lv}")

    # -- reports --------------------------------------------------------------------------

    def _report(self, command: str, kind: str, fields: Sequence[str],
                *args: str) -> list[dict[str, str]]:
        out = self.run(command, "--reportformat", "json", "--units", "b", "--nosuffix",
                       "-o", ",".join(fields), *args)
        return parse_report(out, kind)

    def pvs(self) -> list[PvReport]:
        rows = self._report("pvs", "pv", PvReport.FIELDS)
        return [PvReport.from_row(row) for row in rows]

    def vgs(self, *vgs: str) -> list[VgReport]:
        rows = self._report("vgs", "vg", VgReport.FIELDS, *vgs)
        return [VgReport.from_row(row) for row in rows]

    def lvs(self, *vgs: str) -> list[LvReport]:
        rows = self._report("lvs", "lv", LvReport.FIELDS, *vgs)
        return [LvReport.from_row(row) for row in rows]


def parse_report(out: str, kind: str) -> list[dict[str, str]]:
    """The rows of one ``--reportformat json`` report of ``kind`` (``pv``, ``vg``, ``lv``)."""
    try:
        raw = json.loads(out)
    except ValueError as exc:
        raise LvmError(["lvm", kind + "s"], 0, f"report is not JSON: {exc}") from None
    rows: list[dict[str, str]] = []
    for report in raw.get("report", []):
        rows.extend(report.get(kind, []))
    return rows


def _tags(text: str) -> tuple[str, ...]:
    return tuple(sorted(tag for tag in text.split(",") if tag))


def _int(text: str) -> int:
    return int(text) if text.strip() else 0


@dataclass(frozen=True)
class PvReport:
    FIELDS = ("pv_name", "pv_uuid", "vg_name", "pe_start", "pv_size")

    name: str
    uuid: str
    vg_name: str
    pe_start: int
    size: int

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> PvReport:
        return cls(row["pv_name"], row["pv_uuid"], row["vg_name"], _int(row["pe_start"]),
                   _int(row["pv_size"]))


@dataclass(frozen=True)
class VgReport:
    FIELDS = ("vg_name", "vg_uuid", "vg_tags", "vg_extent_size", "vg_size", "vg_free")

    name: str
    uuid: str
    tags: tuple[str, ...]
    extent_size: int
    size: int
    free: int

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> VgReport:
        return cls(row["vg_name"], row["vg_uuid"], _tags(row["vg_tags"]),
                   _int(row["vg_extent_size"]), _int(row["vg_size"]), _int(row["vg_free"]))


@dataclass(frozen=True)
class LvReport:
    FIELDS = ("vg_name", "lv_name", "lv_uuid", "lv_tags", "lv_size", "lv_attr", "lv_active",
              "lv_device_open", "lv_path", "lv_dm_path")

    vg_name: str
    name: str
    uuid: str
    tags: tuple[str, ...]
    size: int
    attr: str
    active: bool
    open: bool
    path: str
    dm_path: str

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> LvReport:
        # The fifth lv_attr character is the state: 'a' active, 's' suspended (still mapped),
        # '-' inactive, 'X' unknown (no device-mapper: lv_active then says "unknown", which
        # must not read as active); the sixth is 'o' while the device is open.
        attr = row.get("lv_attr", "")
        return cls(row["vg_name"], row["lv_name"], row["lv_uuid"], _tags(row["lv_tags"]),
                   _int(row["lv_size"]), attr, attr[4:5] in ("a", "s"), attr[5:6] == "o",
                   row.get("lv_path", ""), row.get("lv_dm_path", ""))
