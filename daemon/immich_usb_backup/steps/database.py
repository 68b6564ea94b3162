"""Database step: the newest database dump into ``database/`` on the disk, the last N kept.

Where the dump comes from (``database.source``):

- ``nightly``: the newest of the dumps Immich wrote in its dumps folder (or those
  ``database.dump_glob`` names), by the time in the name, else by modification time;
- ``immich-api``: ``prepare`` asks Immich to start its database backup job now and
  waits (bounded) for the new dump to be complete in the dumps folder: the ``.tmp``
  renamed, its size no longer growing. When Immich cannot be reached, refuses the key or
  takes too long, the newest nightly dump is copied and the reason is a problem;
- ``command``: ``prepare`` runs ``database.command`` (bounded), its standard output into
  the run's work folder on the server; ``write`` compresses it onto the disk. A failed,
  empty or incomplete dump is a problem, and the newest nightly dump (if any) is copied.

A dump stored under a name without Immich's time in it is given one on the disk
(``immich-db-backup-<its time>-<its name>.sql.gz``), so the newest can be told and the
oldest pruned.
"""

from __future__ import annotations

import asyncio
import glob
import gzip
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from immich_usb_backup import dumps, execute, immich, layout
from immich_usb_backup.config import Config
from immich_usb_backup.errors import BackupError, CommandError
from immich_usb_backup.fsutil import (
    COPY_BLOCK,
    allocated,
    atomic_copy,
    atomic_write,
    fsync_dir,
    remove_stale_temps,
)
from immich_usb_backup.policy import Space
from immich_usb_backup.record import StepResult
from immich_usb_backup.steps.base import DiskCheck, Preflight, RunContext, Step, in_thread
from immich_usb_backup.text import human_bytes, plural

log = logging.getLogger(__name__)

FOLDER = layout.DATABASE
POLL_S = 1.0  # how often the dumps folder is looked at while Immich writes a dump


@dataclass
class DatabaseResult(StepResult):
    dump: str | None = None  # the newest dump's name, on the disk now

    def disk_info(self) -> dict[str, Any]:
        return {"latest_dump": self.dump} if self.dump else {}


@dataclass(frozen=True)
class DumpPlan:
    """The dump to copy (None when there is none), its name on the disk, and the
    allocated bytes it will need. ``compress``: a plain SQL file, gzipped on the way."""

    source: Path | None
    taken_at: datetime | None
    needs_copy: bool
    alloc: int
    size: int = 0
    name: str = ""
    compress: bool = False


class DatabaseStep(Step):
    """The newest (or a fresh) dump into ``database/``, keep the last N."""

    name = "database"
    folder = FOLDER
    readme = """\
  database/         Immich's database dumps (immich-db-backup-*.sql.gz):
                    albums, people, descriptions, who owns what."""
    dump: DumpPlan
    fresh: DumpPlan | None = None  # made by prepare (immich-api, command)

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.database.enabled

    @classmethod
    async def check(cls, config: Config) -> list[str]:
        db = config.database
        problems = []
        if not db.dump_glob and not config.dumps_dir.is_dir():
            problems.append(f"database.dumps_dir: {config.dumps_dir} does not exist")
        if db.source == "immich-api" and config.immich.api_key_file:
            problems += immich.key_file_problems(config.immich.api_key_file)
        if db.source == "command" and shutil.which(db.command[0]) is None:
            problems.append(f"database.command: {db.command[0]} is not installed or not on "
                            "PATH")
        return problems

    @classmethod
    def check_disk(cls, check: DiskCheck) -> None:
        """Every dump read to its end: a whole gzip stream ending with "dump complete"."""
        folder = check.root / FOLDER
        found = sorted(folder.glob("*.sql.gz")) if folder.is_dir() else []
        check.status.set_phase("verify", sum(p.stat().st_size for p in found),
                               f"reading {plural(len(found), 'database dump')} to the end")
        on_bytes = check.status.counter()
        for dump in found:
            why = dumps.check(dump, on_bytes, check.check_stop)
            check.report.dumps_checked += 1
            if why:
                check.report.damaged.add(f"{FOLDER}/{dump.name}: {why}")

    async def prepare(self) -> None:
        """A fresh dump, when the source makes one; on failure a problem, and the
        preflight falls back to the newest nightly dump."""
        source = self.ctx.config.database.source
        try:
            if source == "immich-api":
                self.fresh = await fresh_from_immich(self.ctx)
            elif source == "command":
                self.fresh = await fresh_from_command(self.ctx)
        except BackupError as exc:
            self.ctx.problems.add(f"database: no fresh dump: {exc}; copied the newest "
                                  "nightly dump instead")

    async def preflight(self, cluster: int) -> Preflight:
        self.dump = await in_thread(self.ctx, lambda: plan(self.ctx, cluster, self.fresh))
        return Preflight(Space(to_write=self.dump.alloc), _line(self.dump),
                         int(self.dump.needs_copy), self.dump.size if self.dump.needs_copy
                         else 0)

    async def write(self) -> StepResult:
        return await run(self.ctx, self.dump)


def _line(dump: DumpPlan) -> str:
    if dump.source is None:
        return "database: no dump found (see the problems when it finishes)"
    if dump.compress:
        return f"database: a fresh dump ({human_bytes(dump.size)} of SQL, compressed)"
    if dump.needs_copy:
        return f"database: {dump.name} ({human_bytes(dump.size)})"
    return f"database: {dump.name} is already on the disk"


def plan(ctx: RunContext, cluster: int, fresh: DumpPlan | None = None) -> DumpPlan:
    """The dump to copy: ``fresh`` (made by prepare), else the newest in the dumps folder
    or ``database.dump_glob``; note problems (none found, too old). No writes."""
    if fresh is not None:
        return _on_disk(ctx, fresh, cluster)
    cfg = ctx.config.database
    found = _newest_by_glob(ctx, cfg.dump_glob) if cfg.dump_glob else _newest_nightly(ctx)
    if found is None:
        return DumpPlan(None, None, False, 0)
    source, taken, name = found
    age = ctx.started - taken
    if age > timedelta(hours=cfg.max_age_hours):
        hours = age.total_seconds() / 3600
        ctx.problems.add(
            f"database: the newest dump {source.name} is {hours:.0f} hours old (more than "
            f"{cfg.max_age_hours:g}); check Immich's database backup job"
        )
    size = source.stat().st_size
    return _on_disk(ctx, DumpPlan(source, taken, True, 0, size, name), cluster)


def _on_disk(ctx: RunContext, dump: DumpPlan, cluster: int) -> DumpPlan:
    """``dump`` with what the disk needs: nothing when the same dump is there already."""
    existing = ctx.root.root / FOLDER / dump.name
    needs = dump.compress or not (existing.is_file() and existing.stat().st_size == dump.size)
    return DumpPlan(dump.source, dump.taken_at, needs, allocated(dump.size, cluster)
                    if needs else 0, dump.size, dump.name, dump.compress)


def _newest_nightly(ctx: RunContext) -> tuple[Path, datetime, str] | None:
    dumps_dir = ctx.config.dumps_dir
    try:
        names = [e.name for e in os.scandir(dumps_dir) if e.is_file(follow_symlinks=False)]
    except OSError as exc:
        ctx.problems.add(f"database: cannot read the dumps folder {dumps_dir}: {exc.strerror}")
        return None
    newest = dumps.newest_dump(names)
    if newest is None:
        ctx.problems.add(
            f"database: no Immich database dump found in {dumps_dir}; check that Immich's "
            "database backup job is enabled (Administration > Settings > Backup)"
        )
        return None
    name, taken = newest
    return dumps_dir / name, taken, name


def _newest_by_glob(ctx: RunContext, pattern: str) -> tuple[Path, datetime, str] | None:
    """The newest of the files ``pattern`` matches: by the time in an Immich name, else by
    modification time; on the disk under a name that carries its time."""
    found: list[tuple[datetime, Path]] = []
    for match in glob.glob(pattern):
        path = Path(match)
        if not path.is_file() or not path.name.endswith(".sql.gz"):
            continue
        taken = dumps.dump_time(path.name) or datetime.fromtimestamp(
            path.stat().st_mtime).astimezone()
        found.append((taken, path))
    if not found:
        ctx.problems.add(f"database: no dump (*.sql.gz) matches database.dump_glob {pattern}")
        return None
    taken, path = max(found)
    return path, taken, dumps.disk_name(path.name, taken)


# A fresh dump ---------------------------------------------------------------------------

async def fresh_from_immich(ctx: RunContext) -> DumpPlan:
    """Ask Immich for a dump now and wait for it (see the module doc). Raise BackupError
    saying why there is none."""
    cfg = ctx.config
    assert cfg.immich.url and cfg.immich.api_key_file  # config's relation checks
    url, key_file = cfg.immich.url, cfg.immich.api_key_file
    dumps_dir = cfg.dumps_dir
    before = set(await in_thread(ctx, lambda: _dump_names(dumps_dir)))
    ctx.status.set_phase("database", 0, "asking Immich for a fresh database dump")
    await in_thread(ctx, lambda: immich.start_database_backup(url, immich.read_key(key_file)))
    t0 = time.monotonic()
    sizes: dict[str, int] = {}
    while (waited := time.monotonic() - t0) < cfg.database.fresh_timeout_s:
        ctx.status.progress(0, f"waiting for Immich's database dump ({waited:.0f} s)")
        names = await in_thread(ctx, lambda: _dump_names(dumps_dir))
        for name in sorted(set(names) - before):
            size = names[name]
            if size and sizes.get(name) == size:  # complete: renamed, and not growing
                taken = dumps.dump_time(name) or ctx.started
                log.info("Immich wrote %s in %.0f s", name, waited)
                return DumpPlan(dumps_dir / name, taken, True, 0, size, name)
            sizes[name] = size
        await asyncio.sleep(POLL_S)
    raise BackupError(f"Immich's database dump did not appear in {dumps_dir} within "
                      f"{cfg.database.fresh_timeout_s:g} s (database.fresh_timeout_s)")


def _dump_names(folder: Path) -> dict[str, int]:
    """Nightly-dump names in ``folder`` (``.tmp`` and others left out), with sizes."""
    out = {}
    for e in os.scandir(folder):
        if e.is_file(follow_symlinks=False) and dumps.dump_time(e.name) is not None:
            out[e.name] = e.stat(follow_symlinks=False).st_size
    return out


async def fresh_from_command(ctx: RunContext) -> DumpPlan:
    """Run ``database.command`` (bounded by ``fresh_timeout_s``) with its output into
    the work folder; check it is a whole dump. Raise BackupError saying why not."""
    cfg = ctx.config.database
    raw = ctx.work_dir / "fresh-dump.sql"
    ctx.status.set_phase("database", 0, f"making a fresh dump: {cfg.command[0]}")
    program = os.path.basename(cfg.command[0])
    try:
        with open(raw, "wb") as out:  # noqa: ASYNC230 - opening a file, not writing it
            async with asyncio.timeout(cfg.fresh_timeout_s):
                await execute.run(cfg.command, stdout=out.fileno())
    except TimeoutError:
        raise BackupError(f"the dump command ({program}) did not finish within "
                          f"{cfg.fresh_timeout_s:g} s (database.fresh_timeout_s)") from None
    except CommandError as exc:
        raise BackupError(f"the dump command ({program}) failed with status "
                          f"{exc.returncode}: {exc.stderr_tail}") from None
    except OSError as exc:
        raise BackupError(f"the dump command ({program}) could not be run: "
                          f"{exc.strerror or exc}") from None
    why = await in_thread(ctx, lambda: _incomplete(raw))
    if why:
        raise BackupError(f"the dump command ({program}) wrote {why}")
    taken = ctx.started
    size = raw.stat().st_size
    return DumpPlan(raw, taken, True, 0, size, f"immich-db-backup-{taken:%Y%m%dT%H%M%S}"
                    f"-{_slug(program)}.sql.gz", compress=True)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-") or "command"


def _incomplete(raw: Path) -> str | None:
    """Why the plain SQL dump ``raw`` is not a whole one (None when it is)."""
    size = raw.stat().st_size
    if not size:
        return "nothing (an empty dump)"
    with open(raw, "rb") as f:
        f.seek(max(0, size - dumps.TAIL))
        tail = f.read()
    if not dumps.sql_complete(tail):
        return "an incomplete dump (it does not end with PostgreSQL's \"dump complete\")"
    return None


async def run(ctx: RunContext, dump: DumpPlan) -> DatabaseResult:
    """Copy the planned dump (temp name, fsync, rename) and prune beyond ``keep``."""
    result = DatabaseResult()
    if dump.source is None:
        return result
    folder = ctx.root.path(FOLDER)
    await in_thread(ctx, lambda: remove_stale_temps(ctx.root.mkdir(FOLDER)))
    final = ctx.root.path(FOLDER, dump.name)
    result.dump = dump.name
    if dump.needs_copy:
        size = dump.size
        ctx.status.set_phase("database", size, dump.name)
        progress = ctx.status.counter(ctx.check_cancel)
        source = dump.source
        try:
            if dump.compress:
                copied = await in_thread(
                    ctx, lambda: _compress(ctx, source, final, progress))
            else:
                copied = await in_thread(
                    ctx, lambda: atomic_copy(ctx.root, source, final, progress))
        except OSError as exc:
            raise BackupError(f"database: copying {dump.name} failed: {exc}") from exc
        result.files, result.bytes = 1, copied
    await in_thread(ctx, lambda: _prune(ctx, folder))
    return result


def _compress(ctx: RunContext, source: Path, final: Path,
              progress: Callable[[int], None]) -> int:
    """gzip the plain SQL ``source`` into ``final`` (temp name, fsync, rename); return
    the bytes written to the disk."""
    def write(f: BinaryIO) -> None:
        with open(source, "rb") as src, gzip.GzipFile(fileobj=f, mode="wb",
                                                      compresslevel=6, mtime=0) as gz:
            while block := src.read(COPY_BLOCK):
                gz.write(block)
                progress(len(block))

    atomic_write(ctx.root, final, write)
    return final.stat().st_size


def _prune(ctx: RunContext, folder: Path) -> None:
    names = [e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    for old in dumps.dumps_to_prune(names, ctx.config.database.keep):
        ctx.root.path(FOLDER, old).unlink()
        log.info("pruned old dump %s", old)
    fsync_dir(folder)
