"""Safety rules 8 and 11: one backup at a time, and none while a writer of an earlier
one is alive.

The lock is an ``flock`` on ``<state dir>/backup.lock``; the kernel releases it when the
last holder exits, however it exits, so a crash never leaves a stale lock behind. Every
child a run starts (rsync, the listing helpers, PostgreSQL's programs) inherits the
lock's file descriptor (``execute``), so the lock stays held until the last process of
a run is gone: a next run cannot start beside a leftover writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from immich_usb_backup.errors import Refused
from immich_usb_backup.state import LOCK as LOCK_NAME

_held: list[int] = []  # the descriptor of the lock this process holds now, if any


def held_fds() -> tuple[int, ...]:
    """The lock descriptors the children of a run inherit (none outside a run)."""
    return tuple(_held)


@contextlib.contextmanager
def backup_lock(state_dir: Path) -> Iterator[None]:
    """Hold the backup lock for the block; raise Refused if another run holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise Refused(
                f"another backup is already running (process {holder}); only one backup "
                "runs at a time" if holder else
                "a process of an earlier backup is still running (it holds the backup "
                "lock); only one backup runs at a time: try again when it has ended"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held.append(fd)
        try:
            yield
        finally:
            _held.remove(fd)
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
