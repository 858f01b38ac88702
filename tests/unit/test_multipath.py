"""Multipath state readers against real recorded output.

This machine has no device-mapper, so ``dmsetup`` and ``multipathd`` could only record their
failures here (``recorded_here.json``). The parsers are fed output recorded by others and
published (``tests/data/kernel/*.txt``: vdsm's test data, a RHEL dmsetup notes page, the
kernel's dm-service-time documentation, multipath-tools issue #62, insights-core's test data;
each file's ``## `` header names its source). The sysfs reader runs on ``sysfs_host.json``, a
tree built to the kernel's layout with values from recorded sources (its ``about`` says which),
since no host here can produce a real one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from virtyard.host.storage import multipath as mp
from virtyard.host.storage.iscsiadm import CommandResult, ToolNotFoundError, ToolTimeoutError

DATA = Path(__file__).resolve().parent.parent / "data" / "kernel"
RECORDED: dict[str, dict[str, Any]] = json.loads(
    (DATA / "recorded_here.json").read_text())["cases"]
W1 = "360000000000000000e00000000010001"
W2 = "360000000000000000e00000000010002"
W3 = "360000000000000000e00000000020001"


def fixture(name: str) -> str:
    """A text fixture without its ``## `` source header."""
    text = (DATA / name).read_text()
    header, sep, body = text.partition("## ---\n")
    assert sep and all(line.startswith("##") for line in header.splitlines()), name
    return body


def materialize(spec: dict[str, Any], root: Path) -> Path:
    """Write a ``{"files": {path: text}, "links": {path: target}}`` tree under ``root``."""
    for rel, text in spec.get("files", {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for rel, target in sorted(spec.get("links", {}).items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)
    return root


@pytest.fixture
def sysfs(tmp_path: Path) -> mp.Sysfs:
    spec = json.loads((DATA / "sysfs_host.json").read_text())
    return mp.Sysfs(materialize(spec, tmp_path))


class Runner:
    """Answers every command with one result (or raises), remembering what was run."""

    def __init__(self, answer: CommandResult | Exception) -> None:
        self.answer = answer
        self.calls: list[tuple[list[str], float]] = []

    def __call__(self, argv: Sequence[str], *, timeout: float,
                 secrets: tuple[str, ...] = ()) -> CommandResult:
        self.calls.append((list(argv), timeout))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


# --- dmsetup status ----------------------------------------------------------------------------

def test_dmsetup_status_vdsm_paths_and_fail_counts() -> None:
    maps = mp.parse_dmsetup_status(fixture("dmsetup_status_vdsm.txt"))
    assert list(maps) == ["360014053d0b83eff3d347c48509fc426",
                          "3600140543cb8d7510d54f058c7b3f7ec"]
    first = maps["360014053d0b83eff3d347c48509fc426"]
    assert (first.start, first.length, first.queue_io, first.next_group) == (
        0, 104857600, ("0", "1"), 2)
    assert [g.state for g in first.groups] == ["E", "E", "E"]
    assert list(first.paths()) == [mp.DmPathStatus("67:16", False, 4),
                                   mp.DmPathStatus("65:240", True, 84),
                                   mp.DmPathStatus("66:64", True, 39)]
    # the same answer vdsm's devicemapper.getPathsStatus() gives for this output
    assert mp.path_states(maps) == {"67:16": "failed", "65:240": "active",
                                    "66:64": "active", "65:224": "active",
                                    "65:160": "active", "66:176": "failed"}


def test_dmsetup_status_all_targets_keeps_multipath_only() -> None:
    maps = mp.parse_dmsetup_status(fixture("dmsetup_status_rhel.txt"))
    assert sorted(maps) == ["36001438005deddc80000400003340000", "DMdisk02-2T", "DMdisk03-1T",
                            "fenxi-2T"]
    wwid_map = maps["36001438005deddc80000400003340000"]
    assert [g.state for g in wwid_map.groups] == ["A", "E"]
    assert [[p.devnum for p in g.paths] for g in wwid_map.groups] == [
        ["8:48", "8:128"], ["8:0", "8:64", "8:192", "8:208"]]
    assert all(p.active for m in maps.values() for p in m.paths())
    assert len(mp.path_states(maps)) == 6 + 4 + 6 + 6


def test_dmsetup_status_service_time_info_args_are_skipped() -> None:
    [status] = mp.parse_dmsetup_status(fixture("dmsetup_status_service_time.txt")).values()
    # two selector info words per path ("0 1" and "0 4") must not be read as paths
    assert list(status.paths()) == [mp.DmPathStatus("8:0", True, 0),
                                    mp.DmPathStatus("8:16", True, 0)]


def test_dmsetup_status_no_devices() -> None:
    assert mp.parse_dmsetup_status(fixture("dmsetup_status_none.txt")) == {}
    assert mp.parse_dmsetup_status("") == {}


@pytest.mark.parametrize("line", [
    "m: 0 10 multipath 2 0 0 0 1 1 A 0 2 0 8:0 A 0",  # second path missing
    "m: 0 10 multipath 2 0 0 0 1 1 X 0 1 0 8:0 A 0",  # bad group state
    "m: 0 10 multipath 2 0 0 0 1 1 A 0 1 0 8:0 Q 0",  # bad path state
    "m: 0 10 multipath 2 0 0 0 1 1 A 0 1 0 sdb A 0",  # not major:minor
    "m: 0 10 multipath 2 0 0 0 1 1 A 0 1 0 8:0 A 0 extra",  # trailing words
    "m: 0 10 multipath two 0 0",  # not a number
    "m: zero 10 multipath 0 0 0 0",
    "no separator here",
])
def test_dmsetup_status_malformed(line: str) -> None:
    with pytest.raises(mp.MultipathParseError):
        mp.parse_dmsetup_status(line + "\n")


def test_dmsetup_status_command() -> None:
    run = Runner(CommandResult(0, fixture("dmsetup_status_vdsm.txt"), ""))
    assert len(mp.dmsetup_status(run, timeout=4)) == 2
    assert run.calls == [(["dmsetup", "status", "--target", "multipath"], 4)]


def test_dmsetup_status_without_device_mapper_recorded_here() -> None:
    rec = RECORDED["dmsetup_status_multipath"]
    with pytest.raises(mp.MultipathError, match="device-mapper") as info:
        mp.dmsetup_status(Runner(CommandResult(rec["returncode"], rec["stdout"], rec["stderr"])))
    assert "failed with 1" in str(info.value)


@pytest.mark.parametrize(("error", "message"), [
    (ToolTimeoutError(["dmsetup"], 2), "timed out after 2 s"),
    (ToolNotFoundError("dmsetup", "dmsetup"), "not found"),
])
def test_dmsetup_status_tool_failures(error: Exception, message: str) -> None:
    with pytest.raises(mp.MultipathError, match=message):
        mp.dmsetup_status(Runner(error), timeout=2)


def test_dmsetup_status_spent_budget_runs_nothing() -> None:
    run = Runner(CommandResult(0, "", ""))
    with pytest.raises(mp.MultipathError, match="no time left"):
        mp.dmsetup_status(run, timeout=0)
    assert run.calls == []


# --- multipathd tables -------------------------------------------------------------------------

def test_multipathd_maps_padded_header() -> None:
    rows = mp.parse_multipathd_table(fixture("multipathd_maps_fc.txt"), "%n %d %w",
                                     mp.MAP_HEADERS)
    assert len(rows) == 13
    assert rows[0] == {"n": "mpath13", "d": "dm-6", "w": "3600507630affc54f0000000000009100"}
    assert rows[4] == {"n": "mpath4", "d": "dm-10", "w": "3600507630affc54f0000000000002103"}
    assert rows[-1]["w"] == "3600507630affc54f0000000000002203"


def test_multipathd_paths_orphans() -> None:
    rows = mp.parse_multipathd_table(fixture("multipathd_paths_orphans.txt"),
                                     "%w %d %t %i %o %T %z %s %m", mp.PATH_HEADERS)
    assert rows == [
        {"w": "2c6f914c06154a5c56c9ce90022851301", "d": "sdd", "t": "undef", "i": "8:0:0:1",
         "o": "unknown", "T": "undef", "z": "c6f914c06154a5c56c9ce90022851301",
         "s": "Nimble,Server", "m": "[orphan]"},
        {"w": "2c6f914c06154a5c56c9ce90022851301", "d": "sdc", "t": "undef", "i": "7:0:0:1",
         "o": "unknown", "T": "undef", "z": "c6f914c06154a5c56c9ce90022851301",
         "s": "Nimble,Server", "m": "[orphan]"},
    ]


def test_multipathd_padded_columns_may_hold_spaces() -> None:
    """The recorded orphan table with one checker state widened to "i/o pending" (a state
    print.c prints): columns are cut at the header offsets, so the space stays inside."""
    text = fixture("multipathd_paths_orphans.txt").splitlines()
    header = text[0].replace("chk_st ", "chk_st      ")
    row = text[1].replace("undef  c6f9", "i/o pending c6f9")
    [parsed] = mp.parse_multipathd_table(f"{header}\n{row}\n", "%w %d %t %i %o %T %z %s %m",
                                         mp.PATH_HEADERS)
    assert parsed["T"] == "i/o pending"
    assert parsed["z"] == "c6f914c06154a5c56c9ce90022851301"


def test_multipathd_raw_rows_last_column_keeps_spaces() -> None:
    # "show paths raw format": no header, no padding (multipathd(8)).
    rows = mp.parse_multipathd_table("36001405aa sdb 8:16 7:0:0:1 active running i/o pending\n",
                                     mp.Multipathd.PATHS_FORMAT, mp.PATH_HEADERS)
    assert rows == [{"w": "36001405aa", "d": "sdb", "D": "8:16", "i": "7:0:0:1", "t": "active",
                     "o": "running", "T": "i/o pending"}]
    with pytest.raises(mp.MultipathParseError, match="columns"):
        mp.parse_multipathd_table("36001405aa sdb\n", mp.Multipathd.PATHS_FORMAT,
                                  mp.PATH_HEADERS)


@pytest.mark.parametrize("fmt", ["%w  %d", "%w,%d", "%w %Y", "%w %d%N"])
def test_multipathd_format_must_be_known_wildcards(fmt: str) -> None:
    with pytest.raises(ValueError, match="wildcards"):
        mp.parse_multipathd_table("", fmt, mp.MAP_HEADERS)


def test_multipathd_not_running_recorded_here() -> None:
    rec = RECORDED["multipathd_show_maps"]
    run = Runner(CommandResult(rec["returncode"], rec["stdout"], rec["stderr"]))
    with pytest.raises(mp.MultipathError, match="is multipathd running"):
        mp.Multipathd(run).show_maps(timeout=3)
    assert run.calls == [(rec["argv"], 3)]  # the very command recorded here


def test_multipathd_error_text_is_kept() -> None:
    run = Runner(CommandResult(1, "", "ux_socket_connect: Connection refused\n"))
    with pytest.raises(mp.MultipathError, match="Connection refused"):
        mp.Multipathd(run).show_paths()


def test_multipathd_show_maps_and_paths() -> None:
    """Tables in multipathd's pretty layout (header words and padding per print.c) for the
    formats the initiator asks for; values from the sysfs fixture's maps."""
    maps = ("uuid                              sysfs paths\n"
            f"{W1} dm-1  2    \n"
            f"{W3} dm-4  0    \n")
    found = mp.Multipathd(Runner(CommandResult(0, maps, ""))).show_maps()
    assert found == [mp.MultipathdMap(W1, "dm-1", 2), mp.MultipathdMap(W3, "dm-4", 0)]
    paths = ("uuid                              dev dev_t hcil    dm_st  dev_st  chk_st\n"
             f"{W1} sdb 8:16  7:0:0:1 active running ready \n"
             f"{W1} sdd 8:48  8:0:0:1 failed running faulty\n")
    run = Runner(CommandResult(0, paths, ""))
    got = mp.Multipathd(run).show_paths()
    assert got[1] == mp.MultipathdPath(W1, "sdd", "8:48", "8:0:0:1", "failed", "running",
                                       "faulty")
    assert run.calls[0][0] == ["multipathd", "show", "paths", "format", "%w %d %D %i %t %o %T"]


# --- scsi_id -----------------------------------------------------------------------------------

def test_scsi_serial_from_recorded_output() -> None:
    run = Runner(CommandResult(0, fixture("scsi_id_sata_disk.txt"), ""))
    assert mp.scsi_serial("/dev/dm-1", run, timeout=5, program="/lib/udev/scsi_id") == (
        "SATA_WDC_WD2502ABYS-1_WD-WMAT16865419")
    assert run.calls == [(["/lib/udev/scsi_id", "--page=0x80", "--whitelisted", "--export",
                           "--replace-whitespace", "--device=/dev/dm-1"], 5)]


@pytest.mark.parametrize("case", ["scsi_id_virtio_disk", "scsi_id_missing_device",
                                  "scsi_id_loop_device"])
def test_scsi_serial_none_recorded_here(case: str, caplog: pytest.LogCaptureFixture) -> None:
    # A non-SCSI disk and a missing device print empty values with exit 0; a loop device
    # makes scsi_id exit 1 without a word. All mean "no serial".
    rec = RECORDED[case]
    run = Runner(CommandResult(rec["returncode"], rec["stdout"], rec["stderr"]))
    with caplog.at_level(logging.WARNING):
        assert mp.scsi_serial("/dev/x", run) == ""
    assert ("exited with 1" in caplog.text) == (rec["returncode"] == 1)


def test_scsi_serial_timeout_is_no_serial(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert mp.scsi_serial("/dev/dm-1", Runner(ToolTimeoutError(["scsi_id"], 1))) == ""
    assert "timed out" in caplog.text


def test_parse_scsi_id_export() -> None:
    values = mp.parse_scsi_id_export(fixture("scsi_id_sata_disk.txt"))
    assert values["ID_VENDOR_ENC"] == r"ATA\x20\x20\x20\x20\x20"
    assert values["ID_TYPE"] == "disk"
    assert mp.parse_scsi_id_export("garbage\n=x\n") == {}


# --- sysfs -------------------------------------------------------------------------------------

def test_sysfs_multipath_maps(sysfs: mp.Sysfs) -> None:
    maps = sysfs.multipath_maps()
    # LVM (dm-0) and the kpartx partition map "part1-mpath-…" (dm-3) are not multipath maps
    assert [m.dm for m in maps] == ["dm-1", "dm-2", "dm-4", "dm-5"]
    first = maps[0]
    assert first == mp.DmMap("dm-1", W1, W1, "253:1", ("sdb", "sdd"), 131072, 512, 512, 0)
    assert first.capacity == 64 << 20
    assert maps[1].discard_max_bytes == 1073741824
    friendly = maps[2]
    assert (friendly.name, friendly.wwid, friendly.slaves) == ("mpathb", W3, ("sdf",))
    assert mp.holders_of(maps)["sde"].dm == "dm-2"


def test_sysfs_map_order_is_numeric(sysfs: mp.Sysfs) -> None:
    block = sysfs.sys / "block"
    os.symlink("../devices/virtual/block/dm-1", block / "dm-10")
    assert [m.dm for m in sysfs.multipath_maps()][:2] == ["dm-1", "dm-2"]
    assert [m.dm for m in sysfs.multipath_maps()][-1] == "dm-10"


def test_sysfs_iscsi_disk(sysfs: mp.Sysfs) -> None:
    disk = sysfs.disk("sdb")
    assert disk == mp.BlockDisk(
        name="sdb", devnum="8:16", vendor="IET", model="VIRTUAL-DISK", rev="0001",
        scsi_type=0, hbtl=mp.Hbtl(7, 0, 0, 1), sectors=131072, logical_block_size=512,
        physical_block_size=512, discard_max_bytes=0, sid=1)
    assert str(disk.hbtl) == "7:0:0:1"
    sde = sysfs.disk("sde")
    assert sde is not None and sde.sid == 2


def test_sysfs_local_disk_has_no_session(sysfs: mp.Sysfs) -> None:
    disk = sysfs.disk("sda")
    assert disk is not None
    assert (disk.sid, disk.vendor, disk.model, disk.hbtl) == (
        None, "ATA", "WDC WD2502ABYS-1", mp.Hbtl(0, 0, 0, 0))
    assert sysfs.disk("sdz") is None


def test_sysfs_hbtl_without_scsi_disk_dir(sysfs: mp.Sysfs) -> None:
    device = Path(os.path.realpath(sysfs.sys / "block" / "sdc" / "device"))
    shutil.rmtree(device / "scsi_disk")
    disk = sysfs.disk("sdc")
    assert disk is not None and disk.hbtl == mp.Hbtl(7, 0, 0, 2)  # from the device dir name


def test_sysfs_iscsi_sessions(sysfs: mp.Sysfs) -> None:
    sessions = sysfs.iscsi_sessions()
    assert sessions == [
        mp.IscsiSession(1, "iqn.2026-11.org.virtyard.lab:rec", 1, "192.0.2.10", 3260, "default",
                        "LOGGED_IN"),
        mp.IscsiSession(2, "iqn.2026-11.org.virtyard.lab:rec", 1, "192.0.2.11", 3260, "default",
                        "LOGGED_IN"),
        mp.IscsiSession(3, "iqn.2026-11.org.virtyard.lab:other", 1, "192.0.2.12", 3260,
                        "default", "LOGGED_IN"),
    ]
    assert sysfs.iscsi_session(42) is None


def test_sysfs_session_without_connection_is_not_listed(sysfs: mp.Sysfs) -> None:
    (sysfs.sys / "class" / "iscsi_connection" / "connection3:0").unlink()
    assert [s.sid for s in sysfs.iscsi_sessions()] == [1, 2]
    assert sysfs.iscsi_session(3) is None


def test_sysfs_session_scsi_devices(sysfs: mp.Sysfs) -> None:
    assert sysfs.session_scsi_devices(1) == [
        mp.ScsiDevice(mp.Hbtl(7, 0, 0, 0), 12, None),  # tgt's array controller, no sd
        mp.ScsiDevice(mp.Hbtl(7, 0, 0, 1), 0, "sdb"),
        mp.ScsiDevice(mp.Hbtl(7, 0, 0, 2), 0, "sdc"),
    ]
    assert sysfs.session_scsi_devices(42) == []


def test_sysfs_empty_root(tmp_path: Path) -> None:
    empty = mp.Sysfs(tmp_path)
    assert empty.multipath_maps() == []
    assert empty.iscsi_sessions() == []
    assert empty.disk("sda") is None


# --- recorded for real in the lab's storage host VM (tests/lab/test_kernel_path.py's setup) -----

VM = json.loads((DATA / "storage_host_vm.json").read_text())
VM_W1 = "360000000000000000e00000000060001"
VM_W2 = "360000000000000000e00000000060002"


def test_vm_dmsetup_status_two_portals_then_one_failed() -> None:
    both = mp.path_states(mp.parse_dmsetup_status(VM["dmsetup_status_two_paths"]["stdout"]))
    assert both == {"8:0": "active", "8:32": "active", "8:16": "active", "8:48": "active"}
    failed = mp.path_states(mp.parse_dmsetup_status(VM["dmsetup_status_one_failed"]["stdout"]))
    assert failed == {"8:0": "active", "8:32": "failed", "8:16": "active", "8:48": "failed"}
    assert mp.parse_dmsetup_status(VM["dmsetup_status_after_logout"]["stdout"]) == {}


def test_vm_multipathd_tables() -> None:
    maps = mp.Multipathd(Runner(CommandResult(0, VM["multipathd_maps_two_paths"]["stdout"], "")))
    found = maps.show_maps()
    assert sorted((m.wwid, m.paths) for m in found) == [(VM_W1, 2), (VM_W2, 2)]
    assert sorted(m.sysfs for m in found) == ["dm-0", "dm-1"]
    paths = mp.Multipathd(Runner(CommandResult(
        0, VM["multipathd_paths_one_failed"]["stdout"], ""))).show_paths()
    # dm's state lags the checker's: sdd is still "active" in dm while its checker says faulty.
    assert sorted((p.dev, p.wwid, p.dm_state, p.checker_state) for p in paths) == [
        ("sda", VM_W1, "active", "ready"), ("sdb", VM_W2, "active", "ready"),
        ("sdc", VM_W1, "failed", "faulty"), ("sdd", VM_W2, "active", "faulty")]


def test_vm_scsi_id_gives_the_wwid_tgt_advertises() -> None:
    values = mp.parse_scsi_id_export(VM["scsi_id"]["stdout"])
    assert values["ID_SERIAL"] == VM_W1
