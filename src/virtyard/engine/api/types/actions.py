"""What actions carry (``<action>…</action>``): iSCSI details for discovery and login, the
targets found, the host of a migration, the VM of a start; and the reason a LUN is used.

Kept apart because these refer to types of several modules (hosts, VMs, LUNs).
"""

from __future__ import annotations

from virtyard.engine.api.types.base import BOOLEAN, INTEGER, STRING, Field, ListOf, struct
from virtyard.engine.api.types.common import ACTION
from virtyard.engine.api.types.disks import LOGICAL_UNIT
from virtyard.engine.api.types.hosts import HOST
from virtyard.engine.api.types.vms import VM

ISCSI_DETAILS = struct("iscsi_details", "An iSCSI target as discovery finds it and login "
                       "takes it.", [
    Field("address", STRING, "Portal address."), Field("port", INTEGER, "Portal port (3260)."),
    Field("target", STRING, "Target IQN."), Field("portal", STRING, "Portal group tag."),
    Field("username", STRING, "CHAP user name."),
    Field("password", STRING, "CHAP password. Write-only: accepted, never rendered."),
    Field("initiator", STRING), Field("serial", STRING), Field("vendor_id", STRING),
    Field("product_id", STRING), Field("lun_mapping", INTEGER), Field("size", INTEGER),
    Field("paths", INTEGER), Field("status", STRING), Field("volume_group_id", STRING),
    Field("storage_domain_id", STRING), Field("disk_id", STRING),
])

ACTION.add(
    Field("iscsi", ISCSI_DETAILS, "The target (discovery: address and port; login: and the "
                                  "target)."),
    Field("iscsi_targets", ListOf(STRING, "iscsi_target"),
          "Targets found by iscsidiscover.", read_only=True),
    Field("discovered_targets", ListOf(ISCSI_DETAILS, "iscsi_details"),
          "Targets found by discoveriscsi.", read_only=True),
    Field("host", HOST, "The destination of a migration."),
    Field("vm", VM, "Run options (placement_policy: the hosts to try, in order)."),
    Field("detach_only", BOOLEAN),
    Field("fence_type", STRING, "manual: the host is known to be off."),
)
LOGICAL_UNIT.add(Field("used_by", STRING, "Why the LUN is used: a disk (its alias), a storage "
                       "domain (its name), or what the host found on it (LVM PV, filesystem, "
                       "partition table).", read_only=True))
