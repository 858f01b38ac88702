"""Lab building blocks that need no running service: errors, secrets, ports, env files."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from virtyard.lab import ports
from virtyard.lab.cli import format_status, write_env_file
from virtyard.lab.errors import CommandError, LabError, MissingPackageError, PortBusyError
from virtyard.lab.iscsi_target import Chap, TargetInfo
from virtyard.lab.lab import EPHEMERAL_START, LabConfig, check_prerequisites, leftovers
from virtyard.lab.process import mask, require, run


def test_command_error_masks_secrets() -> None:
    with pytest.raises(CommandError) as info:
        run(["sh", "-c", "echo bad password hunter2 >&2; exit 3", "hunter2"],
            secrets=("hunter2",))
    text = str(info.value)
    assert "hunter2" not in text
    assert "***" in text
    assert info.value.returncode == 3


def test_mask_leaves_other_arguments() -> None:
    assert mask(["tgtadm", "--password", "pw", "--user", "u"], ("pw", "")) == [
        "tgtadm", "--password", "***", "--user", "u"]


def test_chap_repr_hides_password() -> None:
    assert "s3cret" not in repr(Chap("alice", "s3cret"))


def test_require_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingPackageError) as info:
        require("tgtadm")
    assert "apt-get install -y tgt" in str(info.value)
    assert info.value.code == "missing-package"


def test_check_prerequisites_names_every_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingPackageError) as info:
        check_prerequisites()
    message = str(info.value)
    for package in ("tgt", "libvirt-daemon", "qemu-system-x86", "libiscsi-bin"):
        assert f"package {package}" in message
    assert "apt-get install -y tgt" in message


def test_busy_port_is_named() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not ports.port_is_free(port)
        with pytest.raises(PortBusyError) as info:
            ports.ensure_free(port, "test portal")
    assert str(port) in str(info.value) and "test portal" in str(info.value)
    assert ports.port_is_free(port)


def test_env_file_merges_and_quotes(tmp_path: Path) -> None:
    env = tmp_path / "demo.env"
    env.write_text("OTHER='kept'\nVIRTYARD_ISCSI_PORTAL='old'\n")
    write_env_file(env, {"VIRTYARD_ISCSI_PORTAL": "127.0.0.1:13260",
                         "VIRTYARD_LIBVIRT_URIS": "a b", "Q": "it's"})
    lines = env.read_text().splitlines()
    assert "OTHER='kept'" in lines
    assert "VIRTYARD_ISCSI_PORTAL='127.0.0.1:13260'" in lines
    assert "VIRTYARD_LIBVIRT_URIS='a b'" in lines
    assert "Q='it'\\''s'" in lines


def test_demo_and_test_labs_use_distinct_ports(tmp_path: Path) -> None:
    demo = set(p for p, _ in LabConfig.demo(tmp_path / "a").all_ports())
    test = set(p for p, _ in LabConfig.test(tmp_path / "b").all_ports())
    assert demo and test and not demo & test
    assert LabConfig.demo(tmp_path).tgt_control_port != LabConfig.test(tmp_path).tgt_control_port


def test_config_round_trips_through_json(tmp_path: Path) -> None:
    config = LabConfig.test(tmp_path)
    assert LabConfig.from_json(config.to_json()) == config


def test_engine_port_moves_with_the_others(tmp_path: Path) -> None:
    demo, test = LabConfig.demo(tmp_path), LabConfig.test(tmp_path)
    assert (demo.engine_port, test.engine_port) == (15470, 25470)
    assert test.shifted(7).engine_port == 25477
    based = test.with_port_base(21000)
    assert based.engine_port == 21090
    ports_of = [p for p, _ in based.all_ports()]
    assert len(ports_of) == len(set(ports_of)) and based.engine_port in ports_of
    assert (based.engine_port, "engine REST API") in list(based.all_ports())


def test_no_lab_port_lies_in_the_kernels_ephemeral_range(tmp_path: Path) -> None:
    # CI once failed with port-busy: an outgoing connection's local port was the demo lab's.
    for config in (LabConfig.demo(tmp_path), LabConfig.test(tmp_path),
                   LabConfig.test(tmp_path).with_port_base(22000)):
        highest = max([p for p, _ in config.all_ports()] + [config.migration_base_port + 19])
        assert highest + 20 < EPHEMERAL_START, config
    with pytest.raises(LabError, match="ephemeral"):
        LabConfig.test(tmp_path).with_port_base(42000)


def test_config_of_a_lab_from_before_the_engine(tmp_path: Path) -> None:
    raw = LabConfig.demo(tmp_path).to_json()
    del raw["engine_port"]  # lab.json written before the engine joined the lab
    assert LabConfig.from_json(raw) == LabConfig.demo(tmp_path)


def test_format_status_names_portal_and_hosts() -> None:
    text = format_status({
        "state_dir": "/x", "accelerator": "tcg",
        "iscsi": {"portal": "127.0.0.1:1", "pid": 5, "running": True,
                  "targets": [{"iqn": "iqn.x:t", "luns": [1]}]},
        "hosts": [{"name": "host1", "uri": "qemu:///system?socket=/s", "running": True,
                   "pid": 7, "migration_uri": "qemu+tcp://127.0.0.1:2/system", "domains": []}],
    })
    assert "127.0.0.1:1" in text and "iqn.x:t" in text and "qemu:///system?socket=/s" in text


def test_format_status_names_the_engine() -> None:
    text = format_status({
        "state_dir": "/x", "accelerator": "tcg",
        "iscsi": {"portal": "127.0.0.1:1", "pid": 5, "running": True, "targets": []},
        "hosts": [], "agents": [],
        "engine": {"url": "https://127.0.0.1:15470/ovirt-engine/api", "pid": 9,
                   "running": True, "log": "/x/engine/engine.log"},
    })
    assert text.splitlines()[-1] == ("engine: https://127.0.0.1:15470/ovirt-engine/api "
                                     "(running, pid 9; log /x/engine/engine.log)")


def test_target_wwid_is_what_a_guest_saw() -> None:
    # lab.md: tgt's tid 1 LUN 1 appeared in a guest as by-id scsi-360000000000000000e00000000010001
    target = TargetInfo(tid=1, iqn="iqn.x:t", address="127.0.0.1", port=3260, luns=())
    assert target.wwid(1) == "360000000000000000e00000000010001"
    assert TargetInfo(2, "iqn.x:u", "127.0.0.1", 3260, ()).wwid(260) == \
        "360000000000000000e00000000020104"


def test_leftovers_of_a_lab_are_not_its_siblings(tmp_path: Path) -> None:
    # `.lab` (the demo) must not report, or detach, what `.lab-test` (the tests) runs.
    procs = [subprocess.Popen(["sh", "-c", "sleep 30", "sh", str(tmp_path / name / "x.toml")])
             for name in ("lab", "lab-test")]
    try:
        found = leftovers(tmp_path / "lab")
        assert len(found) == 1 and f"process {procs[0].pid}:" in found[0]
        assert [f"process {procs[1].pid}:" in line for line in leftovers(tmp_path / "lab-test")
                ] == [True]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
