"""VMs, the Blank template, and the small values a VM is made of.

Beside what the engine stores (name, memory, CPU topology, OS and direct kernel boot, high
availability, placement hosts, cluster), a VM description carries every element the oVirt SDK
writes for a ``Vm``: the codec refuses unknown elements, and an SDK script that sets, say,
``memory_policy`` must not fail on that. Such fields are documented "accepted, not used".
"""

from __future__ import annotations

from virtyard.engine.api.types.base import (
    BOOLEAN,
    DATE,
    INTEGER,
    REGISTRY,
    STRING,
    Enum,
    Field,
    Link,
    ListOf,
    Type,
    identified,
    register,
    struct,
)
from virtyard.engine.api.types.common import IDENTIFIED_REF_FIELDS, VERSION
from virtyard.engine.api.types.hosts import CLUSTER, CPU, EVENT, HOST

UNUSED = "Accepted for compatibility, not used."


def ref(tag: str, doc: str, collection: str | None = None) -> Type:
    """An identified type other modules may own: the registered one if it exists already
    (so one tag is one description), else a minimal one (id, name, description, comment)."""
    existing = REGISTRY.get(tag)
    if existing is not None:
        return existing
    t = Type(tag, doc, list(IDENTIFIED_REF_FIELDS), identified=True, collection=collection)
    register(t)
    return t


def _unused(tag: str, doc: str, fields: list[Field]) -> Type:
    return struct(tag, f"{doc} {UNUSED}", fields)


VM_STATUS = Enum("vm_status", (
    "down", "image_locked", "migrating", "not_responding", "paused", "powering_down",
    "powering_up", "reboot_in_progress", "restoring_state", "saving_state", "suspended",
    "unassigned", "unknown", "up", "wait_for_launch"))
VM_TYPE = Enum("vm_type", ("desktop", "high_performance", "server"))
BOOT_DEVICE = Enum("boot_device", ("cdrom", "hd", "network"))
VM_AFFINITY = Enum("vm_affinity", ("migratable", "pinned", "user_migratable"))
INHERITABLE_BOOLEAN = Enum("inheritable_boolean", ("false", "inherit", "true"))

# The Cpu description is shared with hosts; a VM's adds what the SDK writes for one.
CPU.add(
    Field("architecture", Enum("architecture", (
        "aarch64", "loongarch64", "ppc64", "s390x", "undefined", "x86_64"))),
    Field("mode", Enum("cpu_mode", ("custom", "host_model", "host_passthrough")), UNUSED),
    Field("level", INTEGER, UNUSED),
)

BOOT = struct("boot", "Boot order.", [
    Field("devices", ListOf(BOOT_DEVICE, "device"), "Devices in boot order.")])

OPERATING_SYSTEM = struct("operating_system", "The guest OS and direct kernel boot.", [
    Field("type", STRING, "OS type (e.g. rhel_9x64, other)."),
    Field("kernel", STRING, "Kernel image path for direct kernel boot."),
    Field("initrd", STRING, "Initial ramdisk path for direct kernel boot."),
    Field("cmdline", STRING, "Kernel command line for direct kernel boot."),
    Field("custom_kernel_cmdline", STRING, UNUSED),
    Field("reported_kernel_cmdline", STRING, read_only=True),
    Field("description", STRING, UNUSED),
    Field("boot", BOOT),
    Field("version", VERSION, UNUSED),
])

HIGH_AVAILABILITY = struct("high_availability", "Restart the VM elsewhere if its host fails.", [
    Field("enabled", BOOLEAN), Field("priority", INTEGER, "Higher restarts first.")])

PLACEMENT_POLICY = struct("vm_placement_policy", "Where the VM may run.", [
    Field("affinity", VM_AFFINITY, UNUSED),
    Field("hosts", ListOf(HOST, "host"), "Preferred hosts, the first one first (by id or name)."),
])

TEMPLATE = ref("template", "A template VMs are made from (only Blank exists).", "templates")
INSTANCE_TYPE = ref("instance_type", f"An instance type. {UNUSED}")
CPU_PROFILE = ref("cpu_profile", f"A CPU profile. {UNUSED}")
QUOTA = ref("quota", f"A quota. {UNUSED}")
VM_POOL = ref("vm_pool", f"A VM pool. {UNUSED}")
MIGRATION_POLICY = ref("migration_policy", f"A migration policy. {UNUSED}")
STORAGE_DOMAIN = ref("storage_domain", "A storage domain (an LVM VG on a LUN).",
                     "storagedomains")

BIOS = _unused("bios", "Firmware.", [
    Field("type", Enum("bios_type", ("cluster_default", "i440fx_sea_bios", "q35_ovmf",
                                     "q35_sea_bios", "q35_secure_boot"))),
    Field("boot_menu", struct("boot_menu", "Boot menu.", [Field("enabled", BOOLEAN)]))])
CONSOLE = _unused("console", "Serial console.", [Field("enabled", BOOLEAN)])
DISPLAY = _unused("display", "Graphical console.", [
    Field("type", Enum("display_type", ("spice", "vnc"))), Field("address", STRING),
    Field("port", INTEGER), Field("secure_port", INTEGER), Field("monitors", INTEGER),
    Field("allow_override", BOOLEAN), Field("copy_paste_enabled", BOOLEAN),
    Field("disconnect_action", STRING), Field("disconnect_action_delay", INTEGER),
    Field("file_transfer_enabled", BOOLEAN), Field("keyboard_layout", STRING),
    Field("proxy", STRING), Field("single_qxl_pci", BOOLEAN), Field("smartcard_enabled", BOOLEAN),
    Field("video_type", Enum("video_type", ("bochs", "cirrus", "qxl", "vga")))])
IO = _unused("io", "I/O threads.", [Field("threads", INTEGER)])
ICON = Type("icon", f"An icon. {UNUSED}", [
    *IDENTIFIED_REF_FIELDS, Field("data", STRING), Field("media_type", STRING)])
register(ICON)
LEASE = _unused("storage_domain_lease", "A VM lease.", [Field("storage_domain", STORAGE_DOMAIN)])
MEMORY_POLICY = _unused("memory_policy", "Memory guarantees.", [
    Field("ballooning", BOOLEAN), Field("guaranteed", INTEGER), Field("max", INTEGER),
    Field("over_commit", struct("memory_over_commit", "Overcommit.", [
        Field("percent", INTEGER)])),
    Field("transparent_hugepages", struct("transparent_huge_pages", "THP.", [
        Field("enabled", BOOLEAN)]))])
MIGRATION = _unused("migration_options", "Migration tuning.", [
    Field("auto_converge", INHERITABLE_BOOLEAN), Field("compressed", INHERITABLE_BOOLEAN),
    Field("encrypted", INHERITABLE_BOOLEAN), Field("custom_parallel_migrations", INTEGER),
    Field("parallel_migrations_policy", Enum("parallel_migrations_policy", (
        "auto", "auto_parallel", "custom", "disabled", "inherit"))),
    Field("policy", MIGRATION_POLICY),
    Field("bandwidth", struct("migration_bandwidth", "Migration bandwidth.", [
        Field("assignment_method", Enum("migration_bandwidth_assignment_method", (
            "auto", "custom", "hypervisor_default"))),
        Field("custom_value", INTEGER)]))])
SERIAL_NUMBER = _unused("serial_number", "The SMBIOS serial.", [
    Field("policy", Enum("serial_number_policy", ("custom", "host", "none", "vm"))),
    Field("value", STRING)])
METHOD = Type("method", "A single sign-on method.", [], identified=True)
register(METHOD)
SSO = _unused("sso", "Single sign-on.", [Field("methods", ListOf(METHOD, "method"))])
TIME_ZONE = _unused("time_zone", "The guest's clock.", [
    Field("name", STRING), Field("utc_offset", STRING)])
USB = _unused("usb", "USB.", [Field("enabled", BOOLEAN),
                              Field("type", Enum("usb_type", ("legacy", "native")))])
VIRTIO_SCSI = _unused("virtio_scsi", "The virtio-scsi controller.", [Field("enabled", BOOLEAN)])
RNG_DEVICE = _unused("rng_device", "Random number generator.", [
    Field("source", Enum("rng_source", ("hwrng", "random", "urandom"))),
    Field("rate", struct("rate", "Rate limit.", [Field("bytes", INTEGER),
                                                  Field("period", INTEGER)]))])
CUSTOM_PROPERTY = _unused("custom_property", "A custom property.", [
    Field("name", STRING), Field("regexp", STRING), Field("value", STRING)])

_VM_COMMON = [
    Field("status", VM_STATUS, "down, up, ...", read_only=True),
    Field("status_detail", STRING, read_only=True),
    Field("stop_reason", STRING, read_only=True),
    Field("memory", INTEGER, "Bytes of memory (default 1 GiB)."),
    Field("cpu", CPU, "CPU topology (sockets, cores, threads)."),
    Field("os", OPERATING_SYSTEM),
    Field("high_availability", HIGH_AVAILABILITY),
    Field("placement_policy", PLACEMENT_POLICY),
    Field("cluster", CLUSTER, "The cluster, by id or name (default: Default)."),
    Field("template", TEMPLATE, "Only Blank (the default) exists."),
    Field("host", HOST, "The host the VM runs on.", read_only=True),
    Field("stateless", BOOLEAN, "Always false here; accepted for compatibility."),
    Field("type", VM_TYPE, "Always server here; accepted for compatibility."),
    Field("creation_time", DATE, read_only=True),
    Field("start_time", DATE, read_only=True),
    Field("stop_time", DATE, read_only=True),
    Field("origin", STRING, read_only=True),
    Field("fqdn", STRING, read_only=True),
    Field("run_once", BOOLEAN, read_only=True),
    Field("has_illegal_images", BOOLEAN, read_only=True),
    Field("next_run_configuration_exists", BOOLEAN, read_only=True),
    Field("guest_time_zone", TIME_ZONE, read_only=True),
]

_VM_UNUSED = [
    Field(name, kind, UNUSED) for name, kind in (
        ("custom_cpu_model", STRING), ("custom_emulated_machine", STRING),
        ("cpu_shares", INTEGER), ("migration_downtime", INTEGER),
        ("virtio_scsi_multi_queues", INTEGER), ("delete_protected", BOOLEAN),
        ("multi_queues_enabled", BOOLEAN), ("soundcard_enabled", BOOLEAN),
        ("start_paused", BOOLEAN), ("tpm_enabled", BOOLEAN), ("tunnel_migration", BOOLEAN),
        ("use_latest_template_version", BOOLEAN), ("virtio_scsi_multi_queues_enabled", BOOLEAN),
        ("auto_pinning_policy", Enum("auto_pinning_policy", ("adjust", "disabled",
                                                             "existing"))),
        ("cpu_pinning_policy", Enum("cpu_pinning_policy", (
            "dedicated", "isolate_threads", "manual", "none", "resize_and_pin_numa"))),
        ("numa_tune_mode", Enum("numa_tune_mode", ("interleave", "preferred", "strict"))),
        ("storage_error_resume_behaviour", Enum("vm_storage_error_resume_behaviour", (
            "auto_resume", "kill", "leave_paused"))),
        ("bios", BIOS), ("console", CONSOLE), ("cpu_profile", CPU_PROFILE),
        ("custom_compatibility_version", VERSION),
        ("custom_properties", ListOf(CUSTOM_PROPERTY, "custom_property")),
        ("display", DISPLAY), ("instance_type", INSTANCE_TYPE), ("io", IO),
        ("large_icon", ICON), ("small_icon", ICON), ("lease", LEASE),
        ("memory_policy", MEMORY_POLICY), ("migration", MIGRATION),
        ("original_template", TEMPLATE), ("quota", QUOTA), ("rng_device", RNG_DEVICE),
        ("serial_number", SERIAL_NUMBER), ("sso", SSO), ("storage_domain", STORAGE_DOMAIN),
        ("time_zone", TIME_ZONE), ("usb", USB), ("virtio_scsi", VIRTIO_SCSI),
        ("vm_pool", VM_POOL))
]

VM = identified("vm", "A virtual machine: its definition and what it does now.",
                [*_VM_COMMON, *_VM_UNUSED], collection="vms")
# The disk attachments and CD-ROMs are sub-collections (links); the lists are read from a
# request too, so that the add can refuse them by name rather than as unknown elements.
VM.add_links(Link("diskattachments", "disk_attachments", "disk_attachment"),
             Link("cdroms", "cdroms", "cdrom"))

# The Blank template is a VM definition too: the same fields, its own status values.
TEMPLATE.add(
    Field("status", Enum("template_status", ("illegal", "locked", "ok")), read_only=True),
    *[f for f in _VM_COMMON if f.name in ("memory", "cpu", "os", "high_availability",
                                          "cluster", "stateless", "type", "creation_time",
                                          "origin")],
)
if TEMPLATE.collection is None:
    TEMPLATE.collection = "templates"

EVENT.add(Field("vm", VM, "The VM the event is about."),
          Field("template", TEMPLATE, read_only=True),
          Field("storage_domain", STORAGE_DOMAIN, "The storage domain the event is about."))
