"""The agent's kernel path for real: open-iscsi, dm-multipath and LVM activation in the lab's
storage host VM (a TCG guest with a Debian kernel; :mod:`virtyard.lab.storage_host`).

Everything goes through the agent's verbs over mutual TLS, and is checked independently: the
kernel's own view inside the guest (sessions, SCSI devices, ``/dev/mapper``, ``lvs``) and the
bytes in the target's backing files on this machine (what went over the wire).
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from virtyard.host.client import HostClient
from virtyard.lab.iscsi_target import Chap, TargetInfo
from virtyard.lab.lab import Lab
from virtyard.lab.storage_host import PORTAL_PORT, PORTALS, StorageHostVM

pytestmark = pytest.mark.lab

MiB = 1 << 20
# Under TCG on a busy two-CPU machine a path change takes multipathd seconds to tens of seconds.
SLOW = 180.0

MakeTarget = Callable[..., TargetInfo]


@pytest.fixture(scope="module")
def storage_host(lab: Lab) -> Iterator[StorageHostVM]:
    """The lab's storage host VM, booted for this module (or still up from
    ``test_kernel_cdrom``, which runs first and leaves it running) and stopped after it."""
    lab.start_storage_host()
    yield lab.storage_host
    lab.storage_host.stop()


@pytest.fixture(scope="module")
def client(storage_host: StorageHostVM) -> Iterator[HostClient]:
    with storage_host.client(timeout=SLOW) as c:
        yield c


@pytest.fixture
def connect(client: HostClient) -> Iterator[Callable[..., list[dict[str, Any]]]]:
    """Factory: connectStorageServer through guest portal ``portal`` (0 or 1); every
    connection made is disconnected after the test."""
    made: list[dict[str, Any]] = []

    def do(target: TargetInfo, portal: int = 0, *, user: str = "", password: str = ""
           ) -> list[dict[str, Any]]:
        params = {"id": str(uuid.uuid4()), "connection": PORTALS[portal], "port": PORTAL_PORT,
                  "iqn": target.iqn, "user": user, "password": password}
        made.append(params)
        result: list[dict[str, Any]] = client.call(
            "StoragePool.connectStorageServer", {"domainType": 3, "connectionParams": [params]})
        return result

    yield do
    if made:
        client.call("StoragePool.disconnectStorageServer",
                    {"domainType": 3, "connectionParams": made})


@pytest.fixture(autouse=True)
def portals_back(storage_host: StorageHostVM) -> Iterator[None]:
    yield
    for index in range(len(PORTALS)):
        storage_host.set_portal(index, up=True)


def sh(vm: StorageHostVM, script: str, *, check: bool = True) -> str:
    return str(vm.exec(["sh", "-c", script], check=check, timeout=SLOW)["stdout"])


def poll(probe: Callable[[], Any], done: Callable[[Any], bool], what: str,
         timeout: float = SLOW) -> Any:
    deadline = time.monotonic() + timeout
    last = probe()
    while not done(last):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {last!r} after {timeout:.0f} s")
        time.sleep(1.0)
        last = probe()
    return last


def backing_sha(target: TargetInfo, lun: int, length: int) -> str:
    with target.lun(lun).backing.open("rb") as f:
        return hashlib.sha256(f.read(length)).hexdigest()


def write_random(vm: StorageHostVM, device: str, length: int = MiB) -> str:
    """Write ``length`` random bytes at the start of ``device`` in the guest (O_DIRECT);
    returns their sha256 as read back through the same device."""
    out = sh(vm, f"dd if=/dev/urandom of=/tmp/chunk bs={length} count=1 2>/dev/null && "
                 f"dd if=/tmp/chunk of={device} bs={length} count=1 oflag=direct conv=fsync "
                 "2>/dev/null && "
                 f"dd if={device} bs={length} count=1 iflag=direct 2>/dev/null | sha256sum && "
                 "sha256sum < /tmp/chunk")
    read_back, written = (line.split()[0] for line in out.splitlines())
    assert read_back == written
    return written


def kernel_state(vm: StorageHostVM) -> dict[str, list[str]]:
    """Sessions, multipath maps and SCSI disks the guest's kernel has now."""
    sessions = sh(vm, "ls /sys/class/iscsi_session 2>/dev/null", check=False).split()
    maps = [m for m in sh(vm, "dmsetup ls --target multipath 2>/dev/null",
                          check=False).split() if m.startswith("3")]
    disks = sh(vm, "ls /sys/class/scsi_disk 2>/dev/null", check=False).split()
    return {"sessions": sessions, "maps": maps, "disks": disks}


def paths_of(client: HostClient, guid: str) -> list[dict[str, Any]]:
    [device] = client.call("Host.getDeviceList", {"guids": [guid], "checkStatus": False})
    return list(device["pathstatus"])


# -- discovery and login ---------------------------------------------------------------------------

def test_sendtargets_discovery_through_a_guest_portal(lab: Lab, client: HostClient,
                                                      make_target: MakeTarget) -> None:
    target = make_target([16 * MiB])
    for portal in PORTALS:
        found = client.call("ISCSIConnection.discoverSendTargets",
                            {"host": portal, "port": PORTAL_PORT})
        # tgtd names the portal it was reached on: this machine's loopback (QEMU's NAT).
        assert f"127.0.0.1:{lab.storage.port},1 {target.iqn}" in found
    assert sh(lab.storage_host, "ls /etc/iscsi/send_targets").split() == []


def test_login_with_and_without_chap_wrong_password_refused(
        client: HostClient, storage_host: StorageHostVM, make_target: MakeTarget,
        connect: Callable[..., list[dict[str, Any]]]) -> None:
    secret = "chap-" + uuid.uuid4().hex
    user = "u" + uuid.uuid4().hex[:6]
    guarded = make_target([16 * MiB], chap=Chap(user, secret))
    plain = make_target([16 * MiB])
    assert connect(guarded, user=user, password="wrong-" + secret)[0]["status"] == 476
    assert kernel_state(storage_host)["sessions"] == []
    assert connect(guarded, user=user, password=secret)[0]["status"] == 0
    assert connect(plain)[0]["status"] == 0
    visible = client.call("Host.getDevicesVisibility",
                          {"guidList": [guarded.wwid(1), plain.wwid(1)]})
    assert visible == {guarded.wwid(1): True, plain.wwid(1): True}
    assert len(kernel_state(storage_host)["sessions"]) == 2
    assert secret not in storage_host.agent_log.read_text()


# -- multipath ---------------------------------------------------------------------------------

def test_two_portals_one_map_and_a_lost_path(client: HostClient, storage_host: StorageHostVM,
                                             make_target: MakeTarget,
                                             connect: Callable[..., list[dict[str, Any]]]
                                             ) -> None:
    target = make_target([32 * MiB])
    guid = target.wwid(1)
    assert connect(target, 0)[0]["status"] == 0
    assert connect(target, 1)[0]["status"] == 0

    [device] = client.call("Host.getDeviceList", {"guids": [guid], "checkStatus": True})
    assert device["status"] == "free"
    assert sorted(p["connection"] for p in device["pathlist"]) == sorted(PORTALS)
    assert [p["state"] for p in device["pathstatus"]] == ["active", "active"]
    assert {p["lun"] for p in device["pathstatus"]} == {1}
    assert len({p["physdev"] for p in device["pathstatus"]}) == 2
    state = kernel_state(storage_host)
    assert state["maps"] == [guid] and len(state["sessions"]) == 2
    assert len(state["disks"]) == 2  # LUN 1 on each session (LUN 0 is the controller)
    mapper = f"/dev/mapper/{guid}"
    assert write_random(storage_host, mapper) == backing_sha(target, 1, MiB)

    # Portal 2 goes away: its path fails, the map stays, I/O goes on through portal 1.
    storage_host.set_portal(1, up=False)
    failed = poll(lambda: paths_of(client, guid),
                  lambda paths: sorted(p["state"] for p in paths) == ["active", "failed"],
                  "path states after portal 2 went away")
    lost = next(p["physdev"] for p in failed if p["state"] == "failed")
    assert lost in {p["physdev"] for p in device["pathstatus"]}
    assert write_random(storage_host, mapper) == backing_sha(target, 1, MiB)
    assert kernel_state(storage_host)["maps"] == [guid]
    assert client.call("Host.getDevicesVisibility", {"guidList": [guid]}) == {guid: True}

    # It comes back: iscsid logs in again and multipathd reinstates the path.
    storage_host.set_portal(1, up=True)
    poll(lambda: paths_of(client, guid),
         lambda paths: [p["state"] for p in paths] == ["active", "active"],
         "path states after portal 2 came back")
    assert write_random(storage_host, mapper) == backing_sha(target, 1, MiB)


def test_disconnect_leaves_no_session_map_or_scsi_device(
        client: HostClient, storage_host: StorageHostVM, make_target: MakeTarget) -> None:
    target = make_target([16 * MiB, 16 * MiB])
    params = [{"id": str(uuid.uuid4()), "connection": portal, "port": PORTAL_PORT,
               "iqn": target.iqn} for portal in PORTALS]
    before = kernel_state(storage_host)
    result = client.call("StoragePool.connectStorageServer",
                         {"domainType": 3, "connectionParams": params})
    assert [r["status"] for r in result] == [0, 0]
    during = kernel_state(storage_host)
    assert sorted(during["maps"]) == sorted([*before["maps"], target.wwid(1), target.wwid(2)])
    guids = [target.wwid(1), target.wwid(2)]
    assert client.call("Host.getDevicesVisibility", {"guidList": guids}) == dict.fromkeys(
        guids, True)

    result = client.call("StoragePool.disconnectStorageServer",
                         {"domainType": 3, "connectionParams": params})
    assert [r["status"] for r in result] == [0, 0]
    assert kernel_state(storage_host) == before
    assert client.call("Host.getDevicesVisibility", {"guidList": guids}) == dict.fromkeys(
        guids, False)
    # udev drops the /dev/mapper links of removed maps a moment later.
    poll(lambda: sh(storage_host, "ls /dev/mapper").split(), lambda names: names == ["control"],
         "/dev/mapper after the disconnect", timeout=60)
    assert "No active sessions" in str(storage_host.exec(["iscsiadm", "-m", "session"],
                                                         check=False)["stderr"])
    # No node record left behind either (the next login starts clean).
    assert sh(storage_host, "ls /etc/iscsi/nodes").split() == []


# -- LVM activation ---------------------------------------------------------------------------

def make_iso(folder: Path) -> bytes:
    content = folder / "iso"
    content.mkdir()
    (content / "hello.txt").write_text("an ISO on a block storage domain, kernel path\n")
    (content / "filler.bin").write_bytes(os.urandom(600 * 1024))
    out = folder / "test.iso"
    subprocess.run(["genisoimage", "-quiet", "-r", "-J", "-o", str(out), str(content)],
                   check=True)
    return out.read_bytes()


def active_lvs(vm: StorageHostVM) -> list[str]:
    out = sh(vm, "lvs --noheadings -o vg_name,lv_name,lv_active 2>/dev/null", check=False)
    return sorted(" ".join(line.split()[:2]) for line in out.splitlines()
                  if line.split()[2:] == ["active"])


def test_block_domain_iso_volume_lvchange_ay_and_an(
        client: HostClient, storage_host: StorageHostVM, make_target: MakeTarget,
        connect: Callable[..., list[dict[str, Any]]], tmp_path: Path) -> None:
    iso = make_iso(tmp_path)
    target = make_target([64 * MiB])
    guid = target.wwid(1)
    assert connect(target, 0)[0]["status"] == 0
    domain_id = str(uuid.uuid4())
    domain = client.call("StorageDomain.create",
                         {"domainID": domain_id, "guid": guid, "name": "isos"})
    try:
        assert domain["luns"] == [guid]
        [device] = client.call("Host.getDeviceList", {"guids": [guid]})
        assert (device["status"], device["storageDomainID"]) == ("used", domain_id)
        pdiv = {"poolID": str(uuid.uuid4()), "domainID": domain_id,
                "imageID": str(uuid.uuid4()), "volumeID": str(uuid.uuid4())}
        client.call("Volume.create", {**pdiv, "size": len(iso), "type": "ISO"})
        client.call("Volume.write", {**pdiv, "offset": 0,
                                     "data": base64.b64encode(iso).decode()})
        verified = client.call("Volume.verify", {**pdiv, "size": len(iso),
                                                 "sha256": hashlib.sha256(iso).hexdigest()})
        assert verified["state"] == "READY"
        # What went over the wire: the ISO's bytes in the target's backing file.
        with target.lun(1).backing.open("rb") as f:
            f.seek(verified["offset"])
            assert f.read(len(iso)) == iso

        before = active_lvs(storage_host)
        lv = f"{domain_id} {pdiv['volumeID']}"
        assert lv not in before
        prepared = client.call("Image.prepare", {**pdiv, "user": "vm-a:hdc", "iso": True})
        assert (prepared["method"], prepared["diskType"]) == ("lvm-activation", "block")
        path = prepared["path"]
        assert path == f"/dev/{domain_id}/{pdiv['volumeID']}"
        assert active_lvs(storage_host) == sorted([*before, lv])
        read = sh(storage_host, f"dd if={path} bs={len(iso)} count=1 iflag=direct "
                                "2>/dev/null | sha256sum").split()[0]
        assert read == hashlib.sha256(iso).hexdigest()
        # A second user shares the activation; only the last teardown deactivates.
        client.call("Image.prepare", {**pdiv, "user": "vm-b:hdc", "iso": True})
        client.call("Image.teardown", {**pdiv, "user": "vm-a:hdc"})
        assert lv in active_lvs(storage_host)
        released = client.call("Image.teardown", {**pdiv, "user": "vm-b:hdc"})
        assert released == {"prepared": False, "users": []}
        assert active_lvs(storage_host) == before
        assert sh(storage_host, f"ls /dev/{domain_id} 2>/dev/null; true").split() == []
    finally:
        client.call("StorageDomain.remove", {"domainID": domain_id, "force": True})
    assert active_lvs(storage_host) == []
