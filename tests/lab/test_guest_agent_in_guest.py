"""Our guest agent for real: in the Python-carrying lab guest, over a real virtio-serial channel.

The guest is the lab's ``python`` flavour (the tiny guest plus Debian's Python and our agent,
started by init); QEMU listens on the channel's unix socket under the lab's state directory and
the host side is our own reader (:class:`ChannelPoller`). Disks are LUNs of the lab's tgtd that
QEMU reaches over iSCSI, on virtio, virtio-scsi and as SCSI passthrough. The names the agent
reports are checked against qemu-guest-agent in the same guest and against the LUNs' bytes.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

from virtyard.host.virt.disk_mapping import GuestReport, VmDisk, map_disks
from virtyard.host.virt.guest_channel import ChannelPoller, GuestChannel, MappingReport
from virtyard.lab import qga
from virtyard.lab.guest_image import GuestImage, build_guest_image
from virtyard.lab.guest_vm import VIRTYARD_AGENT_CHANNEL, iscsi_disk_xml, tiny_guest_xml
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab

pytestmark = pytest.mark.lab

MiB = 1 << 20
OFFSET = 5 * MiB
REPORT_TIMEOUT = 60.0  # first report after boot: ~5 s under TCG


@pytest.fixture(scope="module")
def python_image(lab: Lab) -> GuestImage:
    started = time.monotonic()
    image = build_guest_image(lab.cache_dir / "guest", flavour="python")
    size = image.initrd.stat().st_size
    print(f"\npython guest image: initrd {size / MiB:.1f} MiB, ready in "
          f"{time.monotonic() - started:.1f} s (cached when unchanged)")
    return image


@dataclass
class AgentGuest:
    """A booted python-flavour guest and our reader on its channel."""

    dom: libvirt.virDomain
    channel: GuestChannel
    poller: ChannelPoller
    socket_path: Path
    booted_at: float
    reports: list[MappingReport] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait_report(self, check: Callable[[MappingReport], bool], timeout: float = 5.0,
                    after: int = 0) -> MappingReport:
        """The first report numbered above ``after`` that passes ``check``."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for report in self.reports:
                    if report.sequence > after and check(report):
                        return report
                left = deadline - time.monotonic()
                if left <= 0:
                    last = self.reports[-1].mapping if self.reports else None
                    raise AssertionError(f"no such report in {timeout} s; last: {last}")
                self.changed.wait(left)

    @property
    def last(self) -> MappingReport:
        with self.changed:
            return self.reports[-1]


@pytest.fixture
def agent_guest(lab: Lab, python_image: GuestImage) -> Iterator[AgentGuest]:
    """A python-flavour guest on lab host 1, booted, its agent reporting; all removed after."""
    name = f"vm-ga-{uuid.uuid4().hex[:8]}"
    dom_uuid = str(uuid.uuid4())
    channels = lab.state_dir / "channels"
    channels.mkdir(exist_ok=True)
    socket_path = channels / f"{name}.sock"
    xml = tiny_guest_xml(name, dom_uuid, python_image, accelerator=lab.accelerator,
                         console_log=lab.console_dir / f"{name}.log",
                         channels={VIRTYARD_AGENT_CHANNEL: socket_path})
    conn = libvirt.open(lab.hosts[0].uri)
    poller = ChannelPoller()
    dom = conn.defineXML(xml)
    guest: AgentGuest | None = None
    try:
        booted_at = time.monotonic()
        dom.create()
        channel = poller.add(name, str(socket_path))
        guest = AgentGuest(dom, channel, poller, socket_path, booted_at)

        def record(_channel: GuestChannel, report: MappingReport) -> None:
            assert guest is not None
            with guest.changed:
                guest.reports.append(report)
                guest.changed.notify_all()

        channel.on_report = record
        poller.start()
        first = guest.wait_report(lambda r: True, REPORT_TIMEOUT)
        qga.wait_ready(dom)
        print(f"\nboot to the agent's first report: {first.received - booted_at:.1f} s, "
              f"to qemu-ga answering: {time.monotonic() - booted_at:.1f} s")
        yield guest
    finally:
        poller.stop()
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        conn.close()
        socket_path.unlink(missing_ok=True)


def _plug(dom: libvirt.virDomain, target: TargetInfo, lun: int, dev: str, bus: str,
          **extra: str) -> float:
    """Hot-plug LUN ``lun`` as ``dev``; returns when libvirt returned (monotonic)."""
    dom.attachDeviceFlags(iscsi_disk_xml(portal_host=target.address, portal_port=target.port,
                                         iqn=target.iqn, lun=lun, target_dev=dev, bus=bus,
                                         **extra), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    return time.monotonic()


def _unplug(dom: libvirt.virDomain, target: TargetInfo, lun: int, dev: str, bus: str,
            **extra: str) -> float:
    dom.detachDeviceFlags(iscsi_disk_xml(portal_host=target.address, portal_port=target.port,
                                         iqn=target.iqn, lun=lun, target_dev=dev, bus=bus,
                                         **extra), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    return time.monotonic()


def _qga_serials(dom: libvirt.virDomain) -> dict[str, str]:
    """``{serial: name}`` from qemu-guest-agent's guest-get-disks (serial is under address)."""
    return {d["address"]["serial"]: d["name"] for d in qga.command(dom, "guest-get-disks")
            if d.get("address", {}).get("serial")}


def test_agent_names_every_bus_as_qemu_guest_agent_does(
        agent_guest: AgentGuest, make_target: Callable[..., TargetInfo]) -> None:
    target = make_target([16 * MiB] * 3)
    dom = agent_guest.dom
    serials = {"virtio": f"vyv{uuid.uuid4().hex[:12]}", "scsi": f"vys{uuid.uuid4().hex[:12]}"}
    _plug(dom, target, 1, "vdb", "virtio", serial=serials["virtio"])
    _plug(dom, target, 2, "sdb", "scsi", serial=serials["scsi"])
    _plug(dom, target, 3, "sdc", "scsi", device="lun")
    wwid = target.wwid(3)
    report = agent_guest.wait_report(
        lambda r: {serials["virtio"], serials["scsi"], wwid} <= set(r.mapping), 10)
    qga.check_output(dom, "udevadm settle --timeout=30")  # qemu-ga reads udev's database
    expected = _qga_serials(dom)
    assert {serials["virtio"], f"0QEMU_QEMU_HARDDISK_{serials['scsi']}", wwid} <= set(expected)
    agent_guest.channel.request_refresh()
    report = agent_guest.wait_report(lambda r: True, 5, after=report.sequence)
    ours = report.names()
    assert {serial: ours.get(serial) for serial in expected} == expected
    assert set(ours.values()) <= {d["name"] for d in qga.command(dom, "guest-get-disks")}

    # The host side names each VM disk, and each name really is that LUN: bytes written to it
    # in the guest land in that LUN's backing file.
    disks = [VmDisk("vdb", iface="virtio", serial=serials["virtio"], target="vdb"),
             VmDisk("sdb", iface="scsi", serial=serials["scsi"], target="sdb"),
             VmDisk("sdc", device="lun", iface="scsi", guid=wwid, target="sdc")]
    mapping = map_disks(disks, [GuestReport.from_agent_mapping(report.mapping,
                                                               report.received)])
    assert all(mapping.names.values()), mapping
    for lun, disk in enumerate(disks, start=1):
        pattern = f"VY-{disk.key}-{uuid.uuid4().hex}"
        qga.check_output(dom, f"printf '{pattern}' | dd of={mapping.names[disk.key]} bs=512 "
                              f"seek={OFFSET // 512} conv=notrunc,fsync 2>/dev/null")
        with target.lun(lun).backing.open("rb") as backing:
            backing.seek(OFFSET)
            assert backing.read(len(pattern)) == pattern.encode(), disk


def test_hot_plugged_lun_is_reported_within_a_second_and_goes_on_unplug(
        agent_guest: AgentGuest, make_target: Callable[..., TargetInfo]) -> None:
    target = make_target([16 * MiB] * 2)
    dom = agent_guest.dom
    plug_latency: list[float] = []
    unplug_latency: list[float] = []
    for round_ in range(3):
        for lun, (dev, bus, extra) in enumerate(
                [("sdd", "scsi", {"device": "lun"}),
                 ("vdc", "virtio", {"serial": f"hot{round_}"})], start=1):
            key = target.wwid(lun) if lun == 1 else f"hot{round_}"
            before = agent_guest.last.sequence
            returned = _plug(dom, target, lun, dev, bus, **extra)
            report = agent_guest.wait_report(lambda r, k=key: k in r.mapping, 5, after=before)
            plug_latency.append(report.received - returned)
            name = report.mapping[key]["name"]
            assert qga.run(dom, f"test -b {name}").exitcode == 0

            before = report.sequence
            returned = _unplug(dom, target, lun, dev, bus, **extra)
            report = agent_guest.wait_report(lambda r, k=key: k not in r.mapping, 5,
                                             after=before)
            unplug_latency.append(max(0.0, report.received - returned))
    print(f"\nhot-plug -> report: median {statistics.median(plug_latency):.3f} s, "
          f"max {max(plug_latency):.3f} s; unplug -> report: median "
          f"{statistics.median(unplug_latency):.3f} s, max {max(unplug_latency):.3f} s")
    assert max(plug_latency) < 1.0
    assert max(unplug_latency) < 1.0


def test_refresh_heartbeat_and_a_host_that_goes_and_comes_back(
        agent_guest: AgentGuest) -> None:
    channel = agent_guest.channel
    before = agent_guest.last.sequence
    asked = time.monotonic()
    agent_guest.poller.refresh(channel.name)
    report = agent_guest.wait_report(lambda r: True, 5, after=before)
    assert report.received - asked < 1.0
    assert channel.responsive(timeout=10)

    # We go away; a raw client takes our place and sees the whole protocol from the start.
    agent_guest.poller.remove(channel.name)
    deadline = time.monotonic() + 5
    while True:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(5)
        raw.connect(str(agent_guest.socket_path))
        try:
            raw.sendall(b'{"__name__": "refresh"}\n')
            break
        except OSError:  # QEMU had not yet noticed the old client go
            raw.close()
            assert time.monotonic() < deadline
            time.sleep(0.1)
    try:
        buffer = b""
        names: list[str] = []
        while "disks-usage" not in names or "heartbeat" not in names:
            data = raw.recv(65536)
            assert data, "QEMU closed the channel"
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            names += [json.loads(line)["__name__"] for line in lines if line.strip()]
    finally:
        raw.close()

    # And back with our reader: it asks for a refresh on connecting and gets the state.
    again = agent_guest.poller.add("again", str(agent_guest.socket_path))
    deadline = time.monotonic() + 10
    while again.report is None:
        assert time.monotonic() < deadline, "no report after reconnecting"
        time.sleep(0.05)
    assert again.report.mapping == agent_guest.last.mapping
    log = qga.check_output(agent_guest.dom, "cat /run/virtyard-guest-agent.log")
    assert "Traceback" not in log, log
