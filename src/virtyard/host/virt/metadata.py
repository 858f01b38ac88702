"""Virtyard's own metadata inside a libvirt domain: what libvirt does not know about a VM.

One element in our namespace sits under the domain's ``<metadata>``::

    <metadata>
      <vy:vm xmlns:vy="https://virtyard.org/vm/1">
        <vy:generation>4</vy:generation>
        <vy:device name="sda">
          <vy:GUID>360000000000000000e00000000010001</vy:GUID>
          <vy:diskId>0c2f1b7e-9d3a-4c51-a8e2-5b0e6f7a8b9c</vy:diskId>
          <vy:guestName>/dev/sda</vy:guestName>
        </vy:device>
        <vy:device name="sdc">
          <vy:poolID>…</vy:poolID><vy:domainID>…</vy:domainID>
          <vy:imageID>…</vy:imageID><vy:volumeID>…</vy:volumeID>
          <vy:change>
            <vy:state>loading</vy:state>
            <vy:poolID>…</vy:poolID>…
          </vy:change>
        </vy:device>
      </vy:vm>
    </metadata>

Devices are keyed by their target device name (``sda``, ``vdb``), as vdsm keys its
``ovirt-vm:device`` entries. The ``change`` record is the in-flight part of an atomic changeCD
(vdsm's shape): written before the media change, applied or discarded after it, and read back by
recovery after an agent crash. ``generation`` is a VM-level counter bumped on every device change
(the engine compares it to notice a changed VM, like vdsm's stats ``hash``).

The element can be written whole inside a domain XML (:func:`replace_metadata`, :meth:`to_xml`)
or set on a live domain with ``dom.setMetadata(VIR_DOMAIN_METADATA_ELEMENT,
metadata.to_libvirt_xml(), METADATA_KEY, METADATA_NS, flags)``. libvirt wants that element
*without* a namespace (it puts every element of it into ``uri`` with prefix ``key`` itself, and
fails with "failed to create a new XML namespace" when the element already declares the prefix),
and ``dom.metadata(VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)`` hands it back without one too:
:meth:`VmMetadata.from_xml` reads both forms. Parsing goes by namespace, never by prefix.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from lxml import etree

from virtyard.host.storage.pdiv import PDIV_KEYS, Pdiv, PdivError

METADATA_NS = "https://virtyard.org/vm/1"
METADATA_KEY = "vy"

ChangeState = Literal["loading", "ejecting"]


class VirtXmlError(ValueError):
    """Bad domain XML, device spec or metadata; ``reason`` is a stable, machine-readable code."""

    def __init__(self, reason: str, message: str, *, key: str | None = None) -> None:
        self.reason = reason
        self.key = key
        super().__init__(f"{reason}: {message}")


class MetadataError(VirtXmlError):
    """Our metadata element is malformed (or a metadata object was built inconsistently)."""


def parse_xml(text: str | bytes) -> etree._Element:
    """Parse XML text without entities, DTDs or network access (shared by the virt modules)."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             remove_blank_text=True)
    data = text.encode() if isinstance(text, str) else text
    try:
        return etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise VirtXmlError("malformed_xml", str(exc)) from exc


def _q(tag: str) -> str:
    return f"{{{METADATA_NS}}}{tag}"


def _sub_text(parent: etree._Element, tag: str, text: str) -> None:
    etree.SubElement(parent, _q(tag)).text = text


def _child_text(elem: etree._Element, tag: str) -> str | None:
    child = elem.find(_q(tag))
    if child is None:
        return None
    return (child.text or "").strip()


def _write_pdiv(parent: etree._Element, pdiv: Pdiv) -> None:
    for tag, value in pdiv.to_dict().items():
        _sub_text(parent, tag, value)


def _read_pdiv(elem: etree._Element) -> Pdiv | None:
    values = {tag: _child_text(elem, tag) for tag in PDIV_KEYS}
    if all(v is None for v in values.values()):
        return None
    try:
        return Pdiv.from_dict(values)
    except PdivError as exc:
        raise MetadataError(exc.reason, str(exc).removeprefix(f"{exc.reason}: "),
                            key=exc.key) from None


@dataclass(frozen=True)
class CdChange:
    """An in-flight CD-ROM media change: ``loading`` a volume (with its PDIV) or ``ejecting``."""

    state: ChangeState
    pdiv: Pdiv | None = None

    def __post_init__(self) -> None:
        if self.state not in ("loading", "ejecting"):
            raise MetadataError("invalid_change", f"change state must be loading or ejecting, "
                                f"not {self.state!r}")
        if (self.state == "loading") != (self.pdiv is not None):
            raise MetadataError("invalid_change", "a loading change needs the PDIV it loads; "
                                "an ejecting change has none")

    def _to_element(self) -> etree._Element:
        elem = etree.Element(_q("change"))
        _sub_text(elem, "state", self.state)
        if self.pdiv is not None:
            _write_pdiv(elem, self.pdiv)
        return elem

    @classmethod
    def _from_element(cls, elem: etree._Element) -> CdChange:
        state = _child_text(elem, "state")
        if state not in ("loading", "ejecting"):
            raise MetadataError("invalid_change", f"change state must be loading or ejecting, "
                                f"not {state!r}")
        return cls(state, _read_pdiv(elem))  # type: ignore[arg-type]


@dataclass(frozen=True)
class DeviceMetadata:
    """What we keep about one device that libvirt does not know.

    ``shared`` is kept only for ``"exclusive"``: libvirt's ``<shareable/>`` says "shared" and its
    absence "none", but nothing in libvirt's XML can say "exclusive".
    """

    guid: str | None = None
    pdiv: Pdiv | None = None
    disk_id: str | None = None
    guest_name: str | None = None
    shared: Literal["exclusive"] | None = None
    change: CdChange | None = None

    def begin_change(self, change: CdChange) -> DeviceMetadata:
        """This entry with ``change`` recorded (step 1 of changeCD, before touching libvirt)."""
        return dataclasses.replace(self, change=change)

    def apply_change(self) -> DeviceMetadata:
        """The media change happened: the loaded volume becomes current (or the tray empty)."""
        if self.change is None:
            return self
        return dataclasses.replace(self, pdiv=self.change.pdiv, change=None)

    def discard_change(self) -> DeviceMetadata:
        """The media change did not happen: forget it, the current volume stays."""
        return dataclasses.replace(self, change=None)

    def to_element(self, name: str) -> etree._Element:
        elem = etree.Element(_q("device"), name=name)
        if self.guid is not None:
            _sub_text(elem, "GUID", self.guid)
        if self.pdiv is not None:
            _write_pdiv(elem, self.pdiv)
        if self.disk_id is not None:
            _sub_text(elem, "diskId", self.disk_id)
        if self.guest_name is not None:
            _sub_text(elem, "guestName", self.guest_name)
        if self.shared is not None:
            _sub_text(elem, "shared", self.shared)
        if self.change is not None:
            elem.append(self.change._to_element())
        return elem

    @classmethod
    def from_element(cls, elem: etree._Element) -> DeviceMetadata:
        shared = _child_text(elem, "shared")
        if shared not in (None, "exclusive"):
            raise MetadataError("invalid_shared", f"metadata shared must be exclusive, "
                                f"not {shared!r}")
        change = elem.find(_q("change"))
        return cls(guid=_child_text(elem, "GUID") or None, pdiv=_read_pdiv(elem),
                   disk_id=_child_text(elem, "diskId") or None,
                   guest_name=_child_text(elem, "guestName") or None,
                   shared=shared,  # type: ignore[arg-type]
                   change=None if change is None else CdChange._from_element(change))


@dataclass(frozen=True)
class VmMetadata:
    """Our whole metadata element: a generation counter and the devices by target name."""

    generation: int = 0
    devices: dict[str, DeviceMetadata] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.generation, bool) or not isinstance(self.generation, int) \
                or self.generation < 0:
            raise MetadataError("invalid_generation",
                                f"generation must be an int >= 0, not {self.generation!r}")

    def next_generation(self) -> VmMetadata:
        """This metadata with the generation counter bumped."""
        return dataclasses.replace(self, generation=self.generation + 1)

    def device(self, name: str) -> DeviceMetadata:
        """The entry of device ``name`` (an empty one when there is none)."""
        return self.devices.get(name, DeviceMetadata())

    def with_device(self, name: str, device: DeviceMetadata | None) -> VmMetadata:
        """This metadata with device ``name`` replaced (``None``: removed)."""
        devices = dict(self.devices)
        if device is None:
            devices.pop(name, None)
        else:
            devices[name] = device
        return dataclasses.replace(self, devices=devices)

    def to_element(self) -> etree._Element:
        root = etree.Element(_q("vm"), nsmap={METADATA_KEY: METADATA_NS})
        _sub_text(root, "generation", str(self.generation))
        for name in sorted(self.devices):
            root.append(self.devices[name].to_element(name))
        return root

    def to_xml(self) -> str:
        """The ``<vy:vm>`` element as text, as it sits in a domain XML."""
        return etree.tostring(self.to_element(), encoding="unicode", pretty_print=True)

    def to_libvirt_xml(self) -> str:
        """The element without namespace: the ``metadata`` argument of libvirt's
        ``setMetadata`` (with ``key=METADATA_KEY, uri=METADATA_NS``)."""
        root = self.to_element()
        for elem in root.iter():
            elem.tag = etree.QName(elem).localname
        etree.cleanup_namespaces(root)
        return etree.tostring(root, encoding="unicode", pretty_print=True)

    @classmethod
    def from_element(cls, root: etree._Element) -> VmMetadata:
        """From our element, in our namespace or (as libvirt's ``metadata()`` returns it)
        in none."""
        if root.tag == "vm":
            root = copy.deepcopy(root)
            for elem in root.iter():
                if isinstance(elem.tag, str) and not elem.tag.startswith("{"):
                    elem.tag = _q(elem.tag)
        if root.tag != _q("vm"):
            raise MetadataError("not_virtyard_metadata",
                                f"expected {{{METADATA_NS}}}vm, not {root.tag!r}")
        raw_generation = _child_text(root, "generation") or "0"
        if not raw_generation.isdigit():
            raise MetadataError("invalid_generation",
                                f"generation must be an int >= 0, not {raw_generation!r}")
        devices: dict[str, DeviceMetadata] = {}
        for elem in root.iterfind(_q("device")):
            name = elem.get("name")
            if not name:
                raise MetadataError("invalid_device", "a metadata device needs a name")
            if name in devices:
                raise MetadataError("duplicate_device", f"device {name!r} appears twice")
            devices[name] = DeviceMetadata.from_element(elem)
        return cls(int(raw_generation), devices)

    @classmethod
    def from_xml(cls, text: str | bytes) -> VmMetadata:
        """From the element's text: :meth:`to_xml`'s or libvirt's ``metadata()`` answer."""
        return cls.from_element(parse_xml(text))


def find_metadata(domain: etree._Element) -> VmMetadata:
    """Our metadata inside a parsed ``<domain>`` element; empty when it has none."""
    elem = domain.find(f"metadata/{_q('vm')}")
    return VmMetadata() if elem is None else VmMetadata.from_element(elem)


def read_metadata(domain_xml: str | bytes) -> VmMetadata:
    """Our metadata inside a full domain XML; empty when it has none."""
    return find_metadata(parse_xml(domain_xml))


def put_metadata(domain: etree._Element, metadata: VmMetadata) -> None:
    """Replace our element under ``domain``'s ``<metadata>`` (created after ``<uuid>`` if missing).

    Other applications' metadata elements are left as they are.
    """
    container = domain.find("metadata")
    if container is None:
        container = etree.Element("metadata")
        anchor = None
        for tag in ("description", "title", "uuid", "name"):
            anchor = domain.find(tag)
            if anchor is not None:
                break
        if anchor is None:
            domain.insert(0, container)
        else:
            anchor.addnext(container)
    for old in container.findall(_q("vm")):
        container.remove(old)
    container.append(metadata.to_element())


def replace_metadata(domain_xml: str | bytes, metadata: VmMetadata) -> str:
    """``domain_xml`` with our metadata element replaced by ``metadata``."""
    domain = parse_xml(domain_xml)
    if domain.tag != "domain":
        raise VirtXmlError("not_a_domain", f"expected <domain>, not {domain.tag!r}")
    put_metadata(domain, metadata)
    return etree.tostring(domain, encoding="unicode", pretty_print=True)
