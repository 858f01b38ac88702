"""Domain XML for the lab's tiny guest: direct kernel boot, a guest-agent channel, no network.

Only the lab and its tests use this; the host agent builds its own domain XML from device dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lxml import etree

from virtyard.lab.guest_image import DEFAULT_CMDLINE, GuestImage

QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
VIRTYARD_AGENT_CHANNEL = "org.virtyard.guest_agent.0"


def _sub(parent: etree._Element, tag: str, text: str | None = None,
         **attrs: str) -> etree._Element:
    elem = etree.SubElement(parent, tag, attrs)
    if text is not None:
        elem.text = text
    return elem


def tiny_guest_xml(
    name: str,
    uuid: str,
    image: GuestImage,
    *,
    accelerator: str,
    console_log: Path,
    memory_mib: int = 256,
    vcpus: int = 1,
    channels: Mapping[str, Path] | None = None,
) -> str:
    """A persistent-definable domain that boots ``image`` with a virtio-scsi controller,
    a virtio-serial guest-agent channel and the serial console written to ``console_log``.

    ``channels`` adds virtio-serial channels ``{name: socket path}`` on which QEMU listens, so
    a test can hold the host end itself (e.g. our guest agent's ``VIRTYARD_AGENT_CHANNEL``).
    """
    domain = etree.Element("domain", type="kvm" if accelerator == "kvm" else "qemu")
    _sub(domain, "name", name)
    _sub(domain, "uuid", uuid)
    _sub(domain, "memory", str(memory_mib), unit="MiB")
    _sub(domain, "vcpu", str(vcpus))
    os_elem = _sub(domain, "os")
    _sub(os_elem, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_elem, "kernel", str(image.kernel))
    _sub(os_elem, "initrd", str(image.initrd))
    _sub(os_elem, "cmdline", DEFAULT_CMDLINE)
    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")
    devices = _sub(domain, "devices")
    _sub(devices, "emulator", QEMU_BINARY)
    _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    _sub(devices, "controller", type="virtio-serial", index="0")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    for channel_name, path in (channels or {}).items():
        extra = _sub(devices, "channel", type="unix")
        _sub(extra, "source", mode="bind", path=str(path))
        _sub(extra, "target", type="virtio", name=channel_name)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(console_log), append="on")
    _sub(serial, "target", port="0")
    _sub(devices, "memballoon", model="none")
    video = _sub(devices, "video")
    _sub(video, "model", type="none")
    return etree.tostring(domain, encoding="unicode", pretty_print=True)


def iscsi_disk_xml(
    *, portal_host: str, portal_port: int, iqn: str, lun: int, target_dev: str,
    bus: str = "scsi", serial: str | None = None, device: str = "disk",
) -> str:
    """A disk whose bytes QEMU reads over iSCSI through libiscsi (no kernel initiator)."""
    disk = etree.Element("disk", type="network", device=device)
    _sub(disk, "driver", name="qemu", type="raw", cache="none")
    source = _sub(disk, "source", protocol="iscsi", name=f"{iqn}/{lun}")
    _sub(source, "host", name=portal_host, port=str(portal_port))
    _sub(disk, "target", dev=target_dev, bus=bus)
    if serial is not None and device != "lun":
        _sub(disk, "serial", serial)
    return etree.tostring(disk, encoding="unicode")
