"""Named locks: verbs run concurrently, but operations on the same connection, device or VM
are serialised. Locks are created on first use and dropped when nobody holds or waits for them.

One table can serve every user: each takes a :meth:`KeyedLocks.scope` (``vm:``, ``prepare:``)
so that its keys never meet another's by accident, while the dispatcher's verb locks use their
own ``connection:``, ``lun:``, ``domain:`` and ``volume:`` keys. Locks that guard one object's
data (a ``threading.Lock`` around a dict) are not named locks and stay where they are.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager


class KeyedLocks:
    """A lock per key, taken in sorted order so that two multi-key callers cannot deadlock."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def _get(self, key: str) -> threading.Lock:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
            return lock

    def _put(self, key: str) -> None:
        with self._guard:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    @contextmanager
    def hold(self, keys: list[str], *, timeout: float | None = None) -> Iterator[None]:
        """Hold every lock in ``keys`` for the duration of the ``with`` block; with a
        ``timeout``, :class:`TimeoutError` when one cannot be had in time (nothing held)."""
        ordered = sorted(set(keys))
        taken: list[str] = []
        try:
            for key in ordered:
                lock = self._get(key)
                if not lock.acquire(timeout=-1 if timeout is None else timeout):
                    self._put(key)
                    raise TimeoutError(f"{key} is busy")
                taken.append(key)
            yield
        finally:
            for key in reversed(taken):
                self._locks[key][0].release()
                self._put(key)

    def __len__(self) -> int:
        with self._guard:
            return len(self._locks)

    def held(self) -> list[str]:
        """The keys held or waited for now (for debugging and tests)."""
        with self._guard:
            return sorted(self._locks)

    def scope(self, prefix: str) -> LockScope:
        """This table seen through ``prefix``: ``scope("vm:").hold([id])`` holds ``vm:<id>``."""
        return LockScope(self, prefix)


class LockScope:
    """A prefix on a :class:`KeyedLocks` table, with the same :meth:`hold`."""

    def __init__(self, table: KeyedLocks, prefix: str) -> None:
        self.table = table
        self.prefix = prefix

    def hold(self, keys: list[str], *, timeout: float | None = None
             ) -> AbstractContextManager[None]:
        """:meth:`KeyedLocks.hold` of the prefixed keys."""
        return self.table.hold([self.prefix + key for key in keys], timeout=timeout)
