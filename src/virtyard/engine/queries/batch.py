"""Loading related rows for whole lists: ``column IN (ids)`` as one statement for any number of
ids, and building large answers without the garbage collector's quadratic cost.

Related rows are loaded for a whole list at once (never one statement per row), so an id list
can hold tens of thousands of ids: more than SQLite (32,766) or PostgreSQL (65,535) accept as
bind parameters. Short lists are plain ``IN (…)``; long ones travel as one JSON text parameter
that the database unpacks itself (``json_each`` on SQLite, ``json_array_elements_text`` on
PostgreSQL), which also keeps the statement text, and so the statement caches, the same.
"""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import JSON, ColumnElement, Row, Select, String, cast, column, func, literal, select
from sqlalchemy.orm import Session

INLINE_MAX = 256
# Statements and rows of any columns (lists select columns, not ORM objects).
AnySelect = Select[*tuple[Any, ...]]
AnyRow = Row[*tuple[Any, ...]]


def ids_in(tx: Session, col: Any, ids: Iterable[str]) -> ColumnElement[bool]:
    """``col IN ids`` (duplicates dropped) as one statement, whatever the count."""
    unique = list(dict.fromkeys(ids))
    if len(unique) <= INLINE_MAX:
        result: ColumnElement[bool] = col.in_(unique)
        return result
    payload = literal(json.dumps(unique), String)
    if tx.get_bind().dialect.name == "postgresql":
        values = select(func.json_array_elements_text(cast(payload, JSON)))
    else:
        values = select(column("value")).select_from(func.json_each(payload))
    result = col.in_(values.scalar_subquery())
    return result



_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a large answer is built.

    A list of thousands of VMs with their disks is hundreds of thousands of dicts that all stay
    alive; each one allocated counts towards the next collection, and the full collections
    that follow traverse the whole growing heap again and again (measured: half the time of
    building 2,000 VMs with 10,000 disks). Reference counting still frees everything as usual;
    only cycles wait for the next collection. Pauses nest across threads (counted).
    """
    global _gc_pauses, _gc_was_enabled  # noqa: PLW0603
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()
