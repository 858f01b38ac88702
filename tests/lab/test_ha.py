"""High availability on the real lab, with a watcher that samples both lab hosts every 50 ms
during each whole test and fails it if two QEMU processes of the VM ever live at once (two
copies of the VM on its LUN): a killed QEMU is restarted and the guest writes to its LUN again;
a user's stop and a guest's own shutdown are not restarted; a host whose agent stops while its
libvirtd and the VM keep running (a network partition as the engine sees it) without power
management is never given up until an administrator confirms it off; with the lab's fence
agent it is powered off first (its old QEMU gone), then the VM runs on the other host; an
engine killed in the middle of an HA restart neither loses the VM nor starts a second copy; a
host confirmed off wrongly that comes back loses its stale copy before it returns to service.

The module runs its own engine (SQLite, own port and database), with short HA timings, so it
can be killed and restarted at will.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import ovirtsdk4 as sdk4
import pytest
import sqlalchemy as sa
from engine_helpers import add_tiny_vm, domain_on, wait_guest_path
from ovirtsdk4 import types

from virtyard.lab import power, qga
from virtyard.lab.engine import EngineProcess
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab
from virtyard.lab.process import wait_until

pytestmark = [pytest.mark.lab, pytest.mark.parametrize("engine", ["sqlite"], indirect=True)]

MiB = 1 << 20
OFFSET = 3 * MiB
PORT = 15560 + int(os.environ.get("VIRTYARD_TEST_PORT_OFFSET", "0"))
HA_CONFIG = ("\n[ha]\ninterval = 0.5\nfence_after = 2.0\nfence_poll = 0.3\n"
             "backoff_initial = 1.0\n")
HA_EVENTS = {"failed": 9602, "restarted": 9605, "fencing": 9030, "off": 9031,
             "manual": 9034}


@pytest.fixture(scope="module")
def engine(engine: Any, lab: Lab) -> Iterator[Any]:
    """This module's own engine (SQLite), with short HA timings."""
    root = lab.state_dir / "engine-ha"
    root.mkdir(parents=True, exist_ok=True)
    (root / "engine.db").unlink(missing_ok=True)
    url = f"sqlite:///{root / 'engine.db'}"
    process = EngineProcess(root, PORT, lab.pki, database_url=url, heartbeat_interval=1.0,
                            extra_config=HA_CONFIG)
    own = dataclasses.replace(engine, process=process, database_url=url, secrets=set(),
                              users={}, _admin_token="")
    try:
        process.start()
        own.secrets.add(process.password)
        yield own
    finally:
        process.stop()


def restart(engine: Any, die_at: str = "") -> None:
    """Kill the engine (as a crash) and start it again, ``die_at`` armed or not."""
    engine.process.kill()
    engine.process.extra_config = HA_CONFIG + (f'\n[debug]\ndie_at = "{die_at}"\n'
                                               if die_at else "")
    engine.process.start()


def qemu_pids(vm_id: str) -> set[int]:
    """Every QEMU process of the VM on this machine (both lab hosts): ``-uuid <vm id>``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu" in cmdline.split(b"\0", 1)[0] and vm_id.encode() in cmdline:
            found.add(int(entry))
    return found


class Watcher:
    """Samples the VM's QEMU processes every 50 ms in a thread; ``overlap`` holds every
    sample that saw two at once (there must be none)."""

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        self.overlap: list[set[int]] = []
        self.seen: list[tuple[float, frozenset[int]]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = qemu_pids(self.vm_id)
            self.samples += 1
            if len(pids) > 1:
                self.overlap.append(pids)
            if not self.seen or self.seen[-1][1] != pids:
                self.seen.append((time.monotonic(), frozenset(pids)))
            time.sleep(0.05)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclasses.dataclass
class HaVm:
    engine: Any
    sdk: sdk4.Connection
    lab: Lab
    hosts: list[types.Host]
    target: TargetInfo
    vm_id: str
    disk_id: str

    @property
    def service(self) -> Any:
        return self.sdk.system_service().vms_service().vm_service(self.vm_id)

    def host_index(self) -> int | None:
        vm = self.service.get()
        if vm.status != types.VmStatus.UP or vm.host is None:
            return None
        return next(i for i, h in enumerate(self.hosts) if h.id == vm.host.id)

    def wait_up(self, timeout: float = 60.0) -> int:
        """Until the API says up; the lab host it runs on."""
        assert wait_until(lambda: self.host_index() is not None, timeout=timeout,
                          interval=0.2), f"the VM is not up again: {self.service.get().status}"
        index = self.host_index()
        assert index is not None
        return index

    def write_and_check(self, index: int) -> None:
        """The guest on lab host ``index`` writes to its LUN; the bytes land in the file."""
        dom = domain_on(self.lab, index, self.vm_id)
        assert dom is not None
        qga.wait_ready(dom)
        device = f"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{self.disk_id[:20]}"
        wait_guest_path(dom, device)
        pattern = "HA-" + uuid.uuid4().hex
        qga.check_output(dom, f"printf '{pattern}' | dd of={device} bs=512 "
                              f"seek={OFFSET // 512} conv=notrunc 2>/dev/null && sync")
        with self.target.lun(1).backing.open("rb") as backing:
            backing.seek(OFFSET)
            assert backing.read(len(pattern)).decode() == pattern

    def codes(self) -> list[int]:
        return [e.code for e in self.sdk.system_service().events_service().list(max=60)]

    def table(self, name: str) -> list[Any]:
        db = self.engine.database()
        try:
            with db.connect() as conn:
                return list(conn.execute(sa.text(f"SELECT * FROM {name}")).all())
        finally:
            db.dispose()

    def settled(self) -> bool:
        return not self.table("flows") and not self.table("ha_restarts")


def power_on_all(lab: Lab) -> None:
    for host in lab.hosts:
        if power.state(lab.state_dir, host.name) == "off" or not lab.agents[
                lab.hosts.index(host)].is_running():
            power.on(lab.state_dir, host.name)


@pytest.fixture
def ha_vm(engine: Any, sdk: sdk4.Connection, lab: Lab, *,
          add_lab_host: Callable[..., types.Host], wait_host: Callable[..., types.Host],
          make_target: Callable[..., TargetInfo]) -> Iterator[HaVm]:
    """Two Up hosts; an HA VM (placement: lab host 0, then 1) with a LUN disk, started on lab
    host 0. Afterwards every lab host is powered on, the engine runs without ``die_at``, and
    the VM and its disk are gone from the engine and the hosts."""
    power_on_all(lab)
    hosts = [wait_host(h.id, types.HostStatus.UP) for h in (add_lab_host(0), add_lab_host(1))]
    system = sdk.system_service()
    target = make_target([16 * MiB])
    disk = system.disks_service().add(types.Disk(
        alias=f"ha-{uuid.uuid4().hex[:6]}", lun_storage=types.HostStorage(
            type=types.StorageType.ISCSI, logical_units=[types.LogicalUnit(
                id=target.wwid(1), address=target.address, port=target.port,
                target=target.iqn)])))
    vm = add_tiny_vm(sdk, lab, "ha", hosts, memory_mib=192, ha_priority=50)
    it = HaVm(engine, sdk, lab, hosts, target, vm.id, disk.id)
    try:
        it.service.disk_attachments_service().add(types.DiskAttachment(
            disk=types.Disk(id=disk.id), active=True,
            interface=types.DiskInterface.VIRTIO_SCSI))
        it.service.start()
        assert it.host_index() == 0
        yield it
    finally:
        power_on_all(lab)
        if engine.process.extra_config != HA_CONFIG or not engine.process.is_running():
            restart(engine)
        with contextlib.suppress(sdk4.Error):
            for h in hosts:
                wait_host(h.id, types.HostStatus.UP, timeout=60)
        connection = engine.connect()
        try:
            service = connection.system_service().vms_service().vm_service(vm.id)
            wait_until(lambda: not it.table("flows"), timeout=30)
            # The HA row must go first, or the engine would restart what the test stops.
            service.update(types.Vm(high_availability=types.HighAvailability(enabled=False)))
            if service.get().status != types.VmStatus.DOWN:
                service.stop()
            service.remove()  # its disks go with it
        finally:
            connection.close()
        for index in range(len(lab.hosts)):
            conn = libvirt.open(lab.hosts[index].uri)
            try:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.lookupByUUIDString(vm.id).destroy()
            finally:
                conn.close()


def test_crash_restarts_a_stop_or_guest_shutdown_does_not(ha_vm: HaVm) -> None:
    with Watcher(ha_vm.vm_id) as watcher:
        ha_vm.write_and_check(0)
        (old,) = qemu_pids(ha_vm.vm_id)
        os.kill(old, 9)  # QEMU killed: a crash
        assert wait_until(lambda: qemu_pids(ha_vm.vm_id) - {old}, timeout=30, interval=0.1)
        index = ha_vm.wait_up()
        assert index == 0  # its own host still sees the LUN: restarted there
        ha_vm.write_and_check(index)
        codes = ha_vm.codes()
        assert HA_EVENTS["failed"] in codes and HA_EVENTS["restarted"] in codes
        assert wait_until(ha_vm.settled, timeout=10)

        # A user's stop is not restarted.
        ha_vm.service.stop()
        time.sleep(4)
        assert ha_vm.service.get().status == types.VmStatus.DOWN and not qemu_pids(ha_vm.vm_id)

        # Nor a shutdown from inside the guest.
        ha_vm.service.start()
        dom = domain_on(ha_vm.lab, ha_vm.wait_up(), ha_vm.vm_id)
        assert dom is not None
        qga.wait_ready(dom)
        with contextlib.suppress(Exception):  # no reply on success: the guest goes away
            qga.command(dom, "guest-shutdown", timeout=5)
        assert wait_until(lambda: not qemu_pids(ha_vm.vm_id), timeout=30), "no shutdown"
        assert wait_until(lambda: ha_vm.service.get().status == types.VmStatus.DOWN,
                          timeout=10)
        time.sleep(4)
        events = [e.description for e in
                  ha_vm.sdk.system_service().events_service().list(max=8)]
        assert ha_vm.service.get().status == types.VmStatus.DOWN, events
        assert not qemu_pids(ha_vm.vm_id)
    assert not watcher.overlap and watcher.samples > 50


def partition(lab: Lab, index: int) -> None:
    """The engine loses the host: its agent stops; libvirtd and the VM keep running."""
    lab.agents[index].stop()


def test_partition_without_power_management_waits_for_manual_confirmation(
        ha_vm: HaVm, wait_host: Callable[..., types.Host]) -> None:
    lab = ha_vm.lab
    with Watcher(ha_vm.vm_id) as watcher:
        (old,) = qemu_pids(ha_vm.vm_id)
        partition(lab, 0)
        wait_host(ha_vm.hosts[0].id, types.HostStatus.NON_RESPONSIVE, timeout=30)
        assert wait_until(lambda: ha_vm.service.get().status == types.VmStatus.UNKNOWN,
                          timeout=15)
        time.sleep(8)  # well past fence_after and many HA passes: nothing may happen
        assert ha_vm.service.get().status == types.VmStatus.UNKNOWN
        assert qemu_pids(ha_vm.vm_id) == {old}  # still running, only there
        assert HA_EVENTS["manual"] in ha_vm.codes()
        # The administrator really turns the host off, then says so.
        power.off(lab.state_dir, lab.hosts[0].name)
        assert not qemu_pids(ha_vm.vm_id)
        answer = ha_vm.engine.request("POST", f"/hosts/{ha_vm.hosts[0].id}/fence",
                                      token=ha_vm.engine.admin_token(),
                                      body=b"<action><fence_type>manual</fence_type></action>")
        assert answer.status_code == 200, answer.text
        assert ha_vm.wait_up(timeout=60) == 1
        ha_vm.write_and_check(1)
        # The host comes back (nothing stale on it: it was off) and returns to service.
        power.on(lab.state_dir, lab.hosts[0].name)
        wait_host(ha_vm.hosts[0].id, types.HostStatus.UP, timeout=60)
        assert ha_vm.host_index() == 1
    assert not watcher.overlap and watcher.samples > 50


def test_fencing_powers_the_host_off_first_then_restarts_elsewhere(
        ha_vm: HaVm, wait_host: Callable[..., types.Host]) -> None:
    lab, engine = ha_vm.lab, ha_vm.engine
    token = engine.admin_token()
    host = ha_vm.hosts[0]
    agent = (f"<agent><type>virtyard_lab</type><address>localhost</address><order>1</order>"
             f"<options><option><name>plug</name><value>{lab.hosts[0].name}</value></option>"
             f"<option><name>lab_dir</name><value>{lab.state_dir}</value></option></options>"
             f"</agent>")
    answer = engine.request("POST", f"/hosts/{host.id}/fenceagents", token=token,
                            body=agent.encode())
    assert answer.status_code == 201, answer.text
    answer = engine.request("PUT", f"/hosts/{host.id}", token=token, body=(
        b"<host><power_management><enabled>true</enabled></power_management></host>"))
    assert answer.status_code == 200, answer.text
    with Watcher(ha_vm.vm_id) as watcher:
        (old,) = qemu_pids(ha_vm.vm_id)
        partition(lab, 0)
        assert wait_until(lambda: ha_vm.host_index() == 1, timeout=60, interval=0.2), \
            f"the VM is not up on the other host: {ha_vm.service.get().status}"
        new = qemu_pids(ha_vm.vm_id)
        assert old not in new
        # The old QEMU was gone before the new one appeared.
        gone = next(t for t, pids in watcher.seen if old not in pids)
        born = next(t for t, pids in watcher.seen if pids - {old})
        assert gone <= born
        ha_vm.write_and_check(1)
        codes = ha_vm.codes()
        assert HA_EVENTS["fencing"] in codes and HA_EVENTS["off"] in codes
        # Powered back on after the fence, the host returns to service.
        wait_host(host.id, types.HostStatus.UP, timeout=90)
    assert not watcher.overlap and watcher.samples > 50


@pytest.mark.parametrize("die_at", ["run_vm:proven", "run_vm:created"])
def test_engine_killed_in_the_middle_of_an_ha_restart(ha_vm: HaVm, die_at: str) -> None:
    engine = ha_vm.engine
    with Watcher(ha_vm.vm_id) as watcher:
        restart(engine, die_at)
        (old,) = qemu_pids(ha_vm.vm_id)
        os.kill(old, 9)
        assert wait_until(lambda: not engine.process.is_running(), timeout=30), \
            "the engine did not die in the HA restart"
        restart(engine)
        index = ha_vm.wait_up(timeout=60)
        assert wait_until(ha_vm.settled, timeout=30)
        assert len(qemu_pids(ha_vm.vm_id)) == 1
        ha_vm.write_and_check(index)
    assert not watcher.overlap


def test_a_host_that_comes_back_loses_its_stale_copy_first(
        engine: Any, sdk: sdk4.Connection, lab: Lab, *,
        add_lab_host: Callable[..., types.Host],
        wait_host: Callable[..., types.Host]) -> None:
    """An administrator confirms a partitioned host off while it is not (its QEMU runs on):
    the VM — no disk here, so the two copies share nothing — runs on the other host. When the
    host's agent answers again, its stale copy is destroyed before the host returns to ``up``;
    the database keeps the real one."""
    power_on_all(lab)
    hosts = [wait_host(h.id, types.HostStatus.UP) for h in (add_lab_host(0), add_lab_host(1))]
    system = sdk.system_service()
    vm = add_tiny_vm(sdk, lab, "stale", hosts, memory_mib=128, ha_priority=1)
    service = system.vms_service().vm_service(vm.id)
    try:
        service.start()
        (old,) = qemu_pids(vm.id)
        lab.agents[0].stop()
        wait_host(hosts[0].id, types.HostStatus.NON_RESPONSIVE, timeout=30)
        answer = engine.request("POST", f"/hosts/{hosts[0].id}/fence",
                                token=engine.admin_token(),
                                body=b"<action><fence_type>manual</fence_type></action>")
        assert answer.status_code == 200, answer.text
        assert wait_until(lambda: (v := service.get()).status == types.VmStatus.UP
                          and v.host.id == hosts[1].id, timeout=60, interval=0.2)
        assert old in qemu_pids(vm.id)  # the stale copy still runs on the lost host
        lab.agents[0].start()
        up = wait_host(hosts[0].id, types.HostStatus.UP, timeout=60)
        assert up.status == types.HostStatus.UP
        assert old not in qemu_pids(vm.id) and len(qemu_pids(vm.id)) == 1
        running = service.get()
        assert running.status == types.VmStatus.UP and running.host.id == hosts[1].id
        events = system.events_service().list(max=30)
        assert any(e.code == 9035 for e in events), [e.description for e in events]
    finally:
        power_on_all(lab)
        with contextlib.suppress(sdk4.Error):
            service.update(types.Vm(high_availability=types.HighAvailability(enabled=False)))
            if service.get().status != types.VmStatus.DOWN:
                service.stop()
            service.remove()
        for pid in qemu_pids(vm.id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
