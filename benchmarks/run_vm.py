"""Running a VM through the engine, clean and with the preferred host's storage path broken;
an engine LUN hot-plug against the host agent's own.

Run by hand on a lab machine (the packages `make test` installs)::

    .venv/bin/python benchmarks/run_vm.py                  # 20 start and 20 plug rounds of each
    .venv/bin/python benchmarks/run_vm.py --rounds 40 --plug-rounds 40
    .venv/bin/python benchmarks/run_vm.py --plug-only --port-base 25000   # the hot-plug alone

It brings up its own two-host lab with its engine (ports from ``--port-base``, 24000 unless
told, state in /tmp), adds both hosts to the engine through the REST API, and takes
everything down at the end, also on error. Everything goes through the engine's REST API
(JSON over HTTPS, one keep-alive client with a bearer token) or, for the agent's own numbers,
the agent's mutual-TLS JSON-RPC client.
Measured, alternating round by round so every case sees the same machine:

* start, clean: ``POST vms/{id}/start`` until ``GET vms/{id}`` says ``up``, a VM with one LUN
  disk and placement host 1 only (connect host 1, prove it sees the LUN, ``VM.create``).
* start, preferred host broken: a VM whose LUN's target lets only host 2's initiator in (a
  target ACL: host 1's login is refused for real), placement host 1 then host 2: host 1 fails
  to connect, the VM runs on host 2. Goal: ≤ 1.2x clean.
  Each VM is stopped again (``POST vms/{id}/stop``, which logs the host out) outside the timed
  part, so every start pays the iSCSI login. ``up`` in the API is when ``VM.create`` returned
  on the host (QEMU runs); the guest's boot is not part of it.
* hot-plug: on the clean VM, running, a second LUN of the same target attached inactive;
  ``PUT vms/{id}/diskattachments/{disk}`` with ``active=true`` until it returns, against the
  agent's own ``VM.hotplugDisk`` of the same LUN into the same slot of the same VM with the
  drive the engine sends (under a disk id the engine does not know, so its monitoring leaves
  it alone). Each plug is undone (through the same path) outside the timed part, and the
  guest-name probes a plug sets off are let finish before the next round. Goal: ≤ 2x.

Then, to show where the engine's time goes, the agent calls a plug makes before
``VM.hotplugDisk`` (``StoragePool.getConnections``, ``Host.getDevicesVisibility``) and a refused
login on host 1 are timed on their own, and so is a plain REST read (``GET`` of the
attachment: HTTPS, the token check, one query, the answer).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
from benchlab import bench_lab

from virtyard.host.client import HostClient
from virtyard.lab.demo import register_hosts
from virtyard.lab.guest_image import DEFAULT_CMDLINE
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab

PORT_BASE = 24000
MiB = 1 << 20
SETTLE = 3.0  # seconds after a plug/unplug: the guest-name probes run until 2.5 s after it


def ok(answer: httpx.Response) -> dict[str, Any]:
    if not answer.is_success:
        raise RuntimeError(f"{answer.request.method} {answer.request.url}: "
                           f"{answer.status_code} {answer.text[:300]}")
    body: dict[str, Any] = answer.json() if answer.content else {}
    return body


def lun_disk(api: httpx.Client, target: TargetInfo, lun: int) -> str:
    return str(ok(api.post("/disks", json={
        "alias": f"{target.iqn.split(':', 1)[1]}-lun{lun}",
        "lun_storage": {"type": "iscsi", "logical_units": [{
            "id": target.wwid(lun), "address": target.address, "port": target.port,
            "target": target.iqn}]}}))["id"])


def lun_vm(api: httpx.Client, lab: Lab, name: str, disk_id: str, hosts: list[str]) -> str:
    """A tiny-guest VM with one LUN disk attached, placement ``hosts`` in order."""
    image = lab.guest_image
    vm_id = str(ok(api.post("/vms", json={
        "name": name, "memory": 256 * MiB, "cluster": {"name": "Default"},
        "template": {"name": "Blank"},
        "os": {"kernel": str(image.kernel), "initrd": str(image.initrd),
               "cmdline": DEFAULT_CMDLINE},
        "placement_policy": {"hosts": [{"id": h} for h in hosts]}}))["id"])
    ok(api.post(f"/vms/{vm_id}/diskattachments", json={
        "disk": {"id": disk_id}, "interface": "virtio_scsi", "active": True}))
    return vm_id


FLICKERS: list[str] = []  # statuses other than up seen after the start call returned


def timed_start(api: httpx.Client, vm_id: str) -> tuple[float, float, str]:
    """Seconds until the start call returned, until the API said ``up``; the host it runs on."""
    start = time.perf_counter()
    ok(api.post(f"/vms/{vm_id}/start", json={}))
    returned = time.perf_counter() - start
    while True:
        vm = ok(api.get(f"/vms/{vm_id}"))
        if vm["status"] == "up":
            return returned, time.perf_counter() - start, str(vm["host"]["id"])
        # Seen under load: a start-up "paused" the monitoring applies after the run finished.
        if vm["status"] not in ("wait_for_launch", "powering_up", "paused") \
                or time.perf_counter() - start > 60:
            raise RuntimeError(f"VM {vm_id} is {vm['status']}")
        FLICKERS.append(vm["status"])
        time.sleep(0.005)


def stop(api: httpx.Client, vm_id: str) -> None:
    ok(api.post(f"/vms/{vm_id}/stop", json={}))
    time.sleep(0.5)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ms(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1000:7.1f} ms  "
            f"min {min(values) * 1000:7.1f} ms  max {max(values) * 1000:7.1f} ms")


def verdict(ratio: float, goal: float) -> str:
    return f"{ratio:.2f}x (goal <= {goal:g}x {'met' if ratio <= goal else 'MISSED'})"


def guest_has(client: HostClient, vm_id: str, wwid: str) -> bool:
    [vm] = client.call("Host.getVMFullList", {"vmList": [vm_id]})
    return any(d.get("GUID") == wwid for d in vm["devices"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="start rounds of each case")
    parser.add_argument("--plug-rounds", type=int, default=20, help="hot-plug rounds of each")
    parser.add_argument("--plug-only", action="store_true", help="no start rounds")
    parser.add_argument("--port-base", type=int, default=PORT_BASE,
                        help="the lab's ports from here (clear of other labs)")
    args = parser.parse_args()
    with bench_lab(args.port_base, hosts=2) as lab:
        hosts = register_hosts(lab)
        host1, host2 = hosts["host1"], hosts["host2"]
        clean = lab.storage.create_target("clean", [16 * MiB, 16 * MiB])
        broken = lab.storage.create_target("broken", [16 * MiB])
        lab.storage.restrict("broken", [lab.agents[1].initiator_name])
        agent1 = lab.agent_client(0)
        with lab.engine.api(timeout=120) as api:
            vm_a = lun_vm(api, lab, "bench-clean", lun_disk(api, clean, 1), [host1])
            vm_b = lun_vm(api, lab, "bench-broken", lun_disk(api, broken, 1), [host1, host2])

            # -- start: clean vs the preferred host's path broken -----------------------
            returned: dict[str, list[float]] = {"a": [], "b": []}
            up: dict[str, list[float]] = {"a": [], "b": []}
            for round_ in range(0 if args.plug_only else args.rounds + 1):  # 0 warms up
                for case, vm_id, expected in (("a", vm_a, host1), ("b", vm_b, host2)):
                    t_return, t_up, on = timed_start(api, vm_id)
                    if on != expected:
                        raise RuntimeError(f"case {case}: VM ran on {on}, not {expected}")
                    if round_:
                        returned[case].append(t_return)
                        up[case].append(t_up)
                    stop(api, vm_id)
            if up["a"]:
                print(f"start → up, clean, 1 host          {ms(up['a'])}")
                print(f"start → up, preferred host broken  {ms(up['b'])}")
                print(f"  (the start call itself: {statistics.median(returned['a']) * 1000:.1f}"
                      f" / {statistics.median(returned['b']) * 1000:.1f} ms)")
                start_ratio = statistics.median(up["b"]) / statistics.median(up["a"])
                print(f"  ratio {verdict(start_ratio, 1.2)}")
            if FLICKERS:
                print(f"  after the start call returned, GET said: {sorted(set(FLICKERS))} "
                      f"({len(FLICKERS)} times) before up")

            # -- hot-plug: engine PUT active=true vs the agent's VM.hotplugDisk ---------
            timed_start(api, vm_a)
            wwid = clean.wwid(2)
            disk2 = lun_disk(api, clean, 2)
            ok(api.post(f"/vms/{vm_a}/diskattachments", json={
                "disk": {"id": disk2}, "interface": "virtio_scsi", "active": False}))
            attachment = f"/vms/{vm_a}/diskattachments/{disk2}"
            # The drive exactly as the engine sends it (vm_spec.VmDisk.drive), with the place
            # the engine keeps (index and the address the host reported at the first plug).
            ok(api.put(attachment, json={"active": True}))
            [vm] = agent1.call("Host.getVMFullList", {"vmList": [vm_a]})
            [plugged] = [d for d in vm["devices"] if d.get("GUID") == wwid]
            ok(api.put(attachment, json={"active": False}))
            other = str(uuid.uuid4())
            drive = {"type": "disk", "device": "disk", "iface": "scsi",
                     "index": plugged["index"], "GUID": wwid, "format": "raw",
                     "readonly": False, "shared": "none", "diskId": other,
                     "alias": f"ua-{other}", "propagateErrors": "off",
                     "serial": disk2[:20], "address": plugged["address"]}
            time.sleep(SETTLE)
            engine: list[float] = []
            agent: list[float] = []
            for _ in range(args.plug_rounds):
                start = time.perf_counter()
                answer = ok(api.put(attachment, json={"active": True}))
                engine.append(time.perf_counter() - start)
                if answer.get("active") is not True or not guest_has(agent1, vm_a, wwid):
                    raise RuntimeError(f"the engine did not plug the disk: {answer}")
                time.sleep(SETTLE)
                ok(api.put(attachment, json={"active": False}))
                time.sleep(SETTLE)
                agent.append(timed(lambda: agent1.call("VM.hotplugDisk", {
                    "vmID": vm_a, "drive": drive})))
                time.sleep(SETTLE)
                agent1.call("VM.hotunplugDisk", {"vmID": vm_a, "drive": {"GUID": wwid}})
                time.sleep(SETTLE)
            print(f"engine PUT active=true (hot-plug)  {ms(engine)}")
            print(f"agent VM.hotplugDisk               {ms(agent)}")
            plug_ratio = statistics.median(engine) / statistics.median(agent)
            print(f"  ratio {verdict(plug_ratio, 2.0)}")

            # -- where the engine's time goes: the other agent calls it makes -----------
            connections = [timed(lambda: agent1.call("StoragePool.getConnections"))
                           for _ in range(args.plug_rounds)]
            visibility = [timed(lambda: agent1.call("Host.getDevicesVisibility",
                                                    {"guidList": [wwid]}))
                          for _ in range(args.plug_rounds)]
            read = [timed(lambda: ok(api.get(attachment))) for _ in range(args.plug_rounds)]
            print(f"  agent StoragePool.getConnections {ms(connections)}")
            print(f"  agent Host.getDevicesVisibility  {ms(visibility)}")
            print(f"  engine GET of the attachment     {ms(read)}")
            stop(api, vm_a)
            refused = []
            for _ in range(max(3, args.rounds // 2)):
                params = {"domainType": 3, "connectionParams": [{
                    "id": "refused", "connection": broken.address, "port": broken.port,
                    "iqn": broken.iqn}]}
                start = time.perf_counter()
                agent1.call("StoragePool.connectStorageServer", params)
                refused.append(time.perf_counter() - start)
                agent1.call("StoragePool.disconnectStorageServer", params)
            print(f"  host 1's refused login           {ms(refused)}")
        agent1.close()
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
