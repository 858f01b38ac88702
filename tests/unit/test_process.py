"""The one subprocess runner (``virtyard.common.process``) and the tool wrappers built on it."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from virtyard.common import process
from virtyard.host.storage import lun_device, lvm


def test_stdin_is_dev_null_unless_input_is_given() -> None:
    assert process.run(["cat"]).stdout == ""  # never reads (or waits on) the caller's stdin
    assert process.run(["cat"], input_text="fed\n").stdout == "fed\n"


def test_passed_descriptors_reach_the_tool() -> None:
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, b"through a pipe")
        os.close(write_fd)
        proc = process.run(["cat", f"/dev/fd/{read_fd}"], pass_fds=(read_fd,))
    finally:
        os.close(read_fd)
    assert proc.stdout == "through a pipe"


def test_check_false_returns_failures_but_raises_on_timeout() -> None:
    assert process.run(["false"], check=False).returncode == 1
    with pytest.raises(process.CommandError) as info:
        process.run(["sleep", "30"], timeout=0.2, check=False)
    assert info.value.returncode == -1 and "timed out" in info.value.stderr


def test_missing_program_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process.shutil, "which", lambda program: None)
    with pytest.raises(process.MissingPackageError, match=r"'umount' \(package mount\)"):
        process.run(["umount", "-l", "/nowhere"], check=False)


def test_lvm_runner_turns_timeouts_and_a_missing_lvm_into_lvm_errors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def timed_out(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        raise process.CommandError(argv, -1, "timed out after 120 s")

    def missing(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        raise process.MissingPackageError("lvm", "lvm2")

    def answered(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert kwargs["check"] is False
        assert kwargs["env"]["LC_ALL"] == "C" and kwargs["env"]["LVM_SUPPRESS_FD_WARNINGS"] == "1"
        return subprocess.CompletedProcess(argv, 5, "", "  Volume group not found\n")

    tool = lvm.Lvm(("/dev/loop9",), dm=False)
    monkeypatch.setattr(lvm.process, "run", timed_out)
    with pytest.raises(lvm.LvmError, match="timed out after 120 s") as info:
        tool.lvremove("vg", "lv")
    assert info.value.returncode == -1
    monkeypatch.setattr(lvm.process, "run", missing)
    with pytest.raises(lvm.LvmError, match=r"lvm program is missing \(package lvm2\)"):
        tool.lvremove("vg", "lv")
    monkeypatch.setattr(lvm.process, "run", answered)
    with pytest.raises(lvm.LvmError, match="Volume group not found") as info:
        tool.lvremove("vg", "lv")
    assert info.value.returncode == 5


def test_lun_device_tools_fail_as_lun_device_errors() -> None:
    with pytest.raises(lun_device.LunDeviceError, match="no-such-tool-4711 is missing"):
        lun_device._run(["no-such-tool-4711"])
    with pytest.raises(lun_device.LunDeviceError, match=r"sleep timed out after 0\.2 s"):
        lun_device._run(["sleep", "30"], timeout=0.2)
    assert lun_device._run(["false"]).returncode == 1  # an exit status is the caller's to judge
