"""oVirt's search language as clients send it, on a real SQLite table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select

from virtyard.engine.api import search
from virtyard.engine.api.faults import ApiError
from virtyard.engine.db.database import Database

META = MetaData()
THINGS = Table("things", META, Column("id", Integer, primary_key=True), Column("name", String),
               Column("status", String))
COLUMNS = {"name": THINGS.c.name, "status": THINGS.c.status}


@pytest.fixture
def names(tmp_path: Path) -> Iterator[object]:
    engine = Database(f"sqlite:///{tmp_path / 'search.db'}").engine
    META.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(THINGS), [
            {"name": "web1", "status": "up"}, {"name": "web2", "status": "down"},
            {"name": "Web3", "status": "up"}, {"name": "db 1", "status": "up"},
            {"name": "a_b%c", "status": "up"}])

    def query(q: str, case_sensitive: bool = True) -> list[str]:
        stmt = select(THINGS.c.name).where(
            *search.conditions(q, COLUMNS, case_sensitive=case_sensitive)).order_by(THINGS.c.id)
        with engine.connect() as conn:
            return [row[0] for row in conn.execute(stmt)]

    yield query


@pytest.mark.parametrize(("query", "expected"), [
    ("", ["web1", "web2", "Web3", "db 1", "a_b%c"]),
    ("name=web1", ["web1"]),
    ('name="db 1"', ["db 1"]),
    ("name=web*", ["web1", "web2"]),
    ('name="*"', ["web1", "web2", "Web3", "db 1", "a_b%c"]),
    ("name=a_b%c", ["a_b%c"]),
    ("name=a?b*", []),
    ("name=a_b*", ["a_b%c"]),
    ("name=web* and status=up", ["web1"]),
    ("Hosts: name=web2", ["web2"]),
    ("status!=up", ["web2"]),
    ("name!=web*", ["Web3", "db 1", "a_b%c"]),
])
def test_queries(names: object, query: str, expected: list[str]) -> None:
    assert names(query) == expected  # type: ignore[operator]


def test_case_insensitive(names: object) -> None:
    assert names("name=WEB*", False) == ["web1", "web2", "Web3"]  # type: ignore[operator]
    assert names("name=WEB*", True) == []  # type: ignore[operator]


@pytest.mark.parametrize(("query", "words"), [
    ("colour=red", "Search field 'colour' is not known"),
    ("name=a or name=b", "'or' is not supported"),
    ("name", "is not valid"),
    ('name="unterminated', "is not valid"),
])
def test_bad_queries_are_400(query: str, words: str) -> None:
    with pytest.raises(ApiError) as err:
        search.conditions(query, COLUMNS)
    assert err.value.status == 400 and words in err.value.detail


def test_numeric_fields_compare_numbers(tmp_path: Path) -> None:
    numbers = Table("numbers", MetaData(), Column("code", Integer, primary_key=True))
    columns = {"code": numbers.c.code}
    engine = Database(f"sqlite:///{tmp_path / 'n.db'}").engine
    numbers.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(numbers), [{"code": 12}, {"code": 44}])
        found = conn.execute(select(numbers.c.code).where(
            *search.conditions("code>=13", columns))).scalars().all()
    assert found == [44]
    with pytest.raises(ApiError, match="takes a number"):
        search.conditions("code=abc", columns)
