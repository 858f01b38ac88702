"""Guest disk names: how soon after VM.hotplugDisk returns the guest's name for the disk is
known, and what following 8 guests costs the host agent in CPU.

Run by hand on a lab machine::

    .venv/bin/python benchmarks/guest_names.py              # 20 plugs, 8 guests, 60 s window
    .venv/bin/python benchmarks/guest_names.py --rounds 5 --guests 4 --window 20

Its own one-host lab (ports from 23600, state in /tmp), taken down at the end. Latency: after
each ``VM.hotplugDisk`` returns, ``Host.getVMFullList`` is polled every 10 ms until the disk's
``guestName`` is set (the path: the guest sees the disk, qemu-guest-agent is asked — at once,
not on its period — the names are merged and written into the VM's metadata). CPU: the
agent process's user+system time over ``--window`` seconds with ``--guests`` running tiny
guests and nothing else happening, from /proc.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import libvirt
from benchlab import bench_lab, vm_params

from virtyard.lab import qga

PORT_BASE = 23600


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--guests", type=int, default=8)
    parser.add_argument("--window", type=float, default=60.0)
    args = parser.parse_args()
    with bench_lab(PORT_BASE) as lab:
        target = lab.storage.create_target("names", [16 << 20])
        client = lab.agent_client(0)
        client.call("StoragePool.connectStorageServer", {"domainType": 3, "connectionParams": [
            {"id": "names", "connection": target.address, "port": target.port,
             "iqn": target.iqn}]})
        params = vm_params(lab, "names")
        client.call("VM.create", {"vmParams": params})
        vm_id = params["vmId"]
        qga.wait_ready(libvirt.open(lab.hosts[0].uri).lookupByUUIDString(vm_id))
        guid = target.wwid(1)
        drive = {"type": "disk", "device": "disk", "iface": "scsi", "index": 0, "GUID": guid,
                 "serial": "names1"}
        latencies = []
        for _ in range(args.rounds):
            client.call("VM.hotplugDisk", {"vmID": vm_id, "drive": drive})
            start = time.perf_counter()
            while True:
                [vm] = client.call("Host.getVMFullList", {"vmList": [vm_id]})
                if any(d.get("GUID") == guid and d["guestName"] for d in vm["devices"]):
                    break
                if time.perf_counter() - start > 10:
                    raise RuntimeError("no guest name within 10 s")
                time.sleep(0.01)
            latencies.append(time.perf_counter() - start)
            client.call("VM.hotunplugDisk", {"vmID": vm_id, "drive": {"GUID": guid}})
        print(f"hotplugDisk returned -> guestName known: median "
              f"{statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
              f" ({args.rounds} rounds; goal <= 1 s)")

        for i in range(args.guests - 1):
            client.call("VM.create", {"vmParams": vm_params(lab, f"names{i}")})
        time.sleep(15)  # let them boot and be named once
        pid = lab.agents[0].pid()
        assert pid is not None
        before, start = cpu_seconds(pid), time.monotonic()
        time.sleep(args.window)
        used, elapsed = cpu_seconds(pid) - before, time.monotonic() - start
        print(f"agent CPU with {args.guests} guests: {used:.2f} s in {elapsed:.0f} s "
              f"= {100 * used / elapsed:.2f}% of one core "
              f"({1000 * used / elapsed / args.guests:.2f} ms/s per guest)")
        client.close()


if __name__ == "__main__":
    main()
