"""Image volumes as libvirt disk sources, and the CHAP secrets sources refer to.

A VM start (:class:`~virtyard.host.virt.drives.DriveResolver`) and a CD change
(:mod:`virtyard.host.virt.cdrom`) both prepare a volume for one VM's drive and hand QEMU a
source for it; a VM that stops or leaves releases its holds. They share this piece, which
takes only the volume service, the connection registry and libvirt's secrets — not the
whole agent.
"""

from __future__ import annotations

import logging
import threading

import libvirt
from lxml import etree

from virtyard.host.rpc.errors import HostError, ImageFileNotFoundError
from virtyard.host.storage.connections import ConnectionRegistry
from virtyard.host.storage.initiator import Connection
from virtyard.host.storage.pdiv import Pdiv
from virtyard.host.storage.volumes import PreparedVolume, VolumeService
from virtyard.host.virt.disk_sources import BlockSource, IscsiSource, Source, StorageSlice
from virtyard.host.virt.libvirt_conn import LibvirtConnection

log = logging.getLogger("virtyard.host.virt.volume_sources")


def drive_user(vm_id: str, drive: str) -> str:
    """Who holds a prepared volume: one VM's one drive."""
    return f"{vm_id}:{drive}"


class ChapSecrets:
    """libvirt ``iscsi`` secrets holding connections' CHAP passwords (never in domain XML)."""

    def __init__(self, libvirt_conn: LibvirtConnection) -> None:
        self.libvirt = libvirt_conn
        self._lock = threading.Lock()

    def ensure(self, connection: Connection) -> str:
        """The secret for ``connection``'s CHAP password, defined or updated; its usage id."""
        assert connection.chap is not None
        usage = f"virtyard-chap-{connection.id}"
        secret_xml = etree.Element("secret", ephemeral="no", private="yes")
        etree.SubElement(etree.SubElement(secret_xml, "usage", type="iscsi"),
                         "target").text = usage
        value = str(connection.chap.password).encode()
        with self._lock:
            def define(conn: libvirt.virConnect) -> None:
                try:
                    secret = conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, usage)
                except libvirt.libvirtError:
                    secret = conn.secretDefineXML(etree.tostring(secret_xml, encoding="unicode"))
                secret.setValue(value)
            self.libvirt.call(define)
        log.debug("CHAP secret %s ready", usage)
        return usage


class VolumeSources:
    """Prepared image volumes as the sources through which QEMU reads them."""

    def __init__(self, volumes: VolumeService, connections: ConnectionRegistry,
                 secrets: ChapSecrets, *, initiator_name: str) -> None:
        self.volumes = volumes
        self.connections = connections
        self.secrets = secrets
        self.initiator_name = initiator_name

    def source_of(self, prepared: PreparedVolume) -> Source:
        """The libvirt source through which QEMU reads a prepared volume."""
        slice_ = (StorageSlice(prepared.offset, prepared.size)
                  if prepared.offset is not None else None)
        if prepared.disk_type == "network":
            usage = None
            if prepared.chap_user:
                connection = self.connections.get(prepared.connection_id)
                if connection is None or connection.chap is None:
                    raise ImageFileNotFoundError(f"no CHAP connection {prepared.connection_id} "
                                                 "for the volume's LUN")
                usage = self.secrets.ensure(connection)
            return IscsiSource(prepared.host, prepared.port, prepared.iqn, prepared.lun,
                               auth_user=prepared.chap_user or None, secret_usage=usage,
                               slice=slice_, initiator=self.initiator_name)
        return BlockSource(prepared.path, slice=slice_)

    def prepare(self, pdiv: Pdiv, user: str, *, iso: bool = False) -> Source:
        """Prepare ``pdiv`` for ``user`` (one VM's drive) and give its source; a
        :class:`HostError` when the volume cannot be reached."""
        return self.source_of(self.volumes.prepare(pdiv, user, iso=iso))

    def release(self, vm_id: str) -> None:
        """Drop every hold VM ``vm_id`` has on image volumes (it stopped or left this host)."""
        prefix = f"{vm_id}:"
        for prepared in self.volumes.prepared():
            for user in prepared.users:
                if user.startswith(prefix):
                    try:
                        self.volumes.teardown(prepared.pdiv, user)
                    except HostError as exc:
                        log.warning("releasing %s for %s failed: %s", prepared.pdiv, user, exc)
