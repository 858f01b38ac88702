"""High availability, timed on a two-host lab with the engine's production HA and heartbeat
defaults (heartbeat every 3 s, non-responsive after 2 missed pings, fence after 3 s, HA pass
every 2 s or at once when monitoring reports a VM down).

Run by hand on a lab machine (the packages `make test` installs)::

    .venv/bin/python benchmarks/ha_restart.py                 # 5 crash rounds, 3 fence rounds
    .venv/bin/python benchmarks/ha_restart.py --crash-rounds 10 --fence-rounds 5

It brings up its own two-host lab with its engine (ports from 24800, state in /tmp), adds both
hosts, makes an HA VM with a LUN disk (placement host 1, then host 2) and takes everything down
at the end, also on error. Measured, from the event to the API's ``up`` and to the guest's
agent answering (the tiny guest has booted: boot time included):

* **crash**: QEMU killed (SIGKILL) → restarted on its own host. Goal: guest up ≤ 15 s.
* **baseline** (same run, same VM): a user's ``POST vms/{id}/start`` of the stopped VM → up,
  guest answering. The crash restart's ratio to it is its overhead (detection + the HA pass).
* **fenced host**: host 1's agent stopped (libvirtd and the VM keep running: a partition as
  the engine sees it) with the lab's fence agent configured → non-responsive → powered off
  through ``fence_virtyard_lab`` (its QEMU dies) → the VM runs on host 2. Goal: ≤ 60 s from
  the agent going silent. Between rounds host 1 is powered back on (the engine does it after a
  fence), returns to ``up`` and the VM migrates back.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import libvirt
from benchlab import bench_lab

from virtyard.lab import qga
from virtyard.lab.demo import register_hosts
from virtyard.lab.guest_image import DEFAULT_CMDLINE
from virtyard.lab.lab import Lab

PORT_BASE = 24800
MiB = 1 << 20


def ok(answer: httpx.Response) -> dict[str, Any]:
    if not answer.is_success:
        raise RuntimeError(f"{answer.request.method} {answer.request.url}: "
                           f"{answer.status_code} {answer.text[:300]}")
    body: dict[str, Any] = answer.json() if answer.content else {}
    return body


def qemu_pids(vm_id: str) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu" in cmdline.split(b"\0", 1)[0] and vm_id.encode() in cmdline:
                found.add(int(entry))
    return found


def wait(what: str, probe: Callable[[], bool], timeout: float = 180.0) -> float:
    """Poll until ``probe()``; the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic()


def guest_ready(lab: Lab, vm_id: str) -> bool:
    for host in lab.hosts:
        try:
            conn = libvirt.open(host.uri)
        except libvirt.libvirtError:
            continue
        try:
            dom = conn.lookupByUUIDString(vm_id)
            qga.command(dom, "guest-ping", timeout=1)
            return True
        except Exception:  # not there, or not booted yet
            continue
        finally:
            conn.close()
    return False


def summary(name: str, values: list[float]) -> str:
    return (f"{name:44s} median {statistics.median(values):6.2f} s  "
            f"min {min(values):6.2f} s  max {max(values):6.2f} s  (n={len(values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crash-rounds", type=int, default=5)
    parser.add_argument("--fence-rounds", type=int, default=3)
    args = parser.parse_args()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # polling: errors expected
    with bench_lab(PORT_BASE, hosts=2) as lab:
        lab.engine.stop()
        lab.engine.heartbeat_interval = 3.0  # the engine's default, not the lab's 1 s
        lab.engine.start()
        hosts = register_hosts(lab)
        host1, host2 = hosts["host1"], hosts["host2"]
        target = lab.storage.create_target("ha", [16 * MiB])
        with lab.engine.api(timeout=120) as api:
            disk = str(ok(api.post("/disks", json={
                "alias": "ha-bench", "lun_storage": {"type": "iscsi", "logical_units": [{
                    "id": target.wwid(1), "address": target.address, "port": target.port,
                    "target": target.iqn}]}}))["id"])
            image = lab.guest_image
            vm_id = str(ok(api.post("/vms", json={
                "name": "ha-bench", "memory": 192 * MiB, "cluster": {"name": "Default"},
                "template": {"name": "Blank"},
                "high_availability": {"enabled": True, "priority": 50},
                "os": {"kernel": str(image.kernel), "initrd": str(image.initrd),
                       "cmdline": DEFAULT_CMDLINE},
                "placement_policy": {"hosts": [{"id": host1}, {"id": host2}]}}))["id"])
            ok(api.post(f"/vms/{vm_id}/diskattachments", json={
                "disk": {"id": disk}, "interface": "virtio_scsi", "active": True}))

            def vm() -> dict[str, Any]:
                return ok(api.get(f"/vms/{vm_id}"))

            def up_on(host: str | None = None) -> Callable[[], bool]:
                def probe() -> bool:
                    v = vm()
                    return v["status"] == "up" and (host is None or v["host"]["id"] == host)
                return probe

            ok(api.post(f"/vms/{vm_id}/start", json={}))
            wait("first boot", lambda: guest_ready(lab, vm_id))

            base_up: list[float] = []
            base_ready: list[float] = []
            crash_up: list[float] = []
            crash_ready: list[float] = []
            for _ in range(args.crash_rounds):
                # Baseline: a user's start of the stopped VM.
                ok(api.post(f"/vms/{vm_id}/stop", json={}))
                wait("stopped", lambda: not qemu_pids(vm_id))
                t0 = time.monotonic()
                ok(api.post(f"/vms/{vm_id}/start", json={}))
                base_up.append(wait("up", up_on()) - t0)
                base_ready.append(wait("guest", lambda: guest_ready(lab, vm_id)) - t0)
                # Crash: QEMU killed.
                (old,) = qemu_pids(vm_id)
                t0 = time.monotonic()
                os.kill(old, signal.SIGKILL)
                wait("crash seen", lambda old=old: old not in qemu_pids(vm_id))
                crash_up.append(wait("restarted", lambda old=old: up_on()() and bool(
                    qemu_pids(vm_id) - {old})) - t0)
                crash_ready.append(wait("guest", lambda: guest_ready(lab, vm_id)) - t0)
            print(summary("baseline: user start → API up", base_up))
            print(summary("baseline: user start → guest answers", base_ready))
            print(summary("crash (QEMU killed) → API up", crash_up))
            print(summary("crash (QEMU killed) → guest answers", crash_ready))
            ratio = statistics.median(crash_ready) / statistics.median(base_ready)
            goal = statistics.median(crash_ready) <= 15
            print(f"  crash restart / user start (guest answers): {ratio:.2f}x; "
                  f"goal ≤ 15 s {'met' if goal else 'MISSED'}")

            # -- a fenced host ---------------------------------------------------------
            ok(api.post(f"/hosts/{host1}/fenceagents", json={
                "type": "virtyard_lab", "address": "localhost", "order": 1,
                "options": [{"name": "plug", "value": "host1"},
                            {"name": "lab_dir", "value": str(lab.state_dir)}]}))
            ok(api.put(f"/hosts/{host1}", json={"power_management": {"enabled": True}}))
            nonresp: list[float] = []
            fenced_up: list[float] = []
            fenced_ready: list[float] = []
            for _ in range(args.fence_rounds):
                if vm()["host"]["id"] != host1:
                    ok(api.post(f"/vms/{vm_id}/migrate", json={"host": {"id": host1}}))
                    wait("back on host 1", up_on(host1))
                wait("guest", lambda: guest_ready(lab, vm_id))
                t0 = time.monotonic()
                lab.agents[0].stop()  # the agent goes silent; libvirtd and QEMU run on
                nonresp.append(wait("non-responsive", lambda: ok(api.get(
                    f"/hosts/{host1}"))["status"] in ("non_responsive", "down")) - t0)
                fenced_up.append(wait("up on host 2", up_on(host2)) - t0)
                fenced_ready.append(wait("guest", lambda: guest_ready(lab, vm_id)) - t0)
                wait("host 1 back", lambda: ok(api.get(f"/hosts/{host1}"))["status"] == "up",
                     timeout=240)
            print(summary("agent silent → host non-responsive", nonresp))
            print(summary("agent silent → fenced, VM API up on host 2", fenced_up))
            print(summary("agent silent → fenced, guest answers on host 2", fenced_ready))
            goal = statistics.median(fenced_ready) <= 60
            ratio = statistics.median(fenced_ready) / statistics.median(crash_ready)
            print(f"  goal ≤ 60 s {'met' if goal else 'MISSED'}; vs crash restart: {ratio:.2f}x")
            ok(api.put(f"/vms/{vm_id}", json={"high_availability": {"enabled": False}}))
            ok(api.post(f"/vms/{vm_id}/stop", json={}))


if __name__ == "__main__":
    main()
