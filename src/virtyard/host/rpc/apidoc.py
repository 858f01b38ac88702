"""Generate the host agent's API reference (``docs/host-api.md``) from the verb schema.

    python -m virtyard.host.rpc.apidoc > docs/host-api.md

A test checks that the committed reference equals what this prints, so it never goes stale.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from pydantic import TypeAdapter
from pydantic_core import PydanticUndefined

from virtyard.host.rpc.errors import (
    InvalidParamsError,
    InvalidRequestError,
    MethodNotFoundError,
    ParseError,
)
from virtyard.host.rpc.schema import Schema, Verb


def _type_name(schema: dict[str, Any] | bool) -> str:
    if isinstance(schema, bool):  # JSON Schema's "anything" (true)
        return "any"
    if "title" in schema and schema.get("type") == "object" and "properties" in schema:
        return str(schema["title"])
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type_name(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list[{_type_name(schema.get('items', {}))}]"
    if kind == "object" and "additionalProperties" in schema:
        return f"dict[str, {_type_name(schema['additionalProperties'])}]"
    return str(kind)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _parameter_models(definitions: dict[str, Any]) -> list[str]:
    """A table for every model nested in the parameters (a disk dict's fields, …)."""
    lines: list[str] = []
    for name, definition in sorted(definitions.items()):
        props = definition.get("properties")
        if not props:
            continue
        required = set(definition.get("required", []))
        about = inspect.cleandoc(definition.get("description", "")).split("\n\n")[0]
        lines += ["", f"`{name}`" + (f": {_cell(about)}" if about else ""), "",
                  "| field | type | default | description |", "|---|---|---|---|"]
        for field, prop in props.items():
            default = ("required" if field in required else
                       json.dumps(prop["default"], default=str) if "default" in prop else
                       "[]" if prop.get("type") == "array" else "{}")
            lines.append(f"| `{field}` | {_cell(_type_name(prop))} | {default} | "
                         f"{_cell(prop.get('description', ''))} |")
    return lines


def _verb_section(verb: Verb[Any]) -> list[str]:
    doc = inspect.cleandoc(verb.doc) if verb.doc else "(no description)"
    lines = [f"## `{verb.name}`", "", doc, "", "**Parameters**", ""]
    params_schema = verb.params.model_json_schema()
    props = params_schema.get("properties", {})
    if not props:
        lines.append("none")
    else:
        lines += ["| name | type | default | description |", "|---|---|---|---|"]
        for name, field in verb.params.model_fields.items():
            prop = props.get(name, {})
            default = ("required" if field.is_required() else
                       "[]" if field.default is PydanticUndefined else
                       "\"\"" if str(field.default) in ("", "**********") else
                       json.dumps(field.default, default=str))
            description = (field.description or "").replace("|", "\\|")
            kind = _type_name(prop).replace("|", "\\|")
            lines.append(f"| `{name}` | {kind} | {default} | {description} |")
    lines += _parameter_models(params_schema.get("$defs", {}))
    result_schema = TypeAdapter(verb.result).json_schema()
    lines += ["", f"**Returns** `{_type_name(result_schema)}`", ""]
    definitions = dict(result_schema.get("$defs", {}))
    if "properties" in result_schema and "title" in result_schema:
        definitions[result_schema["title"]] = result_schema
    for name, definition in sorted(definitions.items()):
        fields = ", ".join(f"`{k}`: {_type_name(v)}"
                           for k, v in definition.get("properties", {}).items())
        lines.append(f"- `{name}`: {fields}")
    errors = ", ".join(f"{e.code} `{e.name}`" for e in verb.errors) or "none beyond the common"
    lines += ["", f"**Errors** {errors}", ""]
    return lines


def render(schema: Schema[Any]) -> str:
    """The whole reference as Markdown."""
    common = (ParseError, InvalidRequestError, MethodNotFoundError, InvalidParamsError)
    lines = [
        "# Host agent API reference",
        "",
        "Generated from the verb schema by `python -m virtyard.host.rpc.apidoc`; do not edit.",
        "",
        "Transport: JSON-RPC 2.0, `POST https://<host>:<port>/jsonrpc`, mutual TLS (a client",
        "certificate signed by the engine's CA is required). Parameters by name (an object) or",
        "by position (an array, in the order listed). Errors are JSON-RPC error objects",
        "`{code, message, data: {name, ...}}`.",
        "",
        "Common errors: " + ", ".join(f"{e.code} `{e.name}`" for e in common)
        + ", 100 `GeneralException` (an unexpected failure; the agent logs it).",
        "",
    ]
    for name in sorted(schema.verbs):
        lines += _verb_section(schema.verbs[name])
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    from virtyard.host.verbs import SCHEMA

    print(render(SCHEMA), end="")
