"""Fixtures over the real lab: a session-wide lab, and per-test isolated targets and guests.

A test says what it needs in a few lines::

    def test_x(lab, make_target, make_guest):
        target = make_target([64 * MiB] * 3)
        dom = make_guest(host=0)

The tests' lab has its own state directory (``.lab-test``, or ``$VIRTYARD_TEST_LAB``) and its own
ports (``$VIRTYARD_TEST_PORT_OFFSET`` shifts every port the tests use), so ``make test`` passes
while ``make demo`` runs. Two test runs side by side need offsets at least 100 apart: the
lab's services sit on neighbouring ports (agents at base+0, +1, +9; engines at +0, +1...).
After the session the lab is taken down and the run fails if anything was left behind.
"""

from __future__ import annotations

import itertools
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from virtyard.host.client import HostClient
from virtyard.lab import qga
from virtyard.lab.guest_vm import tiny_guest_xml
from virtyard.lab.iscsi_target import Chap, TargetInfo
from virtyard.lab.lab import Lab, LabConfig, leftovers

REPO = Path(__file__).resolve().parent.parent
# Every fixed port the tests use is shifted by this, so two test runs can share a machine.
PORT_OFFSET = int(os.environ.get("VIRTYARD_TEST_PORT_OFFSET", "0"))
MiB = 1 << 20

_counter = itertools.count(1)


def test_lab_dir() -> Path:
    return Path(os.environ.get("VIRTYARD_TEST_LAB", str(REPO / ".lab-test")))


test_lab_dir.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The tests' lab, up for the whole session (two hosts, tgtd, the tiny guest)."""
    existing = Lab.load(test_lab_dir())
    if existing is not None:  # a previous run died without cleaning up
        existing.down()
    the_lab = Lab(LabConfig.test(test_lab_dir()).shifted(PORT_OFFSET))
    try:
        the_lab.up()
        yield the_lab
    finally:
        the_lab.down()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if the lab left anything behind after going down."""
    found = leftovers(test_lab_dir())
    if found:
        print("\nthe test lab left things behind:\n  " + "\n  ".join(found))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _unique(request: pytest.FixtureRequest, kind: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:24]
    return f"{kind}-{base}-{next(_counter)}-{uuid.uuid4().hex[:4]}"


@pytest.fixture
def make_target(lab: Lab, request: pytest.FixtureRequest
                ) -> Iterator[Callable[..., TargetInfo]]:
    """Factory: a fresh target with LUNs of the given sizes, deleted after the test."""
    names: list[str] = []

    def make(lun_sizes: list[int], *, chap: Chap | None = None) -> TargetInfo:
        name = _unique(request, "t")
        names.append(name)
        return lab.storage.create_target(name, lun_sizes, chap=chap)

    yield make
    for name in names:
        lab.storage.delete_target(name)


def connect(lab: Lab, host: int) -> libvirt.virConnect:
    return libvirt.open(lab.hosts[host].uri)


@pytest.fixture
def make_guest(lab: Lab, request: pytest.FixtureRequest
               ) -> Iterator[Callable[..., libvirt.virDomain]]:
    """Factory: a booted tiny guest (agent answering) on lab host ``host``; removed after."""
    made: list[str] = []

    def make(host: int = 0, *, memory_mib: int = 256) -> libvirt.virDomain:
        name = _unique(request, "vm")
        dom_uuid = str(uuid.uuid4())
        made.append(dom_uuid)
        xml = tiny_guest_xml(name, dom_uuid, lab.guest_image, accelerator=lab.accelerator,
                             console_log=lab.console_dir / f"{name}.log",
                             memory_mib=memory_mib)
        conn = connect(lab, host)
        dom = conn.defineXML(xml)
        dom.create()
        qga.wait_ready(dom)
        return dom

    yield make
    for index in range(len(lab.hosts)):
        conn = connect(lab, index)
        for dom_uuid in made:
            try:
                dom = conn.lookupByUUIDString(dom_uuid)
            except libvirt.libvirtError:
                continue
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
        conn.close()


@pytest.fixture
def host_client(lab: Lab) -> Iterator[HostClient]:
    """A mutual-TLS JSON-RPC client to lab host 1's agent (the engine's certificate)."""
    with agent_client(lab, 0) as client:
        yield client


def agent_client(lab: Lab, index: int) -> HostClient:
    return lab.agent_client(index)


@pytest.fixture
def connect_target(lab: Lab, host_client: HostClient
                   ) -> Iterator[Callable[..., list[dict[str, Any]]]]:
    """Factory: connectStorageServer for a target (optionally with CHAP) on host ``host``
    (default: host 1); disconnected after the test."""
    made: list[tuple[HostClient, dict[str, Any]]] = []
    extra: list[HostClient] = []

    def connect(target: TargetInfo, *, user: str = "", password: str = "",
                conn_id: str | None = None, client: HostClient | None = None,
                host: int | None = None) -> list[dict[str, Any]]:
        if client is None and host is not None and host != 0:
            client = agent_client(lab, host)
            extra.append(client)
        client = client or host_client
        params = {"id": conn_id or str(uuid.uuid4()), "connection": target.address,
                  "port": target.port, "iqn": target.iqn, "user": user, "password": password}
        made.append((client, params))
        result: list[dict[str, Any]] = client.call(
            "StoragePool.connectStorageServer",
            {"domainType": 3, "connectionParams": [params]})
        return result

    yield connect
    for client, params in made:
        client.call("StoragePool.disconnectStorageServer",
                    {"domainType": 3, "connectionParams": [params]})
    for client in extra:
        client.close()
