"""Device listing (``Host.getDeviceList``) over the user-space initiator vs ``iscsi-ls -s``.

Run by hand on a lab machine (needs tgt, libiscsi-bin, and e2fsprogs for ``--formatted``)::

    .venv/bin/python benchmarks/device_list.py                  # 256 empty 1 GiB LUNs, 20 rounds
    .venv/bin/python benchmarks/device_list.py --luns 64 --rounds 50 --lun-mib 64
    .venv/bin/python benchmarks/device_list.py --formatted 128  # half of them ext4 (mkfs.ext4)
    .venv/bin/python benchmarks/device_list.py --sequential     # also the old one-read-a-session
                                                                # path, timed once (slow)

It starts its own tgtd on 127.0.0.1:36260 (control port 3626), creates one target with ``--luns``
sparse LUNs, and stops tgtd and removes every file it made when done (also on error or Ctrl-C).
The measured cases alternate round by round so all see the same machine load; it prints medians:

* ``iscsi-ls -s``: libiscsi's tool in a fresh process: SendTargets discovery, login, then TEST
  UNIT READY + INQUIRY + READ CAPACITY per LUN, one synchronous round trip at a time.
* ``checkStatus=false``: ``DeviceService.listing(refresh=True, check_status=False)``: login,
  REPORT LUNS, then INQUIRY, VPD 0x80/0x83/0xb0 and READ CAPACITY of every LUN, pipelined.
* ``checkStatus=true``: the same plus the first 8 KiB of each LUN in the same pass, signature
  probing, and the reads past the head the probes want (for an empty LUN, libblkid's "second
  look": about 1 MiB in five ranges), batched in rounds of one ``read_many`` each.
* ``cached``: ``listing(refresh=False, check_status=True)`` right after a checkStatus=true call.

Goals (the issue): checkStatus=false <= 1.5x iscsi-ls, checkStatus=true <= 3x, cached <= 20 ms.
Every LUN is empty by default: the worst case for checkStatus=true, since only LUNs that look
free pay for the second look.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from virtyard.host.storage.connections import ConnectionRegistry
from virtyard.host.storage.devices import DeviceEntry, DeviceService
from virtyard.host.storage.initiator import Connection, Device, Initiator, Portal
from virtyard.host.storage.userspace_initiator import UserspaceInitiator
from virtyard.lab.iscsi_target import TargetServer

PORT = 36260
CONTROL_PORT = 3626
MiB = 1 << 20
INITIATOR = "iqn.2026-11.org.virtyard:bench"


class _Timed(UserspaceInitiator):
    """Records how long listing and batched reads take, and how much they read."""

    def __init__(self) -> None:
        super().__init__(INITIATOR)
        self.listing_s = 0.0
        self.read_s = 0.0
        self.read_calls = 0
        self.read_bytes = 0

    def reset(self) -> None:
        self.listing_s = self.read_s = 0.0
        self.read_calls = self.read_bytes = 0

    def devices(self, connections: list[Connection], *, guids: frozenset[str] | None,
                read_head: int, timeout: float) -> list[Device]:
        started = time.perf_counter()
        try:
            return super().devices(connections, guids=guids, read_head=read_head,
                                   timeout=timeout)
        finally:
            self.listing_s += time.perf_counter() - started

    def read_many(self, requests: list[tuple[Device, int, int]], *,
                  timeout: float) -> list[bytes]:
        started = time.perf_counter()
        try:
            got = super().read_many(requests, timeout=timeout)
        finally:
            self.read_s += time.perf_counter() - started
            self.read_calls += 1
        self.read_bytes += sum(len(data) for data in got)
        return got


class _Sequential(UserspaceInitiator):
    """The path before batching: every read past the head logs in on its own session."""

    def read_many(self, requests: list[tuple[Device, int, int]], *,
                  timeout: float) -> list[bytes]:
        return Initiator.read_many(self, requests, timeout=timeout)


def _iscsi_ls(port: int, luns: int) -> None:
    out = subprocess.run(["iscsi-ls", "-s", f"iscsi://127.0.0.1:{port}"], check=True,
                         capture_output=True, text=True).stdout
    assert out.count("Lun:") == luns + 1, out[-500:]  # + LUN 0, tgt's controller


def _check(entries: list[DeviceEntry], luns: int, check_status: bool) -> None:
    assert len(entries) == luns, len(entries)
    if check_status:
        assert all(e.usage is not None for e in entries)


def _format(backings: list[Path]) -> None:
    for backing in backings:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True,
                       capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--luns", type=int, default=256)
    parser.add_argument("--lun-mib", type=int, default=1024, help="size of each sparse LUN")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--formatted", type=int, default=0,
                        help="make the first N LUNs ext4 (found in the head: no second look)")
    parser.add_argument("--sequential", action="store_true",
                        help="also time the old one-session-per-read path once")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vy-bench-devlist-") as tmp:
        server = TargetServer(Path(tmp) / "tgt", PORT, CONTROL_PORT)
        server.start()
        try:
            started = time.perf_counter()
            target = server.create_target("bench", [args.lun_mib * MiB] * args.luns)
            _format([lun.backing for lun in target.luns[:args.formatted]])
            print(f"created {args.luns} LUNs of {args.lun_mib} MiB ({args.formatted} ext4) in "
                  f"{time.perf_counter() - started:.2f} s")
            registry = ConnectionRegistry(Path(tmp) / "connections.json")
            registry.add(Connection(id="bench", portal=Portal("127.0.0.1", PORT),
                                    iqn=target.iqn))
            initiator = _Timed()
            service = DeviceService(initiator, registry, probe_bytes=8192, timeout=30)
            breakdown: dict[str, list[float]] = {"listing": [], "read_many": [],
                                                 "probing (rest)": []}

            def check_status_true() -> None:
                initiator.reset()
                began = time.perf_counter()
                entries = service.listing(guids=None, check_status=True, refresh=True)
                total = time.perf_counter() - began
                _check(entries, args.luns, True)
                breakdown["listing"].append(initiator.listing_s)
                breakdown["read_many"].append(initiator.read_s)
                breakdown["probing (rest)"].append(total - initiator.listing_s
                                                   - initiator.read_s)

            cases: dict[str, Callable[[], None]] = {
                "iscsi-ls -s": lambda: _iscsi_ls(PORT, args.luns),
                "checkStatus=false": lambda: _check(service.listing(
                    guids=None, check_status=False, refresh=True), args.luns, False),
                "checkStatus=true": check_status_true,
                "cached (refresh=false)": lambda: _check(service.listing(
                    guids=None, check_status=True, refresh=False), args.luns, True),
            }
            times: dict[str, list[float]] = {name: [] for name in cases}
            for run in cases.values():
                run()  # warm up (page cache, imports, libblkid)
            for values in breakdown.values():
                values.clear()
            for _ in range(args.rounds):
                for name, run in cases.items():
                    began = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - began)
            base = statistics.median(times["iscsi-ls -s"])
            for name, samples in times.items():
                median = statistics.median(samples)
                print(f"{name:24s} median {median * 1000:8.2f} ms  min {min(samples) * 1000:8.2f}"
                      f" ms  {median / base:5.2f}x iscsi-ls")
            print(f"checkStatus=true: {initiator.read_calls} read_many call(s), "
                  f"{initiator.read_bytes / MiB:.1f} MiB read past the heads; medians:")
            for name, samples in breakdown.items():
                print(f"  {name:22s} {statistics.median(samples) * 1000:8.1f} ms")
            if args.sequential:
                old = DeviceService(_Sequential(INITIATOR), registry, probe_bytes=8192,
                                    timeout=30)
                began = time.perf_counter()
                _check(old.listing(guids=None, check_status=True, refresh=True), args.luns,
                       True)
                took = (time.perf_counter() - began) * 1000
                print(f"{'checkStatus=true, old':24s} once   {took:8.1f} ms"
                      " (a session per read past the head)")
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"peak RSS of this process: {peak:.0f} MiB")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
