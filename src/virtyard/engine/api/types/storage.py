"""Block storage domains: an LVM volume group on one SAN LUN, holding ISO volumes.

The ``storage_domain`` tag is declared early (``vms.STORAGE_DOMAIN``, referred to by disks and
events); this module completes that one description, so one tag stays one type. What the SDK
writes when it adds an iSCSI data domain (``add_iscsi_data_storage_domain.py``) is accepted;
fields that have no meaning for a block domain here are documented "accepted, not used".
"""

from __future__ import annotations

from virtyard.engine.api.types.base import BOOLEAN, INTEGER, Enum, Field, ListOf
from virtyard.engine.api.types.disks import HOST_STORAGE
from virtyard.engine.api.types.hosts import DATA_CENTER, HOST
from virtyard.engine.api.types.vms import STORAGE_DOMAIN, UNUSED

STORAGE_DOMAIN_TYPE = Enum("storage_domain_type", (
    "data", "export", "image", "iso", "managed_block_storage", "volume"))
STORAGE_DOMAIN_STATUS = Enum("storage_domain_status", (
    "activating", "active", "detaching", "inactive", "locked", "maintenance", "mixed",
    "preparing_for_maintenance", "unattached", "unknown"))
STORAGE_FORMAT = Enum("storage_format", ("v1", "v2", "v3", "v4", "v5"))

STORAGE_DOMAIN.add(
    Field("type", STORAGE_DOMAIN_TYPE, "data (a block domain holding ISO disks)."),
    Field("status", STORAGE_DOMAIN_STATUS,
          "unattached, active (attached to a data center, its hosts connected), "
          "maintenance, locked (being created).", read_only=True),
    Field("storage", HOST_STORAGE, "iscsi, and the volume group's one LUN (by WWID, with "
          "the target that reaches it)."),
    Field("host", HOST, "The host that creates (or formats) the domain.", read_only=False),
    Field("data_center", DATA_CENTER, "The data center it is attached to.", read_only=True),
    Field("data_centers", ListOf(DATA_CENTER, "data_center"), read_only=True),
    Field("master", BOOLEAN, "Always false: there is no master domain here.", read_only=True),
    Field("storage_format", STORAGE_FORMAT, "v5."),
    Field("available", INTEGER, "Free bytes, as last reported.", read_only=True),
    Field("used", INTEGER, "Used bytes, as last reported.", read_only=True),
    Field("committed", INTEGER, read_only=True),
    *[Field(name, kind, UNUSED) for name, kind in (
        ("wipe_after_delete", BOOLEAN), ("discard_after_delete", BOOLEAN),
        ("supports_discard", BOOLEAN), ("supports_discard_zeroes_data", BOOLEAN),
        ("backup", BOOLEAN), ("import", BOOLEAN), ("block_size", INTEGER),
        ("warning_low_space_indicator", INTEGER), ("critical_space_action_blocker", INTEGER))],
)
