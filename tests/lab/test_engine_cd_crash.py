"""The engine killed (``[debug] die_at``) in the middle of a CD change and of adding a storage
domain, then started again: recovery asks the host what the drive holds (what volume group
exists) and the database converges to it; the guest reads what the API says; the host keeps
exactly the volume the drive holds prepared — none that no drive holds.

Runs on the crash module's own engine (own port, own database), so killing it disturbs no
other test.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ovirtsdk4 as sdk4
import pytest
from engine_helpers import add_tiny_vm, domain_on, guest_cd_sha, make_iso, own_engine
from ovirtsdk4 import types
from test_engine_cdrom import add_domain, attach, iso_disk, iso_volume, prepared
from test_engine_crash import flow_rows, restart, wait_settled

from virtyard.lab import qga
from virtyard.lab.lab import Lab
from virtyard.lab.process import wait_until

pytestmark = pytest.mark.lab

MiB = 1 << 20
PORT_OFFSET = int(os.environ.get("VIRTYARD_TEST_PORT_OFFSET", "0"))
# This module's engines: clear of the session's (15540, 15541), the crash module's (15545,
# 15546) and PostgreSQL's (15532), with room for the port offsets of parallel runs.
CD_CRASH_PORTS = {"sqlite": 15550 + PORT_OFFSET, "postgresql": 15551 + PORT_OFFSET}


@pytest.fixture(scope="module")
def engine(engine: Any, lab: Lab, request: pytest.FixtureRequest) -> Iterator[Any]:
    """This module's own engine (killed and restarted at will)."""
    with own_engine(engine, lab, request, "cdcrash", CD_CRASH_PORTS[engine.kind]) as own:
        yield own


def die_in(engine: Any, die_at: str, method: str, path: str, body: str,
           **params: str) -> None:
    """Restart the engine with ``die_at`` armed and send the request: it dies there."""
    restart(engine, die_at)
    offset = engine.log_size()
    with pytest.raises(httpx.TransportError):
        answer = engine.request(method, path, token=engine.admin_token(), body=body.encode(),
                                params=params or None)
        pytest.fail(f"the engine answered instead of dying at {die_at}: "
                    f"{answer.status_code} {answer.text[:300]}")
    assert wait_until(lambda: not engine.process.is_running(), timeout=10)
    assert f"debug.die_at={die_at}: dying now" in engine.log_since(offset)
    assert flow_rows(engine), "the flow's row is the engine's memory of it"
    restart(engine)
    wait_settled(engine)
    logged = engine.log_since(offset)
    assert "Traceback" not in logged, logged[-4000:]


@pytest.fixture
def up_host(add_lab_host: Callable[..., types.Host],
            wait_host: Callable[..., types.Host]) -> types.Host:
    return wait_host(add_lab_host(0).id, types.HostStatus.UP)


@pytest.mark.parametrize(("die_at", "lands"), [("change_cd:proven", False),
                                               ("change_cd:changed", True)])
def test_engine_killed_in_a_cd_change(die_at: str, lands: bool, engine: Any,
                                      *, sdk: sdk4.Connection, lab: Lab, up_host: types.Host,
                                      make_target: Any, tmp_path: Path) -> None:
    system = sdk.system_service()
    target = make_target([64 * MiB])
    domain = add_domain(sdk, up_host, target)
    attach(sdk, domain.id)
    dc = system.data_centers_service().list(search="name=Default")[0]
    texts = [f"{n} {uuid.uuid4().hex}\n" for n in ("old", "new")]
    isos = [iso_disk(engine, lab, domain.id, dc.id, make_iso(tmp_path, t)) for t in texts]
    shas = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    vm = add_tiny_vm(sdk, lab, "cdcrash")
    vm_service = system.vms_service().vm_service(vm.id)
    cd_path = f"/vms/{vm.id}/cdroms/00000000-0000-0000-0000-000000000000"
    try:
        vm_service.start()
        dom = domain_on(lab, 0, vm.id)
        assert dom is not None
        qga.wait_ready(dom)
        cd = vm_service.cdroms_service().cdrom_service("00000000-0000-0000-0000-000000000000")
        cd.update(types.Cdrom(file=types.File(id=isos[0])), current=True)

        die_in(engine, die_at, "PUT", cd_path, f'<cdrom><file id="{isos[1]}"/></cdrom>',
               current="true")
        connection = engine.connect()
        try:
            cd = connection.system_service().vms_service().vm_service(vm.id) \
                .cdroms_service().cdrom_service("00000000-0000-0000-0000-000000000000")
            held = isos[1] if lands else isos[0]
            assert wait_until(lambda: cd.get(current=True).file.id == held, timeout=30)
            assert guest_cd_sha(dom) == shas[1 if lands else 0]
            volumes = [p["volumeID"] for p in prepared(lab, 0, domain.id)]
            assert volumes == [iso_volume(engine, held)]  # no other volume stays prepared
            # It obeys again: eject, stop; nothing stays prepared.
            cd.update(types.Cdrom(file=types.File(id="")), current=True)
            assert guest_cd_sha(dom) is None
            connection.system_service().vms_service().vm_service(vm.id).stop()
            assert prepared(lab, 0, domain.id) == []
        finally:
            connection.close()
    finally:
        remove_all(engine, vm.id, domain.id, up_host)


def remove_all(engine: Any, vm_id: str, domain_id: str, host: types.Host) -> None:
    """Whatever happened: the engine runs, the VM and the domain are gone (formatted)."""
    if engine.process.extra_config or not engine.process.is_running():
        restart(engine)
    wait_settled(engine)
    connection = engine.connect()
    try:
        system = connection.system_service()
        vm_service = system.vms_service().vm_service(vm_id)
        try:
            if vm_service.get().status != types.VmStatus.DOWN:
                vm_service.stop()
            vm_service.remove()
        except sdk4.NotFoundError:
            pass
        dcs = system.data_centers_service()
        dc = dcs.list(search="name=Default")[0]
        attached = dcs.data_center_service(dc.id).storage_domains_service() \
            .storage_domain_service(domain_id)
        try:
            if attached.get().status == types.StorageDomainStatus.ACTIVE:
                attached.deactivate()
            attached.remove()
        except sdk4.NotFoundError:
            pass
        with contextlib.suppress(sdk4.NotFoundError):
            system.storage_domains_service().storage_domain_service(domain_id).remove(
                host=host.name, format=True)
    finally:
        connection.close()


@pytest.mark.parametrize(("die_at", "made"), [("add_storage_domain:proven", False),
                                              ("add_storage_domain:created", True)])
def test_engine_killed_while_adding_a_domain(die_at: str, made: bool, engine: Any,
                                             *, sdk: sdk4.Connection, lab: Lab,
                                             up_host: types.Host, make_target: Any) -> None:
    target = make_target([32 * MiB])
    name = f"crash-{uuid.uuid4().hex[:6]}"
    body = (f"<storage_domain><name>{name}</name><type>data</type>"
            f"<host><name>{up_host.name}</name></host><storage><type>iscsi</type>"
            f"<volume_group><logical_units><logical_unit id=\"{target.wwid(1)}\">"
            f"<address>{target.address}</address><port>{target.port}</port>"
            f"<target>{target.iqn}</target></logical_unit></logical_units></volume_group>"
            "</storage></storage_domain>")
    die_in(engine, die_at, "POST", "/storagedomains", body)
    connection = engine.connect()
    try:
        found = connection.system_service().storage_domains_service().list(
            search=f"name={name}")
        # The host lets go of an unattached domain's target: log it in to look.
        connection.system_service().hosts_service().host_service(up_host.id).iscsi_login(
            iscsi=types.IscsiDetails(address=target.address, port=target.port,
                                     target=target.iqn))
        with lab.agent_client(0) as agent:
            on_host = {d["name"]: d["domainID"] for d in agent.call("StorageDomain.list")}
        if made:
            assert [d.status for d in found] == [types.StorageDomainStatus.UNATTACHED]
            assert on_host.get(name) == found[0].id
            connection.system_service().storage_domains_service().storage_domain_service(
                found[0].id).remove(host=up_host.name, format=True)
        else:
            assert found == [] and name not in on_host
        # Either way the LUN is free for a new domain now.
        again = add_domain(connection, up_host, target)
        connection.system_service().storage_domains_service().storage_domain_service(
            again.id).remove(host=up_host.name, format=True)
    finally:
        connection.close()

