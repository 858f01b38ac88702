"""oVirt's ``search=`` language, the part clients use: ``name=web*``, ``name="my vm"``,
``status!=up``, ``a and b``, an optional ``Vms:`` prefix, ``*`` as a wildcard.

A query becomes SQL conditions on the columns a collection declares searchable (so paging and
limits stay in the database); an unknown field or a malformed query is a 400 naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, func

from virtyard.engine.api.faults import bad_request

_TERM = re.compile(
    r"""\s*(?P<field>[A-Za-z_][\w.]*)\s*(?P<op>!=|<=|>=|=|<|>)\s*
        (?:"(?P<quoted>[^"]*)"|(?P<bare>[^\s"]*))\s*""", re.VERBOSE)
_PREFIX = re.compile(r"^\s*[A-Za-z]+\s*:\s*")


@dataclass(frozen=True)
class Term:
    field: str
    op: str
    value: str


def parse(query: str) -> list[Term]:
    """The AND-ed terms of ``query`` ('' → none)."""
    query = _PREFIX.sub("", query.strip(), count=1)
    if not query:
        return []
    terms = []
    for part in re.split(r"\s+and\s+", query, flags=re.IGNORECASE):
        if re.search(r"\s+or\s+", part, flags=re.IGNORECASE):
            raise bad_request(f"Search query '{query}': 'or' is not supported", "SEARCH_SYNTAX")
        match = _TERM.fullmatch(part)
        if not match:
            raise bad_request(f"Search query '{query}' is not valid near '{part.strip()}'",
                              "SEARCH_SYNTAX")
        value = match.group("quoted") if match.group("quoted") is not None \
            else match.group("bare")
        terms.append(Term(match.group("field").lower(), match.group("op"), value))
    return terms


def conditions(query: str, columns: dict[str, Any], *,
               case_sensitive: bool = True) -> list[ColumnElement[bool]]:
    """SQL conditions for ``query`` over ``columns`` (search field → column)."""
    out: list[ColumnElement[bool]] = []
    for term in parse(query):
        column = columns.get(term.field)
        if column is None:
            known = ", ".join(sorted(columns))
            raise bad_request(f"Search field '{term.field}' is not known here (known: {known})",
                              "SEARCH_FIELD")
        out.append(_condition(column, term, case_sensitive))
    return out


def _condition(column: Any, term: Term, case_sensitive: bool) -> ColumnElement[bool]:
    try:
        numeric = column.type.python_type is int
    except (AttributeError, NotImplementedError):
        numeric = False
    if numeric:
        if not re.fullmatch(r"-?\d{1,18}", term.value):
            raise bad_request(f"Search field '{term.field}' takes a number, not "
                              f"'{term.value[:64]}'", "SEARCH_SYNTAX")
        number = int(term.value)
        ops = {"=": column.__eq__, "!=": column.__ne__, "<": column.__lt__,
               ">": column.__gt__, "<=": column.__le__, ">=": column.__ge__}
        compared: ColumnElement[bool] = ops[term.op](number)
        return compared
    value = term.value
    left = column if case_sensitive else func.lower(column)
    if not case_sensitive:
        value = value.lower()
    if term.op in ("=", "!=") and "*" in value:
        pattern = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = pattern.replace("*", "%")
        like = left.like(pattern, escape="\\")
        return like if term.op == "=" else ~like
    ops = {"=": left.__eq__, "!=": left.__ne__, "<": left.__lt__, ">": left.__gt__,
           "<=": left.__le__, ">=": left.__ge__}
    result: ColumnElement[bool] = ops[term.op](value)
    return result


def all_of(conds: list[ColumnElement[bool]]) -> ColumnElement[bool] | None:
    return and_(*conds) if conds else None
