"""After the copy: compare contents (verify and full modes) and write the manifest.

``compare`` reads the server's file and the disk's copy at once (one thread each, see
``hashing.hash_both``) for the files the mode asks for: in ``verify``, every file copied
in this run plus one turn of the rest (``library.verify_rotation_runs``); in ``full``,
every file. A copy that differs is set aside into the keep area and copied again at
once, then read back; each one is a problem of the run, which ends ``failed``.

``write_manifest`` writes ``library.sha256`` from the run's files list and the hash
cache, hashing (on the server's side) only what the cache does not know at the file's
size and time.
"""

from __future__ import annotations

import logging
import os
import threading
import zlib
from pathlib import Path
from typing import BinaryIO

from immich_usb_backup import keep, layout, manifest, rsync
from immich_usb_backup.errors import BackupError
from immich_usb_backup.fsutil import atomic_write
from immich_usb_backup.hashcache import HashCache, Row, chunked
from immich_usb_backup.hashing import (
    Hashed,
    drop_device_cache,
    hash_both,
    hash_files,
    sha256_file,
)
from immich_usb_backup.record import StepResult
from immich_usb_backup.scan import MODIFY_WINDOW_NS, STALE_MTIME, Plan, read_files_list, read_paths
from immich_usb_backup.steps.base import RunContext, in_thread

log = logging.getLogger(__name__)


def _selected(rel: str, copied: bool, mode: str, runs: int, turn: int) -> bool:
    if copied or mode == "full":
        return True
    if mode != "verify" or runs <= 0:
        return False
    return zlib.crc32(os.fsencode(rel)) % runs == turn % runs


def _write_selection(ctx: RunContext, plan: Plan, turn: int) -> tuple[Path, int, int]:
    """Write the paths to compare into a list; return it with their count and bytes."""
    assert plan.files_list is not None
    runs = ctx.config.library.verify_rotation_runs
    path = ctx.work_dir / "compare"
    files = size = 0
    with open(path, "wb") as out:
        for rec in read_files_list(plan.files_list):
            if _selected(rec.rel, rec.copied, ctx.mode, runs, turn):
                out.write(os.fsencode(rec.rel) + b"\0")
                files += 1
                size += rec.size
    return path, files, size


def _why(cached: str | None, source: Hashed, disk: Hashed) -> str:
    if disk.digest is None:
        return f"the disk's copy cannot be read ({disk.error})"
    if cached is not None and cached == disk.digest:
        return ("the server's file changed since it was backed up although its size and "
                "time did not (damage on the server's storage?)")
    if cached is not None and cached == source.digest:
        return "the disk's copy is damaged"
    return "the contents differ"


def _compare_all(ctx: RunContext, selection: Path, cache: HashCache,
                 mismatched: list[tuple[str, str, str]]) -> int:
    """Hash both sides of every selected path; return how many files were compared."""
    source = str(ctx.config.immich.upload_location)
    mirror = str(ctx.root.path(layout.LIBRARY))
    read = [0]
    lock = threading.Lock()

    def on_bytes(n: int) -> None:
        with lock:
            read[0] += n

    compared = 0
    for s, d in hash_both(source, mirror, lambda: read_paths(selection), on_bytes=on_bytes,
                          stop=ctx.cancel):
        ctx.status.progress(read[0], f"{compared} files compared")
        if s.digest is None:  # gone or changing on the server: the next run sees it
            log.info("not compared, the server's file %s: %s", s.rel, s.error)
            continue
        if d.digest is not None and (
            s.size != d.size or abs(s.mtime_ns - d.mtime_ns) > MODIFY_WINDOW_NS
        ):
            log.info("not compared, %s changed on the server after it was copied", s.rel)
            continue
        compared += 1
        cached = cache.lookup(s.rel, s.size, s.mtime_ns)
        cache.put(s.rel, s.size, s.mtime_ns, s.digest, s.sha1)
        if d.digest != s.digest:
            mismatched.append((s.rel, _why(cached, s, d), s.digest))
    cache.commit()
    return compared


def _set_aside(ctx: RunContext, rels: list[str]) -> Path:
    """Mark the differing copies stale, move them into the keep area (or leave them for
    rsync to replace), and write the list to copy again."""
    mirror = ctx.root.path(layout.LIBRARY)
    day = keep.run_day(ctx.config.library.keep_deleted_days, ctx.started.date())
    path = ctx.work_dir / "recopy"
    with open(path, "wb") as out:
        for rel in rels:
            target = mirror / rel
            try:
                os.utime(target, (STALE_MTIME, STALE_MTIME))
                if day is not None:
                    keep.move_into(ctx.root, mirror, rel, day)
            except FileNotFoundError:
                pass
            out.write(os.fsencode(rel) + b"\0")
    return path


def _settle(ctx: RunContext) -> None:
    """Before reading copies back: sync them to the disk, then drop the device's cached
    blocks (see ``hashing.drop_device_cache``), so the check reads the disk."""
    os.sync()
    if not drop_device_cache(ctx.disk.device):
        log.info("could not drop the cache of %s: the check may read from memory",
                 ctx.disk.device)


async def compare(ctx: RunContext, plan: Plan, cache: HashCache) -> tuple[int, list[str]]:
    """Compare contents (see the module doc); return how many files were compared and
    the problems found (empty if none)."""
    turn = cache.next_rotation(ctx.disk_key) if ctx.mode == "verify" else 0
    selection, files, size = await in_thread(ctx, lambda: _write_selection(ctx, plan, turn))
    ctx.status.set_phase("verify", 2 * size,
                         f"comparing {files} files on the server and on the disk")
    await in_thread(ctx, lambda: _settle(ctx))
    mismatched: list[tuple[str, str, str]] = []
    compared = await in_thread(
        ctx, lambda: _compare_all(ctx, selection, cache, mismatched))
    log.info("compared %d files (%s mode, turn %d)", compared, ctx.mode, turn)
    if not mismatched:
        return compared, []
    cache.set_manifest_state(ctx.disk_key, None)  # what is copied again may differ
    rels = [rel for rel, _, _ in mismatched]
    recopy = await in_thread(ctx, lambda: _set_aside(ctx, rels))
    day = keep.run_day(ctx.config.library.keep_deleted_days, ctx.started.date())
    kept = f"; the differing copy is kept in deleted/{day}/" if day else ""
    try:
        await rsync.copy_paths(ctx, [recopy], len(rels), 0, StepResult())
    except BackupError as exc:
        return compared, [
            f"verify: library/{rel} differed from the server ({why}){kept}; copying it "
            f"again failed ({exc}): the next run copies it" for rel, why, _ in mismatched]
    await in_thread(ctx, lambda: _settle(ctx))
    mirror = str(ctx.root.path(layout.LIBRARY))
    again = await in_thread(ctx, lambda: list(hash_files(mirror, rels, drop_cache=True,
                                                         stop=ctx.cancel)))
    problems = []
    for (rel, why, source_digest), h in zip(mismatched, again, strict=True):
        if h.digest is not None and h.digest == source_digest:
            problems.append(f"verify: library/{rel} differed from the server ({why}); "
                            f"copied again and checked{kept}")
        else:
            problems.append(f"verify: library/{rel} differed from the server ({why}) and "
                            f"still differs after copying it again: the disk may be failing")
    return compared, problems


# The manifest ----------------------------------------------------------------------

def _write_lines(ctx: RunContext, plan: Plan, cache: HashCache, out: BinaryIO,
                 counts: dict[str, int]) -> None:
    assert plan.files_list is not None
    source = str(ctx.config.immich.upload_location)
    mirror = str(ctx.root.path(layout.LIBRARY))
    done = 0
    buf = bytearray(1024 * 1024)
    for chunk in chunked(read_files_list(plan.files_list)):
        ctx.check_cancel()
        known = cache.lookup_many([(r.rel, r.size, r.mtime_ns) for r in chunk])
        hashed: list[Row] = []  # put into the cache a chunk at a time
        for rec, cached in zip(chunk, known, strict=True):
            digest = None if rec.changed else cached
            if digest is None and not rec.changed:
                h = sha256_file(os.path.join(source, rec.rel), rec.rel, stop=ctx.cancel,
                                buf=buf)
                if h.digest is not None:
                    hashed.append((rec.rel, h.size, h.mtime_ns, h.digest, h.sha1))
                    if (h.size, h.mtime_ns) == (rec.size, rec.mtime_ns):
                        digest = h.digest
            if digest is None:
                # the server's file changed during the run (or while it was copied): the
                # line must describe the disk's copy, whatever version it holds
                h = sha256_file(os.path.join(mirror, rec.rel), rec.rel, stop=ctx.cancel,
                                buf=buf)
                if h.digest is None:
                    counts["left_out"] += 1
                    log.info("not in the manifest this time: %s (%s)", rec.rel, h.error)
                    continue
                digest = h.digest
                counts["from_disk"] = counts.get("from_disk", 0) + 1
            out.write(manifest.line(digest, rec.rel))
            counts["entries"] += 1
            done += rec.size
        cache.put_many(hashed)
        counts["hashed"] += len(hashed)
        ctx.status.progress(done, f"{counts['entries']} files listed")
    cache.commit()


async def write_manifest(ctx: RunContext, plan: Plan, cache: HashCache) -> dict[str, int]:
    """Write ``library.sha256`` unless the one on the disk is already this run's."""
    final = ctx.root.path(manifest.NAME)
    known = cache.manifest_state(ctx.disk_key)
    try:
        st = os.stat(final)
        now: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
    except FileNotFoundError:
        now = None
    if known is not None and known[2] and now == known[:2]:
        log.info("the manifest on the disk is up to date")
        return {"entries": plan.source_files, "hashed": 0, "left_out": 0, "unchanged": 1}
    ctx.status.set_phase("manifest", plan.source_bytes, "listing the checksums")
    counts = {"entries": 0, "hashed": 0, "left_out": 0}
    await in_thread(ctx, lambda: atomic_write(
        ctx.root, final, lambda f: _write_lines(ctx, plan, cache, f, counts)))
    st = os.stat(final)
    cache.set_manifest_state(ctx.disk_key, (st.st_size, st.st_mtime_ns,
                                            counts["left_out"] == 0))
    return counts


def remove_manifest(ctx: RunContext) -> None:
    """``library.manifest = false``: a manifest left from before would go stale."""
    path = ctx.root.path(manifest.NAME)
    if path.is_file():
        path.unlink()
        log.info("removed %s (library.manifest is off)", path)
