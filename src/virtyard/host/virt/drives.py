"""Where a VM disk's bytes come from on this host: a LUN GUID becomes a libvirt disk source.

The engine names a LUN only by its WWID. On a kernel-initiator host that is the multipath
device ``/dev/mapper/<GUID>``; on a user-space host QEMU reaches the LUN itself over iSCSI,
at the portal, target and LUN number of this host's own connection (and CHAP credentials as
a libvirt secret, never in the domain XML). A LUN this host does not see is refused before
anything touches libvirt.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import libvirt
from lxml import etree

from virtyard.host.storage.initiator import Connection
from virtyard.host.virt.domain_xml import BlockSource, DiskDevice, IscsiSource, Source
from virtyard.host.virt.libvirt_conn import LibvirtConnection

if TYPE_CHECKING:
    from virtyard.host.agent import HostAgent

log = logging.getLogger("virtyard.host.virt.drives")


class DriveNotVisibleError(Exception):
    """This host does not see the LUN (or the volume) a disk names."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not visible on this host")
        self.what = what


class DriveResolver:
    """Resolves :class:`DiskDevice` storage names into sources for this host."""

    def __init__(self, agent: HostAgent, libvirt_conn: LibvirtConnection) -> None:
        self.agent = agent
        self.libvirt = libvirt_conn
        self._secrets_lock = threading.Lock()

    def visible(self, guids: list[str]) -> dict[str, bool]:
        """Which of these LUNs this host sees now (one rescan before a 'no')."""
        return self.agent.devices.visibility(guids) if guids else {}

    def resolve(self, device: DiskDevice, vm_id: str) -> Source | None:
        """The source of ``device`` of VM ``vm_id`` on this host (an image volume is prepared
        for that VM's drive); raises :class:`DriveNotVisibleError`."""
        if device.guid is not None:
            return self._lun_source(device.guid)
        if device.pdiv is not None:
            return self.agent.resolve_volume(device, vm_id)
        return None  # an empty CD-ROM tray

    def _lun_source(self, guid: str) -> Source:
        if not self.visible([guid]).get(guid):
            raise DriveNotVisibleError(f"LUN {guid}")
        if self.agent.initiator.kind == "kernel":
            return BlockSource.for_guid(guid)
        entries = self.agent.devices.listing(guids=frozenset([guid]), check_status=False,
                                             refresh=False)
        if not entries or not entries[0].device.paths:
            raise DriveNotVisibleError(f"LUN {guid}")
        path = entries[0].device.paths[0]
        conn = path.connection
        initiator = conn.initiator_name or self.agent.config.storage.initiator_name
        if conn.chap is None:
            return IscsiSource(conn.portal.host, conn.portal.port, conn.iqn, path.lun,
                               initiator=initiator)
        usage = self.ensure_chap_secret(conn)
        return IscsiSource(conn.portal.host, conn.portal.port, conn.iqn, path.lun,
                           auth_user=conn.chap.username, secret_usage=usage,
                           initiator=initiator)

    def ensure_chap_secret(self, connection: Connection) -> str:
        """A libvirt ``iscsi`` secret holding the connection's CHAP password; its usage id."""
        assert connection.chap is not None
        usage = f"virtyard-chap-{connection.id}"
        secret_xml = etree.Element("secret", ephemeral="no", private="yes")
        etree.SubElement(etree.SubElement(secret_xml, "usage", type="iscsi"),
                         "target").text = usage
        value = str(connection.chap.password).encode()
        with self._secrets_lock:
            def define(conn: libvirt.virConnect) -> None:
                try:
                    secret = conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, usage)
                except libvirt.libvirtError:
                    secret = conn.secretDefineXML(etree.tostring(secret_xml, encoding="unicode"))
                secret.setValue(value)
            self.libvirt.call(define)
        log.debug("CHAP secret %s ready", usage)
        return usage

