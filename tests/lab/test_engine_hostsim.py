"""The engine cannot tell simulated hosts from real agents: its own flows (add host, list
LUNs, add a LUN disk, run a VM, hot-plug, stop) and its monitoring (VMs found on the hosts
are external; a simulated device change reaches the engine) run against ``virtyard-hostsim``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ovirtsdk4 as sdk4
import pytest
from ovirtsdk4 import types

from virtyard.lab import ports
from virtyard.lab.lab import Lab

pytestmark = pytest.mark.lab

BASE_PORT = 15600 + int(os.environ.get("VIRTYARD_TEST_PORT_OFFSET", "0"))
HOSTS = 3


@pytest.fixture
def simulated(lab: Lab, tmp_path: Path) -> Iterator[list[dict[str, Any]]]:
    """Three simulated hosts with the lab's CA (the engine trusts them, they trust it)."""
    hosts_file = tmp_path / "hosts.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtyard.hostsim.cli", "--hosts", str(HOSTS),
         "--vms-per-host", "4", "--luns-per-host", "4", "--base-port", str(BASE_PORT),
         "--pki", str(lab.pki.root), "--hosts-file", str(hosts_file), "--seed", "7"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (hosts_file.exists() and all(ports.port_is_listening(BASE_PORT + i)
                                               for i in range(HOSTS))):
            assert proc.poll() is None, "virtyard-hostsim exited"
            assert time.monotonic() < deadline, "virtyard-hostsim did not start"
            time.sleep(0.1)
        yield json.loads(hosts_file.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_engine_flows_on_simulated_hosts(engine: Any, sdk: sdk4.Connection,
                                         simulated: list[dict[str, Any]]) -> None:
    system = sdk.system_service()
    hosts_service = system.hosts_service()
    engine.remove_all_hosts()
    added = []
    for entry in simulated:
        address, port = entry["address"].rsplit(":", 1)
        added.append(hosts_service.add(types.Host(name=f"{entry['name']}-{uuid.uuid4().hex[:4]}",
                                                  address=address, port=int(port))))
    try:
        deadline = time.monotonic() + 30
        while any(hosts_service.host_service(h.id).get().status != types.HostStatus.UP
                  for h in added):
            assert time.monotonic() < deadline, "simulated hosts did not come up"
            time.sleep(0.2)
        host = hosts_service.host_service(added[0].id).get()
        assert host.hardware_information.uuid and host.iscsi.initiator

        storage = hosts_service.host_service(host.id).storage_service().list()
        assert len(storage) >= 4
        unit = storage[0].logical_units[0]
        disk = system.disks_service().add(types.Disk(
            alias=f"sim-{uuid.uuid4().hex[:6]}", lun_storage=types.HostStorage(
                type=types.StorageType.ISCSI, host=types.Host(id=host.id),
                logical_units=[types.LogicalUnit(id=unit.id, address=unit.address,
                                                 port=unit.port, target=unit.target)])))
        vm = system.vms_service().add(types.Vm(
            name=f"simvm-{uuid.uuid4().hex[:6]}", cluster=types.Cluster(name="Default"),
            template=types.Template(name="Blank"),
            placement_policy=types.VmPlacementPolicy(hosts=[types.Host(id=host.id)])))
        vm_service = system.vms_service().vm_service(vm.id)
        vm_service.start()
        assert vm_service.get().host.id == host.id
        attachments = vm_service.disk_attachments_service()
        attachments.add(types.DiskAttachment(disk=types.Disk(id=disk.id), active=True,
                                             interface=types.DiskInterface.VIRTIO_SCSI))
        attachment = attachments.attachment_service(disk.id)
        deadline = time.monotonic() + 20
        while not attachment.get().logical_name:  # the simulated guest names it
            assert time.monotonic() < deadline, "no guest name from the simulated host"
            time.sleep(0.2)
        vm_service.stop()
        assert vm_service.get().status == types.VmStatus.DOWN
        vm_service.remove()
        # The simulated hosts' own VMs are external: never imported, never touched.
        assert not [v for v in system.vms_service().list() if v.name.startswith("sim")
                    and v.id != vm.id]
    finally:
        engine.remove_all_hosts()
