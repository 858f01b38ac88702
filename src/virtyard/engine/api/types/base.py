"""The language in which every wire type of the REST API is described, once.

A description (:class:`Type`) names the type's XML tag, its fields in wire order and their kinds,
whether it is an identified entity (``id``/``href`` attributes, a top-level collection), and the
sub-collections reachable from it by ``<link rel=…>``. The codec (``api/codec.py``) reads and
writes XML and JSON from these descriptions and ``api/openapi.py`` turns them into the OpenAPI
document; nothing else knows the wire format. This mirrors oVirt's ``ovirt-engine-api-model``,
where one description per type drives the server, the SDKs and the documentation.

The model side is plain data: a ``dict`` of wire names to Python values (``str``, ``int``,
``bool``, ``datetime``, nested dicts, lists of dicts).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Model = dict[str, Any]


class Kind:
    """What a field holds."""

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Scalar(Kind):
    """string | integer | boolean | decimal | date."""

    name: str

    def describe(self) -> str:
        return self.name


STRING = Scalar("string")
INTEGER = Scalar("integer")
BOOLEAN = Scalar("boolean")
DECIMAL = Scalar("decimal")
DATE = Scalar("date")


@dataclass(frozen=True)
class Enum(Kind):
    """A closed set of lower-case values (oVirt's enums as the SDK writes them)."""

    name: str
    values: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.name} ({'|'.join(self.values)})"


@dataclass(frozen=True)
class ListOf(Kind):
    """A list, written ``<field><item_tag>…</item_tag>…</field>``."""

    item: Kind
    item_tag: str

    def describe(self) -> str:
        return f"list of {self.item.describe()}"


@dataclass(frozen=True)
class Field:
    """One field of a type, by its wire name."""

    name: str
    kind: Kind
    doc: str = ""
    # Set only by the engine: accepted and ignored in input.
    read_only: bool = False


@dataclass(frozen=True)
class Link:
    """A sub-collection of an entity: ``<link rel="rel" href=".../{id}/rel"/>``, or the
    list itself in ``field`` when a client asks ``follow=field``."""

    rel: str
    field: str
    item: str  # the tag of the list's items (a registered type)


@dataclass(eq=False)
class Type(Kind):
    """One wire type. ``collection`` is its top-level collection path (``hosts``), if any."""

    tag: str
    doc: str
    fields: list[Field] = field(default_factory=list)
    identified: bool = True
    collection: str | None = None
    links: list[Link] = field(default_factory=list)
    # The plural tag of a list of this type at the top level (``<hosts>``).
    plural: str = ""

    def __post_init__(self) -> None:
        if not self.plural:
            self.plural = self.tag + "s"
        self._by_name = {f.name: f for f in self.fields}
        self._links_by_field = {link.field: link for link in self.links}

    def describe(self) -> str:
        return self.tag

    def field_named(self, name: str) -> Field | None:
        return self._by_name.get(name)

    def link_for(self, field_name: str) -> Link | None:
        return self._links_by_field.get(field_name)

    def add(self, *fields: Field) -> Type:
        """Add fields after creation (types that refer to each other)."""
        for f in fields:
            self.fields.append(f)
            self._by_name[f.name] = f
        return self

    def add_links(self, *links: Link) -> Type:
        for link in links:
            self.links.append(link)
            self._links_by_field[link.field] = link
        return self


REGISTRY: dict[str, Type] = {}


def register(*types: Type) -> None:
    for t in types:
        REGISTRY[t.tag] = t


def identified(tag: str, doc: str, fields: Iterable[Field], *, collection: str | None = None,
               plural: str = "") -> Type:
    """An entity with oVirt's Identified fields (name, description, comment) first."""
    base = [Field("name", STRING, "Name, unique among its kind."),
            Field("description", STRING, "Free text."),
            Field("comment", STRING, "Free text for administrators.")]
    t = Type(tag, doc, base + list(fields), identified=True, collection=collection,
             plural=plural)
    register(t)
    return t


def struct(tag: str, doc: str, fields: Iterable[Field]) -> Type:
    """A nested value without an id (e.g. ``high_availability``)."""
    t = Type(tag, doc, list(fields), identified=False)
    register(t)
    return t
