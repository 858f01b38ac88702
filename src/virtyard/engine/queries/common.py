"""Helpers every query uses: search + limit over a statement, lookups that 404."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from virtyard.engine.api import search
from virtyard.engine.api.faults import not_found

T = TypeVar("T")


def searched(stmt: Select[Any], query: str, columns: dict[str, Any], *,
             case_sensitive: bool = True, limit: int | None = None) -> Select[Any]:
    conds = search.conditions(query, columns, case_sensitive=case_sensitive)
    if conds:
        stmt = stmt.where(*conds)
    if limit is not None:
        stmt = stmt.limit(limit)
    return stmt


def get_or_404(tx: Session, model: type[T], ident: str, what: str) -> T:
    row = tx.get(model, ident)
    if row is None:
        raise not_found(what, ident[:64])
    return row
