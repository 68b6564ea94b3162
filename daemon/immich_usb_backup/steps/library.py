"""Library step: mirror Immich's upload location into ``library/`` on the disk.

Preflight (``check_source``, ``plan``) reads only. ``run`` then deletes what the plan
listed (only inside ``library/``, each path checked) and copies what it listed with
rsync, in batches (``--files-from``), with flags that suit exFAT: times kept, no owners,
groups or permissions, a one-second window for times. rsync's own temporary name and
rename keep each file whole; its ``--info=progress2`` lines feed the live status.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from immich_usb_backup import execute, keep, manifest, moves, policy
from immich_usb_backup.config import Config
from immich_usb_backup.errors import BackupError, CommandError, Refused
from immich_usb_backup.fsutil import Inside, allocated
from immich_usb_backup.hashcache import CHUNK, HashCache, Row, chunked
from immich_usb_backup.hashing import Stopped, hash_files
from immich_usb_backup.policy import Space, human_bytes
from immich_usb_backup.record import StepResult
from immich_usb_backup.scan import Excludes, Plan, read_delete_list, read_files_list, scan
from immich_usb_backup.steps.base import Preflight, RunContext, Step, in_thread

log = logging.getLogger(__name__)

FOLDER = "library"
IMMICH_FOLDERS = ("upload", "library", "profile", "thumbs", "encoded-video", "backups")
IMMICH_MARKER = ".immich"
RSYNC_MIN_VERSION = (3, 1, 0)
RSYNC_VANISHED = 24  # a source file vanished while copying: Immich deleted it; fine

HASH_AHEAD_BYTES = 128 * 1024 * 1024  # how far hashing may read ahead of rsync's copy
OUTPUT_EVERY_S = 0.1  # rsync's output is read this often (execute.run's coalesce_s)
MANIFEST_LINE_BYTES = 200  # a generous average: digest, two spaces, a long Immich path

_PROGRESS = re.compile(r"^\s*([\d,.]+)\s+(\d+)%")
_STATS_FILES = re.compile(r"^Number of regular files transferred:\s*([\d,.]+)")
_STATS_BYTES = re.compile(r"^Total transferred file size:\s*([\d,.]+)")
_STATS_LIST_S = re.compile(r"^File list generation time:\s*(\d+)[.,](\d+) seconds")


@dataclass
class LibraryResult(StepResult):
    pruned_days: list[str] | None = None  # dated folders pruned from deleted/
    moved: int | None = None  # files Immich moved, renamed on the disk (not copied again)
    deleted: int | None = None  # files removed because the server deleted them
    kept: int | None = None  # files moved into deleted/ (removed or replaced)
    keep_day: str | None = None
    keep_days: int | None = None
    source_files: int | None = None
    source_bytes: int | None = None
    compared: int | None = None  # files compared by content (verify and full modes)
    manifest: dict[str, int] | None = None  # entries, hashed, left_out (unchanged)
    mismatches: int | None = None

    def finished_lines(self) -> list[str]:
        lines = []
        if self.moved:
            lines.append(f"Renamed on the disk: {self.moved} files Immich moved (not copied "
                         "again).")
        if self.kept:
            where = f"deleted/{self.keep_day}/" if self.keep_day else "deleted/"
            days = f" for {self.keep_days} days" if self.keep_days else ""
            lines.append(f"Set aside: {self.kept} files deleted or changed on the server, "
                         f"kept in {where} on the disk{days}.")
        if self.compared is not None:
            lines.append(f"Compared by content with the server: {self.compared} files.")
        return lines

    def disk_info(self) -> dict[str, Any]:
        return {"library_files": self.source_files or 0,
                "library_bytes": self.source_bytes or 0}

    @property
    def verify_failed(self) -> bool:
        return bool(self.mismatches)


class LibraryStep(Step):
    """Mirror the upload location into ``library/``; compare and list checksums."""

    name = "library"
    plan: Plan
    found: moves.Moves  # the files Immich moved
    kept: keep.KeepSurvey | None = None
    cache: HashCache | None = None

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.library.enabled

    async def preflight(self, cluster: int) -> Preflight:
        """Refuse a source that is not Immich's (rule 4), compare the library with the
        backup, refuse a run that deletes or replaces too much, survey the keep area."""
        ctx, cfg = self.ctx, self.ctx.config
        await in_thread(ctx, lambda: check_source(cfg.immich.upload_location,
                                                  cfg.immich.require_markers))
        self.plan = p = await plan(ctx, cluster)
        if p.files_list is not None:
            self.cache = await in_thread(ctx, lambda: HashCache(cfg.state_dir))
        self.found = await self._find_moves(cluster)
        limit = cfg.library.max_delete_percent
        refusal = (policy.deletion_refusal(p.delete_files, p.mirror_files, limit)
                   or policy.replacement_refusal(p.replaced_files, p.mirror_files, limit))
        if refusal:
            raise Refused(refusal)
        self.kept = await in_thread(ctx, lambda: survey_keep(ctx, cluster))
        log.debug("library preflight: %d files to copy, %d to delete", p.copy_files,
                  p.delete_files)
        renamed = f"{self.found.files} renamed on the disk, " if self.found.files else ""
        line = (f"library: {p.copy_files} of {p.source_files} files to copy "
                f"({human_bytes(p.copy_bytes)}), {renamed}{p.delete_files} to delete")
        return Preflight(self._space(cluster), line, p.copy_files, p.copy_bytes)

    async def _find_moves(self, cluster: int) -> moves.Moves:
        """Files Immich moved (see ``moves``): out of the plan, to be renamed on the disk."""
        ctx, p, cache = self.ctx, self.plan, self.cache
        if cache is None or not p.delete_files or not p.copy_files:
            return moves.Moves()
        ctx.status.set_phase("scan", 0, "looking for files Immich moved")
        return await in_thread(ctx, lambda: moves.find(
            p, ctx.config.immich.upload_location, ctx.work_dir, cache,
            self._fresh_manifest(cache), cluster, check_cancel=ctx.check_cancel))

    def _fresh_manifest(self, cache: HashCache) -> Path | None:
        """The disk's manifest when it is the one last written, complete: then it holds
        the digest of every file in library/."""
        path = self.ctx.root.path(manifest.NAME)
        known = cache.manifest_state(self.ctx.disk_key)
        try:
            st = os.stat(path)
        except OSError:
            return None
        fresh = known is not None and known[2] and known[:2] == (st.st_size, st.st_mtime_ns)
        return path if fresh else None

    def _space(self, cluster: int) -> Space:
        """With the keep area on, nothing the run removes from the mirror frees space (it
        is moved to deleted/); only the dated folders it prunes do."""
        p, kept = self.plan, self.kept
        to_write = p.copy_alloc
        if p.files_list is not None and self.ctx.config.library.manifest:
            to_write += allocated(p.source_files * MANIFEST_LINE_BYTES, cluster)
        freed = kept.prune_alloc if kept else 0
        in_keep = (kept.alloc - kept.prune_alloc) if kept else 0
        if self.ctx.config.library.keep_deleted_days > 0:
            return Space(to_write, freed, kept=in_keep + p.delete_alloc + p.replaced_alloc)
        return Space(to_write, freed + p.delete_alloc, p.replaced_alloc,
                     p.largest_replaced_alloc, in_keep)

    async def write(self) -> StepResult:
        return await run(self.ctx, self.plan, self.kept, self.cache, self.found)

    async def verify(self, result: StepResult) -> None:
        """Compare contents (verify and full modes) and write the manifest; a difference
        fails the run, after each is named in the problems."""
        # integrity uses this module's copying: imported here, not at the top
        from immich_usb_backup.steps import integrity  # noqa: PLC0415

        assert isinstance(result, LibraryResult)
        ctx, cache = self.ctx, self.cache
        mismatches: list[str] = []
        if cache is not None and ctx.mode != "quick":
            result.compared, mismatches = await integrity.compare(ctx, self.plan, cache)
        if cache is not None and ctx.config.library.manifest:
            result.manifest = await integrity.write_manifest(ctx, self.plan, cache)
        else:
            await in_thread(ctx, lambda: integrity.remove_manifest(ctx))
        if mismatches:
            result.mismatches = len(mismatches)
            for problem in mismatches:
                ctx.problems.add(problem)
            raise BackupError(
                f"verify: {len(mismatches)} file(s) on the disk differed from the server "
                "(listed above); something changed data it should not have: check the "
                "disk and the server's storage")

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None


def rsync_base_args(bwlimit_kib: int = 0) -> list[str]:
    """The rsync flags for a mirror onto exFAT (also used by the benchmark's bare rsync)."""
    args = [
        "rsync",
        "--times",
        "--modify-window=1",
        "--no-perms",
        "--no-owner",
        "--no-group",
    ]
    if bwlimit_kib:
        args.append(f"--bwlimit={bwlimit_kib}")
    return args


def check_source(upload: Path, require_markers: bool) -> None:
    """Refuse (safety rule 4) a source that is missing, empty or not Immich's mount."""
    if not upload.is_dir():
        raise Refused(
            f"the upload location {upload} does not exist or is not a folder; is Immich's "
            "storage mounted? Nothing was copied or deleted."
        )
    try:
        with os.scandir(upload) as it:
            empty = next(it, None) is None
    except OSError as exc:
        raise Refused(f"cannot read the upload location {upload}: {exc.strerror}") from None
    if empty:
        raise Refused(
            f"the upload location {upload} is empty; is Immich's storage mounted? A mirror "
            "of an empty folder would wipe the backup, so nothing was copied or deleted."
        )
    if not require_markers:
        return
    present = [d for d in IMMICH_FOLDERS if (upload / d).is_dir()]
    if not present:
        raise Refused(
            f"{upload} does not look like Immich's upload location (no upload/, library/ or "
            "profile/ folder); check immich.upload_location. Nothing was copied or deleted."
        )
    missing = [d for d in present if not (upload / d / IMMICH_MARKER).is_file()]
    if missing:
        shown = ", ".join(f"{d}/{IMMICH_MARKER}" for d in missing)
        raise Refused(
            f"Immich's marker files are missing in {upload} ({shown}): its storage may not "
            "be mounted or may have moved, so nothing was copied or deleted. If this is a "
            "very old Immich that writes no markers, set immich.require_markers = false."
        )


async def plan(ctx: RunContext, cluster: int) -> Plan:
    """Scan source and mirror side by side (see ``scan``); reads only."""
    cfg = ctx.config
    mirror = ctx.root.path(FOLDER)
    excludes = Excludes(cfg.library.excludes)
    ctx.status.set_phase("scan", 0, "comparing the library with the backup")

    def progress(files: int) -> None:
        ctx.check_cancel()
        ctx.status.progress(0, f"{files} files compared")

    list_files = cfg.library.manifest or ctx.mode != "quick"
    return await in_thread(
        ctx,
        lambda: scan(
            cfg.immich.upload_location, mirror, ctx.work_dir, excludes, cluster,
            ctx.problems, list_files=list_files, on_progress=progress,
        ),
    )


def survey_keep(ctx: RunContext, cluster: int) -> keep.KeepSurvey | None:
    """The keep area as it is, and what this run prunes from it (reads only)."""
    days = ctx.config.library.keep_deleted_days
    if not days and not (ctx.root.root / keep.FOLDER).is_dir():
        return None
    return keep.survey(ctx.root, ctx.started.date(), days, cluster)


def keep_day(ctx: RunContext) -> str | None:
    """The keep area's folder for this run, or None when deletions are not kept."""
    if not ctx.config.library.keep_deleted_days:
        return None
    return keep.day_name(ctx.started.date())


def _rotated_prefix(ctx: RunContext) -> str | None:
    """``backups/`` (Immich's dumps folder, when it is inside the upload location): Immich
    rotates its nightly dumps itself, and the newest are kept in ``database/`` on the
    disk, so a dump Immich removed is removed from the mirror too, not kept."""
    upload = ctx.config.immich.upload_location
    try:
        rel = ctx.config.dumps_dir.relative_to(upload)
    except ValueError:
        return None
    return f"{rel.as_posix()}/" if rel.parts else None


def _delete(ctx: RunContext, mirror: Path, plan: Plan) -> tuple[int, int]:
    """Remove what the plan lists from the mirror, every path checked inside it: into the
    keep area when it is on, else for good. Return (files removed because the server
    deleted them, files moved into the keep area: removed or replaced)."""
    removed = kept = 0
    if plan.delete_list is None:
        return 0, 0
    day = keep_day(ctx)
    rotated = _rotated_prefix(ctx)
    inside = Inside(mirror)
    for kind, rel in read_delete_list(plan.delete_list):
        ctx.check_cancel()
        path = mirror / rel
        if path == mirror:
            raise BackupError("refusing to delete the mirror folder itself")
        inside.entry(path)  # unlink, rmdir and rename never follow a link at the name
        try:
            if kind == "D":
                os.rmdir(path)
            elif day is not None and not (rotated and rel.startswith(rotated)):
                keep.move_into(ctx.root, mirror, rel, day, inside)
                kept += 1
                removed += kind == "F"
            elif kind == "F":
                os.unlink(path)
                removed += 1
            # "R" without a keep area: rsync replaces the file
        except FileNotFoundError:
            continue
        except OSError as exc:
            what = "keep" if day is not None and kind != "D" else "delete"
            ctx.problems.add(f"library: could not {what} {rel} in the backup: {exc.strerror}")
    return removed, kept


def _number(text: str) -> int:
    return int(re.sub(r"[,.]", "", text))


async def run(ctx: RunContext, plan: Plan, kept: keep.KeepSurvey | None,
              cache: HashCache | None, found: moves.Moves) -> LibraryResult:
    """Apply the plan: prune the keep area, rename what Immich moved, set aside what the
    server deleted or changed (into the keep area, or deleted), then copy. With a
    ``cache`` in quick mode, the new files are hashed (for the manifest) while rsync
    copies them."""
    result = LibraryResult()
    mirror = await in_thread(ctx, lambda: ctx.root.mkdir(FOLDER))
    if cache is not None and (plan.copy_files or plan.delete_files or plan.delete_dirs
                              or found.files):
        cache.set_manifest_state(ctx.disk_key, None)  # the manifest is stale until rewritten
    if kept is not None and kept.prune:
        ctx.status.set_phase("prune", 0, f"removing {len(kept.prune)} expired folder(s) "
                             "from deleted/")
        await in_thread(ctx, lambda: keep.prune(ctx.root, kept.prune))
        result.pruned_days = kept.prune
    copy_lists = plan.copy_lists
    if found.files:
        ctx.status.set_phase("move", 0, f"renaming {found.files} files Immich moved")
        applied = await in_thread(ctx, lambda: moves.apply(found, mirror, ctx.work_dir, cache,
                                                           ctx.check_cancel))
        result.moved = applied.renamed
        if applied.recopy is not None:
            copy_lists = [*copy_lists, applied.recopy]
    if plan.delete_files or plan.delete_dirs or plan.replaced_files:
        ctx.status.set_phase("delete", 0, f"setting aside {plan.delete_files} deleted and "
                             f"{plan.replaced_files} changed files")
        removed, moved = await in_thread(ctx, lambda: _delete(ctx, mirror, plan))
        result.deleted, result.kept = removed, moved
        if moved:
            result.keep_day = keep_day(ctx)
            result.keep_days = ctx.config.library.keep_deleted_days
    hasher = None  # in quick mode, the manifest's new digests come from hashing meanwhile
    if (copy_lists and cache is not None and plan.files_list is not None
            and ctx.mode == "quick"):  # not a no-change run: its files list is long
        hasher = CopyHasher(str(ctx.config.immich.upload_location), plan.files_list, cache)
    await copy_paths(ctx, copy_lists, plan.copy_files, plan.copy_bytes, result, hasher)
    result.source_files, result.source_bytes = plan.source_files, plan.source_bytes
    return result


async def copy_paths(ctx: RunContext, lists: list[Path], files: int, total_bytes: int,
                     result: StepResult, hasher: CopyHasher | None = None) -> None:
    """Copy the paths in ``lists`` (NUL-separated, relative to the upload location) with
    rsync, one list at a time, counting into ``result``. A ``hasher`` runs in a thread
    meanwhile, kept within ``HASH_AHEAD_BYTES`` of rsync's progress."""
    mirror = ctx.root.path(FOLDER)
    ctx.status.set_phase("library", total_bytes, f"{files} files to copy")
    source = str(ctx.config.immich.upload_location).rstrip("/") + "/"
    done = {"before": 0, "batch": 0}  # bytes of finished batches, of the running one
    list_s: str | None = None  # the batch's seconds building its file list (--stats)

    def on_lines(lines: list[str]) -> None:
        """rsync's output of one read: many progress lines (two a file copied; only the
        last counts), then at the end the --stats lines (these start with a letter,
        progress lines with spaces)."""
        nonlocal list_s
        for line in reversed(lines):
            m = _PROGRESS.match(line)
            if m:
                done["batch"] = _number(m.group(1))
                ctx.status.progress(done["before"] + done["batch"])
                if hasher is not None:
                    hasher.copied = done["before"] + done["batch"]
                break
        for line in lines:
            if line.startswith(" "):
                continue
            m = _STATS_FILES.match(line)
            if m:
                result.files += _number(m.group(1))
                continue
            m = _STATS_BYTES.match(line)
            if m:
                result.bytes += _number(m.group(1))
                continue
            m = _STATS_LIST_S.match(line)
            if m:
                list_s = f"{m.group(1)}.{m.group(2)}"

    if hasher is not None:
        hasher.start()
    try:
        for listed in lists:
            batch = await in_thread(ctx, functools.partial(_without_comments, listed))
            done["batch"], list_s = 0, None
            argv = [
                *rsync_base_args(ctx.config.library.bwlimit_kib),
                "--dirs",
                f"--files-from={batch}",
                "--from0",
                "--info=progress2",
                "--stats",
                "--no-human-readable",
                source,
                str(mirror) + "/",
            ]
            t0 = time.monotonic()
            try:
                await execute.run(argv, on_lines=on_lines, coalesce_s=OUTPUT_EVERY_S,
                                  ok_codes=(0, RSYNC_VANISHED))
            except CommandError as exc:
                raise BackupError(
                    f"library: rsync failed with status {exc.returncode}: {exc.stderr_tail}"
                ) from exc
            # rsync reads a list one byte a system call and copies nothing meanwhile
            # (docs/design.md, "What the lists cost rsync"): about 1 s a megabyte
            took = f", {list_s} s of it building its file list" if list_s else ""
            log.debug("rsync batch %s: %.1f s%s", batch.name, time.monotonic() - t0, took)
            done["before"] += done["batch"]
    except BaseException:
        if hasher is not None:
            hasher.stop.set()
        raise
    finally:
        if hasher is not None:
            await hasher.finish()


def _without_comments(batch: Path) -> Path:
    """The list as rsync reads it right. rsync skips an entry of ``--files-from`` that
    starts with ``#`` or ``;`` as a comment, ``--from0`` or not, without a word: a name
    at the top of the upload location such as Synology's ``#recycle`` would be counted
    as copied and never be. Such entries are given as ``./NAME`` (rsync drops the
    ``./``); a list with none is used as it is."""
    data = batch.read_bytes()
    if not (data[:1] in (b"#", b";") or b"\0#" in data or b"\0;" in data):
        return batch
    fixed = batch.with_name(batch.name + ".rsync")
    fixed.write_bytes(b"\0".join(b"./" + p if p[:1] in (b"#", b";") else p
                                  for p in data.split(b"\0")))
    return fixed


class CopyHasher:
    """Hashes the files a run copies into the hash cache (SHA-256 and SHA-1), in a thread,
    while rsync copies them: the files list's records marked copied, in its order, those
    the cache does not know both digests of at the size and time the scan saw (a second
    disk's first backup hashes nothing again). It reads at most ``HASH_AHEAD_BYTES``
    ahead of what rsync reports copied, so a cold library is read from the server's
    storage once: by whichever comes first, the other finds it in the page cache."""

    def __init__(self, source: str, files_list: Path, cache: HashCache) -> None:
        self.source, self.files_list, self.cache = source, files_list, cache
        self.copied = 0  # bytes rsync has copied so far; sys.maxsize when it is done
        self.stop = threading.Event()
        self.hashed = 0
        self._running: asyncio.Future[None] | None = None

    def _unknown(self) -> Iterator[str]:
        position = 0  # bytes of the copied files before this one, in the list's order
        copied = (r for r in read_files_list(self.files_list) if r.copied)
        for chunk in chunked(copied):
            known = self.cache.digests_many([(r.rel, r.size, r.mtime_ns) for r in chunk])
            for rec, digests in zip(chunk, known, strict=True):
                before, position = position, position + rec.size
                if digests is not None and digests.sha1 is not None:
                    continue
                while before - self.copied > HASH_AHEAD_BYTES:
                    if self.stop.wait(0.05):
                        raise Stopped
                yield rec.rel

    def start(self) -> None:
        """Hash in a thread from now on, until ``finish``."""
        self._running = asyncio.ensure_future(asyncio.to_thread(self.run))

    async def finish(self) -> None:
        """Let the thread hash the rest (rsync is done, or ``stop`` was set) and wait for
        it. A hashing error costs only cache entries (the manifest hashes those): logged."""
        assert self._running is not None, "finish() before start()"
        self.copied = sys.maxsize  # nothing more to wait for
        t0 = time.monotonic()
        for outcome in await asyncio.shield(asyncio.gather(self._running,
                                                           return_exceptions=True)):
            if isinstance(outcome, Exception) and not isinstance(outcome, Stopped):
                log.warning("hashing while copying failed: %s", outcome)
        log.debug("hashing while copying: %d files, %.1f s after the copy", self.hashed,
                  time.monotonic() - t0)

    def run(self) -> None:
        rows: list[Row] = []
        for h in hash_files(self.source, self._unknown(), stop=self.stop):
            if h.digest is not None:
                rows.append((h.rel, h.size, h.mtime_ns, h.digest, h.sha1))
                if len(rows) >= CHUNK:
                    self.cache.put_many(rows)
                    self.hashed += len(rows)
                    rows.clear()
        self.cache.put_many(rows)
        self.hashed += len(rows)
        self.cache.commit()
