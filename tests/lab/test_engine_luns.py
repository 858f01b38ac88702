"""Direct LUN through the engine, storage side: discover, log in, list LUNs with why they are
used, add LUN disks (the vDisk rule, races, refusals) — driven by the official SDK on the real
lab and engine, on SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import json
import uuid
from collections.abc import Callable
from typing import Any

import ovirtsdk4 as sdk4
import pytest
from ovirtsdk4 import types

from virtyard.lab.iscsi_target import TargetInfo
from virtyard.lab.lab import Lab

pytestmark = pytest.mark.lab

MiB = 1 << 20


@pytest.fixture
def up_host(add_lab_host: Callable[..., types.Host],
            wait_host: Callable[..., types.Host]) -> types.Host:
    host = add_lab_host(0)
    return wait_host(host.id, types.HostStatus.UP)


def lun_disk(target: TargetInfo, lun: int, *, alias: str | None = None,
             host: types.Host | None = None, shareable: bool | None = None) -> types.Disk:
    unit = types.LogicalUnit(id=target.wwid(lun), address=target.address, port=target.port,
                             target=target.iqn)
    return types.Disk(alias=alias, shareable=shareable, lun_storage=types.HostStorage(
        type=types.StorageType.ISCSI, logical_units=[unit], host=host))


def test_discover_login_list_and_reasons(engine: Any, sdk: sdk4.Connection, lab: Lab,
                                         up_host: types.Host, make_target: Any) -> None:
    target = make_target([64 * MiB, 64 * MiB, 64 * MiB])
    hosts = sdk.system_service().hosts_service()
    host_service = hosts.host_service(up_host.id)
    iscsi = types.IscsiDetails(address=target.address, port=target.port)
    found = host_service.iscsi_discover(iscsi=iscsi)
    assert target.iqn in found
    details = host_service.discover_iscsi(iscsi=iscsi)
    assert any(d.target == target.iqn and d.port == target.port for d in details)

    host_service.iscsi_login(iscsi=types.IscsiDetails(address=target.address, port=target.port,
                                                      target=target.iqn))
    # LUN 3 becomes a block storage domain behind the engine's back; LUN 1 a disk of ours.
    with lab.agent_client(0) as agent:
        agent.call("StorageDomain.create", {"domainID": str(uuid.uuid4()),
                                            "guid": target.wwid(3), "name": "sd-test"})
    disk = sdk.system_service().disks_service().add(lun_disk(target, 1, alias="lun-one",
                                                             host=up_host))
    assert disk.alias == "lun-one" and disk.lun_storage.logical_units[0].id == target.wwid(1)
    assert disk.lun_storage.logical_units[0].size == 64 * MiB

    storage = {s.id: s for s in host_service.storage_service().list()}
    units = {w: storage[w].logical_units[0] for w in (target.wwid(n) for n in (1, 2, 3))}
    assert units[target.wwid(1)].status == types.LunStatus.USED
    assert units[target.wwid(1)].disk_id == disk.id
    assert units[target.wwid(2)].status == types.LunStatus.FREE
    assert units[target.wwid(3)].status == types.LunStatus.USED
    assert units[target.wwid(2)].size == 64 * MiB and units[target.wwid(2)].paths == 1
    raw = engine.get_json(f"/hosts/{up_host.id}/storage")["host_storage"]
    reasons = {s["id"]: s["logical_units"]["logical_unit"][0].get("used_by") for s in raw}
    assert reasons[target.wwid(1)] == "disk lun-one"
    assert reasons[target.wwid(3)].startswith("storage domain")
    assert reasons[target.wwid(2)] is None
    fast = {s.id for s in host_service.storage_service().list(report_status=False)}
    assert set(units) <= fast


def test_lun_disk_rules(engine: Any, sdk: sdk4.Connection, up_host: types.Host,
                        make_target: Any) -> None:
    target = make_target([32 * MiB, 32 * MiB])
    disks = sdk.system_service().disks_service()
    first = disks.add(lun_disk(target, 1))
    assert first.alias == target.wwid(1)  # the alias defaults to the WWID
    # The vDisk rule: the same WWID with nothing that disagrees is the same disk.
    assert disks.add(lun_disk(target, 1)).id == first.id
    assert disks.add(lun_disk(target, 1, alias=target.wwid(1), shareable=False)).id == first.id
    with pytest.raises(sdk4.Error) as err:
        disks.add(lun_disk(target, 1, alias="another-name"))
    assert err.value.code == 409 and "used by another disk" in str(err.value)
    with pytest.raises(sdk4.Error) as err:
        disks.add(lun_disk(target, 1, shareable=True))
    assert err.value.code == 409
    # Not visible on the host given (the host never logged in to this target).
    other = make_target([32 * MiB])
    with pytest.raises(sdk4.Error) as err:
        disks.add(lun_disk(other, 1, host=up_host))
    assert err.value.code == 400 and "not visible" in str(err.value)
    # Missing connection details: oVirt's key, 409.
    with pytest.raises(sdk4.Error) as err:
        disks.add(types.Disk(lun_storage=types.HostStorage(
            type=types.StorageType.ISCSI,
            logical_units=[types.LogicalUnit(id=target.wwid(2))])))
    assert err.value.code == 409
    disks.disk_service(first.id).remove()
    assert disks.add(lun_disk(target, 1, alias="again")).alias == "again"


def test_twenty_concurrent_adds_of_one_wwid_leave_one_disk(engine: Any, make_target: Any
                                                           ) -> None:
    target = make_target([16 * MiB])
    alias = f"raced-{uuid.uuid4().hex[:8]}"
    body = {"alias": alias, "lun_storage": {"type": "iscsi", "logical_units": {
        "logical_unit": [{"id": target.wwid(1), "address": target.address,
                          "port": target.port, "target": target.iqn}]}}}
    token = engine.admin_token()

    def add(_: int) -> tuple[int, str]:
        answer = engine.request("POST", "/disks", token=token, flavor="json",
                                body=json.dumps(body).encode())
        return answer.status_code, answer.json().get("id", "")

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(add, range(20)))
    assert {code for code, _ in results} <= {200, 201}, results
    assert len({disk_id for _, disk_id in results}) == 1
    listed = engine.get_json("/disks", params={"search": f"name={alias}"}).get("disk", [])
    assert len(listed) == 1
