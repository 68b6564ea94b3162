"""The shape every pipeline step has, and what a run gives its steps.

A step is a class with four phases, which the flow runs for every enabled step in the
order of ``steps.STEPS`` (one phase across all steps before the next phase starts):

``prepare``    may act on the server (ask Immich for a fresh dump); writes nothing to
               the disk. Optional.
``preflight``  reads only: refuses (``Refused``) when a safety rule says so, and returns
               the space it needs on the disk and its line for the "started" message.
``write``      writes to the disk; returns the step's ``StepResult``.
``verify``     checks what ``write`` wrote (optional); raises ``BackupError`` on a
               difference, after naming each in ``ctx.problems``.

Every phase reports progress through ``ctx.status``, adds problems to ``ctx.problems``
and does its blocking file work in a thread (``in_thread``). ``close`` runs at the end
of every run that created the step, however it ended.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import ClassVar, TypeVar

from immich_usb_backup.config import Config
from immich_usb_backup.errors import BackupError
from immich_usb_backup.fsutil import BackupRoot
from immich_usb_backup.policy import Space
from immich_usb_backup.record import StepResult
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


@dataclass(frozen=True)
class Preflight:
    """What a step's preflight found: the space it needs (allocated bytes), its line
    for the "started" message (None: nothing to say), and the files and bytes it is
    about to copy."""

    space: Space
    line: str | None = None
    files: int = 0
    bytes: int = 0


class Step(abc.ABC):
    """One step of a run; see the module doc. A subclass sets ``name`` (its key in the
    history's ``steps``), ``enabled`` and at least ``preflight`` and ``write``."""

    name: ClassVar[str]

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    @classmethod
    @abc.abstractmethod
    def enabled(cls, config: Config) -> bool:
        """Whether the configuration turns this step on."""

    async def prepare(self) -> None:
        """Act on the server before the preflight; never write to the disk. Most steps
        have nothing to do here."""
        return

    @abc.abstractmethod
    async def preflight(self, cluster: int) -> Preflight:
        """Read only; refuse, or say what the step needs (``cluster``: the disk's)."""

    @abc.abstractmethod
    async def write(self) -> StepResult:
        """Write to the disk."""

    async def verify(self, result: StepResult) -> None:
        """Check what ``write`` wrote (optional: nothing by default)."""
        return

    def close(self) -> None:
        """Release what the step holds (a cache, a connection); nothing by default."""
        return


async def in_thread(ctx: RunContext, func: Callable[[], T]) -> T:
    """Run blocking ``func`` in a thread; on cancellation tell it to stop, then re-raise."""
    try:
        return await asyncio.to_thread(func)
    except asyncio.CancelledError:
        ctx.cancel.set()
        raise
