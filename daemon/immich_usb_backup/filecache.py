"""What was computed from state files, kept until one of them changes.

The history page and the web UI read the whole history (``history.jsonl``, thousands of
runs) to sum up each disk; the file changes once a run. ``FileCache`` keeps a function's
result with the files' (inode, size, modification time) and computes it again only when
one of them differs. Blocking (``stat``, and the function): call it in a thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

Signature = tuple[tuple[int, int, int] | None, ...]


def signature(paths: Sequence[Path]) -> Signature:
    """Each file's (inode, size, mtime in ns), None for one that does not exist."""
    out: list[tuple[int, int, int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class FileCache(Generic[T]):
    """``get()``: ``compute()``'s result, computed again when ``paths`` changed."""

    def __init__(self, paths: Sequence[Path], compute: Callable[[], T]) -> None:
        self.paths, self.compute = list(paths), compute
        self._lock = threading.Lock()
        self._kept: tuple[Signature, T] | None = None

    def get(self) -> T:
        before = signature(self.paths)
        with self._lock:
            if self._kept is not None and self._kept[0] == before:
                return self._kept[1]
        value = self.compute()
        if signature(self.paths) == before:  # not changed while computing: keep it
            with self._lock:
                self._kept = (before, value)
        return value
