"""Pipeline steps. Each takes the run context, reports progress through
``ctx.status``, adds problems to ``ctx.problems`` and returns a StepResult.

The order they run in is in ``flow.py``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from immich_usb_backup.config import Config
from immich_usb_backup.errors import BackupError
from immich_usb_backup.fsutil import BackupRoot
from immich_usb_backup.scan import Problems
from immich_usb_backup.status import StatusWriter
from immich_usb_backup.target import Disk

T = TypeVar("T")


class Cancelled(BackupError):
    """Raised inside a worker thread when the run was interrupted."""


@dataclass
class RunContext:
    config: Config
    disk: Disk
    root: BackupRoot
    status: StatusWriter
    problems: Problems
    work_dir: Path
    started: datetime
    mode: str
    cancel: threading.Event = field(default_factory=threading.Event)
    writing: bool = False  # set once the preflight passed and the disk is written to

    @property
    def disk_key(self) -> str:
        """What the state dir knows this disk by: its file system UUID."""
        return self.disk.uuid or f"path:{self.disk.mount_point}"

    def check_cancel(self) -> None:
        """Called from worker threads between blocks: stop when the run is interrupted."""
        if self.cancel.is_set():
            raise Cancelled("interrupted")


@dataclass
class StepResult:
    name: str
    files: int = 0
    bytes: int = 0
    info: dict[str, Any] = field(default_factory=dict)


async def in_thread(ctx: RunContext, func: Callable[[], T]) -> T:
    """Run blocking ``func`` in a thread; on cancellation tell it to stop, then re-raise."""
    try:
        return await asyncio.to_thread(func)
    except asyncio.CancelledError:
        ctx.cancel.set()
        raise
