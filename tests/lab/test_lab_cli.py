"""`virtyard-lab` as a person uses it: clear errors with non-zero exits, and a `down` that leaves
nothing behind (no process, mount, loop device or file)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from virtyard.lab import qga
from virtyard.lab.demo import DEMO_CONNECTION, set_up
from virtyard.lab.guest_vm import tiny_guest_xml
from virtyard.lab.iscsi_target import Chap
from virtyard.lab.lab import Lab, LabConfig, leftovers, loop_devices_under
from virtyard.lab.process import run

pytestmark = pytest.mark.lab

LAB_CLI = [sys.executable, "-m", "virtyard.lab.cli"]
PORT_BASE = 21000 + int(os.environ.get("VIRTYARD_TEST_PORT_OFFSET", "0"))  # a third lab


@pytest.fixture
def stray_lab(tmp_path: Path) -> Iterator[Path]:
    """A state dir for an `up` that must fail; if it wrongly succeeds, it is taken down."""
    state = tmp_path / "lab"
    yield state
    if state.exists():
        _cli("--state-dir", str(state), "down")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAB_CLI, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, check=False)


def test_missing_package_is_named_and_nothing_is_created(stray_lab: Path) -> None:
    state = stray_lab
    result = _cli("--state-dir", str(state), "up", env={"PATH": "/nonexistent"})
    assert result.returncode == 1
    assert "missing-package" in result.stderr
    assert "apt-get install -y tgt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not state.exists()


def test_busy_port_is_named_and_nothing_is_started(lab: Lab, stray_lab: Path) -> None:
    # The session's test lab holds its iSCSI port: a second lab wanting it must refuse.
    state = stray_lab
    result = _cli("--state-dir", str(state), "up", "--port-base", str(lab.config.iscsi_port))
    assert result.returncode == 1
    assert f"port {lab.config.iscsi_port}" in result.stderr
    assert "port-busy" in result.stderr
    assert not state.exists()
    assert lab.storage.is_running()


def test_failed_guest_build_is_one_clear_error(tmp_path: Path, stray_lab: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_apt = fake_bin / "apt-get"
    fake_apt.write_text("#!/bin/sh\necho 'E: Unable to locate package' >&2\nexit 100\n")
    fake_apt.chmod(0o755)
    state = stray_lab
    result = _cli("--state-dir", str(state), "up", "--port-base", str(PORT_BASE),
                  env={"PATH": f"{fake_bin}:{os.environ['PATH']}",
                       "VIRTYARD_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 1
    assert "guest-build-failed" in result.stderr
    assert "apt-get update" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not state.exists()
    assert not list((tmp_path / "cache" / "guest").glob(".build-*"))


@pytest.fixture
def third_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    state = Path(f"/tmp/vy-third-{uuid.uuid4().hex[:6]}")
    the_lab = Lab(LabConfig.test(state).with_port_base(PORT_BASE))
    the_lab = Lab(LabConfig(**{**the_lab.config.__dict__, "host_count": 1}))
    try:
        yield the_lab
    finally:
        the_lab.down()


def test_down_leaves_nothing_behind(third_lab: Lab) -> None:
    lab = third_lab
    status = _cli("--state-dir", str(lab.state_dir), "up", "--hosts", "1",
                  "--port-base", str(PORT_BASE))
    assert status.returncode == 0, status.stderr
    assert f"127.0.0.1:{PORT_BASE}" in status.stdout
    assert f"engine: https://127.0.0.1:{PORT_BASE + 90}/ovirt-engine/api (running" in status.stdout
    lab = Lab.load(lab.state_dir)  # type: ignore[assignment]
    assert lab is not None and lab.storage.is_running() and lab.engine.is_running()

    # Use every kind of resource the lab can hold: a CHAP target, a guest with the LUN
    # attached over iSCSI, and a loop device over a file in the lab's directory.
    target = lab.storage.create_target("leftover", [16 << 20], chap=Chap("u1", "pw-" + "x" * 8))
    conn = libvirt.open(lab.hosts[0].uri)
    dom = conn.defineXML(tiny_guest_xml("leftover", str(uuid.uuid4()), lab.guest_image,
                                        accelerator=lab.accelerator,
                                        console_log=lab.console_dir / "leftover.log"))
    dom.create()
    qga.wait_ready(dom)
    conn.close()
    image = lab.state_dir / "loop.img"
    image.write_bytes(b"\0" * (1 << 20))
    run(["losetup", "-f", "--show", str(image)])
    assert loop_devices_under(lab.state_dir)
    assert target.iqn

    down = _cli("--state-dir", str(lab.state_dir), "down")
    assert down.returncode == 0, down.stderr
    assert leftovers(lab.state_dir) == []
    assert not lab.storage.is_running() and not lab.engine.is_running()
    assert not lab.state_dir.exists()
    # Down twice is fine.
    assert _cli("--state-dir", str(lab.state_dir), "down").returncode == 0


def test_status_of_a_missing_lab(tmp_path: Path) -> None:
    result = _cli("--state-dir", str(tmp_path / "none"), "status")
    assert result.returncode == 3
    assert "no lab" in result.stderr


def test_status_shows_the_session_lab(lab: Lab) -> None:
    result = _cli("--state-dir", str(lab.state_dir), "status")
    assert result.returncode == 0
    assert lab.storage.portal in result.stdout
    for host in lab.hosts:
        assert host.uri in result.stdout


def test_demo_set_up_is_idempotent(lab: Lab) -> None:
    """What `make demo` adds to a lab: a target, both agents connected, both hosts in the
    engine, the engine VM `demo` up with its LUN disk attached and active."""
    first = set_up(lab)
    vm_id = first["VIRTYARD_DEMO_VM"]
    [target] = [t for t in lab.storage.targets() if t.iqn == first["VIRTYARD_DEMO_TARGET"]]
    try:
        with lab.engine.api() as api:
            ids = {h["name"]: h["id"] for h in api.get("/hosts").json()["host"]}
        assert set_up(lab) == first  # again: finds what is there
        with lab.engine.api() as api:
            hosts = api.get("/hosts").json()["host"]
            [vm] = api.get("/vms", params={"search": "name=demo"}).json()["vm"]
            [attachment] = api.get(f"/vms/{vm_id}/diskattachments").json()["disk_attachment"]
            disk = api.get(f"/disks/{attachment['id']}").json()
            starts = [e for e in api.get("/events").json()["event"]
                      if e["code"] == 153 and (e.get("vm") or {}).get("id") == vm_id]
        assert sorted((h["name"], h["status"], h["port"]) for h in hosts) == [
            (a.name, "up", a.port) for a in lab.agents]
        assert {h["name"]: h["id"] for h in hosts} == ids  # left as they were
        assert (vm["id"], vm["status"], vm["host"]["id"]) == (vm_id, "up", ids["host1"])
        assert len(starts) == 1  # started once, not again
        assert (attachment["active"], attachment["interface"]) == (True, "virtio_scsi")
        assert disk["lun_storage"]["logical_units"]["logical_unit"][0]["id"] == target.wwid(1)
        assert first["VIRTYARD_GUEST_KERNEL"] == str(lab.guest_image.kernel)
        with lab.agent_client(0) as client:
            [running] = client.call("Host.getVMFullList", {"vmList": [vm_id]})
            assert running["status"] == "Up"
            [lun, cd] = [d for d in running["devices"] if d.get("type") == "disk"]
            assert (lun["device"], lun["GUID"], lun["diskId"]) == ("disk", target.wwid(1),
                                                                   disk["id"])
            assert cd["device"] == "cdrom" and "PDIV" not in cd  # an empty drive
            volumes = client.call("Volume.list", {"domainID": first["VIRTYARD_DEMO_DOMAIN"]})
        with lab.engine.api() as api:  # the ISO domain and its ISO are the engine's
            domain = api.get(f"/storagedomains/{first['VIRTYARD_DEMO_DOMAIN']}").json()
            iso = api.get(f"/disks/{first['VIRTYARD_DEMO_ISO']}").json()
        assert (domain["name"], domain["status"]) == ("demo-isos", "active")
        assert (iso["alias"], iso["status"], iso["content_type"]) == ("demo.iso", "ok", "iso")
        assert [(v["imageID"], v["state"]) for v in volumes] == [(iso["image_id"], "READY")]
        with lab.agent_client(1) as client:
            assert client.call("Host.getDevicesVisibility",
                               {"guidList": [target.wwid(1)]}) == {target.wwid(1): True}
    finally:
        with lab.engine.api() as api:  # the session's engine as it was: no VM, disk or host
            for vm in api.get("/vms").json().get("vm", []):
                if vm["status"] != "down":
                    api.post(f"/vms/{vm['id']}/stop", json={}).raise_for_status()
                api.delete(f"/vms/{vm['id']}").raise_for_status()
            for disk in api.get("/disks").json().get("disk", []):
                api.delete(f"/disks/{disk['id']}").raise_for_status()
            for sd in api.get("/storagedomains").json().get("storage_domain", []):
                dc = (sd.get("data_center") or {}).get("id")
                if dc and sd["status"] == "active":
                    api.post(f"/datacenters/{dc}/storagedomains/{sd['id']}/deactivate",
                             json={}).raise_for_status()
                if dc:
                    api.delete(f"/datacenters/{dc}/storagedomains/{sd['id']}")\
                        .raise_for_status()
                api.delete(f"/storagedomains/{sd['id']}", params={
                    "format": "true", "host": "host1"}).raise_for_status()
            for host in api.get("/hosts").json()["host"]:
                api.post(f"/hosts/{host['id']}/deactivate").raise_for_status()
                api.delete(f"/hosts/{host['id']}").raise_for_status()
        for index in range(len(lab.agents)):
            with lab.agent_client(index) as client:
                for _ in range(2):  # set_up ran twice but connected once: both calls are fine
                    client.call("StoragePool.disconnectStorageServer", {
                        "domainType": 3, "connectionParams": [{
                            "id": DEMO_CONNECTION, "connection": "127.0.0.1",
                            "iqn": first["VIRTYARD_DEMO_TARGET"]}]})
        lab.storage.delete_target("demo")


def test_exec_runs_in_the_guest_and_passes_the_exit_status(
        lab: Lab, make_guest: Callable[..., libvirt.virDomain]) -> None:
    dom = make_guest(host=1)
    ok = _cli("--state-dir", str(lab.state_dir), "exec", dom.name(), "echo hello; uname -s")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == ["hello", "Linux"]
    assert _cli("--state-dir", str(lab.state_dir), "exec", dom.UUIDString(),
                "exit 7").returncode == 7
    missing = _cli("--state-dir", str(lab.state_dir), "exec", "no-such-vm", "true")
    assert missing.returncode == 1 and "no running VM" in missing.stderr
