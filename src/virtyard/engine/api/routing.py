"""Operations of the REST API, declared once: path, method, wire types, query parameters.

Each resource module declares its operations on :data:`ROUTES` with a decorator; the same
declarations become Starlette routes (``api/app.py``) and the OpenAPI document
(``api/openapi.py``). A handler is a plain function of an :class:`ApiRequest` that runs in a
worker thread, parses nothing and renders nothing: it calls a command or a query and returns
model data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import QueryParams

from virtyard.engine.api.faults import bad_request
from virtyard.engine.api.types.base import Model, Type
from virtyard.engine.commands.base import Context, Principal


@dataclass(frozen=True)
class QueryParam:
    name: str
    kind: str  # string | integer | boolean
    doc: str


SEARCH = QueryParam("search", "string", "oVirt search query, e.g. name=web*")
CASE_SENSITIVE = QueryParam("case_sensitive", "boolean",
                            "Whether search compares case (default true).")
MAX = QueryParam("max", "integer", "At most this many results.")
FOLLOW = QueryParam("follow", "string",
                    "Links to render inline, comma separated (e.g. disk_attachments.disk).")
ALL_CONTENT = QueryParam("all_content", "boolean", "Include every attribute.")
ASYNC = QueryParam("async", "boolean", "Answer before the action completes.")
LIST_QUERY = (SEARCH, CASE_SENSITIVE, MAX, FOLLOW, ALL_CONTENT)
GET_QUERY = (FOLLOW, ALL_CONTENT)


@dataclass
class ApiRequest:
    """One request, as a handler sees it."""

    services: Any
    principal: Principal
    path: dict[str, str]
    query: QueryParams
    body: Model | None
    correlation_id: str = ""

    def ctx(self) -> Context:
        ctx = Context(self.services.db, self.principal, self.services)
        if self.correlation_id:
            ctx.correlation_id = self.correlation_id
        return ctx

    def flag(self, name: str, default: bool = False) -> bool:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise bad_request(f"Invalid value '{raw}' for parameter '{name}': not a boolean")

    def integer(self, name: str, *, minimum: int = 0) -> int | None:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return None
        try:
            value = int(raw)
        except ValueError:
            raise bad_request(f"Invalid value '{raw}' for parameter '{name}': "
                              "not an integer") from None
        if value < minimum or value > (1 << 62):
            raise bad_request(f"Invalid value '{raw}' for parameter '{name}'")
        return value

    def text(self, name: str) -> str:
        return self.query.get(name) or ""

    def follow(self) -> list[str]:
        return [p.strip() for p in self.text("follow").split(",") if p.strip()]


Handler = Callable[[ApiRequest], Any]


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # below /ovirt-engine/api, e.g. /hosts/{id}
    handler: Handler
    summary: str
    body: Type | None = None
    returns: Type | None = None
    many: bool = False
    query: tuple[QueryParam, ...] = ()
    status: int = 200
    tag: str = ""


@dataclass
class Routes:
    operations: list[Operation] = field(default_factory=list)

    def _add(self, method: str, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            summary = kwargs.pop("summary", None) or (handler.__doc__ or "").strip()
            tag = kwargs.pop("tag", None) or path.strip("/").split("/")[0] or "system"
            self.operations.append(Operation(method, path, handler, summary, tag=tag,
                                             **kwargs))
            return handler
        return register

    def get(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        return self._add("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        return self._add("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        return self._add("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        return self._add("DELETE", path, **kwargs)


ROUTES = Routes()
