"""Settling the storage flows an engine crash left open (see ``recovery.py``): adding a
storage domain, and changing a VM's CD.

* A domain being added: the host that was asked says whether the volume group exists; if it
  does the domain is ``unattached`` (as if the flow had finished), else its rows go.
* A CD change: the VM's host says what the drive holds now (the agent's change is atomic and
  recovered at its own start); the database takes that as the VM's current CD.
A host that cannot be asked leaves the flow for the next round.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from sqlalchemy import delete

from virtyard.engine import audit
from virtyard.engine.commands.cd_media import CDROM_ID, held_volume, iso_of_volume
from virtyard.engine.commands.flow import flow_data
from virtyard.engine.commands.storage_domains import forget_domain
from virtyard.engine.db.models import Flow, StorageDomain, VmDevice, VmDynamic
from virtyard.engine.hosts import connections as conns
from virtyard.engine.hosts import vm_spec
from virtyard.engine.hosts.pool import HostCallError, HostUnreachableError

NO_SUCH_VM = 1


class HostUnsureError(Exception):
    """The host that must answer did not."""


async def settle_add_domain(recovery: Any, flow: Flow) -> list[str]:
    """The hosts whose pins changed."""
    domain_id = str(flow_data(flow).get("domain", ""))
    host = recovery._hosts([flow.host_id or ""]).get(flow.host_id or "")
    exists = False
    if host is not None:
        try:
            found = await recovery.pool.call(host, "StorageDomain.list", timeout=60)
        except (HostCallError, HostUnreachableError) as exc:
            raise HostUnsureError(f"{host.address}: {exc}") from exc
        exists = any(isinstance(d, dict) and d.get("domainID") == domain_id for d in found)

    def settle() -> list[str]:
        with recovery.db.transaction() as tx:
            domain = tx.get(StorageDomain, domain_id)
            if domain is not None and exists:
                domain.status = "unattached"
                touched = conns.drop_owner(tx, conns.domain_work_owner(domain_id))
                outcome = f"storage domain {domain.name} exists (done)"
            else:
                touched = forget_domain(tx, domain_id)
                outcome = "no storage domain was made (undone)"
            audit.record(tx, audit.FLOW_RECOVERED, audit.Ids(storage_domain_id=None),
                         correlation_id=flow.correlation_id, flow=flow.kind, outcome=outcome)
            tx.execute(delete(Flow).where(Flow.id == flow.id))
            return touched

    result: list[str] = await anyio.to_thread.run_sync(settle)
    return result


async def settle_change_cd(recovery: Any, flow: Flow) -> list[str]:
    """The CD the drive holds becomes the VM's current CD."""
    vm_id = flow.vm_id or ""
    host = recovery._hosts([flow.host_id or ""]).get(flow.host_id or "")
    definition: Any = None
    if host is not None:
        try:
            listed = await recovery.pool.call(host, "Host.getVMFullList", {"vmList": [vm_id]},
                                              timeout=30)
        except (HostCallError, HostUnreachableError) as exc:
            raise HostUnsureError(f"{host.address}: {exc}") from exc
        definition = next((v for v in listed if isinstance(v, dict)
                           and v.get("vmId") == vm_id), None) if isinstance(listed, list) \
            else None

    def settle() -> list[str]:
        with recovery.db.transaction() as tx:
            row = tx.get(VmDevice, (CDROM_ID, vm_id))
            place = vm_spec.DiskPlace.loads(row.address) if row is not None else None
            held = held_volume(definition, vm_spec.CD_IFACE, place.index) \
                if definition is not None and place is not None else None
            dynamic = tx.get(VmDynamic, vm_id)
            if held is None:
                outcome = "the VM does not run there; monitoring settles it"
            else:
                iso = iso_of_volume(tx, held)
                if dynamic is not None:
                    dynamic.current_cd = iso
                outcome = f"the drive holds {iso or 'nothing'}"
            asked = flow_data(flow).get("file") or "an eject"
            audit.record(tx, audit.FLOW_RECOVERED, audit.Ids(vm_id=vm_id),
                         correlation_id=flow.correlation_id, flow=flow.kind,
                         outcome=f"{outcome} (asked for {asked})")
            tx.execute(delete(Flow).where(Flow.id == flow.id))
        return []

    result: list[str] = await anyio.to_thread.run_sync(settle)
    return result


SETTLERS = {"add_storage_domain": settle_add_domain, "change_cd": settle_change_cd}
