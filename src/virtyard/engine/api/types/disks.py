"""Disks (direct LUNs, ISO images), their attachments to VMs, the LUNs and the storage that
reaches them, and the CD-ROM.

A LUN disk's ``lun_storage`` and its one logical unit carry the LUN's WWID as id, as oVirt's.
Passwords (CHAP) are write-only: accepted in requests, never put in a model, so never rendered.
Deprecated VM-side disk fields (``interface``, ``bootable``, ``read_only`` on a disk) are
accepted as oVirt's are; the attachment holds them.
"""

from __future__ import annotations

from virtyard.engine.api.types.base import (
    BOOLEAN,
    INTEGER,
    STRING,
    Enum,
    Field,
    ListOf,
    Type,
    identified,
    register,
)
from virtyard.engine.api.types.common import PROPERTIES
from virtyard.engine.api.types.hosts import EVENT, HOST
from virtyard.engine.api.types.vms import (
    INSTANCE_TYPE,
    QUOTA,
    STORAGE_DOMAIN,
    TEMPLATE,
    UNUSED,
    VM,
    ref,
)

DISK_INTERFACE = Enum("disk_interface", ("ide", "sata", "spapr_vscsi", "virtio", "virtio_scsi"))
STORAGE_TYPE = Enum("storage_type", (
    "cinder", "fcp", "glance", "glusterfs", "iscsi", "localfs", "managed_block_storage", "nfs",
    "posixfs"))
LUN_STATUS = Enum("lun_status", ("free", "unusable", "used"))
DISK_STORAGE_TYPE = Enum("disk_storage_type", ("cinder", "image", "lun",
                                               "managed_block_storage"))
DISK_CONTENT_TYPE = Enum("disk_content_type", (
    "backup_scratch", "data", "hosted_engine", "hosted_engine_configuration",
    "hosted_engine_metadata", "hosted_engine_sanlock", "iso", "memory_dump_volume",
    "memory_metadata_volume", "ovf_store"))
DISK_STATUS = Enum("disk_status", ("illegal", "locked", "ok"))
SGIO = Enum("scsi_generic_io", ("disabled", "filtered", "unfiltered"))
DISK_FORMAT = Enum("disk_format", ("cow", "raw"))
NEVER_RENDERED = "Write-only: accepted in requests, never rendered."

LOGICAL_UNIT = Type("logical_unit", "A SAN LUN, by its WWID (the id), and how it is reached.", [
    Field("address", STRING, "The target portal's address."),
    Field("port", INTEGER, "The target portal's port (3260)."),
    Field("target", STRING, "The target's IQN."),
    Field("portal", STRING, "The portal group tag."),
    Field("username", STRING, "CHAP user name."),
    Field("password", STRING, f"CHAP password. {NEVER_RENDERED}"),
    Field("serial", STRING, read_only=True),
    Field("vendor_id", STRING, read_only=True),
    Field("product_id", STRING, read_only=True),
    Field("lun_mapping", INTEGER, "The LUN number on its target.", read_only=True),
    Field("size", INTEGER, "Bytes.", read_only=True),
    Field("paths", INTEGER, read_only=True),
    Field("active_paths", INTEGER, read_only=True),
    Field("status", LUN_STATUS, "free, used (by a disk or a storage domain), unusable.",
          read_only=True),
    Field("volume_group_id", STRING, read_only=True),
    Field("storage_domain_id", STRING, read_only=True),
    Field("disk_id", STRING, read_only=True),
    Field("discard_max_size", INTEGER, "Bytes one discard may cover (0: none).",
          read_only=True),
    Field("discard_zeroes_data", BOOLEAN, "Deprecated: always false.", read_only=True),
], identified=True, plural="logical_units")
register(LOGICAL_UNIT)

VOLUME_GROUP = Type("volume_group", "An LVM volume group on LUNs.", [
    Field("name", STRING), Field("logical_units", ListOf(LOGICAL_UNIT, "logical_unit"))],
    identified=True)
register(VOLUME_GROUP)

HOST_STORAGE = identified("host_storage", "Storage as a host sees it: for a LUN disk, the LUN "
                          "(id = WWID) and the connection that reaches it.", [
    Field("type", STORAGE_TYPE, "iscsi or fcp."),
    Field("address", STRING), Field("port", INTEGER), Field("target", STRING),
    Field("portal", STRING), Field("username", STRING),
    Field("password", STRING, f"CHAP password. {NEVER_RENDERED}"),
    Field("logical_units", ListOf(LOGICAL_UNIT, "logical_unit")),
    Field("host", HOST, "The host that checks the LUN is visible."),
    Field("volume_group", VOLUME_GROUP),
    Field("override_luns", BOOLEAN),
    *[Field(name, kind, UNUSED) for name, kind in (
        ("path", STRING), ("mount_options", STRING), ("vfs_type", STRING),
        ("nfs_version", Enum("nfs_version", ("auto", "v3", "v4", "v4_0", "v4_1", "v4_2"))),
        ("nfs_timeo", INTEGER), ("nfs_retrans", INTEGER), ("driver_options", PROPERTIES),
        ("driver_sensitive_options", PROPERTIES))],
])

DISK_PROFILE = ref("disk_profile", f"A disk profile. {UNUSED}")

DISK = identified("disk", "A disk: a direct LUN, or an image (e.g. an ISO) on a storage "
                  "domain.", [
    Field("alias", STRING, "The disk's name."),
    Field("storage_type", DISK_STORAGE_TYPE, "lun or image."),
    Field("content_type", DISK_CONTENT_TYPE, "data, or iso for a CD image."),
    Field("status", DISK_STATUS, read_only=True),
    Field("shareable", BOOLEAN, "May be attached to several VMs at once."),
    Field("sgio", SGIO, "SCSI passthrough: filtered or unfiltered (LUN disks only)."),
    Field("lun_storage", HOST_STORAGE, "The LUN of a LUN disk."),
    Field("provisioned_size", INTEGER, "Bytes (a LUN disk: the LUN's size)."),
    Field("actual_size", INTEGER, read_only=True),
    Field("total_size", INTEGER, read_only=True),
    Field("initial_size", INTEGER, UNUSED),
    Field("format", DISK_FORMAT, "raw (images here are raw)."),
    Field("sparse", BOOLEAN),
    Field("image_id", STRING, read_only=True),
    Field("storage_domain", STORAGE_DOMAIN, "Where an image disk lives."),
    Field("storage_domains", ListOf(STORAGE_DOMAIN, "storage_domain")),
    Field("wipe_after_delete", BOOLEAN),
    Field("propagate_errors", BOOLEAN),
    Field("uses_scsi_reservation", BOOLEAN, "Deprecated here: see the attachment."),
    Field("logical_name", STRING, "Deprecated here: see the attachment.", read_only=True),
    Field("interface", DISK_INTERFACE, "Deprecated: see the attachment."),
    Field("bootable", BOOLEAN, "Deprecated: see the attachment."),
    Field("read_only", BOOLEAN, "Deprecated: see the attachment."),
    Field("active", BOOLEAN, "Deprecated: see the attachment."),
    Field("vm", VM, read_only=True),
    Field("vms", ListOf(VM, "vm"), "The VMs the disk is attached to.", read_only=True),
    Field("template", TEMPLATE, read_only=True),
    *[Field(name, kind, UNUSED) for name, kind in (
        ("backup", Enum("disk_backup", ("incremental", "none"))),
        ("backup_mode", Enum("disk_backup_mode", ("full", "incremental"))),
        ("qcow_version", Enum("qcow_version", ("qcow2_v2", "qcow2_v3"))),
        ("external_disk", STRING), ("disk_profile", DISK_PROFILE), ("quota", QUOTA),
        ("instance_type", INSTANCE_TYPE))],
], collection="disks")

DISK_ATTACHMENT = identified("disk_attachment", "A disk attached to a VM (id = the disk's id).", [
    Field("active", BOOLEAN, "Plugged into the VM."),
    Field("bootable", BOOLEAN),
    Field("interface", DISK_INTERFACE, "virtio_scsi, virtio, ..."),
    Field("pass_discard", BOOLEAN),
    Field("read_only", BOOLEAN),
    Field("uses_scsi_reservation", BOOLEAN),
    Field("logical_name", STRING, "The guest's name for the disk (e.g. /dev/sdb), once known.",
          read_only=True),
    Field("disk", DISK),
    Field("vm", VM, read_only=True),
    Field("template", TEMPLATE, read_only=True),
])

FILE = identified("file", "A file on a storage domain: here an ISO disk (id = the disk's id).", [
    Field("type", STRING), Field("content", STRING, UNUSED),
    Field("storage_domain", STORAGE_DOMAIN),
])

CDROM = identified("cdrom", "The VM's CD-ROM drive (one per VM, id 00000000-…-000000000000).", [
    Field("file", FILE, "The ISO in the drive; absent when empty."),
    Field("vm", VM, read_only=True),
    Field("vms", ListOf(VM, "vm"), read_only=True),
    Field("template", TEMPLATE, read_only=True),
    Field("instance_type", INSTANCE_TYPE, UNUSED),
])

# Followed inline (follow=disk_attachments), and read from a request so that adding a VM can
# refuse them by name.
VM.add(Field("disk_attachments", ListOf(DISK_ATTACHMENT, "disk_attachment"),
             "Rendered with follow=disk_attachments; attach with POST .../diskattachments."),
       Field("cdroms", ListOf(CDROM, "cdrom"), "Rendered with follow=cdroms."))

EVENT.add(Field("disk", DISK, "The disk the event is about."))
