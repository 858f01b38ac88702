"""`make demo` with the engine, as a person runs it: `virtyard-lab up` and `demo` with an env
file, then the oVirt SDK with nothing but that file's values — both hosts up, the demo VM an
engine VM that is up with its LUN disk attached and active, the LUN inside the guest
(`virtyard-lab exec demo`); `demo` again changes nothing; `down` leaves nothing behind."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import ovirtsdk4
import ovirtsdk4.types as otypes
import pytest

from virtyard.lab.demo import DEMO_README
from virtyard.lab.guest_image import DEFAULT_CMDLINE
from virtyard.lab.lab import Lab, leftovers

pytestmark = pytest.mark.lab

LAB_CLI = [sys.executable, "-m", "virtyard.lab.cli"]
PORT_BASE = 22000 + int(os.environ.get("VIRTYARD_TEST_PORT_OFFSET", "0"))  # its own lab


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAB_CLI, *args], capture_output=True, text=True, timeout=600,
                          check=False)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        values[key] = shlex.split(value)[0] if value else ""
    return values


@pytest.fixture
def demo_state() -> Iterator[Path]:
    """A state folder for a demo lab (short: libvirt's socket paths); down at the end."""
    state = Path(f"/tmp/vy-demo-{uuid.uuid4().hex[:6]}")
    try:
        yield state
    finally:
        if state.exists():
            _cli("--state-dir", str(state), "down")


def test_demo_engine_answers_the_sdk_and_down_leaves_nothing(demo_state: Path,
                                                            tmp_path: Path) -> None:
    state, env_file = str(demo_state), tmp_path / "demo.env"
    up = _cli("--state-dir", state, "up", "--port-base", str(PORT_BASE), "--env-file",
              str(env_file))
    assert up.returncode == 0, up.stderr
    url = f"https://127.0.0.1:{PORT_BASE + 90}/ovirt-engine/api"
    assert f"engine: {url} (running" in up.stdout
    demo = _cli("--state-dir", state, "demo", "--env-file", str(env_file))
    assert demo.returncode == 0, demo.stderr

    env = read_env_file(env_file)
    assert env["VIRTYARD_ENGINE_URL"] == url
    assert env["VIRTYARD_ENGINE_USER"] == "admin@internal"
    assert Path(env["VIRTYARD_ENGINE_CA"]).is_file()
    password_file = demo_state / "engine" / "admin-password"
    assert env["VIRTYARD_ENGINE_PASSWORD"] == password_file.read_text().strip()
    assert password_file.stat().st_mode & 0o777 == 0o600
    assert Path(env["VIRTYARD_GUEST_KERNEL"]).is_file()
    assert Path(env["VIRTYARD_GUEST_INITRD"]).is_file()
    assert env["VIRTYARD_GUEST_CMDLINE"] == DEFAULT_CMDLINE
    lab = Lab.load(demo_state)
    assert lab is not None
    [target] = [t for t in lab.storage.targets() if t.iqn == env["VIRTYARD_DEMO_TARGET"]]
    connection = ovirtsdk4.Connection(
        url=env["VIRTYARD_ENGINE_URL"], username=env["VIRTYARD_ENGINE_USER"],
        password=env["VIRTYARD_ENGINE_PASSWORD"], ca_file=env["VIRTYARD_ENGINE_CA"])
    try:
        assert connection.test(raise_exception=True)
        system = connection.system_service()
        hosts_service = system.hosts_service()
        hosts = hosts_service.list()
        assert sorted((h.name, h.address, h.port, h.status) for h in hosts) == [
            ("host1", "127.0.0.1", PORT_BASE + 50, otypes.HostStatus.UP),
            ("host2", "127.0.0.1", PORT_BASE + 51, otypes.HostStatus.UP)]
        host_ids = {h.name: h.id for h in hosts}

        # The demo VM is the engine's: up on the preferred host, its LUN disk attached, active.
        [vm] = system.vms_service().list(search="name=demo")
        assert vm.id == env["VIRTYARD_DEMO_VM"]
        assert vm.status == otypes.VmStatus.UP and vm.host.id == host_ids["host1"]
        assert vm.memory == 256 << 20
        assert (vm.os.kernel, vm.os.initrd, vm.os.cmdline) == (
            env["VIRTYARD_GUEST_KERNEL"], env["VIRTYARD_GUEST_INITRD"], DEFAULT_CMDLINE)
        assert [h.id for h in vm.placement_policy.hosts] == [host_ids["host1"],
                                                             host_ids["host2"]]
        attachments = system.vms_service().vm_service(vm.id).disk_attachments_service()
        [attachment] = attachments.list()
        assert attachment.active is True
        assert attachment.interface == otypes.DiskInterface.VIRTIO_SCSI
        disk = connection.follow_link(attachment.disk)
        assert disk.alias == "demo-lun1"
        [unit] = disk.lun_storage.logical_units
        assert unit.id == target.wwid(1)
        # Added through host 1: the LUN's facts as the host reads them.
        assert (unit.size, unit.vendor_id, unit.product_id) == (target.lun(1).size, "IET",
                                                                "VIRTUAL-DISK")
        with lab.agent_client(0) as agent:  # host 1 runs it, as the engine says, with that disk
            [running] = agent.call("Host.getVMFullList", {"vmList": [vm.id]})
            assert running["status"] == "Up"
            assert [(d["device"], d.get("GUID"), d.get("diskId")) for d in running["devices"]
                    if d.get("type") == "disk"] == [
                ("disk", target.wwid(1), disk.id), ("cdrom", None, None)]  # an empty drive

        # Inside the guest: the LUN under the serial the engine gave it.
        link = f"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{disk.id[:20]}"
        inside = _cli("--state-dir", state, "exec", "demo",
                      f"for i in $(seq 100); do [ -e {link} ] && break; sleep 0.2; done; "
                      f"blockdev --getsize64 {link}")
        assert inside.returncode == 0, inside.stderr
        assert int(inside.stdout) == target.lun(1).size

        # The ISO domain is the engine's, and so is the demo VM's CD-ROM.
        [domain] = system.storage_domains_service().list(search="name=demo-isos")
        assert domain.status == otypes.StorageDomainStatus.ACTIVE
        assert domain.storage.volume_group.logical_units[0].id == target.wwid(3)
        iso = system.disks_service().disk_service(env["VIRTYARD_DEMO_ISO"]).get()
        assert (iso.alias, iso.status, iso.content_type) == (
            "demo.iso", otypes.DiskStatus.OK, otypes.DiskContentType.ISO)
        cd = system.vms_service().vm_service(vm.id).cdroms_service().cdrom_service(
            "00000000-0000-0000-0000-000000000000")
        cd.update(otypes.Cdrom(file=otypes.File(id=iso.id)), current=True)
        read = _cli("--state-dir", state, "exec", "demo",
                    "mkdir -p /mnt/cd; mount -t iso9660 -o ro /dev/sr0 /mnt/cd && "
                    "cat /mnt/cd/README.txt; r=$?; umount /mnt/cd; exit $r")
        assert read.returncode == 0 and read.stdout == DEMO_README, read
        cd.update(otypes.Cdrom(file=otypes.File(id="")), current=True)
        assert cd.get(current=True).file is None

        # The demo again (make demo on a running demo): hosts and VM left as they were.
        again = _cli("--state-dir", state, "demo", "--env-file", str(env_file))
        assert again.returncode == 0, again.stderr
        assert read_env_file(env_file) == env
        assert sorted((h.name, h.id) for h in hosts_service.list()) == sorted(
            (h.name, h.id) for h in hosts)
        [same] = system.vms_service().list(search="name=demo")
        assert (same.id, same.status, same.host.id) == (vm.id, vm.status, vm.host.id)
        starts = [e for e in system.events_service().list()
                  if e.code == 153 and e.vm is not None and e.vm.id == vm.id]
        assert len(starts) == 1  # started once, not again
        assert [(a.id, a.active) for a in attachments.list()] == [(attachment.id, True)]
    finally:
        connection.close()

    down = _cli("--state-dir", state, "down")
    assert down.returncode == 0, down.stderr
    assert leftovers(demo_state) == []
