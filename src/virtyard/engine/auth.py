"""Users, passwords and tokens.

Passwords are argon2id hashes (argon2-cffi). A login returns a random bearer token; only its
SHA-256 is stored (``sessions``), with an expiry that each use pushes forward (sliding, like
oVirt's SSO). Nothing here logs a password or a token.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session as DbSession

from virtyard.engine.commands.base import ROLES, Principal
from virtyard.engine.db.database import Database
from virtyard.engine.db.models import Session, User, utcnow

_HASHER = PasswordHasher()
# Checked against when the user does not exist, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _HASHER.hash("virtyard-no-such-user")
DEFAULT_DOMAIN = "internal"


class AuthError(Exception):
    """Bad credentials, or a token that is unknown or expired."""


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def split_user(login: str) -> tuple[str, str]:
    """``admin@internal`` → (``admin``, ``internal``); no domain → the internal one."""
    name, _, domain = login.rpartition("@")
    if not name:
        return login, DEFAULT_DOMAIN
    return name, domain or DEFAULT_DOMAIN


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def principal_of(user: User) -> Principal:
    return Principal(user.id, f"{user.name}@{user.domain}", user.role)


@dataclass(frozen=True)
class Login:
    token: str
    principal: Principal
    expires_at: datetime.datetime


class Authenticator:
    """Checks passwords, issues and verifies tokens."""

    def __init__(self, db: Database, *, token_lifetime: datetime.timedelta) -> None:
        self.db = db
        self.token_lifetime = token_lifetime

    def add_user(self, login: str, password: str, role: str) -> User:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        name, domain = split_user(login)
        with self.db.transaction() as tx:
            user = User(name=name, domain=domain, password_hash=hash_password(password),
                        role=role)
            tx.add(user)
        return user

    def set_password(self, login: str, password: str) -> None:
        name, domain = split_user(login)
        with self.db.transaction() as tx:
            user = tx.scalars(select(User).where(User.name == name,
                                                 User.domain == domain)).one()
            user.password_hash = hash_password(password)

    def find_user(self, tx: DbSession, login: str) -> User | None:
        name, domain = split_user(login)
        return tx.scalars(select(User).where(User.name == name, User.domain == domain)).first()

    def login(self, login: str, password: str) -> Login:
        """A new token for valid credentials; :class:`AuthError` otherwise."""
        with self.db.transaction() as tx:
            user = self.find_user(tx, login)
            try:
                _HASHER.verify(user.password_hash if user else _DUMMY_HASH, password)
            except (VerificationError, InvalidHashError):
                raise AuthError("Cannot authenticate user: bad user name or password") from None
            if user is None:
                raise AuthError("Cannot authenticate user: bad user name or password")
            if _HASHER.check_needs_rehash(user.password_hash):
                user.password_hash = hash_password(password)
            token = secrets.token_urlsafe(32)
            expires = utcnow() + self.token_lifetime
            tx.add(Session(token_hash=_token_hash(token), user_id=user.id, expires_at=expires))
            tx.execute(delete(Session).where(Session.expires_at < utcnow()))
            return Login(token, principal_of(user), expires)

    def verify(self, token: str) -> Principal:
        """The principal a token belongs to; it lives ``token_lifetime`` past its last use."""
        now = utcnow()
        digest = _token_hash(token)
        with self.db.read() as tx:  # the common case: one read, no write lock
            row = tx.execute(select(Session.expires_at, User)
                             .join(User, User.id == Session.user_id)
                             .where(Session.token_hash == digest)).first()
        if row is None:
            raise AuthError("The token is not valid")
        expires_at, user = row
        expired = expires_at < now
        # Extended at most once a minute, so most requests never write.
        if expired or expires_at - now < self.token_lifetime - datetime.timedelta(minutes=1):
            with self.db.transaction() as tx:
                session = tx.get(Session, digest)
                if session is not None and expired:
                    tx.delete(session)
                elif session is not None:
                    session.expires_at = now + self.token_lifetime
        if expired:
            raise AuthError("The token has expired")
        return principal_of(user)

    def logout(self, token: str) -> Principal | None:
        with self.db.transaction() as tx:
            row = tx.execute(
                select(Session, User).join(User, User.id == Session.user_id)
                .where(Session.token_hash == _token_hash(token))).first()
            if row is None:
                return None
            tx.delete(row[0])
            return principal_of(row[1])
