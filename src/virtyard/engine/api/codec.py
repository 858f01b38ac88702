"""XML and JSON ⇄ model, driven only by the type descriptions in ``api/types``.

Reading is strict where a mistake would be silent (unknown elements, bad enum values, numbers
that are not numbers: each a :class:`DecodeError` naming the place) and tolerant where clients
differ (element order, ``href`` and ``<link>`` in input, JSON scalars sent as strings the way
oVirt's own JSON has them). XML input is parsed without DTDs, entities or network access.

The JSON flavour mirrors the XML one: an entity is an object with ``id``/``href``; a list inside
an entity is ``{"item_tag": [...]}``; a top-level collection is ``{"item_tag": [...]}``; links
are ``"link": [{"href", "rel"}]``. Scalars are native JSON (numbers, booleans), and input
accepts oVirt's strings too.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable
from typing import Any

from lxml import etree

from virtyard.engine.api.types.base import (
    BOOLEAN,
    DATE,
    DECIMAL,
    INTEGER,
    REGISTRY,
    STRING,
    Enum,
    Kind,
    ListOf,
    Model,
    Scalar,
    Type,
)

API_PREFIX = "/ovirt-engine/api"
MAX_DEPTH = 32

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False,
                          remove_comments=True, remove_pis=True, load_dtd=False)


SYNTAX = "Request syntactically incorrect."
INVALID_VALUE = "Invalid value"
INT64 = (-(1 << 63), (1 << 63) - 1)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class DecodeError(Exception):
    """The request body does not fit the type: says where and why, with oVirt's reason."""

    def __init__(self, detail: str, reason: str = SYNTAX) -> None:
        super().__init__(detail)
        self.reason = reason


def _invalid(detail: str) -> DecodeError:
    return DecodeError(detail, INVALID_VALUE)


# ---------------------------------------------------------------- scalars


def _scalar_from_text(kind: Kind, text: str, where: str) -> Any:
    if kind != STRING:
        text = text.strip()
    if isinstance(kind, Enum):
        value = text.lower()
        if value not in kind.values:
            raise _invalid(f"Invalid value '{text}' for '{where}': expected one of "
                              f"{', '.join(kind.values)}")
        return value
    if kind == INTEGER:
        try:
            number = int(text)
        except ValueError:
            raise _invalid(f"Invalid value '{text[:64]}' for '{where}': not an integer") from None
        if not INT64[0] <= number <= INT64[1]:
            raise _invalid(f"Invalid value for '{where}': out of range")
        return number
    if kind == BOOLEAN:
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise _invalid(f"Invalid value '{text}' for '{where}': not a boolean")
    if kind == DECIMAL:
        try:
            return float(text)
        except ValueError:
            raise _invalid(f"Invalid value '{text}' for '{where}': not a number") from None
    if kind == DATE:
        try:
            return datetime.datetime.fromisoformat(text)
        except ValueError:
            raise _invalid(f"Invalid value '{text}' for '{where}': not a date") from None
    if _CONTROL.search(text):
        raise _invalid(f"Invalid value for '{where}': control characters are not allowed")
    return text


def _scalar_from_json(kind: Kind, value: Any, where: str) -> Any:
    if isinstance(value, bool) and kind == BOOLEAN:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and kind in (INTEGER, DECIMAL):
        if kind == INTEGER and not INT64[0] <= value <= INT64[1]:
            raise _invalid(f"Invalid value for '{where}': out of range")
        return value
    if isinstance(value, float) and kind == DECIMAL:
        return value
    if isinstance(value, str):
        return _scalar_from_text(kind, value, where)
    raise _invalid(f"Invalid value for '{where}': expected {kind.describe()}")


_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def xml_safe(text: str) -> str:
    """Text XML can carry: characters XML 1.0 cannot hold (control characters a client
    smuggled into a name, say) become U+FFFD instead of breaking the whole document."""
    return _XML_INVALID.sub("\ufffd", text)


def _scalar_to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime.datetime):
        return value.isoformat(timespec="milliseconds")
    return xml_safe(str(value))


def _scalar_to_json(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return value.isoformat(timespec="milliseconds")
    return value


def _is_reference(model: Model) -> bool:
    """A bare reference (``<vm id=… href=…/>``) gets no ``<link>`` children: only objects
    rendered with their fields do (oVirt renders them alike; large lists stay lean)."""
    return all(key in ("id", "href") for key in model)


def href_of(t: Type, model: Model) -> str | None:
    """An entity's ``href``: given by the model, or its top-level collection's path."""
    if "href" in model:
        return str(model["href"])
    if t.collection and model.get("id"):
        return f"{API_PREFIX}/{t.collection}/{model['id']}"
    return None


# ---------------------------------------------------------------- XML


def _xml_element(t: Type, model: Model, tag: str | None = None) -> etree._Element:
    element = etree.Element(tag or t.tag)
    href = href_of(t, model) if t.identified else None
    if href:
        element.set("href", xml_safe(href))
    if t.identified and model.get("id") is not None:
        element.set("id", xml_safe(str(model["id"])))
    if href and not _is_reference(model):
        for link in t.links:
            if link.field not in model:
                etree.SubElement(element, "link", href=xml_safe(f"{href}/{link.rel}"),
                                 rel=link.rel)
    for f in t.fields:
        value = model.get(f.name)
        if value is None:
            continue
        _xml_value(element, f.name, f.kind, value)
    for link in t.links:  # followed sub-collections, inline
        if link.field in model and t.field_named(link.field) is None:
            _xml_value(element, link.field, ListOf(REGISTRY[link.item], link.item),
                       model[link.field])
    return element


def _xml_value(parent: etree._Element, tag: str, kind: Kind, value: Any) -> None:
    if isinstance(kind, Type):
        parent.append(_xml_element(kind, value, tag))
    elif isinstance(kind, ListOf):
        container = etree.SubElement(parent, tag)
        for item in value:
            _xml_value(container, kind.item_tag, kind.item, item)
    else:
        etree.SubElement(parent, tag).text = _scalar_to_text(value)


def to_xml(t: Type, model: Model) -> bytes:
    return bytes(etree.tostring(_xml_element(t, model), xml_declaration=True,
                                encoding="UTF-8", pretty_print=True))


def list_to_xml(t: Type, models: Iterable[Model]) -> bytes:
    root = etree.Element(t.plural)
    for model in models:
        root.append(_xml_element(t, model))
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8",
                                pretty_print=True))


def parse_xml(body: bytes) -> etree._Element:
    """The document's root element; DecodeError for anything that is not plain XML."""
    try:
        root = etree.fromstring(body, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise DecodeError(f"Malformed XML: {exc}") from None
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise DecodeError("Malformed XML: document type declarations are not accepted")
    return root


def from_xml(t: Type, body: bytes) -> Model:
    root = parse_xml(body)
    if root.tag != t.tag:
        got = root.tag if isinstance(root.tag, str) else "?"
        raise DecodeError(f"Expected a '{t.tag}' element, got '{got}'")
    return _xml_read(t, root, t.tag, 0)


def _xml_read(t: Type, element: etree._Element, where: str, depth: int) -> Model:
    if depth > MAX_DEPTH:
        raise DecodeError(f"'{where}' is nested too deeply")
    model: Model = {}
    if t.identified and element.get("id") is not None:
        model["id"] = element.get("id")
    for child in element:
        if not isinstance(child.tag, str):
            continue
        name = child.tag
        if name == "link":
            continue
        f = t.field_named(name)
        if f is None:
            raise DecodeError(f"Unknown element '{name[:64]}' in '{where}'")
        model[name] = _xml_read_value(f.kind, child, f"{where}.{name}", depth + 1)
    return model


def _xml_read_value(kind: Kind, element: etree._Element, where: str, depth: int) -> Any:
    if isinstance(kind, Type):
        return _xml_read(kind, element, where, depth)
    if isinstance(kind, ListOf):
        items = []
        for child in element:
            if not isinstance(child.tag, str):
                continue
            if child.tag != kind.item_tag:
                raise DecodeError(f"Unknown element '{child.tag[:64]}' in '{where}' "
                                  f"(expected '{kind.item_tag}')")
            items.append(_xml_read_value(kind.item, child, f"{where}.{kind.item_tag}",
                                         depth + 1))
        return items
    if len(element):
        raise DecodeError(f"'{where}' takes a value, not elements")
    return _scalar_from_text(kind, element.text or "", where)


# ---------------------------------------------------------------- JSON


def _json_object(t: Type, model: Model) -> dict[str, Any]:
    out: dict[str, Any] = {}
    href = href_of(t, model) if t.identified else None
    if href:
        out["href"] = href
    if t.identified and model.get("id") is not None:
        out["id"] = str(model["id"])
    for f in t.fields:
        value = model.get(f.name)
        if value is not None:
            out[f.name] = _json_value(f.kind, value)
    links = []
    for link in t.links:
        if link.field in model and t.field_named(link.field) is None:
            out[link.field] = _json_value(ListOf(REGISTRY[link.item], link.item),
                                          model[link.field])
        elif href and not _is_reference(model):
            links.append({"href": f"{href}/{link.rel}", "rel": link.rel})
    if links:
        out["link"] = links
    return out


def _json_value(kind: Kind, value: Any) -> Any:
    if isinstance(kind, Type):
        return _json_object(kind, value)
    if isinstance(kind, ListOf):
        return {kind.item_tag: [_json_value(kind.item, item) for item in value]}
    return _scalar_to_json(value)


def to_json(t: Type, model: Model) -> bytes:
    return json.dumps(_json_object(t, model), separators=(",", ":")).encode()


def list_to_json(t: Type, models: Iterable[Model]) -> bytes:
    return json.dumps({t.tag: [_json_object(t, m) for m in models]},
                      separators=(",", ":")).encode()


def from_json(t: Type, body: bytes) -> Model:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"Malformed JSON: {exc}") from None
    except RecursionError:
        raise DecodeError("Malformed JSON: nested too deeply") from None
    # oVirt's clients sometimes wrap the object in its tag: {"vm": {...}}.
    if isinstance(data, dict) and list(data) == [t.tag] and isinstance(data[t.tag], dict):
        data = data[t.tag]
    return _json_read(t, data, t.tag, 0)


def _json_read(t: Type, data: Any, where: str, depth: int) -> Model:
    if depth > MAX_DEPTH:
        raise DecodeError(f"'{where}' is nested too deeply")
    if not isinstance(data, dict):
        raise DecodeError(f"'{where}' must be an object")
    model: Model = {}
    for name, value in data.items():
        if name in ("href", "link", "rel"):
            continue
        if name == "id" and t.identified:
            if value is not None and not isinstance(value, str | int):
                raise _invalid(f"Invalid value for '{where}.id': expected a string")
            model["id"] = None if value is None else str(value)
            continue
        f = t.field_named(name)
        if f is None:
            raise DecodeError(f"Unknown element '{name[:64]}' in '{where}'")
        if value is None:
            continue
        model[name] = _json_read_value(f.kind, value, f"{where}.{name}", depth + 1)
    return model


def _json_read_value(kind: Kind, value: Any, where: str, depth: int) -> Any:
    if isinstance(kind, Type):
        return _json_read(kind, value, where, depth)
    if isinstance(kind, ListOf):
        items = value
        if isinstance(value, dict):
            extra = set(value) - {kind.item_tag}
            if extra:
                raise DecodeError(f"Unknown element '{str(sorted(extra)[0])[:64]}' in '{where}' "
                                  f"(expected '{kind.item_tag}')")
            items = value.get(kind.item_tag, [])
        if not isinstance(items, list):
            raise DecodeError(f"'{where}' must be a list")
        return [_json_read_value(kind.item, item, f"{where}.{kind.item_tag}", depth + 1)
                for item in items]
    if isinstance(value, dict | list):
        raise DecodeError(f"'{where}' takes a value, not an object")
    if isinstance(kind, Scalar | Enum):
        return _scalar_from_json(kind, value, where)
    raise DecodeError(f"'{where}': unsupported")


# ---------------------------------------------------------------- either


def encode(t: Type, model: Model, as_json: bool) -> bytes:
    return to_json(t, model) if as_json else to_xml(t, model)


def encode_list(t: Type, models: Iterable[Model], as_json: bool) -> bytes:
    return list_to_json(t, models) if as_json else list_to_xml(t, models)


def decode(t: Type, body: bytes, as_json: bool) -> Model:
    return from_json(t, body) if as_json else from_xml(t, body)
