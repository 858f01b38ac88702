"""Live migration between host agents, peer to peer.

The source agent asks the destination agent (``VM.migrationCreate``, over the same mutual TLS
the engine uses, with this host's own certificate) to check that it sees every LUN of the VM
and to re-resolve every disk source for itself (its initiator, its portal, its secrets); the
destination answers with the domain XML it wants. Only then does the source start libvirt's
peer-to-peer live migration with that XML. A destination that cannot see a LUN refuses, and the
VM stays where it is. The migration runs in the background; ``VM.migrateStatus`` follows it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import libvirt

from virtyard.host.client import ClientTls, HostCallError, HostClient, HostUnreachableError
from virtyard.host.rpc.errors import (
    MigrationError,
    MigrationInProgressError,
    PeerUnreachableError,
    VmCreateError,
)
from virtyard.host.virt.domain_xml import Domain, DomainDisk
from virtyard.host.virt.drives import DriveNotVisibleError
from virtyard.host.virt.vms import VmManager

if TYPE_CHECKING:
    from virtyard.host.config import HostConfig

log = logging.getLogger("virtyard.host.virt.migration")

MIGRATE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER)


@dataclass
class MigrationJob:
    """One outgoing migration, as ``VM.migrateStatus`` reports it."""

    vm_id: str
    destination: str
    status: str = "starting"  # starting | running | done | failed
    message: str = ""
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    progress: int = 0


def prepare_incoming(manager: VmManager, xml: str) -> str:
    """Destination side: every disk re-resolved here, or :class:`VmCreateError` naming the
    LUNs this host does not see. Returns the domain XML this host wants."""
    domain = Domain.from_xml(xml)
    disks: list[DomainDisk] = []
    invisible: list[str] = []
    for disk in domain.disks:
        try:
            disks.append(DomainDisk(disk.device, manager.drives.resolve(disk.device, domain.uuid)))
        except DriveNotVisibleError as exc:
            invisible.append(exc.what)
    if invisible:
        manager.release(domain.uuid)
        raise VmCreateError(f"destination does not see: {', '.join(invisible)}",
                            vmId=domain.uuid, invisible=invisible)
    if manager.libvirt.lookup(domain.uuid) is not None:
        raise VmCreateError(f"VM {domain.uuid} already exists on the destination",
                            vmId=domain.uuid)
    domain.disks = disks
    domain.channels = manager.channels(domain.uuid)  # this host's socket paths
    return domain.to_xml()


class Migrations:
    """Outgoing migrations of one agent."""

    def __init__(self, manager: VmManager, config: HostConfig) -> None:
        self.manager = manager
        self.config = config
        self._jobs: dict[str, MigrationJob] = {}
        self._lock = threading.Lock()

    def _tls(self) -> ClientTls:
        server = self.config.server
        return ClientTls(server.cert, server.key, server.ca)

    def start(self, vm_id: str, destination: str, *, timeout: float = 300.0) -> MigrationJob:
        """Check with the destination, then migrate in the background."""
        with self._lock:
            job = self._jobs.get(vm_id)
            if job is not None and job.status in ("starting", "running"):
                raise MigrationInProgressError(f"VM {vm_id} is already migrating", vmId=vm_id)
        dom = self.manager.domain(vm_id)
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_MIGRATABLE)
        try:
            with HostClient(destination, self._tls(), timeout=60) as peer:
                answer = peer.call("VM.migrationCreate", {"xml": xml})
        except HostUnreachableError as exc:
            raise PeerUnreachableError(f"destination {destination}: {exc}") from None
        except HostCallError as exc:
            raise MigrationError(f"destination {destination} refused: {exc.message}",
                                 vmId=vm_id, destinationCode=exc.code,
                                 **({"invisible": exc.data["invisible"]}
                                    if "invisible" in exc.data else {})) from None
        job = MigrationJob(vm_id, destination, status="running")
        with self._lock:
            self._jobs[vm_id] = job
        thread = threading.Thread(target=self._run, name=f"migrate-{vm_id}", daemon=True,
                                  args=(job, dom, answer["migrationUri"], answer["xml"],
                                        timeout))
        thread.start()
        return job

    def _run(self, job: MigrationJob, dom: libvirt.virDomain, uri: str, dest_xml: str,
             timeout: float) -> None:
        params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_xml}
        try:
            with self.manager.locks.hold([job.vm_id]):
                dom.migrateToURI3(uri, params, MIGRATE_FLAGS)
            job.status, job.progress = "done", 100
            self.manager.release(job.vm_id)  # its drives' holds moved with it
            log.info("VM %s migrated to %s in %.2fs", job.vm_id, job.destination,
                     time.monotonic() - job.started)
        except libvirt.libvirtError as exc:
            job.status, job.message = "failed", exc.get_error_message() or str(exc)
            log.warning("migration of %s to %s failed: %s", job.vm_id, job.destination,
                        job.message)
        finally:
            job.finished = time.monotonic()

    def status(self, vm_id: str) -> MigrationJob:
        """The last migration job of ``vm_id`` (with progress while it runs)."""
        with self._lock:
            job = self._jobs.get(vm_id)
        if job is None:
            raise MigrationError(f"no migration of VM {vm_id} is known", vmId=vm_id)
        if job.status == "running":
            try:
                info = self.manager.domain(vm_id).jobStats()
                total = int(info.get("memory_total", 0))
                remaining = int(info.get("memory_remaining", total))
                if total:
                    job.progress = max(0, min(99, 100 - remaining * 100 // total))
            except Exception:  # the VM may have just left; the thread sets the final status
                pass
        return job
