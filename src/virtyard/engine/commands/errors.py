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
