"""Schemathesis against the running engine: every operation of its OpenAPI document, with
valid and invalid input in both flavours (the Accept header), and not one server error.

The document is read from the engine itself (``GET /ovirt-engine/api/openapi.json``, with the
bearer token). Generation is derandomized and bounded (``MAX_EXAMPLES`` per operation and
mode), so a run is repeatable and takes well under a minute per database. Failures are
collected over all operations and reported together, each with the request that reproduces it.

(Schemathesis' own pytest integration, ``schemathesis.pytest.from_fixture``, cannot be used
here: 4.32.5 reads ``Function._nodeid``, which pytest 9.2 no longer has. Its Python API is:
one Hypothesis test per operation and generation mode, built from ``as_strategy``.)
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.lab

# Examples per operation and generation mode: at most this many, fewer when the API has many
# operations, so the whole run stays near TOTAL_EXAMPLES requests (well under a minute).
MAX_EXAMPLES = 60
MIN_EXAMPLES = 10
TOTAL_EXAMPLES = 2400
ACCEPT = ["application/xml", "application/json"]


def _repro(failure: BaseException) -> str:
    """The first ``curl`` line of Schemathesis' report, or the report's start."""
    text = str(failure)
    for sub in getattr(failure, "exceptions", ()):
        text += "\n" + str(sub)
    found = re.search(r"curl [^\n]+", text)
    status = re.search(r"\[(\d{3})\]", text)
    head = f"[{status.group(1)}] " if status else ""
    return head + (found.group(0) if found else text.strip().splitlines()[0][:300])


def fuzz(operation: Any, mode: GenerationMode, token: str, examples: int) -> str | None:
    """Run one operation in one generation mode; the failure's reproduction, if any."""
    @given(case=operation.as_strategy(generation_mode=mode), accept=st.sampled_from(ACCEPT))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
              phases=[Phase.explicit, Phase.generate, Phase.shrink])
    def run(case: Any, accept: str) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {token}", "Accept": accept},
                               checks=[not_a_server_error], timeout=30)

    try:
        run()
    except (Exception, BaseExceptionGroup) as failure:
        return _repro(failure)
    return None


def test_openapi_fuzz_finds_no_server_error(engine: Any) -> None:
    token = engine.login()
    document = engine.get_json("/openapi.json")
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=engine.base, tls_verify=engine.ca_file)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13, [op.label for op in operations]

    examples = max(MIN_EXAMPLES, min(MAX_EXAMPLES, TOTAL_EXAMPLES // (2 * len(operations))))
    started = time.monotonic()
    failures = []
    try:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                found = fuzz(operation, mode, token, examples)
                if found is not None:
                    failures.append(f"{operation.label} ({mode.value}): {found}")
    finally:
        engine.remove_all_hosts()  # valid random hosts may have been added
    elapsed = time.monotonic() - started
    print(f"fuzzed {len(operations)} operations x 2 modes x {examples} examples on "
          f"{engine.kind} in {elapsed:.0f} s")
    assert not failures, (f"server errors on {engine.kind} ({elapsed:.0f} s):\n  "
                          + "\n  ".join(failures))
