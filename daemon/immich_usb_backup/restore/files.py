"""The photos back: ``library/`` of the disk copied into the upload location, each file
checked against ``library.sha256`` in the same read.

Two threads and a bounded pool of buffers: a reader walks ``library/`` (a folder at a
time, names sorted) and reads each file into buffers of ``BLOCK`` bytes; the calling
thread takes them in order, hashes each block (SHA-256 for the manifest, SHA-1 for
Immich's checksum; ``hashlib`` lets go of the interpreter lock meanwhile) and writes it
to a temporary file in a folder of its own inside DIR. A whole file gets its owner, mode
(0640; folders 0750) and time, and is linked into place: ``link`` never replaces an
entry, so nothing in DIR is ever overwritten (a file that appeared meanwhile is named
and left as it was). Its digests are compared with the manifest (``MANIFEST_TABLE``,
loaded into SQLite first) 500 files at a time and kept (``DIGESTS_TABLE``) for the
asset check. ``merge``: a file DIR already has is left as it is, not read.

Why our own copy and not rsync: docs/design.md, "Restore".
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from immich_usb_backup import layout, manifest
from immich_usb_backup.diskreport import Found
from immich_usb_backup.errors import BackupError, Refused
from immich_usb_backup.fsutil import Inside, write_all
from immich_usb_backup.hashing import Stopped

BLOCK = 1 << 20
POOL = 16  # buffers between the reader and the writer: at most 16 MiB read ahead
IN_FLIGHT = 4096  # messages between them (folders, files left as they are)
BATCH = 500  # files compared with the manifest per query
FILE_MODE, FOLDER_MODE = 0o640, 0o750  # as docs/restore.md's manual way sets them
TEMP_FOLDER = ".immich-usb-backup-restoring"  # inside DIR while files come in
DB_NAME = "restore.sqlite"
MANIFEST_TABLE, DIGESTS_TABLE = "m", "r"
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV)


class WriteFailed(BackupError):
    """DIR could not be written (full, read-only, an I/O error): the copy stopped."""


@dataclass
class FilesResult:
    """What the copy did, in numbers and named files."""

    manifest: bool = False  # the disk has library.sha256
    listed: int = 0  # its entries
    files: int = 0  # copied
    bytes: int = 0
    matched: int = 0  # copied, and its SHA-256 is the manifest's
    kept: int = 0  # --merge: already in DIR, left as it was
    differ: Found = field(default_factory=Found)  # the disk's copy is not what was backed up
    unreadable: Found = field(default_factory=Found)
    missing: Found = field(default_factory=Found)  # listed, not on the disk
    unlisted: Found = field(default_factory=Found)  # on the disk, not listed
    not_placed: Found = field(default_factory=Found)  # DIR had it meanwhile; links; ...
    bad_lines: Found = field(default_factory=Found)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.manifest and not any(f.count for f in self._problem_kinds())

    def _problem_kinds(self) -> tuple[Found, ...]:
        return (self.differ, self.unreadable, self.missing, self.unlisted, self.not_placed,
                self.bad_lines)

    def problems(self) -> list[str]:
        """Each problem on a line, the first ``diskreport.LISTED`` of a kind named."""
        out = [] if self.manifest else [
            f"files: the disk has no {manifest.NAME}: the files could not be checked "
            "(the asset check below still checks the originals)"]
        for found, what in ((self.differ, "differs from library.sha256 (damaged on the "
                             "disk): restored as it is"),
                            (self.unreadable, "cannot be read from the disk: not restored"),
                            (self.missing, "is listed in library.sha256 but not on the disk"),
                            (self.unlisted, "is not listed in library.sha256: restored, "
                             "not checked"),
                            (self.not_placed, "not restored"),
                            (self.bad_lines, "a line of library.sha256 that cannot be read")):
            out += [f"files: {path}: {what}" for path in found.paths]
            if found.count > len(found.paths):
                out.append(f"files: ... and {found.count - len(found.paths)} more that "
                           f"{what.split(':')[0]}")
        return out


def open_db(work: Path) -> sqlite3.Connection:
    """The work folder's database of the manifest and the digests read."""
    db = sqlite3.connect(work / DB_NAME, check_same_thread=False, isolation_level=None)
    db.executescript(f"""
        PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
        CREATE TABLE IF NOT EXISTS {MANIFEST_TABLE} (path TEXT PRIMARY KEY,
            digest TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS {DIGESTS_TABLE} (path TEXT PRIMARY KEY, sha1 TEXT,
            state TEXT NOT NULL) WITHOUT ROWID;
    """)
    return db


def load_manifest(db: sqlite3.Connection, listing: Path, result: FilesResult) -> None:
    """``library.sha256`` into the manifest table (streamed, 5,000 rows a statement)."""
    if not listing.is_file():
        return
    result.manifest = True
    batch: list[tuple[str, str]] = []
    db.execute("BEGIN")
    for item in manifest.read(listing):
        if isinstance(item, manifest.BadLine):
            result.bad_lines.add(str(item))
            continue
        batch.append((item.rel, item.digest))
        if len(batch) >= 5000:
            db.executemany(f"INSERT OR REPLACE INTO {MANIFEST_TABLE} VALUES (?,?)", batch)  # noqa: S608
            batch.clear()
    db.executemany(f"INSERT OR REPLACE INTO {MANIFEST_TABLE} VALUES (?,?)", batch)  # noqa: S608
    db.execute("COMMIT")
    result.listed = db.execute(f"SELECT count(*) FROM {MANIFEST_TABLE}").fetchone()[0]  # noqa: S608


class LibraryCopy:
    """One copy of the disk's ``library/`` (``mirror``) into ``dest`` (see the module doc).
    ``run`` blocks: call it in a thread."""

    def __init__(self, mirror: Path, dest: Path, db: sqlite3.Connection, *,
                 owner: tuple[int, int], merge: bool, stop: threading.Event,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self.mirror, self.dest, self.db = mirror, dest, db
        self.owner, self.merge, self.stop = owner, merge, stop
        self.on_bytes = on_bytes
        self.result = FilesResult()
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._messages: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._sent = self._taken = 0  # messages: the reader waits when too far ahead
        self._temp = dest / TEMP_FOLDER
        self._inside = Inside(dest)
        self._blocked: set[str] = set()  # DIR's folders that lead outside it (--merge)
        self._done: list[tuple[str, str, str]] = []  # (path, SHA-256, SHA-1) to compare
        self._others: list[tuple[str, str | None, str]] = []  # (path, None, state) to keep
        self._halt = threading.Event()  # the writer stopped: the reader stops too
        self._chown = owner != (os.geteuid(), os.getegid())  # else ours already
        self._chmod = True  # unless the umask leaves FILE_MODE as it is (run)

    # the reader ----------------------------------------------------------------------

    def _stopped(self) -> bool:
        return self.stop.is_set() or self._halt.is_set()

    def _send(self, message: tuple[Any, ...]) -> None:
        while self._sent - self._taken >= IN_FLIGHT and not self._stopped():
            time.sleep(0.002)  # the writer is far behind (thousands of small messages)
        self._sent += 1
        self._messages.put(message)

    def _read_all(self) -> None:
        try:
            self._walk()
        except BaseException as exc:  # given to the writer, which raises it
            self._messages.put(("!", exc))
        finally:
            self._messages.put(None)

    def _walk(self) -> None:
        stack = [""]
        while stack:
            rel = stack.pop()
            if self._stopped():
                raise Stopped
            folder = os.path.join(self.mirror, rel)
            try:
                with os.scandir(folder) as it:
                    entries = sorted((e.name, e.is_dir(follow_symlinks=False),
                                      e.is_file(follow_symlinks=False)) for e in it)
            except OSError as exc:
                self._send(("e", rel, f"its folder cannot be read ({exc.strerror or exc})"))
                continue
            there = self._names_in_dest(rel) if self.merge else set()
            self._send(("d", rel))
            subfolders = []
            for name, is_dir, is_file in entries:
                child = f"{rel}/{name}" if rel else name
                if not rel and name == TEMP_FOLDER:
                    continue  # an interrupted restore's, backed up since: not a photo
                if is_dir:
                    subfolders.append(child)
                elif name in there:
                    self._send(("k", child))
                elif not is_file:
                    self._send(("x", child, "not a regular file on the disk"))
                else:
                    self._read_file(child)
            stack.extend(reversed(subfolders))

    def _names_in_dest(self, rel: str) -> set[str]:
        try:
            with os.scandir(os.path.join(self.dest, rel)) as it:
                return {e.name for e in it}
        except OSError:
            return set()

    def _read_file(self, rel: str) -> None:
        try:
            fd = os.open(os.path.join(self.mirror, rel), _OPEN_FLAGS)
        except OSError as exc:
            self._send(("e", rel, exc.strerror or str(exc)))
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._send(("x", rel, "not a regular file on the disk"))
                return
            if st.st_size > BLOCK:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            first, done = True, 0
            while True:
                if self._stopped():
                    raise Stopped
                buf = self._free.get()
                try:
                    n = os.readv(fd, [buf])
                except OSError as exc:
                    self._free.put(buf)
                    self._send(("e", rel, exc.strerror or str(exc)))
                    return
                done += n
                last = n == 0 or done >= st.st_size
                self._send(("f", rel, st, buf, n, last) if first else ("b", buf, n, last))
                first = False
                if last:
                    return
        finally:
            os.close(fd)

    # the writer ----------------------------------------------------------------------

    def run(self) -> FilesResult:
        """Copy, compare, name; raise ``hashing.Stopped`` when ``stop`` is set and
        ``WriteFailed`` when DIR cannot be written."""
        started = time.monotonic()
        for _ in range(POOL):
            self._free.put(bytearray(BLOCK))
        umask = os.umask(0o022)
        os.umask(umask)
        self._chmod = FILE_MODE & ~umask != FILE_MODE
        self._prepare_temp()
        reader = threading.Thread(target=self._read_all, name="restore-reader", daemon=True)
        reader.start()
        try:
            self._write_all()
            self._compare()
            self._name_missing()
        finally:
            self.stop_reader(reader)
            shutil.rmtree(self._temp, ignore_errors=True)
            self.result.duration_s = round(time.monotonic() - started, 1)
        return self.result

    def stop_reader(self, reader: threading.Thread) -> None:
        if not reader.is_alive():
            return
        self._halt.set()
        while reader.is_alive():  # it may wait for a buffer or a slot: give them back
            with contextlib.suppress(queue.Empty):
                message = self._messages.get(timeout=0.05)
                if message is not None and message[0] in ("f", "b"):
                    self._free.put(message[3] if message[0] == "f" else message[1])

    def _prepare_temp(self) -> None:
        try:
            if not self.dest.is_dir():  # made here: ours to give its owner and mode
                self.dest.mkdir(mode=FOLDER_MODE, parents=True)
                self._own(str(self.dest), folder=True)
            if self.merge and self._temp.is_dir() and not self._temp.is_symlink():
                shutil.rmtree(self._temp)  # what an interrupted restore left: ours
            self._temp.mkdir(mode=0o700)
        except OSError as exc:
            raise WriteFailed(f"cannot write into {self.dest}: {exc.strerror or exc}") from exc

    def _write_all(self) -> None:
        fd, rel, st, sha256, sha1, temp = -1, "", None, hashlib.sha256(), hashlib.sha1(), ""  # noqa: S324
        count = 0
        try:
            while (message := self._messages.get()) is not None:
                self._taken += 1
                kind = message[0]
                if kind in ("f", "b"):
                    if kind == "f":
                        _, rel, st, buf, n, last = message
                        count += 1
                        temp = os.path.join(self._temp, str(count))
                        fd = self._open_temp(temp, rel)
                        sha256, sha1 = hashlib.sha256(), hashlib.sha1()  # noqa: S324
                    else:
                        _, buf, n, last = message
                    if n and fd >= 0:
                        view = memoryview(buf)[:n]
                        sha256.update(view)
                        sha1.update(view)
                        self._write(fd, view, rel)
                        view.release()
                        if self.on_bytes is not None:
                            self.on_bytes(n)
                    self._free.put(buf)
                    if last and fd >= 0:
                        assert st is not None
                        self._finish(fd, temp, rel, st, sha256.hexdigest(), sha1.hexdigest())
                        fd = -1
                elif kind == "d":
                    self._folder(message[1])
                elif kind == "k":
                    self.result.kept += 1
                    self._record(message[1], None, "kept")
                elif kind == "e":
                    self._unreadable(message[1], message[2], fd, temp)
                    fd = -1
                elif kind == "x":
                    self.result.not_placed.add(f"{layout.LIBRARY}/{message[1]} ({message[2]})")
                    self._record(message[1], None, "skipped")
                elif kind == "!":
                    raise message[1]
                if len(self._done) >= BATCH:
                    self._compare()
        finally:
            if fd >= 0:
                os.close(fd)

    def _open_temp(self, temp: str, rel: str) -> int:
        try:
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                           | os.O_NOFOLLOW, FILE_MODE)
        except OSError as exc:
            raise WriteFailed(f"cannot write into {self.dest} ({rel}): "
                              f"{exc.strerror or exc}") from exc

    def _write(self, fd: int, view: memoryview, rel: str) -> None:
        try:
            write_all(fd, view)
        except OSError as exc:
            raise WriteFailed(f"writing {self.dest / rel} failed: {exc.strerror or exc}"
                              ) from exc

    def _own(self, path: str | int, *, folder: bool = False) -> None:
        """Give a folder (by path) or a file (by descriptor) its owner and mode."""
        mode = FOLDER_MODE if folder else FILE_MODE
        if isinstance(path, int):
            if self._chown:
                os.fchown(path, *self.owner)
            if self._chmod:
                os.fchmod(path, mode)
            return
        if self._chown:
            os.chown(path, *self.owner, follow_symlinks=False)
        os.chmod(path, mode, follow_symlinks=False)

    def _folder(self, rel: str) -> None:
        if not rel:
            return
        path = os.path.join(self.dest, rel)
        if self._blocked and self._under_blocked(rel):
            return
        try:
            os.mkdir(path, FOLDER_MODE)
        except FileExistsError:  # --merge: DIR's own folder, left as it is, if it is one
            try:
                self._inside.entry(Path(path, "x"))
            except Refused:
                self._blocked.add(rel)
            return
        except OSError as exc:
            raise WriteFailed(f"cannot make the folder {path}: {exc.strerror or exc}"
                              ) from exc
        self._own(path, folder=True)

    def _finish(self, fd: int, temp: str, rel: str, st: os.stat_result, digest: str,
                sha1: str) -> None:
        try:
            self._own(fd)
            os.utime(fd, ns=(st.st_mtime_ns, st.st_mtime_ns))
        except OSError as exc:
            raise WriteFailed(f"cannot set the owner of {self.dest / rel}: "
                              f"{exc.strerror or exc}") from exc
        finally:
            os.close(fd)
        final = os.path.join(self.dest, rel)
        if self._blocked and self._under_blocked(rel):
            os.unlink(temp)
            self.result.not_placed.add(f"{layout.LIBRARY}/{rel} (its folder in "
                                       f"{self.dest} leads outside it)")
            self._record(rel, None, "skipped")
            return
        if not _place(temp, final):
            self.result.not_placed.add(f"{layout.LIBRARY}/{rel} ({final} appeared meanwhile: "
                                       "left as it is)")
            self._record(rel, None, "skipped")
            return
        self.result.files += 1
        self.result.bytes += st.st_size
        self._done.append((rel, digest, sha1))

    def _under_blocked(self, rel: str) -> bool:
        parts = rel.split("/")
        return any("/".join(parts[:i]) in self._blocked for i in range(1, len(parts)))

    def _unreadable(self, rel: str, why: str, fd: int, temp: str) -> None:
        if fd >= 0:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
        self.result.unreadable.add(f"{layout.LIBRARY}/{rel} ({why})")
        self._record(rel, None, "unreadable")

    def _record(self, rel: str, sha1: str | None, state: str) -> None:
        """A file not copied (left as it was, unreadable, ...): kept with the next batch."""
        self._others.append((rel, sha1, state))
        if len(self._others) >= BATCH:
            self._compare()

    def _compare(self) -> None:
        """The digests of the files copied since the last call against the manifest;
        what was found kept in the digests table."""
        done, self._done = self._done, []
        others, self._others = self._others, []
        if not done and not others:
            return
        marks = ",".join("?" * len(done))
        want = dict(self.db.execute(
            f"SELECT path, digest FROM {MANIFEST_TABLE} WHERE path IN ({marks})",  # noqa: S608
            [rel for rel, _, _ in done]).fetchall()) if done else {}
        rows: list[tuple[str, str | None, str]] = []
        for rel, digest, sha1 in done:
            expected = want.get(rel)
            if expected is None:
                if self.result.manifest:
                    self.result.unlisted.add(f"{layout.LIBRARY}/{rel}")
                state = "unlisted"
            elif expected != digest:
                self.result.differ.add(f"{layout.LIBRARY}/{rel}")
                state = "differs"
            else:
                self.result.matched += 1
                state = "matched"
            rows.append((rel, sha1, state))
        rows += others
        self.db.execute("BEGIN")
        self.db.executemany(f"INSERT OR REPLACE INTO {DIGESTS_TABLE} VALUES (?,?,?)", rows)  # noqa: S608
        self.db.execute("COMMIT")

    def _name_missing(self) -> None:
        for (rel,) in self.db.execute(
                f"SELECT path FROM {MANIFEST_TABLE} WHERE path NOT IN "  # noqa: S608
                f"(SELECT path FROM {DIGESTS_TABLE}) ORDER BY path"):
            self.result.missing.add(f"{layout.LIBRARY}/{rel}")


def _place(temp: str, final: str) -> bool:
    """Put the whole file ``temp`` at ``final`` unless something is there; False then.
    A hard link never replaces; where the file system has none, a rename after a look."""
    try:
        os.link(temp, final, follow_symlinks=False)
    except FileExistsError:
        os.unlink(temp)
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise WriteFailed(f"cannot put {final} in place: {exc.strerror or exc}") from exc
        if os.path.lexists(final):
            os.unlink(temp)
            return False
        os.rename(temp, final)
        return True
    os.unlink(temp)
    return True
