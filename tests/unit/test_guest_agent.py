"""Our guest agent against sysfs trees captured from the lab's tiny guest, and its main loop.

``tests/data/guest/all-buses`` is a real guest's ``/sys/block/*`` files (only those the agent
reads) and ``/dev/disk/by-id`` links, with what qemu-guest-agent and libvirt reported in the same
guest at the same moment (see ``tests/data/guest/README.md``). The loop is driven over a
socketpair standing in for the virtio-serial port.
"""

from __future__ import annotations

import _imp
import ast
import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from virtyard.guest import agent
from virtyard.host.storage import scsi
from virtyard.lab import guest_image

DATA = Path(__file__).resolve().parent.parent / "data" / "guest"
ALL_BUSES = DATA / "all-buses"
AGENT_FILE = Path(agent.__file__)


def _qga_serials(root: Path) -> dict[str, str]:
    """``{serial: name}`` from the captured guest-get-disks answer."""
    disks = json.loads((root / "qga-guest-get-disks.json").read_text())
    return {d["address"]["serial"]: d["name"] for d in disks if d["address"].get("serial")}


def _mapping(root: Path) -> dict[str, str]:
    disks = agent.scan_disks(str(root))
    return {serial: v["name"] for serial, v in agent.disk_mapping(disks).items()}


# -- the captured guest -------------------------------------------------------------------------


def test_mapping_names_every_disk_as_qemu_guest_agent_does() -> None:
    qga = _qga_serials(ALL_BUSES)
    ours = _mapping(ALL_BUSES)
    assert len(qga) == 8
    assert {k: ours.get(k) for k in qga} == qga
    qga_names = {d["name"] for d in json.loads((ALL_BUSES / "qga-guest-get-disks.json")
                                                 .read_text())}
    assert set(ours.values()) <= qga_names


def test_each_bus_is_reported_in_its_guest_forms() -> None:
    ours = _mapping(ALL_BUSES)
    # virtio: the guest sees only the first 20 bytes of <serial>.
    assert ours["vyvirtio-0123456789a"] == "/dev/vda"
    # SCSI disk: udev's name from VPD 0x83, and the bare VPD 0x80 serial (QEMU cuts it at 36).
    assert ours["0QEMU_QEMU_HARDDISK_vyscsi-0123456789abcdefghijklmnopqrstuvwxyz"] == "/dev/sda"
    assert ours["vyscsi-0123456789abcdefghijklmnopqrs"] == "/dev/sda"
    assert ours["VYSCSI2"] == ours["0QEMU_QEMU_HARDDISK_VYSCSI2"] == "/dev/sdc"
    # Passthrough LUN: the NAA WWID (our GUID), and tgt's own unit serial.
    assert ours["360000000000000000e00000000010004"] == "/dev/sdb"
    assert ours["beaf14"] == "/dev/sdb"
    # No serial: QEMU's SCSI device id is the drive name; a virtio disk has nothing.
    assert ours["0QEMU_QEMU_HARDDISK_drive-scsi0-0-0-4"] == "/dev/sdd"
    assert "/dev/vdb" not in ours.values()
    # libvirt sends a space in <serial> as "\ "; udev makes "\" "_" ($attr) or squeezes (scsi_id).
    assert ours["vy_ virtio_ 4"] == "/dev/vdc"
    assert ours["0QEMU_QEMU_HARDDISK_VY_SCSI_3"] == "/dev/sde"
    assert ours["VY\\ SCSI\\ 3"] == "/dev/sde"
    # An empty CD-ROM tray has no VPD pages in sysfs: its name comes from the udev link.
    assert ours["0QEMU_QEMU_CD-ROM_drive-scsi0-0-0-0"] == "/dev/sr0"


def test_without_udev_sysfs_alone_gives_udevs_names(tmp_path: Path) -> None:
    shutil.copytree(ALL_BUSES / "sys", tmp_path / "sys", symlinks=True)
    ours = _mapping(tmp_path)
    expected = {k: v for k, v in _qga_serials(ALL_BUSES).items() if v != "/dev/sr0"}
    assert {k: ours.get(k) for k in expected} == expected
    assert "/dev/sr0" not in ours.values()


def test_kernel_wwid_is_the_fallback_for_a_lun_without_page_83(tmp_path: Path) -> None:
    shutil.copytree(ALL_BUSES / "sys", tmp_path / "sys", symlinks=True)
    (tmp_path / "sys/block/sdb/device/vpd_pg83").unlink()
    assert _mapping(tmp_path)["360000000000000000e00000000010004"] == "/dev/sdb"
    assert agent.kernel_wwid_serial("naa.60000000000000000E00000000010004\n") == \
        "360000000000000000e00000000010004"
    assert agent.kernel_wwid_serial("t10.ATA     QEMU HARDDISK   QM00001") == \
        "1ATA_QEMU_HARDDISK_QM00001"
    assert agent.kernel_wwid_serial("eui.0011223344556677") == "20011223344556677"
    assert agent.kernel_wwid_serial("nonsense") == ""


def _sata_disk(root: Path, kname: str, serial: bytes, *, link: bool) -> None:
    """A disk as libata shows it (QEMU's SATA disk on q35): SCSI sysfs, vendor "ATA"."""
    device = root / "sys/block" / kname / "device"
    device.mkdir(parents=True)
    (device / "modalias").write_text("scsi:t-0x00\n")
    (device / "vendor").write_bytes(b"ATA     \n")
    (device / "model").write_bytes(b"QEMU HARDDISK   \n")
    (device / "vpd_pg80").write_bytes(bytes([0, 0x80, 0, len(serial)]) + serial)
    t10 = b"ATA     QEMU HARDDISK" + b" " * 27 + serial
    (device / "vpd_pg83").write_bytes(_page83(_designator(1, t10, code=2)))
    if link:
        by_id = root / "dev/disk/by-id"
        by_id.mkdir(parents=True, exist_ok=True)
        (by_id / f"ata-QEMU_HARDDISK_{serial.decode().strip()}").symlink_to(f"../../{kname}")


def test_sata_disks_are_named_as_udevs_ata_id_names_them(tmp_path: Path) -> None:
    _sata_disk(tmp_path, "sda", b"VYSATA1", link=True)
    _sata_disk(tmp_path, "sdb", b"VYSATA2", link=False)  # no udev: made from sysfs
    ours = _mapping(tmp_path)
    assert ours["QEMU_HARDDISK_VYSATA1"] == ours["VYSATA1"] == "/dev/sda"
    assert ours["QEMU_HARDDISK_VYSATA2"] == ours["VYSATA2"] == "/dev/sdb"
    assert ours["1ATA_QEMU_HARDDISK_VYSATA1"] == "/dev/sda"  # scsi_id's view, kept as an alias


def test_a_serial_two_disks_would_share_is_left_out() -> None:
    disks = [agent.GuestDisk("sda", "scsi", "0QEMU_QEMU_HARDDISK_A", ["SAME"]),
             agent.GuestDisk("sdb", "scsi", "0QEMU_QEMU_HARDDISK_B", ["SAME"]),
             agent.GuestDisk("vda", "virtio", "X", []), agent.GuestDisk("vdb", "virtio", "X", []),
             agent.GuestDisk("sdc", "scsi", "Y", ["0QEMU_QEMU_HARDDISK_A"])]
    mapping = agent.disk_mapping(disks)
    assert "SAME" not in mapping and "X" not in mapping
    assert mapping["0QEMU_QEMU_HARDDISK_A"] == {"name": "/dev/sda"}  # an alias never wins
    assert mapping["Y"] == {"name": "/dev/sdc"}


def test_by_id_links_skip_partitions_and_unknown_buses(tmp_path: Path) -> None:
    by_id = tmp_path / "dev/disk/by-id"
    by_id.mkdir(parents=True)
    links = {"ata-QEMU_HARDDISK_QM1": "../../sda", "ata-QEMU_HARDDISK_QM1-part1": "../../sda1",
             "dm-name-x": "../../dm-0", "nvme-M_S1": "../../nvme0n1"}
    for name, target in links.items():
        (by_id / name).symlink_to(target)
    for kname in ("sda", "dm-0", "nvme0n1", "loop0"):
        (tmp_path / "sys/block" / kname).mkdir(parents=True)
    assert _mapping(tmp_path) == {"QEMU_HARDDISK_QM1": "/dev/sda", "M_S1": "/dev/nvme0n1"}


# -- udev's rules, as the agent reimplements them ------------------------------------------------


def test_udev_character_rules() -> None:
    assert agent.virtio_id_serial(b"vy\\ virtio\\ 4\n") == "vy_ virtio_ 4"
    assert agent.virtio_id_serial(b"a/b$c%d?e,f  \x00junk") == "a/b$c%d?e,f"
    assert agent.virtio_id_serial(b"tab\there") == "tab here"
    assert agent.udev_clean_serial(b"  QEMU    QEMU HARDDISK   S 1 ") == "QEMU_QEMU_HARDDISK_S_1"
    assert agent.udev_clean_serial(b"a\\x41\xc3\xa9\xff*") == "a\\x41\u00e9__"
    assert agent.unit_serial(b"\x00\x80\x00\x0a     beaf1") == "beaf1"
    assert agent.unit_serial(b"\x00\x80\x00\x03a\x01b") == ""  # control characters: not a name
    assert agent.unit_serial(b"\x00\x83\x00\x01x") == ""


def _designator(dtype: int, value: bytes, *, code: int = 1, assoc: int = 0) -> bytes:
    return bytes([code, (assoc << 4) | dtype, 0, len(value)]) + value


def _page83(*designators: bytes) -> bytes:
    body = b"".join(designators)
    return bytes([0, 0x83]) + len(body).to_bytes(2, "big") + body


def _inquiry(vendor: bytes, product: bytes) -> bytes:
    return bytes([0, 0, 5, 2, 31, 0, 0, 0]) + vendor + product + b"0001"


NAA6 = bytes.fromhex("60000000000000000e00000000010004")
NAA5 = bytes.fromhex("5000c50015ea71ad")
EUI64 = bytes.fromhex("0011223344556677")


@pytest.mark.parametrize("page, expected", [
    (_page83(_designator(1, b"IET     00010004"), _designator(3, NAA5), _designator(3, NAA6)),
     "3" + NAA6.hex()),
    (_page83(_designator(3, NAA5, assoc=1), _designator(2, EUI64)), "2" + EUI64.hex()),
    (_page83(_designator(1, b"ACME    LUN 0001", code=2)), "1ACME_LUN_0001"),
    (_page83(_designator(0, b"cafe", code=2)), "0IET_VIRTUAL-DISK_cafe"),
    (_page83(_designator(8, b"iqn.2026-11.org.x:d,L,0x1", code=3)), "8iqn.2026-11.org.x:d_L_0x1"),
    (bytes([0, 0x83, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]), "30102030405060708"),  # pre-SPC-3 page
])
def test_scsi_id_serial_agrees_with_the_hosts_wwid(page: bytes, expected: str) -> None:
    vendor, model = b"IET     ", b"VIRTUAL-DISK    "
    inquiry = scsi.parse_standard_inquiry(_inquiry(vendor, model))
    assert agent.scsi_id_serial(page, None, vendor, model) == expected
    assert scsi.wwid_from_page83(page, inquiry) == expected


def test_scsi_id_serial_agrees_with_the_host_on_random_pages() -> None:
    rng = random.Random(5)
    vendor, model = b"VENDOR  ", b"PRODUCT  X      "
    inquiry = scsi.parse_standard_inquiry(_inquiry(vendor, model))
    for _ in range(2000):
        designators = []
        for _ in range(rng.randint(0, 4)):
            dtype = rng.choice([0, 1, 2, 3, 3, 5, 8])
            code = rng.choice([1, 2, 3])
            length = rng.choice([0, 4, 8, 16, rng.randint(0, 250)])
            value = bytes(rng.choice(b"0123456789abcdefABCDEF \x00\x01\xff/")
                          for _ in range(length))
            designators.append(_designator(dtype, value, code=code, assoc=rng.choice([0, 0, 1])))
        page = _page83(*designators)
        if rng.random() < 0.1:
            page = page[:rng.randint(4, len(page))]
        assert agent.scsi_id_serial(page, None, vendor, model) == \
            scsi.wwid_from_page83(page, inquiry), page


def test_page_80_is_the_fallback_without_page_83() -> None:
    page80 = b"\x00\x80\x00\x04SN01"
    assert agent.scsi_id_serial(None, page80, b"QEMU    ", b"QEMU HARDDISK   ") == \
        "SQEMU_QEMU_HARDDISK_SN01"
    assert agent.scsi_id_serial(_page83(), page80, b"A", b"B") == "SABSN01"
    assert agent.scsi_id_serial(b"\x00\x83", None, b"", b"") == ""


# -- the file itself ---------------------------------------------------------------------------


def test_agent_file_is_stdlib_only_and_python_3_9_syntax() -> None:
    tree = ast.parse(AGENT_FILE.read_text(), feature_version=(3, 9))
    imported: set[str] = set()
    at_run_time: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""]
            imported |= {name.split(".")[0] for name in names}
    for node in tree.body:  # imports for mypy only sit under "if TYPE_CHECKING:"
        if isinstance(node, ast.Import):
            at_run_time |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            at_run_time.add(node.module or "")
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    assert at_run_time == {"__future__", "errno", "json", "os", "select", "socket", "sys",
                           "time"}


def _imported_modules(argv: list[str]) -> set[str]:
    proc = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", *argv],
                          capture_output=True, text=True, timeout=60, check=True)
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "imported package" not in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_python_flavour_ships_every_stdlib_module_the_agent_imports() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    needed = set()
    for name in _imported_modules([str(AGENT_FILE), "--once", "--root", str(ALL_BUSES)]):
        if _imp.is_frozen(name) or name in sys.builtin_module_names:
            continue
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin and origin.endswith(".py"):
            needed.add(Path(origin).relative_to(stdlib).as_posix())
    assert needed, "the import trace was not read"
    assert needed <= set(guest_image.PYTHON_STDLIB_FILES), needed - set(
        guest_image.PYTHON_STDLIB_FILES)


def test_python_flavour_key_covers_the_agent_and_tiny_is_untouched(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert guest_image.FLAVOURS["tiny"].inputs is None
    before = guest_image._python_inputs()
    copy = tmp_path / "agent.py"
    copy.write_text(AGENT_FILE.read_text() + "\n# changed\n")
    monkeypatch.setattr(guest_image, "GUEST_AGENT_SOURCE", copy)
    after = guest_image._python_inputs()
    assert before["virtyard-guest-agent"] != after["virtyard-guest-agent"]
    assert before["virtyard-python-recipe"] == after["virtyard-python-recipe"]


def test_once_prints_one_message() -> None:
    proc = subprocess.run([sys.executable, "-I", "-S", str(AGENT_FILE), "--once", "--root",
                           str(ALL_BUSES)], capture_output=True, text=True, timeout=60,
                          check=True)
    message = json.loads(proc.stdout)
    assert proc.stdout.count("\n") == 1
    assert message["__name__"] == "disks-usage"
    assert message["mapping"]["VYSCSI2"] == {"name": "/dev/sdc"}
    assert isinstance(message["disks"], list)


@pytest.mark.parametrize("argv", [["--bogus"], ["--heartbeat", "x"], ["stray"]])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.main(argv) == 2
    assert "usage" in capsys.readouterr().err


def test_message_stays_under_the_hosts_line_limit() -> None:
    disks = [agent.GuestDisk(f"sd{i}", "scsi", f"0QEMU_QEMU_HARDDISK_{'x' * 200}{i}",
                             [f"{'y' * 200}{i}"]) for i in range(400)]
    message = agent.disks_usage_message(disks, [{"path": "/", "fs": "ext4", "total": 1,
                                                 "used": 0}] * 64)
    assert len(agent.encode(message)) <= agent.MAX_MESSAGE or not any(
        k.startswith("y") for k in message["mapping"])
    assert message["disks"] == []
    small = agent.disks_usage_message(disks[:2], [])
    assert set(small["mapping"]) == {disks[0].serial, disks[1].serial, "y" * 200 + "0",
                                     "y" * 200 + "1"}


def test_filesystem_usage_reads_block_mounts_only(tmp_path: Path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mounts").write_text(
        "proc /proc proc rw 0 0\n/dev/vda1 / ext4 rw 0 0\n/dev/vda1 / ext4 rw 0 0\n"
        f"/dev/sdb1 {tmp_path}/no\\040such ext4 rw 0 0\n")
    [usage] = agent.filesystem_usage(str(tmp_path))
    assert usage["path"] == "/" and usage["fs"] == "ext4"
    assert 0 <= usage["used"] <= usage["total"]


# -- the main loop over a socketpair ------------------------------------------------------------


class Host:
    """The host end of the port: reads the agent's lines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def next(self, want: Callable[[dict[str, Any]], bool], timeout: float = 5.0
             ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                if line:
                    message: dict[str, Any] = json.loads(line)
                    if want(message):
                        return message
            left = deadline - time.monotonic()
            assert left > 0, "no such message in time"
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            assert data, "agent closed the port"
            self.buffer += data


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[agent.Agent, Host, Path]]:
    """An agent on a copy of the captured tree, its port one end of a socketpair."""
    root = tmp_path / "root"
    shutil.copytree(ALL_BUSES, root, symlinks=True)
    ours, theirs = socket.socketpair()
    the_agent = agent.Agent(str(tmp_path / "no-port"), str(root), heartbeat=0.3, refresh=30,
                            use_netlink=False)
    the_agent.port.fd = os.dup(ours.fileno())
    ours.close()
    os.set_blocking(the_agent.port.fd, False)
    thread = threading.Thread(target=the_agent.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not the_agent.port.host_connected and time.monotonic() < deadline:
        time.sleep(0.01)  # settle in setup, so the agent's log lines stay with this phase
    try:
        yield the_agent, Host(theirs), root
    finally:
        the_agent.stop = True
        thread.join(5)
        theirs.close()
        assert not thread.is_alive()


def _is(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m["__name__"] == name


def test_loop_sends_state_heartbeats_changes_and_refreshes(
        running: tuple[agent.Agent, Host, Path]) -> None:
    the_agent, host, root = running
    first = host.next(_is("disks-usage"))
    assert first["mapping"]["VYSCSI2"] == {"name": "/dev/sdc"}
    host.next(_is("heartbeat"))
    host.next(_is("heartbeat"))  # 0.3 s apart

    # A disk appears (as a hot-plug would make it): reported without being asked.
    shutil.copytree(root / "sys/block/sdc", root / "sys/block/sdf")
    (root / "sys/block/sdf/device/vpd_pg80").write_bytes(b"\x00\x80\x00\x03NEW")
    started = time.monotonic()
    changed = host.next(lambda m: m["__name__"] == "disks-usage" and "NEW" in m["mapping"])
    assert time.monotonic() - started < 1.0
    assert changed["mapping"]["NEW"] == {"name": "/dev/sdf"}

    shutil.rmtree(root / "sys/block/sdf")
    host.next(lambda m: m["__name__"] == "disks-usage" and "NEW" not in m["mapping"])

    # Hostile or odd requests are ignored; a refresh is answered at once.
    host.sock.sendall(b"\xff\xfe garbage\n" + b"[" * 5000 + b"\n" + b"x" * 10000 + b"\n"
                      + b'{"__name__": "nonsense"}\n[]\n{"__name__": "refresh"}\n')
    started = time.monotonic()
    host.next(_is("disks-usage"))
    assert time.monotonic() - started < 1.0
    assert the_agent.port.fd >= 0


def test_loop_waits_calmly_while_the_host_is_away(tmp_path: Path) -> None:
    """The port hangs up while nobody holds the host end: checked now and then, no spinning."""
    ours, theirs = socket.socketpair()
    theirs.close()  # a hang-up, as virtio-serial shows it while the host end is closed
    the_agent = agent.Agent(str(tmp_path / "no-port"), str(ALL_BUSES), use_netlink=False)
    the_agent.port.fd = os.dup(ours.fileno())
    ours.close()
    the_agent.port.same_device = lambda: True  # type: ignore[method-assign]
    steps = 0
    now = time.monotonic()
    waited = 0.0
    while waited < 10.0:  # ten seconds of the agent's time, without sleeping
        steps += 1
        wait = the_agent.step(now + waited)
        assert wait > 0
        waited += wait
    assert not the_agent.port.host_connected
    assert steps <= 10 / agent.HOST_AWAY_RECHECK[0]
    assert steps >= 10 / agent.POLL_SECONDS
    os.close(the_agent.port.fd)


def test_loop_survives_a_host_that_never_reads(running: tuple[agent.Agent, Host, Path]) -> None:
    the_agent, host, _root = running
    host.next(_is("disks-usage"))
    for _ in range(200):  # far more than the socket buffer takes
        the_agent._send_state = True
        time.sleep(0.005)
    time.sleep(0.5)
    assert len(the_agent.port.out) <= agent.MAX_PENDING_OUTPUT
    host.sock.setblocking(False)
    while True:  # drain: the agent carries on once the host reads again
        try:
            if not host.sock.recv(1 << 20):
                break
        except BlockingIOError:
            break
    host.sock.setblocking(True)
    host.buffer = b""
    host.next(_is("heartbeat"))


def test_loop_survives_the_host_closing(capsys: pytest.CaptureFixture[str],
                                       running: tuple[agent.Agent, Host, Path]) -> None:
    the_agent, host, _root = running
    host.next(_is("disks-usage"))
    host.sock.close()
    deadline = time.monotonic() + 5
    while the_agent.port.fd >= 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    # A socket end cannot be reopened by path: the agent closed it and keeps retrying calmly.
    assert the_agent.port.fd < 0
    steps = 0
    step = the_agent.step

    def counted(now: float) -> float:
        nonlocal steps
        steps += 1
        return step(now)

    the_agent.step = counted  # type: ignore[method-assign]
    time.sleep(1.0)
    assert steps <= 10  # it waits in poll (0.25 s at most), it does not spin
    err = capsys.readouterr().err
    assert "host disconnected" in err
    assert err.count("cannot open") == 1  # one line per new problem, not one per retry
