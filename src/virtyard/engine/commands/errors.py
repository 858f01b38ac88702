"""Stable error keys (oVirt's ``EngineMessage`` names where one exists) with their HTTP status.

A failed check raises :class:`CommandError` with a key; the REST layer turns it into oVirt's
fault (reason "Operation Failed", detail "[Cannot <action> <type>. <message>]") with the key's
status, and the key itself travels in the fault so scripts need not parse English.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorKey:
    key: str
    status: int
    message: str


class CommandError(Exception):
    """A command refused: which key, and the detail text built from it."""

    def __init__(self, error: ErrorKey, action: str, entity: str, **values: object) -> None:
        self.error = error
        self.message = error.message.format(**values) if values else error.message
        self.detail = f"[Cannot {action} {entity}. {self.message}]"
        super().__init__(f"{error.key}: {self.detail}")

    @property
    def status(self) -> int:
        return self.error.status

    @property
    def key(self) -> str:
        return self.error.key


def _k(key: str, status: int, message: str) -> ErrorKey:
    return ErrorKey(key, status, message)


# Permissions and existence.
NOT_AUTHORIZED = _k("USER_NOT_AUTHORIZED_TO_PERFORM_ACTION", 403,
                    "User is not authorized to perform this action.")
HOST_NOT_FOUND = _k("ACTION_TYPE_FAILED_HOST_NOT_EXIST", 404, "Host does not exist.")
CLUSTER_NOT_FOUND = _k("ACTION_TYPE_FAILED_CLUSTER_IS_NOT_VALID", 400,
                       "Cluster {name} does not exist.")
# Names and addresses.
NAME_ALREADY_USED = _k("ACTION_TYPE_FAILED_NAME_ALREADY_USED", 409,
                       "The name {name} is already in use, please choose a unique name and "
                       "try again.")
NAME_EMPTY = _k("ACTION_TYPE_FAILED_NAME_MAY_NOT_BE_EMPTY", 400, "The name may not be empty.")
NAME_INVALID = _k("ACTION_TYPE_FAILED_NAME_MAY_NOT_CONTAIN_SPECIAL_CHARS", 400,
                  "The name may contain only letters, digits, '_', '-' and '.', "
                  "at most {max} characters.")
HOST_SAME_ADDRESS = _k("ACTION_TYPE_FAILED_VDS_WITH_SAME_HOST_EXIST", 409,
                       "A host with the same address and port ({address}:{port}) already "
                       "exists.")
HOST_SAME_UUID = _k("ACTION_TYPE_FAILED_VDS_WITH_SAME_UUID_EXIST", 409,
                    "A host with the same hardware UUID already exists.")
HOST_ADDRESS_INVALID = _k("VDS_INVALID_SERVER_ADDRESS", 400,
                          "The address '{address}' is not a valid host name or IP address.")
PORT_INVALID = _k("VDS_INVALID_PORT", 400, "The port {port} is not between 1 and 65535.")
# Host status.
HOST_REMOVE_STATUS = _k("VDS_CANNOT_REMOVE_VDS_STATUS_ILLEGAL", 409,
                        "Host {name} is {status}; move it to maintenance first.")
HOST_REMOVE_HAS_VMS = _k("VDS_CANNOT_REMOVE_HOST_WITH_RUNNING_VMS", 409,
                         "Host {name} still runs VMs.")
HOST_ALREADY_UP = _k("VDS_ALREADY_UP", 409, "Host {name} is already up.")
HOST_ALREADY_MAINTENANCE = _k("VDS_CANNOT_MAINTENANCE_VDS_IS_IN_MAINTENANCE", 409,
                              "Host {name} is already in maintenance.")
HOST_MAINTENANCE_RUNNING_VMS = _k("VDS_CANNOT_MAINTENANCE_VDS_RUNNING_VMS", 409,
                                  "Host {name} runs {count} VM(s); stop or migrate them first.")
HOST_STATUS_ILLEGAL = _k("VDS_STATUS_ILLEGAL", 409, "Host {name} is {status}.")
# Generic input.
MISSING_PARAMETER = _k("ACTION_TYPE_FAILED_MISSING_PARAMETER", 400,
                       "The parameter {name} is required.")
# VMs.
VM_NOT_FOUND = _k("ACTION_TYPE_FAILED_VM_NOT_FOUND", 404, "VM does not exist.")
VM_IS_RUNNING = _k("ACTION_TYPE_FAILED_VM_IS_RUNNING", 409,
                   "VM {name} is {status}; stop it first.")
TEMPLATE_NOT_FOUND = _k("ACTION_TYPE_FAILED_TEMPLATE_DOES_NOT_EXIST", 400,
                        "Template {name} does not exist (only Blank does).")
PLACEMENT_HOST_NOT_FOUND = _k("ACTION_TYPE_FAILED_DEDICATED_VDS_DOES_NOT_EXIST", 400,
                              "Host {name} of the placement policy does not exist.")
PLACEMENT_HOST_OTHER_CLUSTER = _k("ACTION_TYPE_FAILED_DEDICATED_VDS_NOT_IN_SAME_CLUSTER", 400,
                                  "Host {name} of the placement policy is not in the VM's "
                                  "cluster.")
VM_MEMORY_INVALID = _k("ACTION_TYPE_FAILED_MEMORY_SIZE_IS_NOT_VALID", 400,
                       "The memory size must be between {min} and {max} MiB, in whole MiB.")
VM_CPU_INVALID = _k("ACTION_TYPE_FAILED_CPU_TOPOLOGY_IS_NOT_VALID", 400,
                    "CPU sockets, cores and threads must each be between 1 and {max}.")
VALUE_TOO_LONG = _k("ACTION_TYPE_FAILED_VALUE_TOO_LONG", 400,
                    "{name} is longer than {max} characters.")
HA_PRIORITY_INVALID = _k("ACTION_TYPE_FAILED_HA_PRIORITY_IS_NOT_VALID", 400,
                         "The high-availability priority must be between 0 and {max}.")

# Flows on running VMs (run, stop, migrate, hot-plug).
VM_IS_LOCKED = _k("ACTION_TYPE_FAILED_VM_IS_LOCKED", 409,
                  "Another operation on this VM is in progress; try again when it ends.")
VM_NOT_RUNNING = _k("ACTION_TYPE_FAILED_VM_IS_NOT_RUNNING", 409, "VM {name} is not running.")
VM_STATUS_ILLEGAL = _k("ACTION_TYPE_FAILED_VM_STATUS_ILLEGAL", 409,
                       "VM {name} is {status}.")
NO_HOST_TO_RUN = _k("SCHEDULING_ALL_HOSTS_FILTERED_OUT", 409,
                    "There is no host Up in the VM's cluster (or placement) to run VM {name}.")
RUN_FAILED = _k("ACTION_TYPE_FAILED_VM_RUN_FAILED", 409,
                "No host could run VM {name}: {why}")
LUN_WITHOUT_CONNECTION = _k("ACTION_TYPE_FAILED_DISK_LUN_ISCSI_MISSING_CONNECTION_PARAMS", 409,
                            "No storage connection reaches the LUN of disk(s) {disks}.")
VM_SHUTDOWN_TIMEOUT = _k("ACTION_TYPE_FAILED_VM_SHUTDOWN_TIMED_OUT", 409,
                         "VM {name} is still running: {why}")
HOST_CALL_FAILED = _k("ACTION_TYPE_FAILED_HOST_CALL", 409, "Host {name} failed: {why}")
HOST_INVALID_ID = _k("VDS_INVALID_SERVER_ID", 400, "The destination host does not exist.")
MIGRATION_TO_SAME_HOST = _k("ACTION_TYPE_FAILED_MIGRATION_TO_SAME_HOST", 409,
                            "The VM already runs on the destination host.")
DESTINATION_OTHER_CLUSTER = _k("ACTION_TYPE_FAILED_DESTINATION_HOST_NOT_IN_DESTINATION_CLUSTER",
                               409, "Host {name} is not in the VM's cluster.")
NO_HOST_TO_MIGRATE = _k("ACTION_TYPE_FAILED_NO_HOST_TO_MIGRATE", 409,
                        "There is no other host Up to migrate VM {name} to.")
MIGRATION_DEST_NOT_PROVEN = _k("ACTION_TYPE_FAILED_DESTINATION_CANNOT_SEE_LUNS", 409,
                               "Host {host} cannot be used: {why}")
MIGRATION_FAILED = _k("ACTION_TYPE_FAILED_MIGRATION_FAILED", 409,
                      "Migrating VM {name} to {host} failed: {why}")
DISK_NOT_ATTACHED = _k("ACTION_TYPE_FAILED_DISK_NOT_ATTACHED_TO_VM", 404,
                       "The disk is not attached to the VM.")
DISK_ALREADY_ACTIVE = _k("HOT_PLUG_DISK_IS_NOT_UNPLUGGED", 409, "Disk is already activated.")
DISK_ALREADY_INACTIVE = _k("HOT_UNPLUG_DISK_IS_NOT_PLUGGED", 409, "Disk is already deactivated.")
HOTPLUG_INTERFACE = _k("ACTION_TYPE_DISK_INTERFACE_UNSUPPORTED", 409,
                       "Disks on interface {iface} cannot be plugged into a running VM.")
LUN_NOT_VISIBLE_ON_HOST = _k("ACTION_TYPE_FAILED_DISK_LUN_INVALID", 409,
                             "The VM's host {host} does not reach the LUN: {why}")
HOTPLUG_FAILED = _k("ACTION_TYPE_FAILED_HOT_PLUG_DISK", 409, "The host refused: {why}")
HOTUNPLUG_FAILED = _k("ACTION_TYPE_FAILED_HOT_UNPLUG_DISK", 409, "The host refused: {why}")

# iSCSI discovery and login.
ISCSI_MISSING_PARAMS = _k("ACTION_TYPE_FAILED_DISK_LUN_ISCSI_MISSING_CONNECTION_PARAMS", 409,
                          "The iSCSI connection needs an address, a port and a target "
                          "(and a numeric portal group).")
ISCSI_TARGET_INVALID = _k("VALIDATION_STORAGE_CONNECTION_INVALID_IQN", 400,
                          "'{target}' is not an iSCSI name (iqn., eui. or naa.).")
ISCSI_DISCOVERY_FAILED = _k("ACTION_TYPE_FAILED_ISCSI_DISCOVERY", 409,
                            "Discovery at {portal} failed: {why}")
ISCSI_LOGIN_FAILED = _k("ACTION_TYPE_FAILED_STORAGE_SERVER_CONNECTION", 409,
                        "Logging in to {target} failed: {why}")
ISCSI_CHAP_FAILED = _k("ACTION_TYPE_FAILED_ISCSI_AUTHENTICATION", 401,
                       "The target {target} refused the CHAP credentials.")
# LUN disks and attachments.
DISK_NOT_FOUND = _k("ACTION_TYPE_FAILED_DISK_NOT_EXIST", 404, "The disk does not exist.")
LUN_ID_INVALID = _k("ACTION_TYPE_FAILED_DISK_LUN_HAS_NO_VALID_TYPE", 400,
                    "'{wwid}' is not a LUN id (WWID).")
LUN_ALREADY_USED_BY_DISK = _k("ACTION_TYPE_FAILED_DISK_LUN_IS_ALREADY_IN_USE", 409,
                              "The provided lun is used by another disk.")
LUN_USED_BY_STORAGE_DOMAIN = _k("ACTION_TYPE_FAILED_LUNS_ALREADY_PART_OF_STORAGE_DOMAINS", 409,
                                "The LUN {wwid} is part of a storage domain.")
LUN_NOT_VISIBLE = _k("ACTION_TYPE_FAILED_DISK_LUN_INVALID", 400,
                     "The provided LUN is not visible by the specified host, please check "
                     "storage server connectivity ({why}).")
SGIO_INVALID = _k("ACTION_TYPE_FAILED_SGIO_IS_NOT_VALID", 400,
                  "sgio must be filtered, unfiltered or disabled.")
SGIO_NEEDS_VIRTIO_SCSI = _k("ACTION_TYPE_FAILED_SGIO_REQUIRES_VIRTIO_SCSI", 409,
                            "SCSI pass-through needs the virtio_scsi interface.")
SGIO_IS_FILTERED = _k("ACTION_TYPE_FAILED_SGIO_IS_FILTERED", 409,
                      "SCSI reservation needs unfiltered SCSI pass-through.")
ISO_DISK_NOT_ATTACHABLE = _k("ACTION_TYPE_FAILED_ISO_DISK_CANNOT_BE_ATTACHED", 409,
                             "An ISO disk is loaded into the CD-ROM, not attached.")
INTERFACE_INVALID = _k("ACTION_TYPE_DISK_INTERFACE_UNSUPPORTED", 400,
                       "Interface {iface} is not supported (virtio, virtio_scsi, sata, ide).")
DISK_ALREADY_ATTACHED = _k("ACTION_TYPE_FAILED_DISK_ALREADY_ATTACHED", 409,
                           "The disk is already attached to this VM.")
NOT_SHAREABLE_DISK_ATTACHED = _k("ACTION_TYPE_FAILED_NOT_SHAREABLE_DISK_ALREADY_ATTACHED", 409,
                                 "The disk is not shareable and is already attached to a VM.")
DISK_BOOT_IN_USE = _k("ACTION_TYPE_FAILED_DISK_BOOT_IN_USE", 409,
                      "The VM already has a bootable disk.")
DISK_PLUGGED_TO_RUNNING_VM = _k("ACTION_TYPE_FAILED_DISK_PLUGGED_TO_RUNNING_VM", 409,
                                "Disk {disk} is plugged into a running VM; deactivate it "
                                "first.")
ATTACHMENT_PLUGGED_UPDATE = _k("ACTION_TYPE_FAILED_VM_IS_RUNNING", 409,
                               "The disk is plugged into a running VM; deactivate it to "
                               "change how it is attached.")
# Storage domains and the CD-ROM (oVirt's keys where they exist).
STORAGE_DOMAIN_NOT_FOUND = _k("ACTION_TYPE_FAILED_STORAGE_DOMAIN_NOT_EXIST", 404,
                              "Storage domain does not exist.")
DATA_CENTER_NOT_FOUND = _k("ACTION_TYPE_FAILED_STORAGE_POOL_NOT_EXIST", 404,
                           "Data center does not exist.")
NO_UP_HOST = _k("ACTION_TYPE_FAILED_NO_VDS_IN_POOL", 409, "There is no Up host to do it.")
STORAGE_DOMAIN_TYPE_UNSUPPORTED = _k("ACTION_TYPE_FAILED_STORAGE_DOMAIN_TYPE_ILLEGAL", 400,
                                     "Storage domain type {type} is not supported: data.")
STORAGE_TYPE_UNSUPPORTED = _k("ACTION_TYPE_FAILED_STORAGE_DOMAIN_STORAGE_TYPE_ILLEGAL", 400,
                              "Storage type {type} is not supported: iscsi.")
STORAGE_DOMAIN_ONE_LUN = _k("ACTION_TYPE_FAILED_STORAGE_DOMAIN_ONE_LUN", 400,
                            "A block storage domain here lives on exactly one LUN, not {count}.")
LUNS_USED_BY_DISKS = _k("ACTION_TYPE_FAILED_LUNS_ALREADY_USED_BY_DISKS", 409,
                        "The following LUNs are already used by DirectLUN disks: {luns}")
STORAGE_DOMAIN_LUN_NOT_FREE = _k("ACTION_TYPE_FAILED_STORAGE_DOMAIN_LUN_NOT_FREE", 409,
                                 "The LUN is not free: {why}.")
STORAGE_DOMAIN_STATUS_ILLEGAL = _k("ACTION_TYPE_FAILED_STORAGE_DOMAIN_STATUS_ILLEGAL2", 409,
                                   "The storage domain {name} is {status}.")
STORAGE_DOMAIN_USED_BY_VMS = _k("ACTION_TYPE_FAILED_STORAGE_DOMAIN_USED_BY_VMS", 409,
                                "Its ISO disks are the CD of VM(s) {vms}: eject them first.")
CDROM_NOT_FOUND = _k("ACTION_TYPE_FAILED_CDROM_NOT_EXIST", 404, "The VM has no such CD-ROM.")
ISO_NOT_FOUND = _k("ERROR_CANNOT_FIND_ISO_IMAGE_PATH", 400,
                   "Invalid ISO image path: {file} is not an ISO disk.")
ISO_STATUS_ILLEGAL = _k("ERROR_ISO_IMAGE_STATUS_ILLEGAL", 409,
                        "The ISO disk {disk} is {status}, not ok.")
ISO_DOMAIN_NOT_ACTIVE = _k("VM_CANNOT_RUN_FROM_CD_WITHOUT_ACTIVE_STORAGE_DOMAIN_ISO", 409,
                           "The ISO's storage domain {domain} is {status}, not active.")
CD_HOST_CANNOT_REACH = _k("ACTION_TYPE_FAILED_STORAGE_DOMAIN_NOT_REACHABLE_BY_HOST", 409,
                          "Host {host} does not reach the storage domain {domain}: {why}")
CHANGE_CD_FAILED = _k("ACTION_TYPE_FAILED_CHANGE_CD", 409,
                      "The host refused; the old CD stays in the drive: {why}")
# High availability and power management (issue 13).
HOST_NO_POWER_MANAGEMENT = _k("ACTION_TYPE_FAILED_PM_ENABLED_WITHOUT_AGENT", 409,
                              "Host {name} has no power management (no fence agent, or not "
                              "enabled).")
FENCE_FAILED = _k("VDS_FENCE_OPERATION_FAILED", 409, "Power {action} of host {name} failed: "
                  "{why}")
FENCE_TYPE_INVALID = _k("ACTION_TYPE_FAILED_INVALID_FENCE_TYPE", 400,
                        "fence_type {fence_type} is not one of manual, stop, start, restart, "
                        "status.")
FENCE_AGENT_INVALID = _k("ACTION_TYPE_FAILED_AGENT_NOT_SUPPORTED", 400, "{why}")
FENCE_AGENT_NOT_FOUND = _k("ACTION_TYPE_FAILED_FENCE_AGENT_NOT_FOUND", 404,
                           "The host has no such fence agent.")

# Image disks (ISO) and image transfers.
STORAGE_DOMAIN_MISSING = _k("ACTION_TYPE_FAILED_STORAGE_DOMAIN_NOT_SPECIFIED", 400,
                            "An image disk needs one storage domain (storage_domains).")
NO_HOST_REACHES_DOMAIN = _k("ACTION_TYPE_FAILED_NO_VDS_IN_POOL", 409,
                            "No host that is Up reaches storage domain {domain}.")
DISK_SIZE_ZERO = _k("ACTION_TYPE_FAILED_DISK_SIZE_ZERO", 400,
                    "The disk's provisioned_size must be more than zero bytes.")
DISK_MAX_SIZE_EXCEEDED = _k("ACTION_TYPE_FAILED_DISK_MAX_SIZE_EXCEEDED", 400,
                            "Disk exceeds maximum size of {max} bytes.")
DISK_ID_INVALID = _k("ACTION_TYPE_FAILED_INVALID_DISK_ID", 400,
                     "The disk id '{id}' is not a UUID.")
DISK_FORMAT_INVALID = _k("ACTION_TYPE_FAILED_DISK_FORMAT_NOT_SUPPORTED", 400,
                         "An ISO disk is raw, not {format}.")
DISK_CONTENT_UNSUPPORTED = _k("ACTION_TYPE_FAILED_DISK_CONTENT_TYPE_NOT_SUPPORTED", 400,
                              "Only ISO image disks (content_type iso) can be added to a "
                              "storage domain here.")
DISK_SPACE_LOW = _k("ACTION_TYPE_FAILED_DISK_SPACE_LOW_ON_STORAGE_DOMAIN", 409,
                    "Storage Domain {domain} has not enough free space: {why}")
VOLUME_CREATE_FAILED = _k("ACTION_TYPE_FAILED_CREATE_VOLUME", 409,
                          "Host {host} could not create the volume: {why}")
DISKS_LOCKED = _k("ACTION_TYPE_FAILED_DISKS_LOCKED", 409,
                  "Disk(s) {disk} are locked. Please try again in a few minutes.")
DISK_IS_CD = _k("ACTION_TYPE_FAILED_DISK_IS_IN_USE_AS_CDROM", 409,
                "ISO disk {disk} is in the CD-ROM of VM(s) {vms}; eject it first.")
VOLUME_REMOVE_FAILED = _k("ACTION_TYPE_FAILED_REMOVE_VOLUME", 409,
                          "Host {host} could not remove the volume of disk {disk}: {why}")
TRANSFER_NOT_FOUND = _k("ACTION_TYPE_FAILED_IMAGE_TRANSFER_NOT_EXIST", 404,
                        "The image transfer does not exist.")
TRANSFER_DISK_NOT_IMAGE = _k("ACTION_TYPE_FAILED_DISK_TYPE_NOT_SUPPORTED_FOR_TRANSFER", 409,
                             "Only image disks on a storage domain (ISO disks) can be "
                             "uploaded; disk {disk} is a {type} disk.")
TRANSFER_DIRECTION = _k("ACTION_TYPE_FAILED_IMAGE_TRANSFER_DIRECTION_NOT_SUPPORTED", 400,
                        "Only uploads are supported (direction upload).")
TRANSFER_DISK_ILLEGAL = _k("ACTION_TYPE_FAILED_DISK_IS_NOT_OK", 409,
                           "Disk {disk} is {status}; only an ok disk can be uploaded to.")
TRANSFER_DISK_HAS_CONTENT = _k("ACTION_TYPE_FAILED_DISK_ALREADY_HAS_CONTENT", 409,
                               "ISO disk {disk} already holds a verified image; remove it "
                               "and add a new disk to upload another.")
TRANSFER_PHASE_ILLEGAL = _k("ACTION_TYPE_FAILED_IMAGE_TRANSFER_PHASE_ILLEGAL", 409,
                            "The image transfer is {phase}.")
TRANSFER_HOST_INVALID = _k("ACTION_TYPE_FAILED_TRANSFER_HOST_CANNOT_REACH_DOMAIN", 409,
                           "Host {host} is not Up or does not reach the disk's storage "
                           "domain.")
TRANSFER_TIMEOUT_INVALID = _k("ACTION_TYPE_FAILED_INACTIVITY_TIMEOUT_OUT_OF_RANGE", 400,
                              "inactivity_timeout must be between 1 and {max} seconds.")
