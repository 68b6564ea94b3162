"""Files Immich moved: found in the plan, renamed on the disk instead of copied again.

``find`` (in the preflight, reading only) pairs the scan's gone files with its new ones:
the same size and nanosecond time as the hash cache recorded (``rename()`` keeps both),
unique, else the same SHA-256; the pairs leave the copy and delete lists, so the
capacity check and the deletion guard count only real writes and deletions. ``apply``
(first in the write phase) renames each on the disk inside ``library/`` and gives the
new path its digests in the cache. Everything streams through a SQLite file in the
run's work folder. docs/design.md ("Moves found by our code") says why.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from immich_usb_backup import manifest
from immich_usb_backup.fsutil import Inside, allocated
from immich_usb_backup.hashcache import HashCache
from immich_usb_backup.hashing import sha256_file
from immich_usb_backup.policy import exfat_fold
from immich_usb_backup.scan import (
    MODIFY_WINDOW_NS,
    Plan,
    delete_record,
    files_record,
    read_delete_records,
    read_files_list,
    read_paths,
    read_records,
)

log = logging.getLogger(__name__)

CANDIDATES = 64  # gone files of one size looked at for one new file


@dataclass
class Moves:
    """The moves found: how many files and bytes, and the list ``apply`` renames."""

    files: int = 0
    bytes: int = 0
    read_files: int = 0  # new files read on the server to prove a move
    list: Path | None = None  # records P, Q, digest, size, mtime_ns, P's mtime_ns (NUL)


@dataclass
class Applied:
    renamed: int = 0
    recopy: Path | None = None  # new files whose rename could not be made: copied instead


def find(plan: Plan, source: Path, work_dir: Path, cache: HashCache,
         manifest_path: Path | None, cluster: int, *,
         check_cancel: Callable[[], None] = lambda: None) -> Moves:
    """Pair the plan's deleted and new files that are one file moved; take them out of
    the plan's lists and numbers. ``manifest_path``: the disk's manifest when it is up to
    date (a second source of P's digest). Sizes and times are the scan's (its delete and
    files lists); reads only the new files it must compare by content."""
    moves = Moves()
    if (not plan.delete_files or not plan.copy_files or plan.delete_list is None
            or plan.files_list is None):
        return moves
    db_path = work_dir / "moves.sqlite"
    db_path.unlink(missing_ok=True)
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.executescript("""
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
            CREATE TABLE gone (rel TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,
                               recorded_mtime_ns INTEGER, digest TEXT, used INTEGER DEFAULT 0,
                               folded TEXT);
            CREATE INDEX gone_size ON gone (size);
            CREATE INDEX gone_folded ON gone (folded);
            CREATE TABLE moved (q TEXT PRIMARY KEY, p TEXT UNIQUE, digest TEXT,
                                size INTEGER, mtime_ns INTEGER, p_mtime_ns INTEGER);
            BEGIN;
        """)
        if not _gone_files(db, plan.delete_list, cache, check_cancel):
            return moves
        if manifest_path is not None:
            _digests_from_manifest(db, manifest_path)
        _pair(db, plan, source, moves, check_cancel)
        db.execute("COMMIT")
        if moves.files:
            _take_out_of_plan(db, plan, work_dir, cluster, moves)
        log.info("found %d files Immich moved (%d read to be sure)", moves.files,
                 moves.read_files)
        return moves
    finally:
        db.close()
        db_path.unlink(missing_ok=True)


def _gone_files(db: sqlite3.Connection, delete_list: Path, cache: HashCache,
                check_cancel: Callable[[], None]) -> bool:
    """The delete list's files, with their size and time on the disk (as the scan listed
    them) and, when the disk holds the version the cache recorded, its digest. Return
    whether there is any."""
    count = 0
    for kind, rel, disk_size, disk_mtime in read_delete_records(delete_list):
        if kind != "F" or disk_size < 0:  # not a regular file
            continue
        if count % 1000 == 0:
            check_cancel()
        recorded = cache.entry(rel)
        digest = recorded_mtime = None
        if recorded is not None:
            size, mtime_ns, cached = recorded
            if size == disk_size and abs(mtime_ns - disk_mtime) <= MODIFY_WINDOW_NS:
                digest, recorded_mtime = cached, mtime_ns
        db.execute("INSERT OR IGNORE INTO gone (rel, size, mtime_ns, recorded_mtime_ns, "
                   "digest, folded) VALUES (?,?,?,?,?,?)",
                   (rel, disk_size, disk_mtime, recorded_mtime, digest, _fold(rel)))
        count += 1
    return count > 0


def _digests_from_manifest(db: sqlite3.Connection, path: Path) -> None:
    """P's digest from the disk's (up-to-date) manifest, for gone files the cache lacks."""
    (missing,) = db.execute("SELECT count(*) FROM gone WHERE digest IS NULL").fetchone()
    if not missing:
        return
    for entry in manifest.read(path):
        if isinstance(entry, manifest.Entry):
            db.execute("UPDATE gone SET digest = ? WHERE rel = ? AND digest IS NULL",
                       (entry.digest, entry.rel))


def _pair(db: sqlite3.Connection, plan: Plan, source: Path, moves: Moves,
          check_cancel: Callable[[], None]) -> None:
    """Each new file (copied, in the files list) against the gone files of its size."""
    assert plan.files_list is not None
    buf = bytearray(1024 * 1024)
    for n, new in enumerate(read_files_list(plan.files_list)):
        if not new.copied:
            continue
        if n % 1000 == 0:
            check_cancel()
        rel, size, mtime_ns = new.rel, new.size, new.mtime_ns
        rows = db.execute(
            "SELECT rel, recorded_mtime_ns, digest, mtime_ns FROM gone WHERE size = ? "
            "AND used = 0 LIMIT ?", (size, CANDIDATES)).fetchall()
        if not rows:
            continue
        exact = [r for r in rows if r[1] == mtime_ns and r[2] is not None]
        if len(exact) == 1:
            gone, digest, p_mtime = exact[0][0], exact[0][2], exact[0][3]
        else:
            known = [r for r in rows if r[2] is not None]
            if not known:
                continue
            h = sha256_file(os.path.join(source, rel), rel, buf=buf)
            moves.read_files += 1
            same = [r for r in known if r[2] == h.digest]
            if h.digest is None or not same or (h.size, h.mtime_ns) != (size, mtime_ns):
                continue  # unreadable, no match, or changed since the scan: copied
            gone, digest, p_mtime = same[0][0], h.digest, same[0][3]
        twin = db.execute("SELECT rel FROM gone WHERE folded = ? AND rel != ?",
                          (_fold(rel), gone)).fetchone()
        if twin is not None:  # Q's name, in another case, is still there until deleted:
            continue  # a rename would replace it (exFAT ignores case); copied instead
        db.execute("UPDATE gone SET used = 1 WHERE rel = ?", (gone,))
        db.execute("INSERT INTO moved (q, p, digest, size, mtime_ns, p_mtime_ns) "
                   "VALUES (?,?,?,?,?,?)", (rel, gone, digest, size, mtime_ns, p_mtime))
        moves.files += 1
        moves.bytes += size


def _fold(rel: str) -> str:
    """``rel`` as exFAT compares names: case folded, component by component."""
    return "/".join(exfat_fold(part) for part in rel.split("/"))


def _take_out_of_plan(db: sqlite3.Connection, plan: Plan, work_dir: Path, cluster: int,
                      moves: Moves) -> None:
    """Rewrite the copy lists, the delete list and the files list without the moves;
    write the moves list; bring the plan's numbers in line."""
    def moved_q(rel: str) -> bool:
        return db.execute("SELECT 1 FROM moved WHERE q = ?", (rel,)).fetchone() is not None

    def moved_p(rel: str) -> bool:
        return db.execute("SELECT 1 FROM moved WHERE p = ?", (rel,)).fetchone() is not None

    for batch in plan.copy_lists:
        _rewrite(batch, (os.fsencode(rel) + b"\0" for rel in read_paths(batch)
                         if not moved_q(rel)))
    assert plan.delete_list is not None
    _rewrite(plan.delete_list, (delete_record(kind.encode(), rel, size, mtime_ns)
                                for kind, rel, size, mtime_ns
                                in read_delete_records(plan.delete_list)
                                if kind != "F" or not moved_p(rel)))
    if plan.files_list is not None:
        _rewrite(plan.files_list, (
            files_record(b"C" if r.copied and not moved_q(r.rel) else b"U", r.size,
                          r.mtime_ns, r.rel)
            for r in read_files_list(plan.files_list)))
    moves.list = work_dir / "moves"
    with open(moves.list, "wb") as out:
        for p, q, digest, size, mtime_ns, p_mtime_ns in db.execute(
                "SELECT p, q, digest, size, mtime_ns, p_mtime_ns FROM moved ORDER BY rowid"):
            out.write(b"\0".join((os.fsencode(p), os.fsencode(q), digest.encode(),
                                  str(size).encode(), str(mtime_ns).encode(),
                                  str(p_mtime_ns).encode())) + b"\0")
            alloc = allocated(size, cluster)
            plan.copy_alloc -= alloc
            plan.delete_alloc -= alloc
    plan.copy_files -= moves.files
    plan.copy_bytes -= moves.bytes
    plan.delete_files -= moves.files


def _rewrite(path: Path, records: Iterator[bytes]) -> None:
    """Replace the list file ``path`` with ``records`` (written beside it, then renamed)."""
    temp = path.with_name(path.name + ".new")
    with open(temp, "wb") as out:
        for record in records:
            out.write(record)
    os.replace(temp, path)


def read_moves(path: Path) -> Iterator[tuple[str, str, str, int, int, int]]:
    """Yield (P, Q, digest, size, mtime_ns, P's mtime_ns on the disk) from a moves list."""
    for p, q, digest, size, mtime_ns, p_mtime_ns in read_records(path, 6):
        yield (os.fsdecode(p), os.fsdecode(q), digest.decode(), int(size), int(mtime_ns),
               int(p_mtime_ns))


def apply(moves: Moves, mirror: Path, work_dir: Path, cache: HashCache | None,
          check_cancel: Callable[[], None] = lambda: None) -> Applied:
    """Rename each P to Q inside ``mirror`` (both checked inside it after resolving
    links); a rename that cannot be made puts Q on a copy list (``Applied.recopy``)."""
    done = Applied()
    if moves.list is None:
        return done
    recopy = work_dir / "recopy-moves"
    inside = Inside(mirror)
    made: set[str] = set()  # folders known to exist (bounded like Inside's)
    with open(recopy, "wb") as again:
        for p, q, digest, size, mtime_ns, p_mtime_ns in read_moves(moves.list):
            check_cancel()
            src, dst = mirror / p, mirror / q
            inside.entry(src)
            try:
                if str(dst.parent) not in made:
                    inside.entry(dst.parent)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    if len(made) >= inside.remember:
                        made.clear()
                    made.add(str(dst.parent))
                inside.entry(dst)
                # Q is free: the scan listed its folder (case-insensitively) under the lock,
                # and each Q is renamed to once; P was a regular file when it was paired.
                # No look at either here: on exFAT every lookup reads the whole folder.
                os.rename(src, dst)  # rename keeps the time: set it only when it differs
                if abs(p_mtime_ns - mtime_ns) > MODIFY_WINDOW_NS:
                    os.utime(dst, ns=(mtime_ns, mtime_ns))
            except OSError as exc:
                log.warning("could not rename %s to %s in the backup (%s): copying it",
                            p, q, exc)
                again.write(os.fsencode(q) + b"\0")
                continue
            if cache is not None:
                cache.put(q, size, mtime_ns, digest, cache.sha1_for(p, digest))
            done.renamed += 1
    if cache is not None:
        cache.commit()
    if recopy.stat().st_size:
        done.recopy = recopy
    return done
