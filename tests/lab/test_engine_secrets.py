"""No secret leaks: after everything the other engine tests did (this module runs after them
for each database), neither the engine's log nor its audit log holds a password or a token
handed out in the session, and the database keeps tokens and passwords only as hashes.

Runs on both databases (the ``engine`` fixture).
"""

from __future__ import annotations

import json
from typing import Any

import ovirtsdk4 as sdk4
import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.lab


def test_no_password_or_token_in_the_log_or_the_events(engine: Any,
                                                       sdk: sdk4.Connection) -> None:
    from virtyard.engine.db.models import Event, Session, User  # noqa: PLC0415

    # This test's own share: a login, a failed login and a logout.
    token = engine.login()
    engine.sso("admin@internal", engine.password + "-not")
    assert engine.request("GET", "/hosts", token=token).status_code == 200
    engine.logout(token)
    sdk.system_service().events_service().list(max=1)

    secrets = {s for s in engine.secrets if len(s) >= 8}
    secrets.add(engine.password + "-not")
    assert engine.password in secrets
    assert len(secrets) >= 3

    log = engine.log_path.read_text(errors="replace")
    assert log.strip(), "the engine wrote no log"
    api_events = json.dumps(engine.get_json("/events"))
    db = engine.database()
    try:
        with db.connect() as conn:
            events = json.dumps([[str(v) for v in row]
                                 for row in conn.execute(sa.select(Event)).all()])
            sessions = json.dumps([[str(v) for v in row]
                                   for row in conn.execute(sa.select(Session)).all()])
            users = json.dumps([[str(v) for v in row]
                                for row in conn.execute(sa.select(User)).all()])
    finally:
        db.dispose()
    assert json.loads(api_events)["event"], "no events to look at"

    for secret in secrets:
        shown = secret[:4] + "…"
        assert secret not in log, f"a secret ({shown}) is in the engine's log"
        assert secret not in api_events, f"a secret ({shown}) is in the events (API)"
        assert secret not in events, f"a secret ({shown}) is in the events table"
        assert secret not in sessions, f"a secret ({shown}) is in the sessions table"
        assert secret not in users, f"a secret ({shown}) is in the users table"
