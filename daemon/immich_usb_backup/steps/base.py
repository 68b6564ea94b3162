"""The shape every pipeline step has, and what a run (and ``verify TARGET``) gives it.

A step owns its folder on the disk (``folder``, its lines of README.txt), its
prerequisites (``check``, for the ``check`` command), what ``verify TARGET`` checks of
its folder (``check_disk``), and its phases in a run, which the flow runs for every
enabled step in the order of ``steps.STEPS``, one phase across all steps before the next
(docs/design.md, "The shape of a step", has the contract).
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
from immich_usb_backup.diskreport import Report
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
    # each step's result once it wrote, by name: a later step reads an earlier one's
    results: dict[str, StepResult] = field(default_factory=dict)
    steps: tuple[type[Step], ...] = ()  # the run's steps, enabled ones, in their order

    @property
    def disk_key(self) -> str:
        """What the state dir knows this disk by: its file system UUID."""
        return self.disk.uuid or f"path:{self.disk.mount_point}"

    def check_cancel(self) -> None:
        """Called from worker threads between blocks: stop when the run is interrupted."""
        if self.cancel.is_set():
            raise Cancelled("interrupted")


@dataclass
class DiskCheck:
    """What ``verify TARGET`` gives a step's ``check_disk``: the backup folder (mounted,
    read only), the report to fill, the live status, the stop event, the share of
    files to read back (None: all) and the disk's device (to drop its cache)."""

    config: Config
    root: Path
    report: Report
    status: StatusWriter
    stop: threading.Event
    sample: float | None = None
    device: str = ""
    work: Path | None = None  # a scratch folder for the whole check (in the state dir)
    library_reads: Path | None = None  # the library's check: what it read back (SQLite)

    def check_stop(self) -> None:
        if self.stop.is_set():
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
    history's ``steps``), ``folder`` and ``readme``, ``enabled`` and at least
    ``preflight`` and ``write``."""

    name: ClassVar[str]
    folder: ClassVar[str | None] = None  # its folder in the backup folder (layout's name)
    readme: ClassVar[str] = ""  # its lines of README.txt's "What is here" (aligned)

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    @classmethod
    @abc.abstractmethod
    def enabled(cls, config: Config) -> bool:
        """Whether the configuration turns this step on."""

    @classmethod
    async def check(cls, config: Config) -> list[str]:
        """What on this machine would stop or weaken the step (for the ``check``
        command): each problem a sentence naming the key or the program. None by
        default."""
        return []

    @classmethod
    def check_disk(cls, check: DiskCheck) -> None:
        """``verify TARGET``: check the step's folder in ``check.root`` from the disk
        alone, reading only, into ``check.report``. In a thread. Nothing by default."""
        return

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

    async def finish(self, result: StepResult) -> None:
        """After every step wrote: check what ``write`` wrote and write what describes
        it (the library: compare contents, write the manifest); raise ``BackupError``
        after naming each difference in ``ctx.problems``. Nothing by default."""
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
