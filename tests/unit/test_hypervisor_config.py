"""Config generation and address checks of the lab's hypervisor hosts (no daemon needed)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from virtyard.lab.errors import LabError
from virtyard.lab.hypervisor import (
    BIND_MOUNTS,
    MIGRATION_ADDRESS,
    UNIX_PATH_MAX,
    HypervisorHost,
    check_host_uuid,
    check_port_range,
    check_socket_path,
    libvirtd_conf,
    namespace_script,
    qemu_conf,
    socket_path,
)

UUID = "3f2b8c1e-6a4d-4e9b-9c7a-1d2e3f4a5b6c"


def settings(text: str) -> dict[str, str]:
    """``key = value`` lines of a libvirt config file, comments dropped."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


def host(root: Path) -> HypervisorHost:
    return HypervisorHost("h1", root, 26509, (26600, 26619), UUID)


def test_libvirtd_conf_listens_on_loopback_tcp_only() -> None:
    conf = settings(
        libvirtd_conf(tcp_port=26509, host_uuid=UUID, log_file=Path("/lab/h1/log/libvirtd.log"))
    )
    assert conf["listen_tls"] == "0"
    assert conf["listen_tcp"] == "1"
    assert conf["tcp_port"] == '"26509"'
    assert conf["listen_addr"] == '"127.0.0.1"'
    assert conf["auth_tcp"] == '"none"'
    assert conf["host_uuid"] == f'"{UUID}"'
    assert conf["log_outputs"] == '"3:file:/lab/h1/log/libvirtd.log"'
    assert conf["unix_sock_rw_perms"] == '"0770"'
    assert conf["unix_sock_dir"] == '"/run/libvirt"'


def test_libvirtd_conf_normalises_uuid_and_rejects_bad_ones() -> None:
    conf = settings(libvirtd_conf(tcp_port=1, host_uuid=UUID.upper(), log_file=Path("/l")))
    assert conf["host_uuid"] == f'"{UUID}"'
    with pytest.raises(LabError, match="not a UUID"):
        libvirtd_conf(tcp_port=1, host_uuid="nope", log_file=Path("/l"))
    with pytest.raises(LabError, match="all digits the same"):
        check_host_uuid("11111111-1111-1111-1111-111111111111")
    with pytest.raises(LabError, match="out of range"):
        libvirtd_conf(tcp_port=70000, host_uuid=UUID, log_file=Path("/l"))


def test_config_values_that_cannot_be_quoted_are_refused() -> None:
    with pytest.raises(LabError, match="cannot write"):
        libvirtd_conf(tcp_port=1, host_uuid=UUID, log_file=Path('/a"b/log'))


def test_qemu_conf() -> None:
    conf = settings(qemu_conf(migration_ports=(49400, 49419)))
    assert conf["user"] == '"root"'
    assert conf["group"] == '"root"'
    assert conf["stdio_handler"] == '"file"'
    assert conf["remember_owner"] == "0"
    assert conf["migration_port_min"] == "49400"
    assert conf["migration_port_max"] == "49419"
    assert conf["migration_address"] == f'"{MIGRATION_ADDRESS}"'
    assert conf["migration_host"] == f'"{MIGRATION_ADDRESS}"'
    assert conf["vnc_listen"] == '"127.0.0.1"'
    assert conf["spice_listen"] == '"127.0.0.1"'
    assert conf["cgroup_controllers"] == "[ ]"


def test_migration_address_is_loopback_but_not_the_one_libvirt_refuses() -> None:
    # libvirt rejects exactly 127.0.0.1 / "localhost*" for migration_address and migration_host.
    assert re.fullmatch(r"127\.\d+\.\d+\.\d+", MIGRATION_ADDRESS)
    assert MIGRATION_ADDRESS != "127.0.0.1"


@pytest.mark.parametrize("ports", [(0, 10), (2000, 1999), (65000, 70000), (1000, 2000)])
def test_bad_migration_port_ranges(ports: tuple[int, int]) -> None:
    with pytest.raises(LabError, match="migration port range"):
        check_port_range(ports)
    with pytest.raises(LabError):
        qemu_conf(migration_ports=ports)


def test_addresses(tmp_path: Path) -> None:
    h = host(Path("/lab/hosts/h1"))
    assert h.uri == "qemu:///system?socket=/lab/hosts/h1/run/libvirt-sock"
    assert h.migration_uri == "qemu+tcp://127.0.0.1:26509/system"
    assert h.socket_path == socket_path(Path("/lab/hosts/h1"))


def test_relative_root_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert host(Path("lab/h1")).root == tmp_path / "lab" / "h1"


def test_socket_path_length_limit() -> None:
    run_suffix = len("/run/libvirt-sock")
    fits = Path("/" + "a" * (UNIX_PATH_MAX - 1 - run_suffix - 1))
    check_socket_path(socket_path(fits))
    assert len(str(socket_path(fits))) == UNIX_PATH_MAX - 1

    too_long = Path("/" + "a" * (UNIX_PATH_MAX - run_suffix - 1))
    assert len(str(socket_path(too_long))) == UNIX_PATH_MAX
    with pytest.raises(LabError, match="shorter than 108 bytes"):
        check_socket_path(socket_path(too_long))
    with pytest.raises(LabError, match="libvirt socket path"):
        _ = host(too_long).uri


def test_start_refuses_long_socket_path_before_doing_anything(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    with pytest.raises(LabError, match="Unix socket paths"):
        host(deep).start()
    assert not deep.exists()


def test_namespace_script_binds_every_folder_then_execs(tmp_path: Path) -> None:
    root = tmp_path / "my host"  # a space must survive quoting
    script = namespace_script(root, ["/usr/sbin/libvirtd", "--daemon", "--config", str(root)])
    lines = script.splitlines()
    assert lines[0] == "set -e"
    mounts = [shlex.split(line) for line in lines if line.startswith("mount ")]
    assert [(m[2], m[3]) for m in mounts] == [(str(root / sub), t) for sub, t in BIND_MOUNTS]
    assert {t for _, t in BIND_MOUNTS} == {
        "/etc/libvirt",
        "/run/libvirt",
        "/var/lib/libvirt",
        "/var/cache/libvirt",
        "/var/log/libvirt",
    }
    assert shlex.split(lines[-1]) == [
        "exec",
        "/usr/sbin/libvirtd",
        "--daemon",
        "--config",
        str(root),
    ]


def test_prepare_writes_layout_and_configs(tmp_path: Path) -> None:
    h = host(tmp_path / "h1")
    h.prepare()
    for sub, _ in BIND_MOUNTS:
        assert (h.root / sub).is_dir()
    assert (h.root / "log" / "qemu").is_dir()
    assert settings((h.root / "etc" / "libvirtd.conf").read_text())["tcp_port"] == '"26509"'
    assert settings((h.root / "etc" / "qemu.conf").read_text())["migration_port_max"] == "26619"


def test_never_started_host_is_not_running(tmp_path: Path) -> None:
    h = host(tmp_path / "h1")
    assert h.pid() is None
    assert not h.is_running()
    assert h.processes() == []


def test_stale_pid_file_of_another_process_does_not_count(tmp_path: Path) -> None:
    h = host(tmp_path / "h1")
    h.prepare()
    (h.root / "run" / "libvirtd.pid").write_text(f"{os.getpid()}\n")  # alive, but not libvirtd
    assert h.pid() is None
    assert not h.is_running()
