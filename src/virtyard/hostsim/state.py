"""What one simulated host holds, in memory: its identity, LUNs, storage connections, VMs with
their disks and guest names, and its event log.

Everything here runs on the simulator's one event loop, so nothing is locked. Every change that
moves a VM's ``hash`` (``<run id>-<generation>``, as the real agent builds it) bumps the VM's
generation and appends a ``devices`` event; a VM that appears or goes away appends a
``status`` event, exactly as the real agent's watcher does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from virtyard.host.rpc.errors import (
    HotplugDiskError,
    HotunplugDiskError,
    InvalidParamsError,
    NoSuchVmError,
    VmCreateError,
    VmExistsError,
)
from virtyard.host.verbs.storage import (
    BlockDeviceInfo,
    IscsiConnectionParams,
    IscsiPath,
    PathStatus,
)
from virtyard.host.verbs.vm import VmDefinition, VmParams, VmStats
from virtyard.host.virt.device_specs import disk_dict, parse_disks
from virtyard.host.virt.domain_xml import DiskDevice, drive_name
from virtyard.host.virt.events import (
    REASON_DESTROYED,
    REASON_FAILED,
    REASON_SHUTDOWN_GUEST,
    EventLog,
    sequence_base,
)

SAN_IQN = "iqn.2026-11.org.virtyard.hostsim:san"
NAMESPACE = uuid.UUID("5b0c4a55-7e2d-4d0e-9a61-3f1c2b8d9e70")  # stable ids across runs
LUN_CAPACITY = 10 << 30
MAX_EXTRA_DISKS = 4  # a VM with this many simulated plugs gets an unplug next
GUEST_PREFIXES = {"virtio": "/dev/vd", "scsi": "/dev/sd", "sata": "/dev/sd", "ide": "/dev/hd"}


@dataclass(frozen=True)
class SimOptions:
    """How many hosts, VMs and LUNs, and how fast they change."""

    hosts: int = 1
    vms_per_host: int = 10
    base_port: int = 28000  # 0: any free port for each host (tests)
    address: str = "127.0.0.1"
    luns_per_host: int = 16
    disks_per_vm: int = 1
    change_rate: float = 0.0  # fraction of each host's VMs with a device change per interval
    change_interval: float = 1.0
    crash_rate: float = 0.0  # fraction of each host's VMs that go down per interval
    guest_name_delay: float = 0.3  # a plugged disk is named by the guest this much later
    event_capacity: int = 1024  # events each host keeps for its long-polls (the agent: 4096)
    san_portal: str = "127.0.0.1:3260"
    name_prefix: str = "sim"
    seed: int | None = None


@dataclass
class SimLun:
    guid: str
    lun: int
    capacity: int
    serial: str
    used_by_vm: bool  # a VM's own disk from the start (its guest partitioned it)


@dataclass
class SimVm:
    vm_id: str
    name: str
    mem: int
    smp: int
    run_id: int
    disks: dict[str, DiskDevice] = field(default_factory=dict)  # by target name
    guest_names: dict[str, str] = field(default_factory=dict)  # target name -> /dev/...
    extra: list[str] = field(default_factory=list)  # disks the simulation plugged, oldest first
    generation: int = 0
    status: str = "Up"
    _stats: VmStats | None = None  # both cached while the hash stays
    _definition: VmDefinition | None = None

    @property
    def hash(self) -> str:
        return f"{self.run_id}-{self.generation}"

    def stats(self) -> VmStats:
        if self._stats is None or self._stats.hash != self.hash:
            self._stats = VmStats(vmId=self.vm_id, vmName=self.name, status=self.status,
                                  hash=self.hash, guestDiskMapping=self.guest_disk_mapping())
        return self._stats

    def guest_disk_mapping(self) -> dict[str, dict[str, str]]:
        return {disk.serial or disk.guid or name: {"name": self.guest_names[name]}
                for name, disk in self.disks.items() if self.guest_names.get(name)}

    def definition(self) -> VmDefinition:
        if self._definition is None or self._definition.hash != self.hash:
            self._definition = self._define()
        return self._definition

    def _define(self) -> VmDefinition:
        devices = []
        for name, disk in sorted(self.disks.items()):
            entry = disk_dict(disk)
            entry["guestName"] = self.guest_names.get(name, "")
            devices.append(entry)
        return VmDefinition(vmId=self.vm_id, vmName=self.name, status=self.status,
                            hash=self.hash, memSize=self.mem, smp=self.smp, devices=devices)

    def guids(self) -> set[str]:
        return {d.guid for d in self.disks.values() if d.guid}


def _address(iface: str, index: int) -> dict[str, str]:
    """The address libvirt would give the disk (so the device dicts look like the agent's)."""
    if iface == "virtio":
        return {"type": "pci", "domain": "0x0000", "bus": "0x00", "slot": f"0x{7 + index:02x}",
                "function": "0x0"}
    return {"type": "drive", "controller": "0", "bus": "0", "target": "0", "unit": str(index)}


def _placed(disk: DiskDevice) -> DiskDevice:
    """``disk`` as the live domain shows it: an address and libvirt's alias when it had none."""
    address = disk.address or _address(disk.iface, disk.index)
    alias = disk.alias
    if alias is None:
        alias = (f"virtio-disk{disk.index}" if disk.iface == "virtio"
                 else f"{disk.iface}0-0-0-{disk.index}")
    return dataclasses.replace(disk, address=address, alias=alias)


class SimHost:
    """One simulated host agent's state."""

    def __init__(self, index: int, options: SimOptions, *, started_at: float,
                 rng: random.Random) -> None:
        self.index = index
        self.options = options
        self.rng = rng
        self.name = f"{options.name_prefix}{index + 1:04d}"
        self.address = options.address
        self.port = options.base_port + index if options.base_port else 0
        self.host_uuid = str(uuid.uuid5(NAMESPACE, f"host:{self.name}"))
        self.initiator_name = f"iqn.2026-11.org.virtyard.hostsim:{self.name}"
        self.boot_id = str(uuid.uuid4())  # a new simulator run is a rebooted host
        self.started_at = started_at
        self.events = EventLog(sequence_base(started_at), options.event_capacity)
        self.waiters: set[asyncio.Future[None]] = set()  # open long-polls, woken by an event
        self.events.subscribe(self._wake_waiters)
        self.luns: dict[str, SimLun] = {}
        self.connections: dict[str, tuple[IscsiConnectionParams, int]] = {}
        self.vms: dict[str, SimVm] = {}
        self._next_run_id = 1
        self._next_lun = 0
        self._change_carry = 0.0
        self._crash_carry = 0.0
        self._device_list: list[BlockDeviceInfo] | None = None
        # Runs ``fn`` after ``delay`` seconds (the server sets the event loop's call_later).
        self.later: Callable[[float, Callable[[], None]], object] = lambda delay, fn: fn()
        for _ in range(options.luns_per_host):
            self._add_lun(used_by_vm=False)
        for n in range(options.vms_per_host):
            self._start_initial_vm(n)

    def _wake_waiters(self) -> None:
        for waiter in list(self.waiters):
            if not waiter.done():
                waiter.set_result(None)

    # -- identity ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def migration_uri(self) -> str:
        return f"qemu+tls://{self.address}:{self.port}/system"

    # -- LUNs -------------------------------------------------------------------------------

    def _add_lun(self, *, used_by_vm: bool) -> SimLun:
        number = self._next_lun
        self._next_lun += 1
        guid = f"36001405{self.index:08x}{number:016x}"
        lun = SimLun(guid=guid, lun=number, capacity=LUN_CAPACITY,
                     serial=f"SIM{self.index:05d}{number:06d}", used_by_vm=used_by_vm)
        self.luns[guid] = lun
        self._device_list = None
        return lun

    def portal(self) -> tuple[str, int]:
        host, _, port = self.options.san_portal.rpartition(":")
        return host.strip("[]"), int(port)

    def device_list(self) -> list[BlockDeviceInfo]:
        """Every LUN as Host.getDeviceList shows it: one active path through the SAN."""
        if self._device_list is None:
            host, port = self.portal()
            self._device_list = [BlockDeviceInfo(
                GUID=lun.guid, vendorID="VIRTYARD", productID="HOSTSIM LUN", fwrev="0001",
                serial=lun.serial, capacity=lun.capacity, logicalblocksize=512,
                physicalblocksize=4096, discard_max_bytes=0,
                pathlist=[IscsiPath(connection=host, port=port, iqn=SAN_IQN, tpgt=1,
                                    portal="1", initiatorname=self.initiator_name)],
                pathstatus=[PathStatus(lun=lun.lun, state="active")],
                status="used" if lun.used_by_vm else "free",
                usedReason="partition-table" if lun.used_by_vm else None,
                usedDetail="a DOS or GPT partition table" if lun.used_by_vm else "")
                for lun in self.luns.values()]
        return self._device_list

    def free_luns(self) -> list[str]:
        """LUNs of the pool no VM of this host uses."""
        used: set[str] = set()
        for vm in self.vms.values():
            used |= vm.guids()
        return [g for g, lun in self.luns.items() if not lun.used_by_vm and g not in used]

    # -- VMs --------------------------------------------------------------------------------

    def vm(self, vm_id: str) -> SimVm:
        found = self.vms.get(vm_id)
        if found is None:
            raise NoSuchVmError(f"virtual machine {vm_id} does not exist", vmId=vm_id)
        return found

    def _run_id(self) -> int:
        self._next_run_id += 1
        return self._next_run_id - 1

    def _start_initial_vm(self, n: int) -> None:
        vm_id = str(uuid.uuid5(NAMESPACE, f"vm:{self.name}:{n}"))
        vm = SimVm(vm_id=vm_id, name=f"{self.name}-vm{n + 1:04d}", mem=1024, smp=1,
                   run_id=self._run_id())
        for index in range(self.options.disks_per_vm):
            lun = self._add_lun(used_by_vm=True)
            disk = _placed(DiskDevice(device="disk", iface="scsi", index=index, guid=lun.guid,
                                      serial=f"{vm_id[:8]}-{index}",
                                      disk_id=str(uuid.uuid5(NAMESPACE, lun.guid))))
            vm.disks[disk.name] = disk
            vm.guest_names[disk.name] = self._guest_name(vm, disk)
        self.vms[vm_id] = vm

    def _guest_name(self, vm: SimVm, disk: DiskDevice) -> str:
        """The lowest free name the guest's kernel would give (/dev/sda, /dev/sdb…)."""
        prefix = GUEST_PREFIXES[disk.iface]
        taken = set(vm.guest_names.values())
        n = 0
        while f"{prefix}{drive_name(disk.iface, n)[2:]}" in taken:
            n += 1
        return f"{prefix}{drive_name(disk.iface, n)[2:]}"

    def _changed(self, vm: SimVm) -> None:
        vm.generation += 1
        self.events.append(vm.vm_id, "devices", vm.status, vm.hash)

    def create_vm(self, params: VmParams) -> SimVm:
        """VM.create: every disk checked, every LUN visible here, or nothing happens."""
        if params.vmId in self.vms:
            raise VmExistsError(f"virtual machine {params.vmId} already exists",
                                vmId=params.vmId)
        disks = [d.disk() for d in params.devices]  # checked, alone and together
        invisible = [f"LUN {d.guid}" for d in disks if d.guid and d.guid not in self.luns]
        if invisible:
            raise VmCreateError(f"not visible on this host: {', '.join(invisible)}",
                                vmId=params.vmId, invisible=invisible)
        vm = SimVm(vm_id=params.vmId, name=params.vmName or f"vm-{params.vmId}",
                   mem=params.memSize, smp=params.smp, run_id=self._run_id())
        for disk in disks:
            placed = _placed(disk)
            vm.disks[placed.name] = placed
            if placed.device != "cdrom":
                vm.guest_names[placed.name] = self._guest_name(vm, placed)
        self.vms[vm.vm_id] = vm
        self.events.append(vm.vm_id, "status", vm.status, vm.hash)
        return vm

    def stop_vm(self, vm_id: str, reason: str) -> SimVm:
        """The VM goes down (destroyed, shut down, crashed): gone, with a status event."""
        vm = self.vm(vm_id)
        del self.vms[vm_id]
        vm.status = "Down"
        self.events.append(vm_id, "status", "Down", vm.hash, reason)
        return vm

    def destroy_vm(self, vm_id: str) -> SimVm:
        return self.stop_vm(vm_id, REASON_DESTROYED)

    def shutdown_vm(self, vm_id: str) -> SimVm:
        return self.stop_vm(vm_id, REASON_SHUTDOWN_GUEST)

    def hotplug(self, vm_id: str, drive: dict[str, Any]) -> SimVm:
        """VM.hotplugDisk: the disk now, the guest's name for it ``guest_name_delay`` later
        (two hash changes, as on a real host)."""
        vm = self.vm(vm_id)
        [disk] = parse_disks([drive], existing=list(vm.disks.values()))
        if disk.guid and disk.guid not in self.luns:
            raise HotplugDiskError(f"cannot hotplug {disk.name}: LUN {disk.guid} is not "
                                   "visible on this host", vmId=vm_id,
                                   invisible=f"LUN {disk.guid}")
        self._plug(vm, _placed(disk), named=False)
        return vm

    def _plug(self, vm: SimVm, disk: DiskDevice, *, named: bool) -> None:
        vm.disks[disk.name] = disk
        vm.guest_names.pop(disk.name, None)
        if named:
            vm.guest_names[disk.name] = self._guest_name(vm, disk)
            self._changed(vm)
            return
        self._changed(vm)
        run_id = vm.run_id

        def name_it() -> None:
            now = self.vms.get(vm.vm_id)
            if now is None or now.run_id != run_id or now.disks.get(disk.name) != disk \
                    or disk.device == "cdrom":
                return
            now.guest_names[disk.name] = self._guest_name(now, disk)
            self._changed(now)

        self.later(self.options.guest_name_delay, name_it)

    def hotunplug(self, vm_id: str, drive: dict[str, Any]) -> SimVm:
        """VM.hotunplugDisk by GUID, or iface and index."""
        vm = self.vm(vm_id)
        guid = drive.get("GUID")
        if guid is not None:
            names = [n for n, d in vm.disks.items() if d.guid == guid]
            if not names:
                raise HotunplugDiskError(f"no disk with GUID {guid} in VM {vm_id}", vmId=vm_id)
            name = names[0]
        else:
            if "iface" not in drive or "index" not in drive:
                raise InvalidParamsError(
                    "invalid parameter 'drive': give GUID, or iface and index")
            try:
                name = drive_name(str(drive["iface"]), int(drive["index"]))
            except (ValueError, TypeError) as exc:
                raise InvalidParamsError(f"invalid parameter 'drive': {exc}") from None
            if name not in vm.disks:
                raise HotunplugDiskError(f"no disk {name} in VM {vm_id}", vmId=vm_id)
        self._unplug(vm, name)
        return vm

    def _unplug(self, vm: SimVm, name: str) -> None:
        del vm.disks[name]
        vm.guest_names.pop(name, None)
        if name in vm.extra:
            vm.extra.remove(name)
        self._changed(vm)

    # -- the simulated life -----------------------------------------------------------------

    def simulate_change(self, vm: SimVm) -> None:
        """One device change: a new LUN disk the guest has already named (/dev/sdX), or, when
        the VM has had enough of them or no LUN is free, the oldest such disk unplugged."""
        free = self.free_luns()
        if len(vm.extra) >= MAX_EXTRA_DISKS or (not free and vm.extra):
            self._unplug(vm, vm.extra[0])
            return
        index = 0
        while drive_name("scsi", index) in vm.disks:
            index += 1
        guid = self.rng.choice(free) if free else self._add_lun(used_by_vm=False).guid
        disk = _placed(DiskDevice(device="disk", iface="scsi", index=index, guid=guid,
                                  serial=f"{vm.vm_id[:8]}-x{index}"))
        vm.extra.append(disk.name)
        self._plug(vm, disk, named=True)

    def tick(self) -> tuple[int, int]:
        """One change interval: ``change_rate`` of the VMs get a device change and
        ``crash_rate`` of them go down (fractions carried over to the next interval, so the
        rate holds exactly over time). Returns (changes, crashes)."""
        vms = list(self.vms.values())
        changes = self._draw("_change_carry", self.options.change_rate * len(vms), len(vms))
        for vm in self.rng.sample(vms, changes):
            self.simulate_change(vm)
        vms = list(self.vms.values())
        crashes = self._draw("_crash_carry", self.options.crash_rate * len(vms), len(vms))
        for vm in self.rng.sample(vms, crashes):
            self.stop_vm(vm.vm_id, REASON_FAILED)
        return changes, crashes

    def _draw(self, carry: str, wanted: float, limit: int) -> int:
        total = getattr(self, carry) + wanted
        count = min(int(total), limit)
        setattr(self, carry, total - count if count < limit else 0.0)
        return count
