"""The engine's tables (SQLAlchemy 2), after oVirt's schema where it fits.

Rules the database itself enforces (not only the commands), so that no race can break them:

- names of hosts, VMs, storage domains and clusters are unique; a host's agent address is unique;
- a LUN has at most one user: ``luns.disk_id`` (unique) or ``luns.storage_domain_id``, never
  both (a CHECK). This one row replaces oVirt's ``disk_lun_map`` so the "one disk per LUN, one
  storage domain per LUN, never both" rule is a constraint rather than a convention;
- a storage server connection is stored once per distinct target details (unique);
- a non-shareable disk is attached to at most one VM: ``disk_vm_element.exclusive_disk_id`` is
  the disk id for non-shareable disks and NULL for shareable ones, and it is unique.

Ids are UUID strings (36 characters) so SQLite and PostgreSQL store them alike; events have an
integer id that grows, as oVirt's audit log does (clients page with ``from=``).
"""

from __future__ import annotations

import datetime
import uuid

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

ID = String(36)


class UtcDateTime(TypeDecorator[datetime.datetime]):
    """A timestamp that is always timezone-aware UTC (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime.datetime | None,
                           dialect: Dialect) -> datetime.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value

    def process_result_value(self, value: datetime.datetime | None,
                             dialect: Dialect) -> datetime.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value

# The rows migration 0001 creates (oVirt has a "Default" data center and cluster too).
DEFAULT_DATA_CENTER_ID = "00000002-0002-0002-0002-000000000001"
DEFAULT_CLUSTER_ID = "00000003-0003-0003-0003-000000000001"


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Base(DeclarativeBase):
    """All tables; ``Base.metadata`` is what Alembic migrations are checked against.

    Constraint names follow one convention on every database, so a violated constraint reported
    by SQLite (by columns) or PostgreSQL (by name) maps back to the same table and columns.
    """

    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class DataCenter(Base):
    __tablename__ = "data_centers"
    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    description: Mapped[str] = mapped_column(String(4000), default="")


class Cluster(Base):
    __tablename__ = "clusters"
    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    description: Mapped[str] = mapped_column(String(4000), default="")
    data_center_id: Mapped[str] = mapped_column(ForeignKey("data_centers.id"))


class Host(Base):
    """A hypervisor host, reached through its agent at ``address:port`` over mutual TLS."""

    __tablename__ = "hosts"
    __table_args__ = (UniqueConstraint("address", "port", name="uq_hosts_agent"),)
    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    description: Mapped[str] = mapped_column(String(4000), default="")
    comment: Mapped[str] = mapped_column(String(4000), default="")
    address: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    cluster_id: Mapped[str] = mapped_column(ForeignKey("clusters.id"))
    # installing | connecting | up | non_responsive | maintenance | preparing_for_maintenance
    status: Mapped[str] = mapped_column(String(32), default="installing")
    status_detail: Mapped[str] = mapped_column(String(1000), default="")
    # What the agent told us (Host.getCapabilities); empty until first contact.
    host_uuid: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)
    iscsi_initiator_name: Mapped[str] = mapped_column(String(255), default="")
    cpu_cores: Mapped[int] = mapped_column(Integer, default=0)
    cpu_model: Mapped[str] = mapped_column(String(255), default="")
    memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    libvirt_version: Mapped[str] = mapped_column(String(64), default="")
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    agent_started_at: Mapped[float] = mapped_column(default=0.0)
    # Power management (fencing): the engine may power the host off through its fence agents.
    pm_enabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    last_seen: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime(),
                                                                default=None)
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(),
                                                          default=utcnow)


class Vm(Base):
    """A VM's definition (oVirt's vm_static); what it does right now lives in :class:`VmDynamic`."""

    __tablename__ = "vms"
    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    description: Mapped[str] = mapped_column(String(4000), default="")
    comment: Mapped[str] = mapped_column(String(4000), default="")
    cluster_id: Mapped[str] = mapped_column(ForeignKey("clusters.id"))
    memory_bytes: Mapped[int] = mapped_column(BigInteger, default=1 << 30)
    cpu_sockets: Mapped[int] = mapped_column(Integer, default=1)
    cpu_cores: Mapped[int] = mapped_column(Integer, default=1)
    cpu_threads: Mapped[int] = mapped_column(Integer, default=1)
    os_type: Mapped[str] = mapped_column(String(64), default="other")
    kernel: Mapped[str] = mapped_column(String(4000), default="")
    initrd: Mapped[str] = mapped_column(String(4000), default="")
    cmdline: Mapped[str] = mapped_column(String(4000), default="")
    ha_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    ha_priority: Mapped[int] = mapped_column(Integer, default=1)
    # The CD for the next run: an ISO disk id, or "" for an empty drive.
    iso_path: Mapped[str] = mapped_column(String(255), default="")
    # Bumped on every change of the VM's devices in the database (oVirt's db_generation).
    generation: Mapped[int] = mapped_column(BigInteger, default=1)
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(),
                                                          default=utcnow)


class VmPlacementHost(Base):
    """The VM's preferred hosts in order (placement_policy.hosts): first is preferred."""

    __tablename__ = "vm_placement_hosts"
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"),
                                       primary_key=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"),
                                         primary_key=True)
    position: Mapped[int] = mapped_column(Integer)


class VmDynamic(Base):
    """What a VM does now, written by flows and monitoring (oVirt's vm_dynamic)."""

    __tablename__ = "vm_dynamic"
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"),
                                       primary_key=True)
    status: Mapped[str] = mapped_column(String(32), default="down")
    run_on_host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id"), default=None,
                                                       index=True)
    migrating_to_host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id"),
                                                             default=None)
    current_cd: Mapped[str] = mapped_column(String(255), default="")
    # The host's devices hash last read with a full device list (monitoring).
    devices_hash: Mapped[str] = mapped_column(String(128), default="")
    exit_reason: Mapped[str] = mapped_column(String(1000), default="")
    status_changed_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(),
                                                                 default=utcnow)


class BaseDisk(Base):
    """A disk: a direct LUN (storage_type "lun") or an image on a storage domain (e.g. an ISO)."""

    __tablename__ = "base_disks"
    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    alias: Mapped[str] = mapped_column(String(255), index=True)
    description: Mapped[str] = mapped_column(String(4000), default="")
    shareable: Mapped[bool] = mapped_column(Boolean, default=False)
    # filtered | unfiltered | "" (no SCSI passthrough)
    sgio: Mapped[str] = mapped_column(String(16), default="")
    storage_type: Mapped[str] = mapped_column(String(16))  # image | lun
    content_type: Mapped[str] = mapped_column(String(32), default="data")  # data | iso
    wipe_after_delete: Mapped[bool] = mapped_column(Boolean, default=False)
    propagate_errors: Mapped[bool] = mapped_column(Boolean, default=False)
    # Image disks only: where the volume lives, its size and state (ok | locked | illegal).
    storage_domain_id: Mapped[str | None] = mapped_column(
        ForeignKey("storage_domains.id"), default=None)
    image_id: Mapped[str | None] = mapped_column(ID, default=None)
    volume_id: Mapped[str | None] = mapped_column(ID, default=None)
    provisioned_size: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(16), default="ok")
    # An ISO disk: bytes of uploaded and verified content (0 until an upload is verified).
    content_size: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(),
                                                          default=utcnow)


class DiskVmElement(Base):
    """How a disk is attached to a VM (interface, boot, ...)."""

    __tablename__ = "disk_vm_element"
    disk_id: Mapped[str] = mapped_column(ForeignKey("base_disks.id", ondelete="CASCADE"),
                                         primary_key=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"),
                                       primary_key=True, index=True)
    is_boot: Mapped[bool] = mapped_column(Boolean, default=False)
    disk_interface: Mapped[str] = mapped_column(String(32), default="virtio_scsi")
    pass_discard: Mapped[bool] = mapped_column(Boolean, default=False)
    uses_scsi_reservation: Mapped[bool] = mapped_column(Boolean, default=False)
    # = disk_id for a non-shareable disk, NULL for a shareable one; unique: one VM at most.
    exclusive_disk_id: Mapped[str | None] = mapped_column(ID, unique=True, default=None)


class VmDevice(Base):
    """A device of a VM as the engine manages it (plugged, address, the guest's name for it)."""

    __tablename__ = "vm_device"
    device_id: Mapped[str] = mapped_column(ID, primary_key=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"),
                                       primary_key=True, index=True)
    type: Mapped[str] = mapped_column(String(30))  # disk
    device: Mapped[str] = mapped_column(String(255))  # disk | lun | cdrom
    address: Mapped[str] = mapped_column(String(255), default="")
    alias: Mapped[str] = mapped_column(String(255), default="")
    is_plugged: Mapped[bool] = mapped_column(Boolean, default=False)
    is_readonly: Mapped[bool] = mapped_column(Boolean, default=False)
    logical_name: Mapped[str] = mapped_column(String(255), default="")


class StorageDomain(Base):
    """A block storage domain: an LVM VG on one LUN (``storage`` = the VG's name/id)."""

    __tablename__ = "storage_domains"
    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    description: Mapped[str] = mapped_column(String(4000), default="")
    domain_type: Mapped[str] = mapped_column(String(16), default="data")
    storage_type: Mapped[str] = mapped_column(String(16), default="iscsi")
    # unattached | active | maintenance | locked
    status: Mapped[str] = mapped_column(String(32), default="unattached")
    data_center_id: Mapped[str | None] = mapped_column(ForeignKey("data_centers.id"),
                                                       default=None)
    storage: Mapped[str] = mapped_column(String(255), default="")


class Lun(Base):
    """A SAN LUN by WWID, known because a disk or a storage domain uses it."""

    __tablename__ = "luns"
    __table_args__ = (
        CheckConstraint("disk_id IS NULL OR storage_domain_id IS NULL",
                        name="one_user"),
    )
    lun_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    disk_id: Mapped[str | None] = mapped_column(
        ForeignKey("base_disks.id", ondelete="CASCADE"), unique=True, default=None)
    storage_domain_id: Mapped[str | None] = mapped_column(
        ForeignKey("storage_domains.id", ondelete="CASCADE"), default=None, index=True)
    volume_group_id: Mapped[str] = mapped_column(String(50), default="")
    physical_volume_id: Mapped[str] = mapped_column(String(50), default="")
    serial: Mapped[str] = mapped_column(String(4000), default="")
    vendor_id: Mapped[str] = mapped_column(String(50), default="")
    product_id: Mapped[str] = mapped_column(String(50), default="")
    lun_mapping: Mapped[int] = mapped_column(Integer, default=0)
    device_size: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes
    discard_max_size: Mapped[int] = mapped_column(BigInteger, default=0)


class StorageServerConnection(Base):
    """An iSCSI target as reached by address, port, IQN, portal group and CHAP user.

    The CHAP password is a secret: never rendered by the API, never in events or logs.
    """

    __tablename__ = "storage_server_connections"
    __table_args__ = (
        UniqueConstraint("storage_type", "connection", "port", "iqn", "portal", "user_name",
                         name="uq_ssc_details"),
    )
    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    storage_type: Mapped[str] = mapped_column(String(16), default="iscsi")
    connection: Mapped[str] = mapped_column(String(250))  # address
    port: Mapped[int] = mapped_column(Integer, default=3260)
    iqn: Mapped[str] = mapped_column(String(223), default="")
    portal: Mapped[str] = mapped_column(String(50), default="1")
    user_name: Mapped[str] = mapped_column(String(255), default="")
    password: Mapped[str] = mapped_column(String(255), default="")


class LunConnection(Base):
    """Which connections reach which LUN (oVirt's lun_storage_server_connection_map)."""

    __tablename__ = "lun_storage_server_connection_map"
    lun_id: Mapped[str] = mapped_column(ForeignKey("luns.lun_id", ondelete="CASCADE"),
                                        primary_key=True)
    connection_id: Mapped[str] = mapped_column(
        ForeignKey("storage_server_connections.id", ondelete="CASCADE"), primary_key=True)


class User(Base):
    """An engine user of the ``internal`` domain; the password is an argon2 hash."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("name", "domain", name="uq_users_name"),)
    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255))
    domain: Mapped[str] = mapped_column(String(255), default="internal")
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(32), default="admin")  # admin | readonly
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(),
                                                          default=utcnow)


class Session(Base):
    """A login: only the token's SHA-256 is stored, so a database dump grants no access."""

    __tablename__ = "sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"),
                                         index=True)
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(),
                                                          default=utcnow)
    expires_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(), index=True)


class Event(Base):
    """The audit log: every change, who did it, what it touched."""

    __tablename__ = "events"
    __table_args__ = (Index(None, "time"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                     primary_key=True, autoincrement=True)
    time: Mapped[datetime.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    code: Mapped[int] = mapped_column(Integer)
    severity: Mapped[str] = mapped_column(String(16))  # normal | warning | error | alert
    description: Mapped[str] = mapped_column(Text)
    correlation_id: Mapped[str] = mapped_column(String(64), default="")
    user_id: Mapped[str | None] = mapped_column(ID, default=None)
    user_name: Mapped[str] = mapped_column(String(255), default="")
    host_id: Mapped[str | None] = mapped_column(ID, default=None, index=True)
    vm_id: Mapped[str | None] = mapped_column(ID, default=None, index=True)
    disk_id: Mapped[str | None] = mapped_column(ID, default=None)
    storage_domain_id: Mapped[str | None] = mapped_column(ID, default=None)


class HostConnectionPin(Base):
    """Why a host must stay connected to a storage server connection: one row per owner
    (``login`` for a user's iSCSI login, ``vm:<id>`` for a VM's LUNs on the host it runs on or
    is starting or migrating to). A host should keep exactly the connections that have a row;
    the reconciler (``hosts/connections.py``) makes the host agree, after every flow and after
    a crash. The rows are the reference counts, kept in the database."""

    __tablename__ = "host_connection_pins"
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"),
                                         primary_key=True)
    connection_id: Mapped[str] = mapped_column(
        ForeignKey("storage_server_connections.id", ondelete="CASCADE"), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Flow(Base):
    """A multi-step operation on a VM in progress (run, stop, migrate, plug, unplug, CD).

    One per VM at a time (``vm_id`` is unique: the database refuses a second, which is the VM's
    lock), with the step it reached, so that an engine that died in the middle completes or
    undoes it at start (``flows/recovery.py``)."""

    __tablename__ = "flows"
    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(32))
    vm_id: Mapped[str | None] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"),
                                              unique=True, default=None)
    host_id: Mapped[str | None] = mapped_column(ID, default=None)
    target_host_id: Mapped[str | None] = mapped_column(ID, default=None)
    disk_id: Mapped[str | None] = mapped_column(ID, default=None)
    step: Mapped[str] = mapped_column(String(64), default="started")
    data: Mapped[str] = mapped_column(Text, default="{}")
    user_name: Mapped[str] = mapped_column(String(255), default="")
    correlation_id: Mapped[str] = mapped_column(String(64), default="")
    started_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class FenceAgent(Base):
    """How to power a host off and on (oVirt's fence agent): a driver ``type`` (redfish,
    ipmilan, or a fence-agents program ``fence_<type>``), its address and credentials, tried in
    ``position`` order. The password is a secret: never rendered, logged or put in events."""

    __tablename__ = "fence_agents"
    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=1)
    type: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(255), default="")
    port: Mapped[int | None] = mapped_column(Integer, default=None)
    user_name: Mapped[str] = mapped_column(String(255), default="")
    password: Mapped[str] = mapped_column(String(255), default="")
    options: Mapped[str] = mapped_column(String(4000), default="")  # "k=v,k=v"
    encrypt_options: Mapped[bool] = mapped_column(Boolean, default=False)


class HaRestart(Base):
    """An HA VM the engine owes a restart (it crashed, or its host was fenced): written before
    the restart is tried, so a restart survives an engine crash; ``state`` pending → (the VM is
    up: row deleted) or failed (retries exhausted). ``host_id``: the host to try first."""

    __tablename__ = "ha_restarts"
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"),
                                       primary_key=True)
    reason: Mapped[str] = mapped_column(String(1000), default="")
    host_id: Mapped[str | None] = mapped_column(ID, default=None)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class ImageTransfer(Base):
    """An upload into an image disk (oVirt's image_transfers): its phase, the host that writes
    the volume, and the ticket that is the only credential of its data URL (so it is stored, to
    render ``transfer_url`` again, and never logged). ``active_disk_id`` is the disk's id while
    the transfer is not finished and NULL after: unique, so a disk has one transfer at a time.
    Finished rows stay a while for clients polling the phase (``transfers.keep_finished``)."""

    __tablename__ = "image_transfers"
    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    disk_id: Mapped[str] = mapped_column(ID, index=True)
    active_disk_id: Mapped[str | None] = mapped_column(ID, unique=True, default=None)
    host_id: Mapped[str | None] = mapped_column(ID, default=None)
    direction: Mapped[str] = mapped_column(String(16), default="upload")
    phase: Mapped[str] = mapped_column(String(32), default="initializing")
    ticket: Mapped[str] = mapped_column(String(64), unique=True)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    transferred: Mapped[int] = mapped_column(BigInteger, default=0)
    inactivity_timeout: Mapped[int] = mapped_column(Integer, default=60)
    # Set when finalizing: the SHA-256 of the content sent to Volume.verify (recovery).
    sha256: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(String(1000), default="")
    user_name: Mapped[str] = mapped_column(String(255), default="")
    correlation_id: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(), default=utcnow)
