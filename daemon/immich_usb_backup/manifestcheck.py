"""``verify TARGET`` for the library: ``library/`` on the disk against its manifest.

The manifest (``library.sha256``) and a walk of ``library/`` are put into a throwaway
SQLite database in the state dir (a million lines are never held in memory): a listed
file that is not there is missing, a file that is not listed is unexpected. Then every
listed file, or a random ``sample`` share of them, is read back from the disk itself
(the device's cache dropped first) and hashed: a different digest is changed.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

from immich_usb_backup import layout, manifest
from immich_usb_backup.errors import BackupError
from immich_usb_backup.hashing import BLOCK, drop_device_cache, sha256_file
from immich_usb_backup.lister import list_dir
from immich_usb_backup.scan import Excludes
from immich_usb_backup.steps.base import DiskCheck
from immich_usb_backup.text import plural


def check(dc: DiskCheck) -> None:
    """Check ``library/`` of ``dc.root`` against its manifest (see the module doc).
    Raise BackupError when the disk has no manifest."""
    listing = dc.root / manifest.NAME
    if not listing.is_file():
        raise BackupError(
            f"{listing} does not exist: this disk has no manifest to check against yet. "
            "A backup with library.manifest = true (the default) writes it.")
    own = dc.work is None
    work = Path(tempfile.mkdtemp(prefix="verify-", dir=dc.config.state_dir)) if own \
        else dc.work
    assert work is not None
    try:
        db = sqlite3.connect(work / "lists.sqlite")
        try:
            _compare_lists(dc, listing, db)
            _choose(db, dc.sample)
            _read_back(dc, db)
            db.commit()
        finally:
            db.close()
        if not own:  # the lists and what was read, for the asset check
            dc.library_reads = work / "lists.sqlite"
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _walk_files(top: Path, excludes: Excludes) -> Iterator[tuple[str, int, bool]]:
    """(path relative to ``top``, size, is a regular file) of everything but folders."""
    stack = [""]
    while stack:
        rel = stack.pop()
        subdirs = []
        for name, kind, size, _ in sorted(list_dir(os.path.join(top, rel))):
            child = f"{rel}/{name}" if rel else name
            if excludes.match(child):
                continue
            if kind == "dir":
                subdirs.append(child)
            else:
                yield child, size, kind == "file"
        stack.extend(reversed(subdirs))


def _compare_lists(dc: DiskCheck, listing: Path, db: sqlite3.Connection) -> None:
    """The manifest into table m, the disk's files into d: missing and unexpected."""
    report, status = dc.report, dc.status
    db.executescript("""
        PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
        CREATE TABLE m (path TEXT PRIMARY KEY, digest TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE d (path TEXT PRIMARY KEY, size INTEGER NOT NULL,
                        regular INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE r (path TEXT PRIMARY KEY, sha1 TEXT) WITHOUT ROWID;
    """)
    status.set_phase("verify", 0, "reading the manifest")
    for item in manifest.read(listing):
        if isinstance(item, manifest.BadLine):
            report.bad_lines.add(str(item))
            continue
        db.execute("INSERT OR REPLACE INTO m VALUES (?, ?)", (item.rel, item.digest))
    report.manifest_entries = db.execute("SELECT count(*) FROM m").fetchone()[0]

    status.set_phase("verify", 0, "listing the files on the disk")
    mirror = dc.root / layout.LIBRARY
    if mirror.is_dir():
        excludes = Excludes(dc.config.library.excludes)
        for rel, size, regular in _walk_files(mirror, excludes):
            dc.check_stop()
            db.execute("INSERT OR REPLACE INTO d VALUES (?, ?, ?)", (rel, size, int(regular)))
    report.files_on_disk = db.execute("SELECT count(*) FROM d").fetchone()[0]
    for (rel,) in db.execute("SELECT path FROM m WHERE path NOT IN (SELECT path FROM d) "
                             "ORDER BY path"):
        report.missing.add(f"{layout.LIBRARY}/{rel}")
    for (rel,) in db.execute("SELECT path FROM d WHERE path NOT IN (SELECT path FROM m) "
                             "ORDER BY path"):
        report.unexpected.add(f"{layout.LIBRARY}/{rel}")


def _choose(db: sqlite3.Connection, sample: float | None) -> None:
    """Table s: the files to read back, all of them or a random ``sample`` percent."""
    # random() gives 64 random bits: keep a row when its low 20 bits fall under the share
    share = 1 << 20 if sample is None else round(sample / 100 * (1 << 20))
    db.execute("CREATE TABLE s AS SELECT m.path AS path, m.digest AS digest, d.size AS size "
               "FROM m JOIN d USING (path) WHERE d.regular = 1 AND (random() & 1048575) < ?",
               (share,))
    if sample is not None and not db.execute("SELECT 1 FROM s LIMIT 1").fetchone():
        # a small share of a small library can draw nothing: a sample reads at least one
        db.execute("INSERT INTO s SELECT m.path, m.digest, d.size FROM m JOIN d USING (path) "
                   "WHERE d.regular = 1 ORDER BY random() LIMIT 1")


def _read_back(dc: DiskCheck, db: sqlite3.Connection) -> None:
    """Hash the chosen files from the disk itself."""
    report = dc.report
    total_files, total_bytes = db.execute("SELECT count(*), coalesce(sum(size), 0) "
                                          "FROM s").fetchone()
    dc.status.set_phase("verify", total_bytes,
                        f"reading {plural(total_files, 'file')} back from the disk")
    on_bytes = dc.status.counter()

    drop_device_cache(dc.device)  # read the disk, not what a FUSE driver left in memory
    buf = bytearray(BLOCK)
    mirror = dc.root / layout.LIBRARY
    for rel, digest, _size in db.execute("SELECT path, digest, size FROM s ORDER BY path"
                                         ).fetchall():
        h = sha256_file(str(mirror / rel), rel, drop_cache=True, on_bytes=on_bytes,
                        stop=dc.stop, buf=buf)
        report.checked_files += 1
        report.checked_bytes += h.size
        if h.sha1 is not None:  # read anyway: the asset check takes it (Immich's SHA-1)
            db.execute("INSERT OR REPLACE INTO r VALUES (?, ?)", (rel, h.sha1))
        if h.digest is None:
            report.unreadable.add(f"{layout.LIBRARY}/{rel} ({h.error})")
        elif h.digest != digest:
            report.changed.add(f"{layout.LIBRARY}/{rel}")
