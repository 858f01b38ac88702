"""``virtyard-lab up``'s ports: ``--profile kernel`` (and ``test``) move by the tests' port
offset like the test suite's lab, so a private lab started by hand is the one the tests use."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtyard.lab.cli import _parser, up_config
from virtyard.lab.errors import LabError
from virtyard.lab.lab import LabConfig


def config_for(argv: list[str]) -> LabConfig:
    return up_config(_parser().parse_args(["--state-dir", "/tmp/x", "up", *argv]))


def test_kernel_profile_honours_the_test_port_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIRTYARD_TEST_PORT_OFFSET", "9")
    config = config_for(["--profile", "kernel"])
    expected = LabConfig.test(Path("/tmp/x")).shifted(9)
    assert config.storage_host
    assert config.storage_host_port == expected.storage_host_port
    assert (config.iscsi_port, config.agent_base_port, config.engine_port) == (
        expected.iscsi_port, expected.agent_base_port, expected.engine_port)
    # The demo profile keeps its own ports whatever the tests do.
    assert config_for([]).agent_base_port == LabConfig.demo(Path("/tmp/x")).agent_base_port


def test_without_an_offset_the_profile_ports_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIRTYARD_TEST_PORT_OFFSET", raising=False)
    assert config_for(["--profile", "kernel"]).storage_host_port == LabConfig.test(
        Path("/tmp/x")).storage_host_port


def test_a_bad_offset_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIRTYARD_TEST_PORT_OFFSET", "nine")
    with pytest.raises(LabError, match="VIRTYARD_TEST_PORT_OFFSET"):
        config_for(["--profile", "test"])
