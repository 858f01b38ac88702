"""The committed API reference is exactly what the schema generates (it cannot go stale)."""

from __future__ import annotations

from pathlib import Path

from virtyard.host.rpc.apidoc import render
from virtyard.host.verbs import SCHEMA

DOC = Path(__file__).resolve().parents[2] / "docs" / "host-api.md"


def test_reference_is_current() -> None:
    assert DOC.read_text() == render(SCHEMA), (
        "docs/host-api.md is stale: run .venv/bin/python -m virtyard.host.rpc.apidoc "
        "> docs/host-api.md")


def test_every_verb_is_documented_with_its_errors() -> None:
    text = DOC.read_text()
    for name, verb in SCHEMA.verbs.items():
        assert f"## `{name}`" in text
        assert verb.doc, f"{name} has no docstring"
        for error in verb.errors:
            assert f"{error.code} `{error.name}`" in text
