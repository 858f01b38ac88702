"""LVM's udev settings come from the host: udev's control socket, or the agent's configuration."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from fake_initiator import FakeInitiator
from pydantic import ValidationError

from virtyard.host.config import HostConfig, StorageConfig
from virtyard.host.storage import lvm
from virtyard.host.storage.devices import DeviceService
from virtyard.host.storage.initiator import Device
from virtyard.host.storage.volumes import VolumeService


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Path]:
    """Where the test's udev control socket goes (not created yet)."""
    yield tmp_path / "control"


def listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(str(path))
    sock.listen(1)
    return sock


def test_udev_runs_when_its_control_socket_exists(control: Path) -> None:
    assert not lvm.udev_running(control)  # no udev at all (the lab's hosts)
    control.write_text("")
    assert not lvm.udev_running(control)  # a plain file is not a listening udev
    control.unlink()
    with listen(control):
        assert lvm.udev_running(control)


def test_setting_auto_asks_the_host_and_on_off_override_it(control: Path) -> None:
    assert lvm.udev_setting("auto", control) is False
    assert lvm.udev_setting("on", control) is True
    with listen(control):
        assert lvm.udev_setting("auto", control) is True
        assert lvm.udev_setting("off", control) is False
    with pytest.raises(ValueError, match="lvm_udev"):
        lvm.udev_setting("sometimes", control)


def test_lvm_commands_carry_the_hosts_choice() -> None:
    calls: list[list[str]] = []

    def runner(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    lvm.Lvm(("/dev/mapper/X",), dm=True, runner=runner, udev=True).activate("vg", "lv")
    lvm.Lvm(("/dev/mapper/X",), dm=True, runner=runner, udev=False).activate("vg", "lv")
    with_udev, without = (argv[3] for argv in calls)
    assert "activation { udev_sync=1 udev_rules=1 }" in with_udev
    assert "activation { udev_sync=0 udev_rules=0 }" in without
    assert without == lvm.LVM_CONFIG  # the default: what a host without udev needs
    assert with_udev.replace("=1", "=0") == without  # the rest of the restrictions stay


class OneLun:
    def devices_of_domain(self, domain_id: str) -> list[Device]:
        return [cast(Device, type("D", (), {"guid": "36001405aa"})())]


@pytest.mark.parametrize(("setting", "flag"), [("on", "1"), ("off", "0")])
def test_volume_service_passes_the_setting_to_every_lvm_command(
        tmp_path: Path, setting: str, flag: str) -> None:
    calls: list[list[str]] = []

    def runner(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    service = VolumeService(tmp_path, FakeInitiator("kernel"), cast(DeviceService, None),
                            initiator_name="iqn.2026-11.x:h", timeout=5, dm=True,
                            lvm_runner=runner, lvm_udev=setting)
    assert service.udev is (setting == "on")
    assert service.domains.udev is service.udev  # the LVM of domain changes too
    service.domains = cast(Any, OneLun())
    service._lvm_for("vg").activate("vg", "lv")
    [argv] = calls
    assert f"activation {{ udev_sync={flag} udev_rules={flag} }}" in argv[3]


def test_config_defaults_to_asking_the_host() -> None:
    assert HostConfig().storage.lvm_udev == "auto"
    assert StorageConfig(lvm_udev="off").lvm_udev == "off"
    with pytest.raises(ValidationError):
        StorageConfig(lvm_udev="yes")  # type: ignore[arg-type]
