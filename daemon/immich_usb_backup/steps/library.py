"""Library step: mirror Immich's upload location into ``library/`` on the disk.

Preflight (``check_source``, ``plan``) reads only. ``run`` then deletes what the plan
listed (only inside ``library/``, each path checked) and copies what it listed with
rsync, in batches (``--files-from``), with flags that suit exFAT: times kept, no owners,
groups or permissions, a one-second window for times. rsync's own temporary name and
rename keep each file whole; its ``--info=progress2`` lines feed the live status.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from immich_usb_backup import (
    integrity,
    keep,
    layout,
    manifest,
    manifestcheck,
    moves,
    policy,
    rsync,
)
from immich_usb_backup.config import Config
from immich_usb_backup.errors import BackupError, Refused
from immich_usb_backup.fsutil import Inside, allocated
from immich_usb_backup.hashcache import HashCache
from immich_usb_backup.policy import Space
from immich_usb_backup.record import StepResult, readable
from immich_usb_backup.scan import (
    STALE_MTIME,
    STALE_WINDOW_NS,
    Excludes,
    Plan,
    files_record,
    read_delete_records,
    read_files_list,
    read_paths,
    scan,
)
from immich_usb_backup.steps.base import DiskCheck, Preflight, RunContext, Step, in_thread
from immich_usb_backup.text import human_bytes, plural, word

log = logging.getLogger(__name__)

FOLDER = layout.LIBRARY
IMMICH_FOLDERS = ("upload", "library", "profile", "thumbs", "encoded-video", "backups")
IMMICH_MARKER = ".immich"
MANIFEST_LINE_BYTES = 200  # a generous average: digest, two spaces, a long Immich path


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
    changed_while_copied: int | None = None  # copied again by the next run
    leftovers: int | None = None  # temporary files of a killed copy, removed

    def finished_lines(self) -> list[str]:
        lines = []
        if self.moved:
            lines.append(f"Renamed on the disk: {plural(self.moved, 'file')} Immich moved "
                         "(not copied again).")
        if self.kept:
            where = f"deleted/{self.keep_day}/" if self.keep_day else "deleted/"
            days = f" for {plural(self.keep_days, 'day')}" if self.keep_days else ""
            lines.append(f"Set aside: {plural(self.kept, 'file')} deleted or changed on the "
                         f"server, kept in {where} on the disk{days}.")
        if self.compared is not None:
            lines.append(f"Compared by content with the server: "
                         f"{plural(self.compared, 'file')}.")
        if self.changed_while_copied:
            n = self.changed_while_copied
            lines.append(f"Changed on the server while {word(n, 'it')} {word(n, 'was')} "
                         f"copied: {plural(n, 'file')}, copied again by the next run.")
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
    folder = FOLDER
    readme = """\
  library/          a copy of Immich's upload location: your original photos
                    and videos (upload/, library/), profile pictures, and all
                    else Immich keeps there. Plain files: open them anywhere.
  library.sha256    the checksum of every file in library/, to check them.
  deleted/          files deleted or replaced on the server, kept a while:
                    deleted/YYYY-MM-DD/<their path in library/>."""
    plan: Plan
    found: moves.Moves  # the files Immich moved
    kept: keep.KeepSurvey | None = None
    cache: HashCache | None = None
    incoming: int = 0  # allocated bytes of rsync's temporary files left by a killed copy

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.library.enabled

    @classmethod
    async def check(cls, config: Config) -> list[str]:
        problems = await rsync.problems()
        upload = config.immich.upload_location
        try:
            await asyncio.to_thread(check_source, upload, config.immich.require_markers)
        except Refused as exc:
            problems.append(f"immich.upload_location: {_as_check(str(exc))}")
        else:
            if not os.access(upload, os.R_OK | os.X_OK):
                problems.append(f"immich.upload_location: {upload} is not readable by this "
                                "user")
        return problems

    @classmethod
    def check_disk(cls, check: DiskCheck) -> None:
        """``library/`` against its manifest (``manifestcheck``)."""
        manifestcheck.check(check)

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
        self.incoming = await in_thread(ctx, lambda: rsync.incoming_size(ctx, cluster))
        log.debug("library preflight: %d files to copy, %d to delete", p.copy_files,
                  p.delete_files)
        renamed = f"{self.found.files} renamed on the disk, " if self.found.files else ""
        line = (f"library: {p.copy_files} of {plural(p.source_files, 'file')} to copy "
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
        # rsync's temporary files of a killed copy are removed before anything is copied
        freed = (kept.prune_alloc if kept else 0) + p.leftover_alloc + self.incoming
        in_keep = (kept.alloc - kept.prune_alloc) if kept else 0
        if self.ctx.config.library.keep_deleted_days > 0:
            return Space(to_write, freed, kept=in_keep + p.delete_alloc + p.replaced_alloc)
        return Space(to_write, freed + p.delete_alloc, p.replaced_alloc,
                     p.largest_replaced_alloc, in_keep)

    async def write(self) -> StepResult:
        return await run(self.ctx, self.plan, self.kept, self.cache, self.found)

    async def finish(self, result: StepResult) -> None:
        """Compare contents (verify and full modes) and write the manifest; a difference
        fails the run, after each is named in the problems."""
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


def _as_check(refusal: str) -> str:
    """A backup's refusal, said for ``check`` (nothing was about to be copied)."""
    return (refusal.replace(", so nothing was copied or deleted.", ": a backup would be refused.")
            .replace(" Nothing was copied or deleted.", " A backup would be refused."))


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
    return keep.run_day(ctx.config.library.keep_deleted_days, ctx.started.date())


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
    keep area when it is on, else for good. rsync's temporary files of a killed copy
    (``T``), and copies marked stale (``STALE_MTIME``: not a version of the server's
    file), are removed, never kept. Return (files removed because the server deleted
    them, files moved into the keep area: removed or replaced)."""
    removed = kept = 0
    if plan.delete_list is None:
        return 0, 0
    day = keep_day(ctx)
    rotated = _rotated_prefix(ctx)
    inside = Inside(mirror)
    for kind, rel, _size, mtime_ns in read_delete_records(plan.delete_list):
        ctx.check_cancel()
        path = mirror / rel
        if path == mirror:
            raise BackupError("refusing to delete the mirror folder itself")
        inside.entry(path)  # unlink, rmdir and rename never follow a link at the name
        stale = kind == "R" and abs(mtime_ns - STALE_MTIME * 10**9) <= STALE_WINDOW_NS
        try:
            if kind == "D":
                os.rmdir(path)
            elif kind == "T":
                os.unlink(path)
            elif day is not None and not stale and not (rotated and rel.startswith(rotated)):
                keep.move_into(ctx.root, mirror, rel, day, inside)
                kept += 1
                removed += kind == "F"
            elif kind == "F":
                os.unlink(path)
                removed += 1
            # "R" without a keep area (or stale): rsync replaces the file
        except FileNotFoundError:
            continue
        except OSError as exc:
            what = "keep" if day is not None and kind not in "DT" else "delete"
            ctx.problems.add(f"library: could not {what} {readable(rel)} in the backup: "
                             f"{exc.strerror}")
    return removed, kept


async def run(ctx: RunContext, plan: Plan, kept: keep.KeepSurvey | None,
              cache: HashCache | None, found: moves.Moves) -> LibraryResult:
    """Apply the plan: prune the keep area, rename what Immich moved, set aside what the
    server deleted or changed (into the keep area, or deleted), then copy. With a
    ``cache`` in quick mode, the new files are hashed (for the manifest) while rsync
    copies them."""
    result = LibraryResult()
    mirror = await in_thread(ctx, lambda: ctx.root.mkdir(FOLDER))
    await in_thread(ctx, lambda: rsync.clean_incoming(ctx))
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
    if plan.delete_files or plan.delete_dirs or plan.replaced_files or plan.leftover_files:
        ctx.status.set_phase("delete", 0, f"setting aside {plan.delete_files} deleted and "
                             f"{plural(plan.replaced_files, 'changed file')}")
        removed, moved = await in_thread(ctx, lambda: _delete(ctx, mirror, plan))
        result.deleted, result.kept = removed, moved
        result.leftovers = plan.leftover_files or None
        if moved:
            result.keep_day = keep_day(ctx)
            result.keep_days = ctx.config.library.keep_deleted_days
    # in quick mode, the manifest's new digests come from hashing while rsync copies
    hasher: rsync.CopyHasher | None = None
    if (copy_lists and cache is not None and plan.files_list is not None
            and ctx.mode == "quick"):  # not a no-change run: its files list is long
        hasher = rsync.CopyHasher(str(ctx.config.immich.upload_location), plan.files_list, cache)
    await rsync.copy_paths(ctx, copy_lists, plan.copy_files, plan.copy_bytes, result, hasher)
    result.source_files, result.source_bytes = plan.source_files, plan.source_bytes
    if plan.files_list is not None and plan.copy_files:
        changed = await in_thread(ctx, lambda: changed_while_copied(ctx, plan))
        if changed:
            result.changed_while_copied = changed
            if cache is not None:
                cache.set_manifest_state(ctx.disk_key, None)
    return result


def changed_while_copied(ctx: RunContext, plan: Plan) -> int:
    """After the copy: the copied files whose server file no longer has the size and time
    the scan saw (it was written to, or replaced, while the run copied it). The disk's
    copy may hold any mix of its versions: each is named in the problems, marked
    ``changed`` in the files list (the manifest then takes its digest from the disk's
    copy, so that it describes the disk), and given ``STALE_MTIME``, so that the next run
    copies it again. Return how many."""
    assert plan.files_list is not None
    source = str(ctx.config.immich.upload_location)
    mirror = ctx.root.path(FOLDER)
    changed = 0
    listed = ctx.work_dir / "changed"  # in the files list's order
    with open(listed, "wb") as out:
        for rec in read_files_list(plan.files_list):
            if not rec.copied:
                continue
            try:
                st = os.stat(os.path.join(source, rec.rel), follow_symlinks=False)
                now = (st.st_size, st.st_mtime_ns)
            except OSError:
                continue  # gone from the server: the next run's scan sees it
            if now == (rec.size, rec.mtime_ns):
                continue
            try:
                os.utime(mirror / rec.rel, (STALE_MTIME, STALE_MTIME), follow_symlinks=False)
            except FileNotFoundError:
                continue  # vanished before rsync copied it: not on the disk
            except OSError as exc:
                log.warning("could not mark %s to be copied again: %s", rec.rel, exc)
            changed += 1
            out.write(os.fsencode(rec.rel) + b"\0")
            ctx.problems.add(f"library: {readable(rec.rel)} changed on the server while it "
                             "was copied: copied again by the next run")
    if changed:
        _mark_changed(plan.files_list, listed)
    return changed


def _mark_changed(files_list: Path, changed: Path) -> None:
    """Rewrite the files list with the records named in ``changed`` (a subsequence of
    it, in its order) flagged ``X``: both are read in step, nothing is held."""
    pending = read_paths(changed)
    want = next(pending, None)
    new = files_list.with_name(files_list.name + ".new")
    with open(new, "wb") as out:
        for rec in read_files_list(files_list):
            flag = b"U" if not rec.copied else b"C"
            if rec.rel == want:
                flag, want = b"X", next(pending, None)
            out.write(files_record(flag, rec.size, rec.mtime_ns, rec.rel))
    os.replace(new, files_list)


