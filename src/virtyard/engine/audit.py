"""The audit log: what every command and the monitoring write (``events`` table).

Codes are oVirt's ``AuditLogType`` numbers where one exists, so tools that know oVirt's events
(e.g. waiting for event 97 after attaching a disk) read ours alike. Texts name objects, never
secrets: callers pass names and ids only.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from virtyard.engine.db.models import Event


@dataclass(frozen=True)
class EventType:
    code: int
    severity: str  # normal | warning | error | alert
    template: str


def _t(code: int, severity: str, template: str) -> EventType:
    return EventType(code, severity, template)


USER_LOGIN = _t(30, "normal", "User {user} logged in.")
USER_LOGOUT = _t(31, "normal", "User {user} logged out.")
USER_LOGIN_FAILED = _t(114, "error", "User {user} failed to log in.")
HOST_ADDED = _t(42, "normal", "Host {host} was added by {user}.")
HOST_REMOVED = _t(44, "normal", "Host {host} was removed by {user}.")
HOST_ACTIVATED = _t(16, "normal", "Host {host} was activated by {user}.")
HOST_MAINTENANCE = _t(600, "normal", "Host {host} was switched to Maintenance Mode by {user}.")
HOST_UP = _t(13, "normal", "Host {host} is up: its agent answers ({detail}).")
HOST_NOT_RESPONDING = _t(12, "error", "Host {host} is not responding: {detail}")
HOST_AGENT_RESTARTED = _t(9000, "warning", "The agent of host {host} restarted.")
HOST_UUID_CONFLICT = _t(9001, "error",
                        "Host {host} reports the hardware UUID of host {other}; it stays "
                        "non-responsive until that is resolved.")
USER_ADDED = _t(149, "normal", "User {name} was added.")
VM_ADDED = _t(34, "normal", "VM {vm} was created by {user}.")
VM_REMOVED = _t(113, "normal", "VM {vm} was successfully removed by {user}.")
VM_DISK_DETACHED = _t(2018, "normal",
                      "Disk {disk} was successfully detached from VM {vm} by {user}.")


@dataclass(frozen=True)
class Ids:
    """The objects an event is about."""

    host_id: str | None = None
    vm_id: str | None = None
    disk_id: str | None = None
    storage_domain_id: str | None = None


def record(tx: Session, kind: EventType, ids: Ids | None = None, *, user_id: str | None = None,
           user_name: str = "", correlation_id: str = "", **values: object) -> Event:
    """Add one event to the transaction ``tx`` (it commits with the change it describes)."""
    event = Event(code=kind.code, severity=kind.severity,
                  description=kind.template.format(**{"user": user_name or "the engine", **values}),
                  correlation_id=correlation_id, user_id=user_id, user_name=user_name,
                  host_id=ids.host_id if ids else None, vm_id=ids.vm_id if ids else None,
                  disk_id=ids.disk_id if ids else None,
                  storage_domain_id=ids.storage_domain_id if ids else None)
    tx.add(event)
    return event
# VM flows (oVirt's codes where they exist).
VM_STARTED = _t(153, "normal", "VM {vm} started on Host {host}.")
VM_START_FAILED = _t(54, "error", "Failed to run VM {vm}: {why}")
VM_STOPPED = _t(33, "normal", "VM {vm} powered off by {user}.")
VM_SHUT_DOWN = _t(73, "normal", "VM {vm} shut down by {user}.")
VM_MIGRATED = _t(62, "normal", "Migration of VM {vm} from {source} to {destination} completed.")
VM_MIGRATION_FAILED = _t(65, "error", "Migration of VM {vm} failed: {why}")
DISK_PLUGGED = _t(2002, "normal", "Disk {disk} was plugged into VM {vm} by {user}.")
DISK_UNPLUGGED = _t(2004, "normal", "Disk {disk} was unplugged from VM {vm} by {user}.")
DISK_PLUG_FAILED = _t(2003, "error", "Failed to plug disk {disk} into VM {vm}: {why}")
DISK_UNPLUG_FAILED = _t(2005, "error", "Failed to unplug disk {disk} from VM {vm}: {why}")
FLOW_RECOVERED = _t(9010, "warning",
                    "After an engine restart, {flow} was settled from the hosts: {outcome}.")
# Direct LUN.
ISCSI_DISCOVERED = _t(9020, "normal", "{count} iSCSI target(s) discovered at {portal} by {user}.")
ISCSI_LOGGED_IN = _t(9021, "normal", "Host {host} logged in to {target} at {portal} ({user}).")
DISK_ADDED = _t(2020, "normal", "LUN {wwid} was added as disk {disk} by {user}.")
DISK_REMOVED = _t(2014, "normal", "Disk {disk} was removed by {user}.")
DISK_ATTACHED = _t(2016, "normal", "Disk {disk} was attached to VM {vm} by {user}.")
DISK_DETACHED = _t(2018, "normal", "Disk {disk} was detached from VM {vm} by {user}.")
# Monitoring.
VM_DOWN = _t(119, "error", "VM {vm} is down: {reason}")
# Storage domains and the CD-ROM (oVirt's codes).
STORAGE_DOMAIN_ADDED = _t(956, "normal",
                          "Storage domain {domain} was added on LUN {wwid} by {user} "
                          "(through host {host}).")
STORAGE_DOMAIN_ADD_FAILED = _t(957, "error", "Failed to add storage domain {domain}: {why}")
STORAGE_DOMAIN_REMOVED = _t(960, "normal", "Storage domain {domain} was removed ({how}) by "
                            "{user}.")
STORAGE_DOMAIN_ATTACHED = _t(962, "normal",
                             "Storage domain {domain} was attached to the data center by {user}.")
STORAGE_DOMAIN_DETACHED = _t(964, "normal",
                             "Storage domain {domain} was detached from the data center by "
                             "{user}.")
STORAGE_DOMAIN_ACTIVATED = _t(966, "normal", "Storage domain {domain} was activated by {user}.")
STORAGE_DOMAIN_DEACTIVATED = _t(968, "normal",
                                "Storage domain {domain} was deactivated by {user}.")
CD_CHANGED = _t(38, "normal", "CD {disk} was inserted into VM {vm} by {user}.")
CD_EJECTED = _t(521, "normal", "The CD was ejected from VM {vm} by {user}.")
CD_CHANGE_FAILED = _t(39, "error", "Failed to change the CD of VM {vm}: {why}")
# High availability and power management (issue 13).
HA_VM_FAILED = _t(9602, "error", "Highly available VM {vm} failed ({reason}); it will be "
                  "restarted automatically.")
HA_VM_RESTART_TRY = _t(9604, "warning", "Restarting highly available VM {vm}: attempt "
                       "{attempt} of {max}.")
HA_VM_RESTARTED = _t(9605, "normal", "Highly available VM {vm} was restarted on host {host}.")
HA_VM_RESTART_RETRY = _t(9606, "warning", "Restart {attempt} of highly available VM {vm} "
                         "failed ({why}); next try in {delay:g} s.")
HA_VM_RESTART_FAILED = _t(9603, "error", "Highly available VM {vm} could not be restarted "
                          "automatically after {attempt} attempts: {why}")
HOST_FENCING = _t(9030, "warning", "Host {host} is not responding: powering it off "
                  "through its power management ({agents}).")
HOST_FENCED_OFF = _t(9031, "warning", "Host {host} is off ({how}); its VMs are down: "
                     "{vms}.")
HOST_FENCE_FAILED = _t(9032, "error", "Power {action} of host {host} failed: {why}")
HOST_POWER = _t(9033, "normal", "Host {host} power {action} by {user}: {state}.")
HOST_NEEDS_MANUAL_FENCE = _t(9034, "alert", "Host {host} is not responding and has no power "
                             "management: its VMs ({vms}) stay unknown and are not restarted "
                             "until an administrator confirms the host is off "
                             "(fence_type=manual).")
HOST_STALE_VM_DESTROYED = _t(9035, "warning", "Host {host} came back running VM {vm}, which "
                             "now {where}: that stale copy was destroyed before the host "
                             "returned to service.")
# ISO disks and image transfers (oVirt's codes where they exist).
ISO_DISK_ADDED = _t(2021, "normal", "ISO disk {disk} ({size} bytes) was added to storage domain "
                    "{domain} by {user}.")
TRANSFER_STARTED = _t(1031, "normal", "Image upload to disk {disk} was started by {user} "
                      "(host {host}).")
TRANSFER_SUCCEEDED = _t(1032, "normal", "Image upload to disk {disk} succeeded: {size} bytes "
                        "verified (sha256 {sha256}).")
TRANSFER_FAILED = _t(1033, "error", "Image upload to disk {disk} failed: {why}")
TRANSFER_CANCELLED = _t(1034, "warning", "Image upload to disk {disk} was cancelled: {why}")

VM_UPDATED = _t(35, "normal", "VM {vm} configuration was updated by {user}.")
