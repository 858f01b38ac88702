"""Hosts, the clusters and data centers they belong to, users, and events."""

from __future__ import annotations

from virtyard.engine.api.types.base import (
    BOOLEAN,
    DATE,
    INTEGER,
    STRING,
    Enum,
    Field,
    identified,
    struct,
)
from virtyard.engine.api.types.common import VERSION

HOST_STATUS = Enum("host_status", (
    "connecting", "down", "error", "initializing", "install_failed", "installing",
    "installing_os", "kdumping", "maintenance", "non_operational", "non_responsive",
    "pending_approval", "preparing_for_maintenance", "reboot", "unassigned", "up"))

DATA_CENTER = identified("data_center", "A data center: hosts, clusters, storage.", [
    Field("local", BOOLEAN), Field("status", Enum("data_center_status", (
        "contend", "maintenance", "not_operational", "problematic", "uninitialized", "up")),
        read_only=True),
    Field("storage_format", STRING), Field("version", VERSION),
], collection="datacenters")

CLUSTER = identified("cluster", "A group of hosts VMs can move between.", [
    Field("data_center", DATA_CENTER), Field("version", VERSION),
], collection="clusters")

USER = identified("user", "An engine user.", [
    Field("domain_entry_id", STRING), Field("namespace", STRING),
    Field("principal", STRING), Field("user_name", STRING, "name@domain"),
    Field("department", STRING), Field("email", STRING), Field("last_name", STRING),
], collection="users")

CPU_TOPOLOGY = struct("topology", "CPU layout.", [
    Field("cores", INTEGER), Field("sockets", INTEGER), Field("threads", INTEGER)])
CPU = struct("cpu", "A CPU model and layout.", [
    Field("name", STRING), Field("speed", INTEGER), Field("topology", CPU_TOPOLOGY),
    Field("type", STRING)])
HARDWARE = struct("hardware_information", "What the host's hardware says of itself.", [
    Field("family", STRING), Field("manufacturer", STRING), Field("product_name", STRING),
    Field("serial_number", STRING), Field("uuid", STRING), Field("version", STRING)])
ISCSI_INITIATOR = struct("iscsi", "The host's iSCSI initiator.", [Field("initiator", STRING)])
SSH = struct("ssh", "SSH access (accepted for compatibility; the agent uses mutual TLS).", [
    Field("port", INTEGER), Field("fingerprint", STRING), Field("user", STRING),
    Field("authentication_method", STRING), Field("public_key", STRING)])
SUMMARY = struct("vm_summary", "How many VMs run on the host.", [
    Field("active", INTEGER), Field("migrating", INTEGER), Field("total", INTEGER)])

HOST = identified("host", "A hypervisor host, managed through its agent over mutual TLS.", [
    Field("address", STRING, "The agent's address (name or IP)."),
    Field("port", INTEGER, "The agent's port (default 54321)."),
    Field("status", HOST_STATUS, "up, non_responsive, maintenance, ...", read_only=True),
    Field("status_detail", STRING, "Why the host has its status.", read_only=True),
    Field("cluster", CLUSTER, "The cluster (Default unless given)."),
    Field("cpu", CPU, read_only=True),
    Field("memory", INTEGER, "Bytes of memory.", read_only=True),
    Field("hardware_information", HARDWARE, read_only=True),
    Field("iscsi", ISCSI_INITIATOR, read_only=True),
    Field("libvirt_version", VERSION, read_only=True),
    Field("version", VERSION, "The agent's version.", read_only=True),
    Field("summary", SUMMARY, read_only=True),
    Field("type", Enum("host_type", ("ovirt_node", "rhel", "rhev_h")), read_only=True),
    Field("root_password", STRING, "Accepted for compatibility, never stored."),
    Field("ssh", SSH, "Accepted for compatibility, never used."),
    Field("override_iptables", BOOLEAN, "Accepted for compatibility, never used."),
    Field("spm", struct("spm", "Storage pool manager role.", [
        Field("priority", INTEGER), Field("status", STRING)]), read_only=True),
], collection="hosts")

SEVERITY = Enum("log_severity", ("alert", "error", "normal", "warning"))

EVENT = identified("event", "One audit-log entry: a change, who made it, what it touched.", [
    Field("code", INTEGER, "What happened (oVirt's audit log type numbers where they exist)."),
    Field("severity", SEVERITY), Field("time", DATE),
    Field("correlation_id", STRING), Field("origin", STRING), Field("custom_id", INTEGER),
    Field("flood_rate", INTEGER), Field("log_on_host", BOOLEAN),
    Field("user", USER), Field("host", HOST), Field("cluster", CLUSTER),
    Field("data_center", DATA_CENTER),
], collection="events")
