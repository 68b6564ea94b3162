"""Database step: copy Immich's newest nightly dump into ``database/``, keep the last N."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from immich_usb_backup import policy
from immich_usb_backup.config import Config
from immich_usb_backup.errors import BackupError
from immich_usb_backup.fsutil import allocated, atomic_copy, fsync_dir, remove_stale_temps
from immich_usb_backup.policy import Space
from immich_usb_backup.record import StepResult
from immich_usb_backup.steps.base import Preflight, RunContext, Step, in_thread

log = logging.getLogger(__name__)

FOLDER = "database"


@dataclass
class DatabaseResult(StepResult):
    dump: str | None = None  # the newest dump's name, on the disk now

    def disk_info(self) -> dict[str, Any]:
        return {"latest_dump": self.dump} if self.dump else {}


@dataclass(frozen=True)
class DumpPlan:
    """The dump to copy (None when there is none) and the allocated bytes it will need."""

    source: Path | None
    taken_at: datetime | None
    needs_copy: bool
    alloc: int
    size: int = 0


class DatabaseStep(Step):
    """Copy Immich's newest dump into ``database/``, keep the last N."""

    name = "database"
    dump: DumpPlan

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.database.enabled

    async def preflight(self, cluster: int) -> Preflight:
        self.dump = await in_thread(self.ctx, lambda: plan(self.ctx, cluster))
        return Preflight(Space(to_write=self.dump.alloc), _line(self.dump),
                         int(self.dump.needs_copy), self.dump.size if self.dump.needs_copy
                         else 0)

    async def write(self) -> StepResult:
        return await run(self.ctx, self.dump)


def _line(dump: DumpPlan) -> str:
    if dump.source is None:
        return "database: no dump found (see the problems when it finishes)"
    if dump.needs_copy:
        return f"database: {dump.source.name} ({policy.human_bytes(dump.size)})"
    return f"database: {dump.source.name} is already on the disk"


def plan(ctx: RunContext, cluster: int) -> DumpPlan:
    """Find the newest dump; note problems (none found, too old). No writes."""
    dumps_dir = ctx.config.dumps_dir
    try:
        names = [e.name for e in os.scandir(dumps_dir) if e.is_file(follow_symlinks=False)]
    except OSError as exc:
        ctx.problems.add(f"database: cannot read the dumps folder {dumps_dir}: {exc.strerror}")
        return DumpPlan(None, None, False, 0)
    newest = policy.newest_dump(names)
    if newest is None:
        ctx.problems.add(
            f"database: no Immich database dump found in {dumps_dir}; check that Immich's "
            "database backup job is enabled (Administration > Settings > Backup)"
        )
        return DumpPlan(None, None, False, 0)
    name, taken = newest
    age = ctx.started - taken
    max_age = timedelta(hours=ctx.config.database.max_age_hours)
    if age > max_age:
        hours = age.total_seconds() / 3600
        ctx.problems.add(
            f"database: the newest dump {name} is {hours:.0f} hours old (more than "
            f"{ctx.config.database.max_age_hours:g}); check Immich's database backup job"
        )
    source = dumps_dir / name
    size = source.stat().st_size
    existing = ctx.root.root / FOLDER / name
    needs = not (existing.is_file() and existing.stat().st_size == size)
    return DumpPlan(source, taken, needs, allocated(size, cluster) if needs else 0, size)


async def run(ctx: RunContext, dump: DumpPlan) -> DatabaseResult:
    """Copy the planned dump (temp name, fsync, rename) and prune beyond ``keep``."""
    result = DatabaseResult()
    if dump.source is None:
        return result
    folder = ctx.root.path(FOLDER)
    await in_thread(ctx, lambda: remove_stale_temps(ctx.root.mkdir(FOLDER)))
    final = ctx.root.path(FOLDER, dump.source.name)
    result.dump = dump.source.name
    if dump.needs_copy:
        size = dump.size
        ctx.status.set_phase("database", size, dump.source.name)
        done = 0

        def progress(n: int) -> None:
            nonlocal done
            ctx.check_cancel()
            done += n
            ctx.status.progress(done)

        try:
            copied = await in_thread(
                ctx, lambda: atomic_copy(ctx.root, dump.source, final, progress)  # type: ignore[arg-type]
            )
        except OSError as exc:
            raise BackupError(f"database: copying {dump.source.name} failed: {exc}") from exc
        result.files, result.bytes = 1, copied
    await in_thread(ctx, lambda: _prune(ctx, folder))
    return result


def _prune(ctx: RunContext, folder: Path) -> None:
    names = [e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    for old in policy.dumps_to_prune(names, ctx.config.database.keep):
        ctx.root.path(FOLDER, old).unlink()
        log.info("pruned old dump %s", old)
    fsync_dir(folder)
