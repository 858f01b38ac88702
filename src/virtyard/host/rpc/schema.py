"""One schema for every host-agent verb: names, typed parameters, results, errors, locks.

A verb is a function registered with :meth:`Schema.verb`. Its parameters are a pydantic model
(field order = positional order, defaults, descriptions), its result a type. The same object
drives dispatch, parameter validation (-32602 naming the parameter) and the generated API
reference (``docs/host-api.md``), so the three can never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from virtyard.host.rpc.errors import HostError, InvalidParamsError

Ctx = TypeVar("Ctx")
P = TypeVar("P", bound="Params")


class Params(BaseModel):
    """Base of every verb's parameter model: unknown parameters are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(Params):
    """A verb that takes no parameters."""


@dataclass(frozen=True)
class Verb(Generic[Ctx]):
    """One registered verb."""

    name: str
    params: type[Params]
    result: Any
    errors: tuple[type[HostError], ...]
    handler: Callable[[Ctx, Any], Any]
    doc: str
    locks: Callable[[Any], Iterable[str]] | None = None
    _result_adapter: TypeAdapter[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_result_adapter", TypeAdapter(self.result))

    def parse_params(self, raw: object) -> Params:
        """Validate JSON-RPC ``params`` (object or array) into the verb's model."""
        fields = list(self.params.model_fields)
        if raw is None:
            raw = {}
        if isinstance(raw, list):
            if len(raw) > len(fields):
                raise InvalidParamsError(f"{self.name} takes at most {len(fields)} parameters, "
                                    f"{len(raw)} given")
            raw = dict(zip(fields, raw, strict=False))
        if not isinstance(raw, dict):
            raise InvalidParamsError("params must be an object or an array")
        try:
            return self.params.model_validate(raw)
        except ValidationError as exc:
            raise InvalidParamsError(_describe(exc), **_detail(exc)) from None

    def dump_result(self, value: Any) -> Any:
        """The result as JSON-ready data, checked against the declared result type."""
        return self._result_adapter.dump_python(
            self._result_adapter.validate_python(value), mode="json", by_alias=True)

    def lock_keys(self, params: Params) -> list[str]:
        """Keys (connection ids, device GUIDs, VM ids) whose operations must not overlap."""
        return sorted(set(self.locks(params))) if self.locks else []


def _where(err: ErrorDetails) -> str:
    """The parameter an error is about, ``vmParams.devices[2].iface``: pydantic's location,
    plus the field a custom error names inside the value it checked (context ``field``)."""
    loc: list[str | int] = list(err["loc"])
    inner = (err.get("ctx") or {}).get("field")
    if isinstance(inner, str) and inner:
        loc += [int(p) if p.isdigit() else p for p in inner.split(".")]
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _error_list(exc: ValidationError) -> list[dict[str, str]]:
    return [{"parameter": _where(err), "error": err["msg"]} for err in exc.errors()]


def _describe(exc: ValidationError) -> str:
    """'invalid parameter 'port': Input should be a valid integer' — the first problem, named."""
    err = exc.errors()[0]
    where = _where(err) or "params"
    if err["type"] == "missing":
        return f"missing parameter '{where}'"
    if err["type"] == "extra_forbidden":
        return f"unknown parameter '{where}'"
    return f"invalid parameter '{where}': {err['msg']}"


def _detail(exc: ValidationError) -> dict[str, Any]:
    """``data`` of the -32602 error: every problem, and the first one's parameter and (for a
    rule of ours, e.g. ``lun_needs_scsi``) its stable reason."""
    first = exc.errors()[0]
    out: dict[str, Any] = {"errors": _error_list(exc), "parameter": _where(first) or "params"}
    if "field" in (first.get("ctx") or {}):
        out["reason"] = first["type"]
    return out


class Schema(Generic[Ctx]):
    """The registry of verbs one agent serves."""

    def __init__(self) -> None:
        self.verbs: dict[str, Verb[Ctx]] = {}

    def verb(
        self,
        name: str,
        *,
        params: type[P],
        result: Any,
        errors: tuple[type[HostError], ...] = (),
        locks: Callable[[P], Iterable[str]] | None = None,
    ) -> Callable[[Callable[[Ctx, P], Any]], Callable[[Ctx, P], Any]]:
        """Register ``handler(ctx, params) -> result`` as verb ``name``."""

        def register(handler: Callable[[Ctx, P], Any]) -> Callable[[Ctx, P], Any]:
            if name in self.verbs:
                raise ValueError(f"verb {name} registered twice")
            self.verbs[name] = Verb(name=name, params=params, result=result, errors=errors,
                                    handler=handler, doc=(handler.__doc__ or "").strip(),
                                    locks=locks)
            return handler

        return register
