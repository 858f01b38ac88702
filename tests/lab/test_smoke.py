"""The lab is real: a guest on host 1 writes to a SAN LUN over iSCSI, migrates, and reads it back.

Every step goes through the real parts: tgtd serves the LUN from a sparse file, QEMU reaches it
with its own iSCSI initiator (libiscsi), the guest writes through qemu-guest-agent, and the
bytes are found in the LUN's backing file; after a live migration to host 2 the guest reads
bytes that were written into the backing file behind its back, so the read really crossed the wire.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import libvirt
import pytest

from virtyard.lab import qga
from virtyard.lab.guest_vm import iscsi_disk_xml
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab

pytestmark = pytest.mark.lab

MiB = 1 << 20
OFFSET = 3 * MiB  # bytes written here, well away from the start of the LUN


def _wait_for_guest_path(dom: libvirt.virDomain, path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if qga.run(dom, f"test -b {path}").exitcode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} did not appear in the guest within {timeout} s")


def _guest_read(dom: libvirt.virDomain, device: str, length: int) -> bytes:
    """Read ``length`` bytes at OFFSET from ``device`` in the guest, bypassing its page cache."""
    out = qga.check_output(
        dom,
        f"echo 3 > /proc/sys/vm/drop_caches; "
        f"dd if={device} bs=512 skip={OFFSET // 512} count=1 2>/dev/null | od -An -tx1 -v",
    )
    return bytes.fromhex("".join(out.split()))[:length]


def test_guest_writes_lun_migrates_and_reads_it_back(
    lab: Lab, make_target: Callable[..., TargetInfo],
    make_guest: Callable[..., libvirt.virDomain],
) -> None:
    target = make_target([64 * MiB])
    lun = target.lun(1)
    dom = make_guest(host=0)

    serial = "smoke" + uuid.uuid4().hex[:8]
    disk_xml = iscsi_disk_xml(portal_host=target.address, portal_port=target.port,
                              iqn=target.iqn, lun=1, target_dev="sdb", bus="scsi", serial=serial)
    dom.attachDeviceFlags(disk_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    device = f"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{serial}"
    _wait_for_guest_path(dom, device)

    pattern = b"VIRTYARD-" + uuid.uuid4().hex.encode()
    qga.check_output(
        dom,
        f"printf '{pattern.decode()}' | dd of={device} bs=512 seek={OFFSET // 512} conv=notrunc "
        f"2>/dev/null && sync",
    )
    with lun.backing.open("rb") as backing:
        backing.seek(OFFSET)
        assert backing.read(len(pattern)) == pattern

    # Live-migrate to host 2; the guest keeps running and keeps its disk.
    dest = libvirt.open(lab.hosts[1].uri)
    flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
             | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    dom.migrateToURI3(lab.hosts[1].migration_uri, {}, flags)
    moved = dest.lookupByUUIDString(dom.UUIDString())
    assert moved.isActive()
    source = libvirt.open(lab.hosts[0].uri)
    assert dom.UUIDString() not in [d.UUIDString() for d in source.listAllDomains()]

    assert _guest_read(moved, device, len(pattern)) == pattern

    # Bytes written to the LUN behind the guest's back are what the migrated guest reads:
    # its reads go over iSCSI from host 2's QEMU to tgtd, not from a cache.
    second = b"MOVED-" + uuid.uuid4().hex.encode()
    with lun.backing.open("r+b") as backing:
        backing.seek(OFFSET)
        backing.write(second)
    assert _guest_read(moved, device, len(second)) == second
