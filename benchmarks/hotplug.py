"""VM.hotplugDisk end to end vs a bare libvirt attachDeviceFlags; Host.getAllVmStats at scale.

Run by hand on a lab machine (the packages `make test` installs)::

    .venv/bin/python benchmarks/hotplug.py                 # 20 rounds, 8 guests for the stats
    .venv/bin/python benchmarks/hotplug.py --rounds 50 --guests 4

It brings up its own one-host lab (ports from 23800, state in /tmp) and takes it down at the end,
also on error. Measured, alternating round by round so both see the same machine:

* ``VM.hotplugDisk``: the agent's verb through the real mutual-TLS JSON-RPC client — parameter
  validation, the LUN's visibility on the host, the metadata write, ``attachDeviceFlags`` and
  the answer (the VM's full definition).
* bare ``attachDeviceFlags``: libvirt-python straight to the host's libvirtd with the very same
  disk XML (what the agent attaches), nothing else.

Each plug is undone (unplug / detach, waited for) outside the timed part. Then ``--guests`` tiny
guests run and ``Host.getAllVmStats`` is timed with all of them, giving the cost per VM.
"""

from __future__ import annotations

import argparse
import statistics
import time

import libvirt
from benchlab import bench_lab, vm_params

from virtyard.host.virt.device_specs import disk_device
from virtyard.host.virt.disk_sources import IscsiSource
from virtyard.host.virt.domain_xml import DomainDisk
from virtyard.lab import qga

PORT_BASE = 23800


def wait_gone(dom: libvirt.virDomain, dev: str) -> None:
    deadline = time.monotonic() + 20
    while f"dev='{dev}'" in dom.XMLDesc(0):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{dev} not released")
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--guests", type=int, default=8)
    args = parser.parse_args()
    with bench_lab(PORT_BASE) as lab:
        target = lab.storage.create_target("bench", [16 << 20, 16 << 20])
        client = lab.agent_client(0)
        client.call("StoragePool.connectStorageServer", {"domainType": 3, "connectionParams": [
            {"id": "bench", "connection": target.address, "port": target.port,
             "iqn": target.iqn}]})
        params = vm_params(lab, "bench")
        client.call("VM.create", {"vmParams": params})
        conn = libvirt.open(lab.hosts[0].uri)
        dom = conn.lookupByUUIDString(params["vmId"])
        qga.wait_ready(dom)

        drive = {"type": "disk", "device": "disk", "iface": "scsi", "index": 1,
                 "GUID": target.wwid(1), "serial": "bench1"}
        bare_xml = DomainDisk(disk_device(drive), IscsiSource(
            target.address, target.port, target.iqn, 1)).to_xml()
        ours: list[float] = []
        bare: list[float] = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            client.call("VM.hotplugDisk", {"vmID": params["vmId"], "drive": drive})
            ours.append(time.perf_counter() - start)
            client.call("VM.hotunplugDisk", {"vmID": params["vmId"],
                                             "drive": {"GUID": drive["GUID"]}})
            start = time.perf_counter()
            dom.attachDeviceFlags(bare_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            bare.append(time.perf_counter() - start)
            dom.detachDeviceFlags(bare_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            wait_gone(dom, "sdb")
        o, b = statistics.median(ours), statistics.median(bare)
        print(f"VM.hotplugDisk (end to end)    median {o * 1000:7.1f} ms  "
              f"min {min(ours) * 1000:6.1f} ms")
        print(f"bare attachDeviceFlags          median {b * 1000:7.1f} ms  "
              f"min {min(bare) * 1000:6.1f} ms")
        print(f"ratio {o / b:.2f}x (goal <= 2x)")

        for i in range(args.guests - 1):
            client.call("VM.create", {"vmParams": vm_params(lab, f"bench{i}")})
        timings = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            stats = client.call("Host.getAllVmStats", {})
            timings.append(time.perf_counter() - start)
        assert len(stats) == args.guests
        t = statistics.median(timings)
        print(f"Host.getAllVmStats, {args.guests} VMs  median {t * 1000:7.1f} ms  "
              f"({t * 1000 / args.guests:.2f} ms per VM)")
        client.close()


if __name__ == "__main__":
    main()
