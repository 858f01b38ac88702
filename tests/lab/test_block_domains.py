"""Block storage domains on the real lab: domains on tgtd LUNs, volumes, a real ISO uploaded and
verified, prepare/teardown per user, agent restarts, every bad input — all through the agent's
mutual-TLS JSON-RPC endpoint, and checked independently: the real LVM tools over a read-only loop
device on the LUN's backing file, the ISO's bytes read from that file, and QEMU reading the
prepared slice over iSCSI. After every test no qemu-storage-daemon, FUSE mount or loop device
over lab files remains."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from virtyard.host.client import ClientTls, HostCallError, HostClient
from virtyard.host.storage.domain_tags import DOMAIN_TAG
from virtyard.lab.iscsi_target import Chap, TargetInfo
from virtyard.lab.lab import Lab, loop_devices_under
from virtyard.lab.process import pid_alive, run

pytestmark = pytest.mark.lab

MiB = 1 << 20
LVM_CONFIG = ("devices { use_devicesfile=0 obtain_device_list_from_udev=0 hints=\"none\" } "
              "activation { udev_sync=0 udev_rules=0 } backup { backup=0 archive=0 }")
ISO_TEXT = "Hello from an ISO on a block storage domain.\n"

Connect = Callable[..., list[dict[str, Any]]]
MakeTarget = Callable[..., TargetInfo]


def new_client(lab: Lab) -> HostClient:
    tls = ClientTls(lab.pki.client.cert, lab.pki.client.key, lab.pki.ca.cert)
    return HostClient(lab.agents[0].address, tls)


def new_pdiv(domain_id: str) -> dict[str, str]:
    return {"poolID": str(uuid.uuid4()), "domainID": domain_id, "imageID": str(uuid.uuid4()),
            "volumeID": str(uuid.uuid4())}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_at(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def make_iso(folder: Path, approx: int = 1 * MiB) -> bytes:
    """A real ISO 9660 image (genisoimage) of about ``approx`` bytes with a text file inside."""
    content = folder / "iso-content"
    content.mkdir()
    (content / "hello.txt").write_text(ISO_TEXT)
    (content / "filler.bin").write_bytes(os.urandom(approx - 400 * 1024))
    out = folder / "test.iso"
    run(["genisoimage", "-quiet", "-V", "VYTEST", "-r", "-J", "-o", str(out), str(content)])
    data = out.read_bytes()
    assert data[32769:32774] == b"CD001"
    return data


def upload(client: HostClient, pdiv: dict[str, str], data: bytes, chunk: int = 256 * 1024,
           times: dict[str, float] | None = None) -> dict[str, Any]:
    """Volume.write in chunks (last one first: order does not matter), then Volume.verify."""
    start = time.monotonic()
    offsets = list(range(0, len(data), chunk))
    for offset in reversed(offsets):
        piece = data[offset:offset + chunk]
        written = client.call("Volume.write", {**pdiv, "offset": offset,
                                               "data": base64.b64encode(piece).decode()})
        assert written == {"offset": offset, "written": len(piece)}
    middle = time.monotonic()
    result: dict[str, Any] = client.call("Volume.verify", {**pdiv, "size": len(data),
                                                           "sha256": sha256(data)})
    if times is not None:
        times[f"write {len(data) / MiB:.2f} MiB in {len(offsets)} chunks"] = middle - start
        times["verify"] = time.monotonic() - middle
    return result


def lvm_report(device: str, command: str, kind: str, fields: str, *args: str
               ) -> list[dict[str, str]]:
    out = run(["lvm", command, "--config", LVM_CONFIG, "--devices", device, "--driverloaded",
               "n", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields,
               *args], timeout=60).stdout
    return [row for report in json.loads(out)["report"] for row in report.get(kind, [])]


def lab_leftovers(lab: Lab) -> list[str]:
    """qemu-storage-daemons, FUSE mounts and loop devices over anything in the lab."""
    root = str(lab.state_dir)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "qemu-storage-daemon" in cmd and root in cmd:
                found.append(f"process {proc.name}: {cmd[:160]}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype.startswith("fuse") and fields[4].startswith(root):
            found.append(f"FUSE mount {fields[4]}")
    found += [f"loop device {d}" for d in loop_devices_under(lab.state_dir)]
    return found


@pytest.fixture(autouse=True)
def no_leftovers(lab: Lab) -> Iterator[None]:
    """Every test must leave no LUN device behind, as the OS and the agent both see it."""
    yield
    assert lab_leftovers(lab) == []
    with new_client(lab) as client:
        assert client.call("Image.leftovers") == []


@pytest.fixture
def ro_loop() -> Iterator[Callable[[Path], str]]:
    """Factory: a read-only loop device over a LUN's backing file (for the real LVM tools)."""
    made: list[str] = []

    def attach(path: Path) -> str:
        device = run(["losetup", "-r", "-f", "--show", str(path)]).stdout.strip()
        made.append(device)
        return device

    yield attach
    for device in made:
        run(["losetup", "-d", device], check=False)


@pytest.fixture
def make_domain(lab: Lab, host_client: HostClient) -> Iterator[Callable[..., dict[str, Any]]]:
    """Factory: StorageDomain.create on a LUN; afterwards every volume of it is torn down and
    the domain removed (with a fresh client: a test may have restarted the agent)."""
    made: list[str] = []

    def make(guid: str, name: str = "") -> dict[str, Any]:
        domain_id = str(uuid.uuid4())
        result: dict[str, Any] = host_client.call(
            "StorageDomain.create", {"domainID": domain_id, "guid": guid, "name": name})
        made.append(domain_id)
        return result

    yield make
    with new_client(lab) as client:
        for domain_id in made:
            for prepared in client.call("Image.listPrepared", {"domainID": domain_id}):
                pdiv = {k: prepared[k] for k in ("poolID", "domainID", "imageID", "volumeID")}
                for user in prepared["users"]:
                    client.call("Image.teardown", {**pdiv, "user": user})
            with contextlib.suppress(HostCallError):
                client.call("StorageDomain.remove", {"domainID": domain_id, "force": True})


@pytest.fixture
def iso(tmp_path: Path) -> bytes:
    return make_iso(tmp_path)


@dataclass
class Env:
    """What every test here uses: the lab, a client of host 1's agent, fresh targets,
    connections and domains (all cleaned up after the test)."""

    lab: Lab
    client: HostClient
    make_target: MakeTarget
    connect: Connect
    make_domain: Callable[..., dict[str, Any]]


@pytest.fixture
def env(lab: Lab, host_client: HostClient, make_target: MakeTarget, connect_target: Connect,
        make_domain: Callable[..., dict[str, Any]]) -> Env:
    return Env(lab, host_client, make_target, connect_target, make_domain)


def error_of(client: HostClient, method: str, params: dict[str, Any]) -> HostCallError:
    with pytest.raises(HostCallError) as info:
        client.call(method, params)
    return info.value


# -- the whole flow -----------------------------------------------------------------------------

def test_domain_volume_upload_prepare_teardown(env: Env, ro_loop: Callable[[Path], str],
                                               iso: bytes, tmp_path: Path) -> None:
    host_client, make_target, connect_target, make_domain = (
        env.client, env.make_target, env.connect, env.make_domain)
    target = make_target([64 * MiB])
    connect_target(target)
    guid = target.wwid(1)
    backing = target.lun(1).backing
    times: dict[str, float] = {}

    start = time.monotonic()
    domain = make_domain(guid, "isos")
    times["create domain"] = time.monotonic() - start
    domain_id = domain["domainID"]
    assert (domain["name"], domain["luns"], domain["volumes"]) == ("isos", [guid], [])
    assert domain["extentSize"] == 4 * MiB

    # The LUN now shows as used by that domain, and the domain is listed.
    [device] = host_client.call("Host.getDeviceList", {"guids": [guid]})
    assert (device["status"], device["usedReason"], device["storageDomainID"]) == (
        "used", "storage-domain", domain_id)
    [cached] = host_client.call("Host.getDeviceList", {"guids": [guid], "refresh": False})
    assert cached["storageDomainID"] == domain_id
    assert domain_id in [d["domainID"] for d in host_client.call("StorageDomain.list")]

    pdiv = new_pdiv(domain_id)
    start = time.monotonic()
    volume = host_client.call("Volume.create", {**pdiv, "size": len(iso), "type": "ISO"})
    times["create volume"] = time.monotonic() - start
    assert (volume["state"], volume["type"], volume["size"]) == ("EMPTY", "ISO", 4 * MiB)
    assert (volume["guid"], volume["users"]) == (guid, [])

    verified = upload(host_client, pdiv, iso, chunk=MiB, times=times)
    assert (verified["state"], verified["contentSize"], verified["sha256"]) == (
        "READY", len(iso), sha256(iso))

    # The real LVM tools, over the target's own backing file, agree on everything.
    loop = ro_loop(backing)
    [vg] = lvm_report(loop, "vgs", "vg", "vg_name,vg_tags,vg_extent_size")
    assert vg["vg_name"] == domain_id and DOMAIN_TAG in vg["vg_tags"].split(",")
    assert "VY_MD_NAME=isos" in vg["vg_tags"].split(",") and int(vg["vg_extent_size"]) == 4 * MiB
    [pv] = lvm_report(loop, "pvs", "pv", "pe_start,vg_name")
    [lv] = lvm_report(loop, "lvs", "seg", "lv_name,lv_tags,lv_size,seg_start_pe,seg_size_pe",
                      "--segments", domain_id)
    assert lv["lv_name"] == pdiv["volumeID"]
    assert set(lv["lv_tags"].split(",")) == {
        f"VY_POOL={pdiv['poolID']}", f"VY_IMAGE={pdiv['imageID']}", "VY_TYPE=ISO",
        "VY_STATE=READY", f"VY_SIZE={len(iso)}", f"VY_SHA256={sha256(iso)}"}
    offset = int(pv["pe_start"]) + int(lv["seg_start_pe"]) * int(vg["vg_extent_size"])
    assert verified["offset"] == offset
    assert sha256(read_at(backing, offset, len(iso))) == sha256(iso)

    start = time.monotonic()
    prepared = host_client.call("Image.prepare", {**pdiv, "user": "vm-a:sdc", "iso": True})
    times["prepare"] = time.monotonic() - start
    assert (prepared["method"], prepared["diskType"], prepared["iso"]) == (
        "iscsi-slice", "network", True)
    assert (prepared["host"], prepared["port"], prepared["iqn"], prepared["lun"]) == (
        target.address, target.port, target.iqn, 1)
    assert (prepared["offset"], prepared["size"]) == (offset, len(iso))
    assert (prepared["chapUser"], prepared["chapSecretUsage"], prepared["users"]) == (
        "", "", ["vm-a:sdc"])
    assert sha256(read_at(backing, prepared["offset"], prepared["size"])) == sha256(iso)

    # QEMU itself, reading what libvirt's <slice> becomes (raw offset/size over iSCSI).
    source = {"driver": "raw", "offset": prepared["offset"], "size": prepared["size"],
              "file": {"driver": "iscsi", "transport": "tcp",
                       "portal": f"{prepared['host']}:{prepared['port']}",
                       "target": prepared["iqn"], "lun": prepared["lun"]}}
    copy = tmp_path / "read-back.iso"
    run(["qemu-img", "convert", "-U", "-O", "raw", "json:" + json.dumps(source), str(copy)])
    assert sha256(copy.read_bytes()) == sha256(iso)

    start = time.monotonic()
    released = host_client.call("Image.teardown", {**pdiv, "user": "vm-a:sdc"})
    times["teardown"] = time.monotonic() - start
    assert released == {"prepared": False, "users": []}
    print("\nblock domain timings: " + ", ".join(f"{k} {v * 1000:.0f} ms"
                                                 for k, v in times.items()))

    # Removing the domain frees the LUN again.
    host_client.call("StorageDomain.remove", {"domainID": domain_id, "force": True})
    [after] = host_client.call("Host.getDeviceList", {"guids": [guid]})
    assert after["status"] == "free" and after["storageDomainID"] == ""
    assert domain_id not in [d["domainID"] for d in host_client.call("StorageDomain.list")]
    assert error_of(host_client, "Volume.list", {"domainID": domain_id}).code == 358


def test_shared_iso_stays_prepared_until_its_last_user_and_orphans_go_at_restart(
        env: Env, iso: bytes) -> None:
    lab, host_client, make_target, connect_target, make_domain = (
        env.lab, env.client, env.make_target, env.connect, env.make_domain)
    target = make_target([64 * MiB])
    connect_target(target)
    domain_id = make_domain(target.wwid(1))["domainID"]
    pdiv = new_pdiv(domain_id)
    host_client.call("Volume.create", {**pdiv, "size": len(iso)})
    upload(host_client, pdiv, iso)

    first = host_client.call("Image.prepare", {**pdiv, "user": "vm-a:sdc", "iso": True})
    second = host_client.call("Image.prepare", {**pdiv, "user": "vm-b:hdc", "iso": True})
    again = host_client.call("Image.prepare", {**pdiv, "user": "vm-b:hdc", "iso": True})
    assert second["users"] == again["users"] == ["vm-a:sdc", "vm-b:hdc"]
    assert {k: v for k, v in first.items() if k != "users"} == \
        {k: v for k, v in second.items() if k != "users"}
    left = host_client.call("Image.teardown", {**pdiv, "user": "vm-a:sdc"})
    assert left == {"prepared": True, "users": ["vm-b:hdc"]}
    # Removal is refused while anyone holds the volume.
    assert error_of(host_client, "Volume.remove", pdiv).code == 203
    busy = error_of(host_client, "StorageDomain.remove", {"domainID": domain_id, "force": True})
    assert busy.code == 203 and "vm-b:hdc" in busy.message
    assert error_of(host_client, "Volume.write", {**pdiv, "offset": 0, "data": ""}).code == 203
    before = host_client.call("Image.listPrepared", {"domainID": domain_id})
    assert [p["users"] for p in before] == [["vm-b:hdc"]]

    # Kill the agent (no chance to save anything) and start it again.
    agent = lab.agents[0]
    pid = agent.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    agent.stop()
    agent.start()
    with new_client(lab) as client:
        # On start the agent makes holds and drives agree: "vm-b" runs nowhere on this host,
        # so its hold is released — no volume stays prepared that no drive uses.
        assert client.call("Image.listPrepared", {"domainID": domain_id}) == []
        assert client.call("Image.leftovers") == []
        [listed] = client.call("Volume.list", {"domainID": domain_id})
        assert listed["users"] == []
        # Releasing what is not held is fine (idempotent).
        assert client.call("Image.teardown", {**pdiv, "user": "vm-b:hdc"}) == {
            "prepared": False, "users": []}
        client.call("Volume.remove", pdiv)
        assert client.call("Volume.list", {"domainID": domain_id}) == []


def test_chap_protected_lun(env: Env, iso: bytes) -> None:
    """LVM changes and the upload go through qemu-storage-daemon with CHAP; the prepared
    volume names the libvirt secret, and the password is in no state file but the connection
    registry's."""
    lab, host_client, make_target, connect_target, make_domain = (
        env.lab, env.client, env.make_target, env.connect, env.make_domain)
    secret = "chap-" + uuid.uuid4().hex
    user = "u" + uuid.uuid4().hex[:6]
    target = make_target([64 * MiB], chap=Chap(user, secret))
    conn_id = str(uuid.uuid4())
    connect_target(target, user=user, password=secret, conn_id=conn_id)
    domain_id = make_domain(target.wwid(1))["domainID"]
    pdiv = new_pdiv(domain_id)
    host_client.call("Volume.create", {**pdiv, "size": len(iso)})
    assert upload(host_client, pdiv, iso)["state"] == "READY"
    prepared = host_client.call("Image.prepare", {**pdiv, "user": "vm-c:sdc", "iso": True})
    assert (prepared["chapUser"], prepared["chapSecretUsage"], prepared["connectionID"]) == (
        user, f"virtyard-chap-{conn_id}", conn_id)
    assert sha256(read_at(target.lun(1).backing, prepared["offset"], prepared["size"])) == \
        sha256(iso)
    storage = lab.agents[0].root / "state" / "storage"
    for name in ("prepared.json", "lun-devices.json"):
        assert secret not in (storage / name).read_text()
    assert secret not in lab.agents[0].log_path.read_text()


# -- bad input ----------------------------------------------------------------------------------

def test_every_bad_input_is_refused_clearly_and_changes_nothing(env: Env, iso: bytes) -> None:
    host_client, make_target, connect_target, make_domain = (
        env.client, env.make_target, env.connect, env.make_domain)
    target = make_target([64 * MiB, 64 * MiB, 64 * MiB])
    run(["mkfs.ext4", "-q", "-F", str(target.lun(3).backing)])
    connect_target(target)
    first, second, ext4 = (target.wwid(n) for n in (1, 2, 3))
    domain_a = make_domain(first)["domainID"]
    domain_b = make_domain(second)["domainID"]
    iso_pdiv = new_pdiv(domain_a)
    host_client.call("Volume.create", {**iso_pdiv, "size": len(iso)})

    def code(method: str, params: dict[str, Any], fragment: str = "") -> int:
        error = error_of(host_client, method, params)
        assert fragment in error.message, error.message
        return error.code

    # Domains: LUN used (by a domain, by a filesystem), invisible, domain UUID taken.
    assert code("StorageDomain.create", {"domainID": str(uuid.uuid4()), "guid": first},
                domain_a) == 515
    assert code("StorageDomain.create", {"domainID": str(uuid.uuid4()), "guid": ext4},
                "ext4") == 601
    assert code("StorageDomain.create", {"domainID": str(uuid.uuid4()),
                                         "guid": "36000000000000000000000000000dead"}) == 606
    assert code("StorageDomain.create", {"domainID": domain_a, "guid": ext4}) == 365
    assert code("StorageDomain.remove", {"domainID": str(uuid.uuid4())}) == 358
    assert code("StorageDomain.remove", {"domainID": domain_a}, "still has 1 volume") == 361

    # Volumes: unknown domain, unknown volume, a PDIV naming another domain, image or pool.
    assert code("Image.prepare", {**new_pdiv(str(uuid.uuid4())), "user": "vm"}) == 358
    assert code("Image.prepare", {**new_pdiv(domain_a), "user": "vm"}) == 201
    elsewhere = {**iso_pdiv, "domainID": domain_b}
    assert code("Image.prepare", {**elsewhere, "user": "vm"},
                f"it is in storage domain {domain_a}") == 201
    assert code("Image.prepare", {**iso_pdiv, "imageID": str(uuid.uuid4()), "user": "vm"},
                f"belongs to image {iso_pdiv['imageID']}") == 201
    assert code("Image.prepare", {**iso_pdiv, "poolID": str(uuid.uuid4()), "user": "vm"},
                "belongs to pool") == 201
    assert code("Volume.create", {**iso_pdiv, "size": 1}) == 212
    assert code("Volume.create", {**new_pdiv(domain_a), "size": 1 << 30}) == 397

    # Not an ISO: before the upload, a DATA volume, a volume of other bytes.
    assert code("Image.prepare", {**iso_pdiv, "user": "vm", "iso": True}, "EMPTY") == 202
    data_pdiv = new_pdiv(domain_a)
    host_client.call("Volume.create", {**data_pdiv, "size": MiB, "type": "DATA"})
    assert code("Image.prepare", {**data_pdiv, "user": "vm", "iso": True},
                "type DATA, not ISO") == 202
    not_iso = os.urandom(64 * 1024)
    host_client.call("Volume.write", {**iso_pdiv, "offset": 0,
                                      "data": base64.b64encode(not_iso).decode()})
    assert code("Volume.verify", {**iso_pdiv, "size": len(not_iso),
                                  "sha256": sha256(not_iso)}, "ISO 9660") == 202
    assert code("Volume.verify", {**iso_pdiv, "size": len(not_iso), "sha256": sha256(b"x")},
                "sha256") == 484
    assert code("Volume.verify", {**iso_pdiv, "size": 5 * MiB, "sha256": sha256(b"")}) == 1000
    assert code("Volume.write", {**iso_pdiv, "offset": 4 * MiB - 1,
                                 "data": base64.b64encode(b"ab").decode()}, "past the end") == 1000
    assert host_client.call("Image.listPrepared", {"domainID": domain_a}) == []

    # A READY volume cannot be written any more.
    upload(host_client, iso_pdiv, iso)
    assert code("Volume.write", {**iso_pdiv, "offset": 0, "data": ""}) == 213

    # Malformed parameters never reach the storage.
    malformed: list[tuple[str, dict[str, Any], str]] = [
        ("Image.prepare", {**iso_pdiv, "domainID": "nope", "user": "vm"}, "domainID"),
        ("Image.prepare", {**iso_pdiv, "user": "a b"}, "user"),
        ("Image.teardown", {**iso_pdiv, "user": ""}, "user"),
        ("Volume.write", {**iso_pdiv, "offset": 0, "data": "%%%"}, "data"),
        ("Volume.verify", {**iso_pdiv, "size": 1, "sha256": "12"}, "sha256"),
        ("Volume.create", {**new_pdiv(domain_a), "size": 1, "type": "RAW"}, "type"),
        ("StorageDomain.create", {"domainID": str(uuid.uuid4()), "guid": ext4,
                                  "name": "no spaces"}, "name"),
    ]
    for method, params, name in malformed:
        error = error_of(host_client, method, params)
        assert error.code == -32602 and f"'{name}'" in error.message, error.message

    # Nothing of that changed the domains: one ISO (READY) and one DATA volume in A, B empty.
    volumes = {v["volumeID"]: v for v in host_client.call("Volume.list", {"domainID": domain_a})}
    assert volumes[iso_pdiv["volumeID"]]["state"] == "READY" and len(volumes) == 2
    assert host_client.call("Volume.list", {"domainID": domain_b}) == []
    [ext4_device] = host_client.call("Host.getDeviceList", {"guids": [ext4]})
    assert ext4_device["usedReason"] == "filesystem"


# -- crash safety of the local LUN devices ------------------------------------------------------

CRASHING_ATTACH = """
import os, sys
from pathlib import Path
from virtyard.host.storage.initiator import Connection, Device, PathInfo, Portal
from virtyard.host.storage.lun_device import LunDevices
from virtyard.host.storage.userspace_initiator import UserspaceInitiator

root, portal, port, iqn = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
initiator = UserspaceInitiator("iqn.2026-11.org.virtyard.lab:crash")
device = Device("crash-lun", "", "", "", "", 0, 512, 512, 0,
                [PathInfo(Connection("c", Portal(portal, port), iqn), 1)])
devices = LunDevices(Path(root), initiator, initiator_name="iqn.2026-11.org.virtyard.lab:crash")
with devices.attached(device) as local:
    print(local.block_device, flush=True)
    os._exit(9)  # the agent dies in the middle of a verb
"""


def test_lun_device_left_by_a_crash_is_removed_by_the_next_agent(
        lab: Lab, make_target: MakeTarget) -> None:
    from virtyard.host.storage.lun_device import LunDevices  # noqa: PLC0415
    from virtyard.host.storage.userspace_initiator import UserspaceInitiator  # noqa: PLC0415

    target = make_target([16 * MiB])
    root = lab.state_dir / "crash-test-state"
    try:
        proc = subprocess.run([sys.executable, "-c", CRASHING_ATTACH, str(root), target.address,
                               str(target.port), target.iqn],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 9, proc.stderr
        loop = proc.stdout.strip()
        assert loop.startswith("/dev/loop")
        assert lab_leftovers(lab), "the crash should have left the daemon and loop device"
        recorded = json.loads((root / "lun-devices.json").read_text())
        assert [r["loop"] for r in recorded] == [loop]

        initiator = UserspaceInitiator("iqn.2026-11.org.virtyard.lab:crash")
        devices = LunDevices(root, initiator, initiator_name=initiator.initiator_name)
        assert devices.attachments() == [] and devices.leftovers() == []
        assert json.loads((root / "lun-devices.json").read_text()) == []
        assert lab_leftovers(lab) == []
        assert not any((root / "lun-devices").iterdir())
    finally:
        with contextlib.suppress(Exception):
            LunDevices(root, UserspaceInitiator("iqn.2026-11.x:y"), initiator_name="x")
        subprocess.run(["rm", "-rf", str(root)], check=False)
