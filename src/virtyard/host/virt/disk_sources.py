"""Where a disk's bytes come from, as libvirt's ``<source>``: a host block device, a file, or
an iSCSI LUN QEMU reaches itself — optionally only a slice of it — formatted and parsed.

Split from :mod:`virtyard.host.virt.domain_xml` (the disks and the domain around them): the
agent's drive resolver and CD changes build sources without the rest of the domain; the
errors every part of the domain XML raises live here, at the bottom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lxml import etree

from virtyard.host.virt.metadata import VirtXmlError


class DomainXmlError(VirtXmlError):
    """A domain XML could not be parsed into our objects, or a domain object is inconsistent."""


class DeviceSpecError(DomainXmlError):
    """A device dict or device object is invalid; ``reason`` says how, ``key`` names the field."""


def sub_element(parent: etree._Element, tag: str, text: str | None = None,
         **attrs: str) -> etree._Element:
    elem = etree.SubElement(parent, tag, attrs)
    if text is not None:
        elem.text = text
    return elem


def _source_error(message: str) -> DeviceSpecError:
    return DeviceSpecError("invalid_source", message, key="source")


@dataclass(frozen=True)
class StorageSlice:
    """Only ``size`` bytes from ``offset`` of a source (libvirt ``<slice type='storage'>``): an
    ISO volume inside an LVM PV read without device-mapper."""

    offset: int
    size: int

    def __post_init__(self) -> None:
        if self.offset < 0 or self.size <= 0:
            raise _source_error(f"slice needs offset >= 0 and size > 0, not {self}")


@dataclass(frozen=True)
class _SourceBase:
    disk_type: ClassVar[str]

    def _finish(self, elem: etree._Element, slice_: StorageSlice | None) -> etree._Element:
        if slice_ is not None:
            slices = sub_element(elem, "slices")
            sub_element(slices, "slice", type="storage", offset=str(slice_.offset),
                 size=str(slice_.size))
        return elem


@dataclass(frozen=True)
class BlockSource(_SourceBase):
    """A host block device: ``<disk type='block'><source dev=…/>``."""

    path: str
    slice: StorageSlice | None = None
    disk_type: ClassVar[str] = "block"

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise _source_error(f"block source needs an absolute path, not {self.path!r}")

    @classmethod
    def for_guid(cls, guid: str) -> BlockSource:
        """The multipath device of a LUN (kernel initiator): ``/dev/mapper/<GUID>``."""
        return cls(f"/dev/mapper/{guid}")

    def to_element(self, *, optional: bool = False) -> etree._Element:
        elem = etree.Element("source", dev=self.path)
        if optional:
            elem.set("startupPolicy", "optional")
        return self._finish(elem, self.slice)


@dataclass(frozen=True)
class FileSource(_SourceBase):
    """A host file (an ISO, a volume on file storage): ``<disk type='file'><source file=…/>``."""

    path: str
    slice: StorageSlice | None = None
    disk_type: ClassVar[str] = "file"

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise _source_error(f"file source needs an absolute path, not {self.path!r}")

    def to_element(self, *, optional: bool = False) -> etree._Element:
        elem = etree.Element("source", file=self.path)
        if optional:
            elem.set("startupPolicy", "optional")
        return self._finish(elem, self.slice)


@dataclass(frozen=True)
class IscsiSource(_SourceBase):
    """A LUN QEMU reaches itself through libiscsi: ``<disk type='network'>`` with an iSCSI source.

    With CHAP, ``auth_user`` and one of ``secret_usage`` / ``secret_uuid`` name a libvirt secret
    of type ``iscsi`` defined elsewhere; the password never appears in domain XML.
    """

    host: str
    port: int
    iqn: str
    lun: int
    auth_user: str | None = None
    secret_usage: str | None = None
    secret_uuid: str | None = None
    slice: StorageSlice | None = None
    # The initiator name QEMU logs in with: the host's, so that arrays' ACLs (which name
    # hosts' initiators) treat QEMU's session like the host's own.
    initiator: str | None = None
    disk_type: ClassVar[str] = "network"

    def __post_init__(self) -> None:
        if not self.host or not 0 < self.port < 65536:
            raise _source_error(f"iSCSI source needs a host and a port 1-65535, "
                                f"not {self.host!r}:{self.port!r}")
        if not self.iqn or "/" in self.iqn or self.lun < 0:
            raise _source_error(f"iSCSI source needs a target name without '/' and a LUN >= 0, "
                                f"not {self.iqn!r} LUN {self.lun!r}")
        has_secret = (self.secret_usage is not None) + (self.secret_uuid is not None)
        if (self.auth_user is None and has_secret) or (self.auth_user is not None
                                                       and has_secret != 1):
            raise _source_error("CHAP needs auth_user and exactly one of secret_usage, "
                                "secret_uuid")

    def to_element(self, *, optional: bool = False) -> etree._Element:
        # libvirt refuses startupPolicy on network sources: ``optional`` is left out.
        del optional
        elem = etree.Element("source", protocol="iscsi", name=f"{self.iqn}/{self.lun}")
        sub_element(elem, "host", name=self.host, port=str(self.port))
        if self.auth_user is not None:
            auth = sub_element(elem, "auth", username=self.auth_user)
            if self.secret_usage is not None:
                sub_element(auth, "secret", type="iscsi", usage=self.secret_usage)
            else:
                sub_element(auth, "secret", type="iscsi", uuid=str(self.secret_uuid))
        if self.initiator:
            sub_element(sub_element(elem, "initiator"), "iqn", name=self.initiator)
        return self._finish(elem, self.slice)


Source = BlockSource | FileSource | IscsiSource


def int_attr(elem: etree._Element, attr: str, *, default: int | None = None) -> int:
    raw = elem.get(attr)
    if raw is None and default is not None:
        return default
    try:
        return int(raw or "")
    except ValueError:
        raise DomainXmlError("invalid_xml", f"<{elem.tag!r} {attr}=…> must be an integer, "
                             f"not {raw!r}") from None


def _parse_slice(source: etree._Element) -> StorageSlice | None:
    elem = source.find("slices/slice[@type='storage']")
    if elem is None:
        return None
    return StorageSlice(int_attr(elem, "offset", default=0), int_attr(elem, "size"))


def parse_source(disk: etree._Element) -> Source | None:
    """The source of a ``<disk>`` element; ``None`` for an empty CD-ROM tray."""
    disk_type = disk.get("type", "file")
    source = disk.find("source")
    if source is None:
        return None
    if disk_type == "block":
        path = source.get("dev")
        return None if path is None else BlockSource(path, _parse_slice(source))
    if disk_type == "file":
        path = source.get("file")
        return None if path is None else FileSource(path, _parse_slice(source))
    if disk_type == "network" and source.get("protocol") == "iscsi":
        iqn, _, lun = (source.get("name") or "").rpartition("/")
        if not iqn or not lun.isdigit():
            iqn, lun = source.get("name") or "", "0"
        host = source.find("host")
        if host is None:
            raise DomainXmlError("invalid_xml", "an iSCSI disk source has no <host>")
        # libvirt accepts <auth> inside <source> (current) or directly under <disk> (old).
        auth = source.find("auth")
        if auth is None:
            auth = disk.find("auth")
        secret = None if auth is None else auth.find("secret")
        iqn_elem = source.find("initiator/iqn")
        return IscsiSource(
            host=host.get("name") or "", port=int_attr(host, "port", default=3260), iqn=iqn,
            lun=int(lun), auth_user=None if auth is None else auth.get("username"),
            secret_usage=None if secret is None else secret.get("usage"),
            secret_uuid=None if secret is None else secret.get("uuid"),
            slice=_parse_slice(source),
            initiator=None if iqn_elem is None else iqn_elem.get("name"))
    raise DomainXmlError("unsupported_disk",
                         f"disk type {disk_type!r} protocol {source.get('protocol')!r}")
