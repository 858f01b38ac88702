"""The OpenAPI 3.1 document of the JSON flavour, made from the same type descriptions and
operation declarations the codec and the router use (no second hand-written API)."""

from __future__ import annotations

import re
from typing import Any

from virtyard.engine.api.routing import Operation
from virtyard.engine.api.types.base import (
    REGISTRY,
    Enum,
    Kind,
    ListOf,
    Scalar,
    Type,
)

_SCALARS = {"string": {"type": "string"}, "integer": {"type": "integer", "format": "int64"},
            "boolean": {"type": "boolean"}, "decimal": {"type": "number"},
            "date": {"type": "string", "format": "date-time"}}


def _schema(kind: Kind) -> dict[str, Any]:
    if isinstance(kind, Type):
        return {"$ref": f"#/components/schemas/{kind.tag}"}
    if isinstance(kind, ListOf):
        return {"type": "object", "additionalProperties": False,
                "properties": {kind.item_tag: {"type": "array", "items": _schema(kind.item)}}}
    if isinstance(kind, Enum):
        return {"type": "string", "enum": list(kind.values)}
    if isinstance(kind, Scalar):
        return dict(_SCALARS[kind.name])
    raise TypeError(kind)


def _type_schema(t: Type) -> dict[str, Any]:
    props: dict[str, Any] = {}
    if t.identified:
        props["id"] = {"type": "string"}
        props["href"] = {"type": "string", "readOnly": True}
    for f in t.fields:
        schema = _schema(f.kind)
        if f.doc or f.read_only:
            schema = {"allOf": [schema]} if "$ref" in schema else schema
            if f.doc:
                schema["description"] = f.doc
            if f.read_only:
                schema["readOnly"] = True
        props[f.name] = schema
    for link in t.links:
        if t.field_named(link.field) is None:
            props[link.field] = {**_schema(ListOf(REGISTRY[link.item], link.item)),
                                 "readOnly": True,
                                 "description": f"Rendered when asked with follow={link.field}"}
    if t.links:
        props["link"] = {"type": "array", "readOnly": True, "items": {
            "type": "object", "properties": {"href": {"type": "string"},
                                             "rel": {"type": "string"}}}}
    return {"type": "object", "description": t.doc, "properties": props,
            "additionalProperties": False}


def _response(op: Operation) -> dict[str, Any]:
    if op.returns is None:
        return {"description": "Done (empty body)."}
    schema: dict[str, Any] = _schema(op.returns)
    if op.many:
        schema = {"type": "object", "properties": {
            op.returns.tag: {"type": "array", "items": schema}}}
    return {"description": "OK", "content": {"application/json": {"schema": schema}}}


def openapi_document(operations: list[Operation], prefix: str) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    fault = {"description": "A fault: reason and detail (and the stable error key).",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/fault"}}}}
    for op in operations:
        params: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", op.path)]
        params += [{"name": q.name, "in": "query", "required": False,
                    "description": q.doc, "schema": dict(_SCALARS[q.kind])} for q in op.query]
        entry: dict[str, Any] = {
            "summary": op.summary.splitlines()[0] if op.summary else "",
            "operationId": _operation_id(op),
            "tags": [op.tag],
            "parameters": params,
            "responses": {str(op.status): _response(op), "400": fault, "401": fault,
                          "403": fault, "404": fault, "409": fault},
        }
        if op.body is not None:
            entry["requestBody"] = {"required": op.method != "POST" or op.body.tag != "action",
                                    "content": {"application/json": {"schema": _schema(op.body)}}}
        path = prefix + op.path.rstrip("/") if op.path != "/" else prefix
        paths.setdefault(path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "Virtyard engine API (oVirt v4 compatible, JSON flavour)",
                 "version": "4"},
        "paths": paths,
        "components": {
            "schemas": {tag: _type_schema(t) for tag, t in sorted(REGISTRY.items())},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _operation_id(op: Operation) -> str:
    words = [w for w in re.split(r"[/{}]+", op.path) if w]
    return op.method.lower() + "".join(w[:1].upper() + w[1:] for w in words)
