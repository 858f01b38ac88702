"""Compare libiscsi's ``iscsi-ls -s`` with our pipelined probe over one target with many LUNs.

Run by hand on a lab machine (needs tgt and libiscsi-bin)::

    .venv/bin/python benchmarks/libiscsi_probe.py            # 256 LUNs, 30 rounds
    .venv/bin/python benchmarks/libiscsi_probe.py --luns 64 --rounds 50

It starts its own tgtd on 127.0.0.1:34262 (control port 3462), creates one target with
``--luns`` sparse 1 MiB LUNs, then alternates the measured runs so both sides see the same
machine load, and prints medians. Each "ours" run is what the host agent does to list a
target's LUNs from cold: SendTargets discovery, login, REPORT LUNS, then standard INQUIRY,
VPD 0x80/0x83/0xb0 and READ CAPACITY(16) of every LUN, optionally with a first-bytes READ.
``iscsi-ls -s`` does discovery, login, and TEST UNIT READY + INQUIRY + READ CAPACITY(10)
per LUN, one synchronous round trip at a time, in a fresh process.

The goal: ours ≤ 1.5x iscsi-ls without reads, ≤ 3x with a first-bytes read.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from virtyard.host.storage import libiscsi, scsi
from virtyard.lab.iscsi_target import TargetServer

PORT = 34262
CONTROL_PORT = 3462


def _iscsi_ls(port: int) -> None:
    subprocess.run(["iscsi-ls", "-s", f"iscsi://127.0.0.1:{port}"], check=True,
                   stdout=subprocess.DEVNULL)


def _ours(port: int, iqn: str, luns: int, read_bytes: int) -> Callable[[], None]:
    def run() -> None:
        libiscsi.discover("127.0.0.1", port)
        with libiscsi.Session.login("127.0.0.1", port, iqn) as session:
            found = session.report_luns()
            probes = libiscsi.probe_luns(session, found, read_bytes=read_bytes)
        assert len(probes) == luns + 1, len(probes)  # + LUN 0, tgt's controller
        disk = probes[1]
        assert disk.vpd.get(scsi.VPD_DEVICE_IDENTIFICATION) and disk.capacity16
        assert read_bytes == 0 or disk.data is not None

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--luns", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vy-bench-") as tmp:
        server = TargetServer(Path(tmp) / "tgt", PORT, CONTROL_PORT)
        server.start()
        try:
            started = time.perf_counter()
            target = server.create_target("bench", [1 << 20] * args.luns)
            print(f"created {args.luns} LUNs in {time.perf_counter() - started:.2f} s")
            cases: dict[str, Callable[[], None]] = {
                "iscsi-ls -s": lambda: _iscsi_ls(PORT),
                "ours": _ours(PORT, target.iqn, args.luns, 0),
                "ours + read 4 KiB": _ours(PORT, target.iqn, args.luns, 4096),
                "ours + read 64 KiB": _ours(PORT, target.iqn, args.luns, 65536),
                "ours + read 1 MiB": _ours(PORT, target.iqn, args.luns, 1 << 20),
            }
            times: dict[str, list[float]] = {name: [] for name in cases}
            for run in cases.values():
                run()  # warm up (page cache, imports)
            for _ in range(args.rounds):
                for name, run in cases.items():
                    started = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - started)
            base = statistics.median(times["iscsi-ls -s"])
            for name, samples in times.items():
                median = statistics.median(samples)
                print(f"{name:20s} median {median * 1000:7.1f} ms  min {min(samples) * 1000:7.1f}"
                      f" ms  {median / base:4.2f}x iscsi-ls")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
