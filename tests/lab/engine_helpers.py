"""Helpers of the engine's lab tests: what the lab hosts really do (libvirt, agents)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import ovirtsdk4 as sdk4
import pytest
from ovirtsdk4 import types

from virtyard.lab import qga
from virtyard.lab.engine import EngineProcess
from virtyard.lab.guest_image import DEFAULT_CMDLINE
from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab

MiB = 1 << 20


def add_tiny_vm(sdk: sdk4.Connection, lab: Lab, prefix: str,
                hosts: Iterable[types.Host] = (), *, memory_mib: int = 256,
                ha_priority: int | None = None) -> types.Vm:
    """A VM of the lab's tiny guest (booted from its kernel and initrd), named ``prefix-…``,
    placed on ``hosts`` in order (none: the scheduler picks); HA with ``ha_priority``."""
    image = lab.guest_image
    placed = [types.Host(id=h.id) for h in hosts]
    return sdk.system_service().vms_service().add(types.Vm(
        name=f"{prefix}-{uuid.uuid4().hex[:6]}", memory=memory_mib * MiB,
        cluster=types.Cluster(name="Default"), template=types.Template(name="Blank"),
        high_availability=(types.HighAvailability(enabled=True, priority=ha_priority)
                           if ha_priority is not None else None),
        os=types.OperatingSystem(kernel=str(image.kernel), initrd=str(image.initrd),
                                 cmdline=DEFAULT_CMDLINE),
        placement_policy=types.VmPlacementPolicy(hosts=placed) if placed else None))


def target_name(target: TargetInfo) -> str:
    return target.iqn.split(":", 1)[1]


def engine_connections(lab: Lab, index: int, ids: set[str]) -> set[str]:
    """The engine's connections (by id) that lab host ``index``'s agent keeps."""
    with lab.agent_client(index) as agent:
        return {c["id"] for c in agent.call("StoragePool.getConnections")} & ids


def domain_on(lab: Lab, index: int, vm_id: str) -> libvirt.virDomain | None:
    conn = libvirt.open(lab.hosts[index].uri)
    try:
        return conn.lookupByUUIDString(vm_id)
    except libvirt.libvirtError:
        return None


def wait_guest_path(dom: libvirt.virDomain, path: str, *, present: bool = True,
                    timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (qga.run(dom, f"test -b {path}").exitcode == 0) == present:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} {'did not appear' if present else 'stayed'} in the guest")


def make_iso(tmp: Path, text: str) -> bytes:
    """A small ISO 9660 image holding ``hello.txt`` with ``text`` (genisoimage)."""
    src = tmp / uuid.uuid4().hex
    src.mkdir()
    (src / "hello.txt").write_text(text)
    out = tmp / f"{src.name}.iso"
    subprocess.run(["genisoimage", "-quiet", "-o", str(out), "-V", "VYTEST", "-r", str(src)],
                   check=True)
    return out.read_bytes()


def guest_cd_sha(dom: libvirt.virDomain, timeout: float = 15.0) -> str | None:
    """The sha256 of ``hello.txt`` on the guest's CD (``/dev/sr0``), or None when the drive
    has no medium."""
    deadline = time.monotonic() + timeout
    while True:
        result = qga.run(dom, "umount /mnt/cd 2>/dev/null; mkdir -p /mnt/cd; "
                              "echo 3 > /proc/sys/vm/drop_caches; "
                              "mount -t iso9660 -o ro /dev/sr0 /mnt/cd && "
                              "sha256sum /mnt/cd/hello.txt; r=$?; umount /mnt/cd; exit $r")
        if result.exitcode == 0:
            return result.stdout.decode().split()[0]
        nomedium = qga.run(dom, "dd if=/dev/sr0 of=/dev/null bs=2048 count=1 2>&1")
        if b"No medium" in nomedium.stdout or b"No such device or address" in nomedium.stdout:
            return None
        if time.monotonic() > deadline:  # the guest may still be settling the new medium
            raise AssertionError(f"CD neither readable nor empty: {result.stderr!r} "
                                 f"{nomedium.stdout!r}")
        time.sleep(0.3)


_databases = itertools.count(1)


@contextlib.contextmanager
def own_engine(engine: Any, lab: Lab, request: pytest.FixtureRequest, name: str,
               port: int) -> Iterator[Any]:
    """An engine of the same database kind as the session's ``engine``, but a module's own:
    its own ``port``, state folder and fresh database, so a module can kill and restart it at
    will without disturbing any other test. Stopped (and its database dropped) at the end."""
    kind: str = engine.kind
    root = lab.state_dir / f"engine-{name}-{kind}"
    database = ""
    pg = None
    if kind == "sqlite":
        root.mkdir(parents=True, exist_ok=True)
        (root / "engine.db").unlink(missing_ok=True)
        url = f"sqlite:///{root / 'engine.db'}"
    else:
        pg = request.getfixturevalue("postgres")
        database = f"engine_{name}_{next(_databases)}_{uuid.uuid4().hex[:8]}"
        url = pg.create_database(database)
    process = EngineProcess(root, port, lab.pki, database_url=url, heartbeat_interval=1.0)
    own = dataclasses.replace(engine, process=process, database_url=url, secrets=set(),
                              users={}, _admin_token="")
    try:
        process.start()
        own.secrets.add(process.password)
        yield own
    finally:
        process.extra_config = ""
        process.stop()
        if pg is not None and database:
            pg.drop_database(database)
