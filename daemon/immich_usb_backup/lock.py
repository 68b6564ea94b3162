"""Safety rule 8: one backup at a time, across the daemon and the command line.

The lock is an ``flock`` on ``<state dir>/backup.lock``; the kernel releases it when the
holder exits, however it exits, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from immich_usb_backup.errors import Refused

LOCK_NAME = "backup.lock"


@contextlib.contextmanager
def backup_lock(state_dir: Path) -> Iterator[None]:
    """Hold the backup lock for the block; raise Refused if another run holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise Refused(
                f"another backup is already running (process {holder}); only one backup "
                "runs at a time"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def is_running(state_dir: Path) -> bool:
    """True while some process holds the backup lock."""
    try:
        fd = os.open(state_dir / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
