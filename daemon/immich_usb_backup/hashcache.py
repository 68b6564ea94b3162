"""The state dir's hash cache: the SHA-256 and SHA-1 of each library file, by path, size
and time.

So the manifest on the disk is kept up to date by hashing only new or changed files, and
the asset check knows each original's SHA-1 (Immich's checksum) without reading it again.
A SQLite database (``<state>/hashes.sqlite``, Python's own ``sqlite3``): a library of a
million files does not fit in memory as a dict, and a keyed table on disk answers one
lookup in microseconds. It also keeps two small facts per backup disk: the manifest last
written to it, and which share of the library a ``verify`` run re-reads next.

The cache is a cache: deleting it costs one run that hashes the whole library again.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

from immich_usb_backup import state

CACHE_NAME = state.HASHES
CHUNK = 500  # paths per query of lookup_many (SQLite allows 999 parameters at least)

T = TypeVar("T")


def chunked(items: Iterable[T], size: int = CHUNK) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last may be shorter), streaming."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    sha1 TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS disks (
    disk TEXT PRIMARY KEY,
    manifest_size INTEGER,
    manifest_mtime_ns INTEGER,
    manifest_complete INTEGER NOT NULL DEFAULT 0,
    rotation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('generation', 0);
"""
# A file's SHA-1 is kept when a put knows only its SHA-256 and that is unchanged: the same
# SHA-256 is the same content, so the same SHA-1.
_PUT = """
INSERT INTO files (path, size, mtime_ns, sha256, sha1) VALUES (?,?,?,?,?)
ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns,
    sha256 = excluded.sha256,
    sha1 = CASE WHEN excluded.sha1 IS NOT NULL THEN excluded.sha1
                WHEN files.sha256 = excluded.sha256 THEN files.sha1 END
"""

Row = tuple[str, int, int, str, str | None]  # path, size, mtime_ns, sha256, sha1 (or None)


class Digests(NamedTuple):
    """A file's digests in hex; ``sha1`` is None when it is not known yet (a cache from
    before SHA-1 was kept, or a file only ever hashed for its SHA-256)."""

    sha256: str
    sha1: str | None


class HashCache:
    """One connection, usable from any thread (calls are serialised by a lock)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / CACHE_NAME
        self._lock = threading.Lock()
        try:
            self._db = self._open()
        except sqlite3.DatabaseError:  # damaged: it is only a cache, start again
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self._db = self._open()
        self._pending = 0

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(files)")}
        if "sha1" not in columns:  # a cache from before SHA-1 was kept: upgraded in place
            db.execute("ALTER TABLE files ADD COLUMN sha1 TEXT")
        db.execute("BEGIN")
        return db

    def generation(self) -> int:
        """A number that changes with every put: what was concluded from the cache
        before still holds while it is the same."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def lookup(self, path: str, size: int, mtime_ns: int) -> str | None:
        """The cached digest of ``path`` if it was hashed at this size and time."""
        with self._lock:  # not through entry(): the manifest calls this once a file
            row = self._db.execute(
                "SELECT size, mtime_ns, sha256 FROM files WHERE path = ?", (path,)
            ).fetchone()
        if row is None or row[0] != size or row[1] != mtime_ns:
            return None
        return str(row[2])

    def lookup_many(self, files: Sequence[tuple[str, int, int]]) -> list[str | None]:
        """``lookup`` for each (path, size, mtime_ns), in one query per ``CHUNK``: a
        library of a million files asks a million times, and a query costs more than
        the answer."""
        return [None if d is None else d.sha256 for d in self.digests_many(files)]

    def digests_many(self, files: Sequence[tuple[str, int, int]]) -> list[Digests | None]:
        """Both digests of each (path, size, mtime_ns) hashed at that size and time, in
        one query per ``CHUNK``."""
        found: dict[str, tuple[int, int, str, str | None]] = {}
        for i in range(0, len(files), CHUNK):
            paths = [f[0] for f in files[i:i + CHUNK]]
            marks = ",".join("?" * len(paths))  # placeholders only: paths are parameters
            query = ("SELECT path, size, mtime_ns, sha256, sha1 FROM files "  # noqa: S608
                     f"WHERE path IN ({marks})")
            with self._lock:
                rows = self._db.execute(query, paths).fetchall()
            found.update((row[0], (row[1], row[2], row[3], row[4])) for row in rows)
        out: list[Digests | None] = []
        for path, size, mtime_ns in files:
            row = found.get(path)
            out.append(Digests(str(row[2]), None if row[3] is None else str(row[3]))
                       if row is not None and row[:2] == (size, mtime_ns) else None)
        return out

    def entry(self, path: str) -> tuple[int, int, str] | None:
        """(size, mtime_ns, digest) last recorded for ``path``, at whatever size and time."""
        with self._lock:
            row = self._db.execute(
                "SELECT size, mtime_ns, sha256 FROM files WHERE path = ?", (path,)
            ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), str(row[2]))

    def sha1_for(self, path: str, sha256: str) -> str | None:
        """The SHA-1 recorded for ``path`` if the SHA-256 recorded with it is ``sha256``
        (the same content, at whatever size and time): for a file renamed elsewhere."""
        with self._lock:
            row = self._db.execute(
                "SELECT sha1 FROM files WHERE path = ? AND sha256 = ?", (path, sha256)
            ).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def put(self, path: str, size: int, mtime_ns: int, digest: str,
            sha1: str | None = None) -> None:
        self.put_many(((path, size, mtime_ns, digest, sha1),))

    def put_many(self, rows: Iterable[Row | tuple[str, int, int, str]]) -> None:
        """``put`` for each (path, size, mtime_ns, sha256, sha1), in one statement. A
        SHA-1 of None (or a row of four: no SHA-1) keeps the one known when the SHA-256
        is unchanged."""
        rows = [row if len(row) == 5 else (*row, None) for row in rows]
        if not rows:
            return
        with self._lock:
            self._db.executemany(_PUT, rows)
            self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
            self._pending += len(rows)
            if self._pending >= 10_000:
                self._commit()

    def _commit(self) -> None:
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")
        self._pending = 0

    def commit(self) -> None:
        with self._lock:
            self._commit()

    # per disk -------------------------------------------------------------------------

    def manifest_state(self, disk: str) -> tuple[int, int, bool] | None:
        """(size, mtime_ns, complete) of the manifest last written to ``disk``."""
        with self._lock:
            row = self._db.execute(
                "SELECT manifest_size, manifest_mtime_ns, manifest_complete FROM disks "
                "WHERE disk = ?", (disk,)
            ).fetchone()
        if row is None or row[0] is None:
            return None
        return int(row[0]), int(row[1]), bool(row[2])

    def set_manifest_state(self, disk: str, state: tuple[int, int, bool] | None) -> None:
        size, mtime_ns, complete = state if state is not None else (None, None, False)
        with self._lock:
            self._db.execute(
                "INSERT INTO disks (disk, manifest_size, manifest_mtime_ns, manifest_complete) "
                "VALUES (?,?,?,?) ON CONFLICT(disk) DO UPDATE SET "
                "manifest_size = excluded.manifest_size, "
                "manifest_mtime_ns = excluded.manifest_mtime_ns, "
                "manifest_complete = excluded.manifest_complete",
                (disk, size, mtime_ns, int(complete)),
            )
            self._commit()

    def next_rotation(self, disk: str) -> int:
        """The rotation number of this verify run on ``disk`` (0, 1, 2, ... per run)."""
        with self._lock:
            row = self._db.execute(
                "SELECT rotation FROM disks WHERE disk = ?", (disk,)
            ).fetchone()
            turn = int(row[0]) if row else 0
            self._db.execute(
                "INSERT INTO disks (disk, rotation) VALUES (?, ?) ON CONFLICT(disk) "
                "DO UPDATE SET rotation = excluded.rotation", (disk, turn + 1),
            )
            self._commit()
        return turn

    def close(self) -> None:
        with self._lock:
            self._db.execute("COMMIT")
            self._db.close()
