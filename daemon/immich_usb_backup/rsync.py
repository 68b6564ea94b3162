"""rsync, the copier: its argv for a mirror onto exFAT, its output, the copy of a run's
lists, and the hashing of what it copies meanwhile.

``copy_paths`` hands rsync one NUL-separated list of paths at a time (``--files-from
--from0``), with its temporary files in ``.incoming/`` of the backup folder, reads its
progress every 0.1 s and counts what it copied; ``CopyHasher`` hashes the copied files
into the hash cache in a thread while rsync copies them. docs/design.md says why each
flag and each batch is as it is, with the measurements.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from immich_usb_backup import execute, layout
from immich_usb_backup.errors import BackupError, CommandError
from immich_usb_backup.fsutil import Inside, allocated
from immich_usb_backup.hashcache import CHUNK, HashCache, Row, chunked
from immich_usb_backup.hashing import Stopped, hash_files
from immich_usb_backup.record import StepResult, readable
from immich_usb_backup.scan import read_files_list
from immich_usb_backup.steps.base import RunContext, in_thread
from immich_usb_backup.text import plural

log = logging.getLogger(__name__)

MIN_VERSION = (3, 1, 0)
VANISHED = 24  # a source file vanished while copying: Immich deleted it; fine
HASH_AHEAD_BYTES = 128 * 1024 * 1024  # how far hashing may read ahead of rsync's copy
OUTPUT_EVERY_S = 0.1  # rsync's output is read this often (execute.run's coalesce_s)

_PROGRESS = re.compile(r"^\s*([\d,.]+)\s+(\d+)%")
_XFR = re.compile(r"xfr#(\d+)")  # files copied so far by this rsync (progress2)
_STATS_FILES = re.compile(r"^Number of regular files transferred:\s*([\d,.]+)")
_STATS_BYTES = re.compile(r"^Total transferred file size:\s*([\d,.]+)")
_STATS_LIST_S = re.compile(r"^File list generation time:\s*(\d+)[.,](\d+) seconds")
_VERSION = re.compile(r"rsync\s+version\s+v?(\d+)\.(\d+)\.(\d+)")


def base_args(bwlimit_kib: int = 0) -> list[str]:
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


async def problems() -> list[str]:
    """What keeps rsync from copying here: not installed, too old (for ``check``)."""
    found = shutil.which("rsync")
    if found is None:
        return ["rsync is not installed (Debian/Ubuntu: apt install rsync)"]
    try:
        _, out = await execute.capture([found, "--version"])
    except (CommandError, OSError) as exc:
        return [f"rsync --version failed: {exc}"]
    m = _VERSION.search(out)
    if m is None:
        return ["could not read rsync's version"]
    if tuple(map(int, m.groups())) < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        return [f"rsync {'.'.join(m.groups())} is too old; {need} or newer needed"]
    return []


def _number(text: str) -> int:
    return int(re.sub(r"[,.]", "", text))


async def copy_paths(ctx: RunContext, lists: list[Path], files: int, total_bytes: int,
                     result: StepResult, hasher: CopyHasher | None = None) -> None:
    """Copy the paths in ``lists`` (NUL-separated, relative to the upload location) with
    rsync, one list at a time, counting into ``result``. A ``hasher`` runs in a thread
    meanwhile, kept within ``HASH_AHEAD_BYTES`` of rsync's progress."""
    mirror = ctx.root.path(layout.LIBRARY)
    ctx.status.set_phase("library", total_bytes, copied_text(0, files))
    source = str(ctx.config.immich.upload_location).rstrip("/") + "/"
    done = {"before": 0, "batch": 0}  # bytes of finished batches, of the running one
    count = {"before": 0, "batch": 0}  # files of finished batches, of the running one
    list_s: str | None = None  # the batch's seconds building its file list (--stats)

    def on_lines(lines: list[str]) -> None:
        """rsync's output of one read: many progress lines (two a file copied; only the
        last counts), then at the end the --stats lines (these start with a letter,
        progress lines with spaces)."""
        nonlocal list_s
        for line in reversed(lines):
            x = _XFR.search(line)
            if x:
                count["batch"] = int(x.group(1))
                break
        for line in reversed(lines):
            m = _PROGRESS.match(line)
            if m:
                done["batch"] = _number(m.group(1))
                ctx.status.progress(done["before"] + done["batch"],
                                    copied_text(count["before"] + count["batch"], files))
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

    incoming = await in_thread(ctx, lambda: ctx.root.mkdir(layout.INCOMING))
    if hasher is not None:
        hasher.start()
    try:
        for listed in lists:
            batch = await in_thread(ctx, functools.partial(_without_comments, listed))
            done["batch"], count["batch"], list_s = 0, 0, None
            argv = [
                *base_args(ctx.config.library.bwlimit_kib),
                "--dirs",
                f"--temp-dir={incoming}",
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
                                  ok_codes=(0, VANISHED))
            except CommandError as exc:
                raise BackupError(
                    f"library: rsync failed with status {exc.returncode}: {exc.stderr_tail}"
                ) from exc
            # rsync reads a list one byte a system call and copies nothing meanwhile
            # (docs/design.md, "What the lists cost rsync"): about 1 s a megabyte
            took = f", {list_s} s of it building its file list" if list_s else ""
            log.debug("rsync batch %s: %.1f s%s", batch.name, time.monotonic() - t0, took)
            done["before"] += done["batch"]
            count["before"] += count["batch"]
    except BaseException:
        if hasher is not None:
            hasher.stop.set()
        raise
    finally:
        if hasher is not None:
            await hasher.finish()
    await in_thread(ctx, lambda: _remove_empty(incoming))


def copied_text(copied: int, files: int) -> str:
    """The live status's detail while the library is copied: "3 of 18 files copied"."""
    return f"{min(copied, files)} of {plural(files, 'file')} copied"


def _remove_empty(folder: Path) -> None:
    """rsync's temporary folder, once the copy ended well (a killed copy's files in it
    are removed by the next run's ``clean_incoming``)."""
    try:
        os.rmdir(folder)
    except OSError as exc:
        log.debug("%s left in place: %s", folder, exc.strerror)


def clean_incoming(ctx: RunContext) -> None:
    """Remove what a killed copy left in rsync's temporary folder (``layout.INCOMING``):
    partial files that belong to no backup."""
    folder = ctx.root.path(layout.INCOMING)
    if not folder.is_dir() or folder.is_symlink():
        return
    inside = Inside(folder)
    for entry in os.scandir(folder):
        inside.entry(Path(entry.path))
        if entry.is_dir(follow_symlinks=False):
            raise BackupError(f"{folder} holds a folder ({entry.name}): rsync's temporary "
                              "folder should hold only files; remove it by hand")
        os.unlink(entry.path)
        log.info("removed %s, left by a copy that was killed", readable(entry.name))


def incoming_size(ctx: RunContext, cluster: int) -> int:
    """The allocated bytes of what a killed copy left in rsync's temporary folder."""
    folder = ctx.root.root / layout.INCOMING
    try:
        with os.scandir(folder) as it:
            return sum(allocated(e.stat(follow_symlinks=False).st_size, cluster)
                       for e in it if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


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
