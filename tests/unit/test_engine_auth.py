"""Users, argon2 passwords and tokens: only hashes stored, tokens expire, logout ends them."""

from __future__ import annotations

import datetime

import pytest
from sqlalchemy import select

from virtyard.engine.auth import Authenticator, AuthError, split_user
from virtyard.engine.db.database import Database
from virtyard.engine.db.models import Session, User, utcnow


@pytest.fixture
def auth(any_db: Database) -> Authenticator:
    authenticator = Authenticator(any_db,
                                  token_lifetime=datetime.timedelta(minutes=30))
    authenticator.add_user("admin@internal", "s3cret-pass", "admin")
    return authenticator


def test_split_user() -> None:
    assert split_user("admin@internal") == ("admin", "internal")
    assert split_user("admin") == ("admin", "internal")
    assert split_user("a@b@corp") == ("a@b", "corp")


def test_login_verify_logout(auth: Authenticator) -> None:
    login = auth.login("admin@internal", "s3cret-pass")
    assert auth.verify(login.token).name == "admin@internal"
    assert auth.verify(login.token).can_write
    assert auth.logout(login.token) is not None
    with pytest.raises(AuthError):
        auth.verify(login.token)


def test_only_hashes_are_stored(auth: Authenticator) -> None:
    login = auth.login("admin@internal", "s3cret-pass")
    db: Database = auth.db
    with db.read() as tx:
        user = tx.scalars(select(User)).one()
        tokens = [s.token_hash for s in tx.scalars(select(Session))]
    assert user.password_hash.startswith("$argon2id$") and "s3cret" not in user.password_hash
    assert login.token not in tokens and len(tokens) == 1 and len(tokens[0]) == 64


@pytest.mark.parametrize(("login", "password"), [
    ("admin@internal", "wrong"), ("nobody@internal", "s3cret-pass"), ("admin@other", "s3cret-pass"),
])
def test_bad_credentials(auth: Authenticator, login: str, password: str) -> None:
    with pytest.raises(AuthError, match="bad user name or password"):
        auth.login(login, password)


def test_forged_and_expired_tokens(auth: Authenticator) -> None:
    with pytest.raises(AuthError):
        auth.verify("forged-token")
    login = auth.login("admin@internal", "s3cret-pass")
    with auth.db.transaction() as tx:
        for session in tx.scalars(select(Session)):
            session.expires_at = utcnow() - datetime.timedelta(seconds=1)
    with pytest.raises(AuthError, match="expired"):
        auth.verify(login.token)
    with auth.db.read() as tx:
        assert tx.scalars(select(Session)).first() is None  # an expired session is dropped


def test_use_extends_the_token(auth: Authenticator) -> None:
    login = auth.login("admin@internal", "s3cret-pass")
    with auth.db.transaction() as tx:
        session = tx.scalars(select(Session)).one()
        session.expires_at = utcnow() + datetime.timedelta(minutes=5)
    auth.verify(login.token)
    with auth.db.read() as tx:
        expires = tx.scalars(select(Session)).one().expires_at
    assert expires > utcnow() + datetime.timedelta(minutes=29)


def test_roles_are_checked(auth: Authenticator) -> None:
    with pytest.raises(ValueError, match="role"):
        auth.add_user("x@internal", "pw", "superuser")
    auth.add_user("viewer@internal", "pw-viewer", "readonly")
    assert not auth.verify(auth.login("viewer@internal", "pw-viewer").token).can_write
