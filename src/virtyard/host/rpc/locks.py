"""Named locks: verbs run concurrently, but operations on the same connection, device or VM
are serialised. Locks are created on first use and dropped when nobody holds or waits for them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


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
