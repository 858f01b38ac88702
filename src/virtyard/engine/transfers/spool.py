"""What an upload received so far: the byte ranges (:class:`RangeSet`) and the bytes themselves
(:class:`Spool`, a sparse file on the engine).

Clients send ranges in any order and in parallel (``ovirt_imageio.client`` uses up to four
writers), so the SHA-256 that ``Volume.verify`` checks the volume against cannot be computed as
the bytes stream by. The spool keeps a copy of every byte written to the volume; at finalize
the engine checks that every byte of the declared size arrived and hashes the spool in order.
The volume is then read back by the host and compared: what the array holds is exactly what
the client sent.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from pathlib import Path

HASH_CHUNK = 8 << 20


class RangeSet:
    """Disjoint, sorted, merged half-open ranges ``[start, end)``."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        # Every range that touches or overlaps [start, end) merges into one.
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def covered(self) -> int:
        """Bytes covered."""
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def missing(self, size: int) -> list[tuple[int, int]]:
        """The gaps in ``[0, size)``."""
        gaps = []
        position = 0
        for start, end in zip(self._starts, self._ends, strict=True):
            if start >= size:
                break
            if start > position:
                gaps.append((position, start))
            position = max(position, end)
        if position < size:
            gaps.append((position, size))
        return gaps

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))


def describe_gaps(gaps: list[tuple[int, int]], limit: int = 3) -> str:
    """``bytes 0-1023, 4096-8191`` (inclusive ends, as HTTP ranges), at most ``limit``."""
    shown = ", ".join(f"{s}-{e - 1}" for s, e in gaps[:limit])
    more = f" and {len(gaps) - limit} more" if len(gaps) > limit else ""
    return f"bytes {shown}{more}"


class Spool:
    """A sparse file of ``size`` bytes holding what was received, at its offsets."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            written = os.pwrite(self._fd, view[done:], offset + done)
            if written <= 0:
                raise OSError(f"short write to the spool at {offset + done}")
            done += written

    def sha256(self, size: int | None = None) -> str:
        """SHA-256 of the first ``size`` bytes (all by default)."""
        digest = hashlib.sha256()
        todo = self.size if size is None else size
        position = 0
        while position < todo:
            chunk = os.pread(self._fd, min(HASH_CHUNK, todo - position), position)
            if not chunk:
                raise OSError(f"the spool ends at {position}, before {todo}")
            digest.update(chunk)
            position += len(chunk)
        return digest.hexdigest()

    def close(self, *, delete: bool = True) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if delete:
            self.path.unlink(missing_ok=True)
