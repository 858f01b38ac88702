"""Our libblkid binding on bytes in memory against ``blkid -p`` on the same real images.

The images are sparse files made by the real tools (mkfs.ext4, mkfs.xfs, mkswap, sfdisk,
genisoimage); no loop devices are needed: ``blkid -p`` probes regular files too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from blockdevs import HEAD, Device, MiB, Scratch, blkid_p, run

from virtyard.host.storage import blkid
from virtyard.host.storage.blkid import Ambivalent, BlkidResult

KiB = 1 << 10
GiB = 1 << 30
TiB = 1 << 40


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Scratch]:
    made = Scratch(tmp_path)
    try:
        yield made
    finally:
        made.close()


def needs(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"needs {tool} (installed by scripts/ensure-system-packages)")


def expected(values: dict[str, str]) -> BlkidResult:
    return BlkidResult(type=values.get("TYPE", ""), usage=values.get("USAGE", ""),
                       uuid=values.get("UUID", ""), label=values.get("LABEL", ""),
                       version=values.get("VERSION", ""), pttype=values.get("PTTYPE", ""),
                       ptuuid=values.get("PTUUID", ""))


def probe_file(device: Device, *, second_look: bool = False) -> blkid.ProbeResult:
    head = device.head()
    more = []
    if second_look:
        more = [(offset, device.read(offset, length))
                for offset, length in blkid.regions(device.size)]
    return blkid.probe_bytes(head, device.size, more=more)


def make_ext4(scratch: Scratch) -> Device:
    dev = scratch.file(64 * MiB)
    run("mkfs.ext4", "-q", "-F", "-L", "data-1", str(dev.path))
    return dev


def make_xfs(scratch: Scratch) -> Device:
    needs("mkfs.xfs")
    dev = scratch.file(320 * MiB)
    run("mkfs.xfs", "-q", "-f", "-L", "xfs1", str(dev.path))
    return dev


def make_swap(scratch: Scratch) -> Device:
    dev = scratch.file(16 * MiB)
    run("mkswap", "-L", "sw", str(dev.path))
    return dev


def make_table(scratch: Scratch, label: str) -> Device:
    needs("sfdisk")
    dev = scratch.file(64 * MiB)
    subprocess.run(["sfdisk", "-q", str(dev.path)], input=f"label: {label}\n,32M\n,\n",
                   text=True, check=True, capture_output=True)
    return dev


def make_iso(scratch: Scratch) -> Device:
    needs("genisoimage")
    iso = scratch.file(0, "cd.iso")
    run("genisoimage", "-quiet", "-V", "VY_CD", "-o", str(iso.path),
        str(Path(blkid.__file__).parent))
    dev = scratch.file(32 * MiB)
    with open(dev.path, "r+b") as f:
        f.write(iso.path.read_bytes())
    return dev


@pytest.mark.parametrize("make", [make_ext4, make_xfs, make_swap])
def test_superblocks_match_blkid_p(scratch: Scratch, make: Callable[[Scratch], Device]) -> None:
    dev = make(scratch)
    status, values = blkid_p(str(dev.path))
    assert status == 0
    found = probe_file(dev)
    assert found == expected(values)
    assert isinstance(found, BlkidResult) and found.type in ("ext4", "xfs", "swap")


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_partition_tables_match_blkid_p(scratch: Scratch, label: str) -> None:
    dev = make_table(scratch, label)
    status, values = blkid_p(str(dev.path))
    assert status == 0 and values["PTTYPE"] == label
    found = probe_file(dev)
    assert found == expected(values)
    assert isinstance(found, BlkidResult) and found.ptuuid


def test_iso_needs_the_bytes_past_the_head(scratch: Scratch) -> None:
    """ISO 9660 starts with 32 KiB of zeros: invisible in 8 KiB, found in the probe regions."""
    dev = make_iso(scratch)
    status, values = blkid_p(str(dev.path))
    assert status == 0 and values["TYPE"] == "iso9660"
    assert probe_file(dev) is None
    assert probe_file(dev, second_look=True) == expected(values)


def test_ambivalent_like_blkid_p(scratch: Scratch) -> None:
    """An ext4 superblock and ISO 9660 volume descriptors on one device."""
    iso = make_iso(scratch)
    dev = make_ext4(scratch)
    with open(dev.path, "r+b") as f:
        f.seek(32 * 1024)
        f.write(iso.read(32 * 1024, 8 * 1024))
    status, _ = blkid_p(str(dev.path))
    assert status == 8  # ambivalent
    found = probe_file(dev, second_look=True)
    assert isinstance(found, Ambivalent)
    assert set(found.candidates) >= {"ext4", "iso9660"}


def test_zeros_and_odd_sizes() -> None:
    assert blkid.probe_bytes(bytes(HEAD), GiB) is None
    assert blkid.probe_bytes(bytes(HEAD), 0) is None
    assert blkid.probe_bytes(b"", 0) is None
    assert blkid.probe_bytes(bytes(HEAD), 1024) is None  # device shorter than the buffer


def test_head_longer_than_the_device_is_cut(scratch: Scratch) -> None:
    dev = make_ext4(scratch)
    head = dev.head()
    assert isinstance(blkid.probe_bytes(head, TiB), BlkidResult)
    # The ext4 superblock is at 1024..2048: a 1 KiB device cannot hold it.
    assert blkid.probe_bytes(head, 1024) is None


def test_regions_are_merged_and_clamped() -> None:
    assert blkid.regions(100 * KiB) == [(0, 100 * KiB)]
    assert blkid.regions(0) == []
    assert blkid.regions(GiB) == [(0, 528 * KiB), (MiB, 4 * KiB), (2 * MiB, 4 * KiB),
                                  (4 * MiB, 4 * KiB), (GiB - 512 * KiB, 512 * KiB)]
    # 1.5 MiB: the last 512 KiB swallow the 1 MiB region
    assert blkid.regions(3 * MiB // 2) == [(0, 528 * KiB), (MiB, 512 * KiB)]


def test_probe_regions_cover_what_libblkid_reads(scratch: Scratch) -> None:
    """With every byte zero, each prober reads where its magic would be: our regions must
    cover all of those reads (but Promise FastTrack's deep ones, knowingly left out)."""
    dev = scratch.file(GiB)
    env = {**os.environ, "LIBBLKID_DEBUG": "lowprobe"}
    done = subprocess.run(["blkid", "-p", str(dev.path)], env=env, capture_output=True,
                          text=True, check=False)
    prober = ""
    reads = []
    for line in done.stderr.splitlines():
        if match := re.search(r"LOWPROBE: \[\d+\] (\S+):$", line):
            prober = match.group(1)
        elif match := re.search(r"read: off=(\d+) len=(\d+)", line):
            reads.append((prober, int(match.group(1)), int(match.group(2))))
    assert len(reads) > 20, "libblkid's debug output changed"
    ranges = blkid.regions(dev.size)
    outside = [(name, offset, length) for name, offset, length in reads
               if not any(start <= offset and offset + length <= start + size
                          for start, size in ranges)]
    assert {name for name, _, _ in outside} <= {"promise_fasttrack_raid_member"}


def test_probe_is_fast(scratch: Scratch) -> None:
    """The aim is 0.2 ms a probe (256 LUNs a listing); the bound here is loose for busy CI."""
    head = make_ext4(scratch).head()
    rounds = 500
    for heads in ([head], [bytes(HEAD)]):
        started = time.perf_counter()
        for _ in range(rounds):
            blkid.probe_bytes(heads[0], TiB)
        per_probe = (time.perf_counter() - started) / rounds
        assert per_probe < 0.002, f"{per_probe * 1e3:.3f} ms per probe"


def test_library_version() -> None:
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", blkid.library_version())
