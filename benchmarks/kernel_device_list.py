"""``Host.getDeviceList`` on the kernel path, in the lab's storage host VM, against the tools.

Run by hand on a lab machine::

    .venv/bin/python benchmarks/kernel_device_list.py                 # 32 LUNs x 2 paths
    .venv/bin/python benchmarks/kernel_device_list.py --luns 64 --rounds 7

A throwaway lab (ports from ``--port-base``) with the storage host VM; one target with
``--luns`` empty sparse LUNs reached through both guest portals (two paths per LUN, one
multipath map each). Every case runs *inside the VM*, timed there (``date`` around the
commands) or around the verb's call, alternating round by round:

* floor for ``checkStatus=false``: ``iscsiadm -m session -P 3`` + ``multipath -ll``;
* ``checkStatus=false``: the agent's verb (sysfs, dmsetup status, scsi_id per map), timed on
  this machine around the call (so it also pays JSON-RPC, TLS and QEMU's forward);
* floor for ``checkStatus=true``: ``blkid -p`` over every ``/dev/mapper/<WWID>``;
* ``checkStatus=true``: the verb with signature probing of every map.

Goals (issue 16): checkStatus=false <= 1.5x its floor; checkStatus=true no slower than
``blkid -p``. Medians and ratios are printed; absolute times are TCG's, the ratios are the result.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlab import bench_lab

from virtyard.lab.storage_host import PORTAL_PORT, PORTALS, StorageHostVM

MiB = 1 << 20


def timed_in_guest(vm: StorageHostVM, script: str) -> float:
    out = vm.exec(["sh", "-c", f"s=$(date +%s.%N); {{ {script}; }} >/dev/null 2>&1; "
                               "e=$(date +%s.%N); echo $s $e"], timeout=600)["stdout"]
    start, end = (float(x) for x in str(out).split())
    return end - start


def verb_time(client: Any, check_status: bool) -> float:
    """The verb as the engine sees it: JSON-RPC over mutual TLS through QEMU's forward."""
    start = time.monotonic()
    devices = client.call("Host.getDeviceList", {"checkStatus": check_status})
    elapsed = time.monotonic() - start
    assert devices, "the verb listed no device"
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--luns", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--port-base", type=int, default=21300)
    args = parser.parse_args()
    with bench_lab(args.port_base) as lab:
        # Many LUNs under TCG: multipathd needs longer than the default 15 s to map them all.
        lab.storage_host.storage_config = "login_timeout = 600\n"
        boot = lab.start_storage_host()
        vm = lab.storage_host
        target = lab.storage.create_target(f"bench-{uuid.uuid4().hex[:6]}",
                                           [16 * MiB] * args.luns)
        params = [{"id": str(uuid.uuid4()), "connection": p, "port": PORTAL_PORT,
                   "iqn": target.iqn} for p in PORTALS]
        with vm.client(timeout=2400) as client:
            start = time.monotonic()
            statuses = client.call("StoragePool.connectStorageServer",
                                   {"domainType": 3, "connectionParams": params})
            connect = time.monotonic() - start
            assert [s["status"] for s in statuses] == [0, 0], statuses
            wwids = [target.wwid(n) for n in range(1, args.luns + 1)]
            devices = " ".join(f"/dev/mapper/{w}" for w in wwids)
            cases = {
                "iscsiadm -m session -P 3 + multipath -ll": lambda: timed_in_guest(
                    vm, "iscsiadm -m session -P 3; multipath -ll"),
                "getDeviceList checkStatus=false": lambda: verb_time(client, False),
                "blkid -p over every map": lambda: timed_in_guest(
                    vm, f"for d in {devices}; do blkid -p $d; done"),
                "getDeviceList checkStatus=true": lambda: verb_time(client, True),
            }
            times: dict[str, list[float]] = {name: [] for name in cases}
            try:
                for _ in range(args.rounds):
                    for name, case in cases.items():
                        times[name].append(case())
            except Exception:  # the lab goes away with its logs: show the agent's side first
                for log in (vm.agent_log, vm.console_log):
                    if log.exists():
                        print(f"--- {log} (end)", file=sys.stderr)
                        print(log.read_text(errors="replace")[-6000:], file=sys.stderr)
                raise
            client.call("StoragePool.disconnectStorageServer",
                        {"domainType": 3, "connectionParams": params})
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"storage host VM boot {boot:.1f} s; connect {args.luns} LUNs x 2 paths "
          f"{connect:.1f} s; {args.rounds} rounds, medians:")
    for name, value in med.items():
        print(f"  {name:45s} {value * 1000:8.0f} ms")
    floor_false = med["iscsiadm -m session -P 3 + multipath -ll"]
    floor_true = med["blkid -p over every map"]
    ratio_false = med["getDeviceList checkStatus=false"] / floor_false
    ratio_true = med["getDeviceList checkStatus=true"] / floor_true
    print(f"  checkStatus=false / floor: {ratio_false:.2f}x (goal <= 1.5x)")
    print(f"  checkStatus=true / blkid -p: {ratio_true:.2f}x (goal <= 1x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
