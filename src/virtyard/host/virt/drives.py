"""Where a VM disk's bytes come from on this host: a LUN GUID becomes a libvirt disk source.

The engine names a LUN only by its WWID. On a kernel-initiator host that is the multipath
device ``/dev/mapper/<GUID>``; on a user-space host QEMU reaches the LUN itself over iSCSI,
at the portal, target and LUN number of this host's own connection (and CHAP credentials as
a libvirt secret, never in the domain XML). A LUN this host does not see is refused before
anything touches libvirt.
"""

from __future__ import annotations

import logging

from virtyard.host.rpc.errors import HostError
from virtyard.host.storage.devices import DeviceService
from virtyard.host.virt.disk_sources import BlockSource, IscsiSource, Source
from virtyard.host.virt.domain_xml import DiskDevice
from virtyard.host.virt.volume_sources import VolumeSources, drive_user

log = logging.getLogger("virtyard.host.virt.drives")


class DriveNotVisibleError(Exception):
    """This host does not see the LUN (or the volume) a disk names."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not visible on this host")
        self.what = what


class DriveResolver:
    """Resolves :class:`DiskDevice` storage names into sources for this host."""

    def __init__(self, devices: DeviceService, sources: VolumeSources, *,
                 initiator_kind: str, initiator_name: str) -> None:
        self.devices = devices
        self.sources = sources
        self.initiator_kind = initiator_kind
        self.initiator_name = initiator_name

    def visible(self, guids: list[str]) -> dict[str, bool]:
        """Which of these LUNs this host sees now (one rescan before a 'no')."""
        return self.devices.visibility(guids) if guids else {}

    def resolve(self, device: DiskDevice, vm_id: str) -> Source | None:
        """The source of ``device`` of VM ``vm_id`` on this host (an image volume is prepared
        for that VM's drive); raises :class:`DriveNotVisibleError`."""
        if device.guid is not None:
            return self._lun_source(device.guid)
        if device.pdiv is not None:
            try:
                return self.sources.prepare(device.pdiv, drive_user(vm_id, device.name),
                                            iso=device.device == "cdrom")
            except HostError as exc:
                raise DriveNotVisibleError(f"volume {device.pdiv} ({exc.message})") from None
        return None  # an empty CD-ROM tray

    def _lun_source(self, guid: str) -> Source:
        if not self.visible([guid]).get(guid):
            raise DriveNotVisibleError(f"LUN {guid}")
        if self.initiator_kind == "kernel":
            return BlockSource.for_guid(guid)
        entries = self.devices.listing(guids=frozenset([guid]), check_status=False,
                                       refresh=False)
        if not entries or not entries[0].device.paths:
            raise DriveNotVisibleError(f"LUN {guid}")
        path = entries[0].device.paths[0]
        conn = path.connection
        initiator = conn.initiator_name or self.initiator_name
        if conn.chap is None:
            return IscsiSource(conn.portal.host, conn.portal.port, conn.iqn, path.lun,
                               initiator=initiator)
        usage = self.sources.secrets.ensure(conn)
        return IscsiSource(conn.portal.host, conn.portal.port, conn.iqn, path.lun,
                           auth_user=conn.chap.username, secret_usage=usage,
                           initiator=initiator)
