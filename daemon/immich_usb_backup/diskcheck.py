"""``verify TARGET``: check a backup disk against its manifest, without the server.

For a disk that sat in a drawer, or before a restore: every file listed in
``library.sha256`` is read back from the disk and hashed (or a random ``sample`` share of
them), and ``library/`` is walked to find files the manifest does not list. The
database dumps are read to their end (a complete gzip stream whose SQL ends with
PostgreSQL's "dump complete" line) and the config archives' checksums tested.

Nothing is written to the disk: a device is mounted read-only for the check. The
lists are compared in a temporary SQLite database in the state dir, so a manifest of a
million lines is never held in memory.

With ``--restore-drill`` the newest dump is also loaded into a throwaway PostgreSQL
(:mod:`immich_usb_backup.drill`), under the same lock and live status (phase ``drill``);
its outcome is kept in the state dir, and every check shows the disk's last drill.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from immich_usb_backup import drill, manifest, page
from immich_usb_backup.config import Config
from immich_usb_backup.drill import DrillOutcome, DrillResult
from immich_usb_backup.dumps import check as dump_check
from immich_usb_backup.errors import BackupError, Refused
from immich_usb_backup.hashing import BLOCK, Stopped, drop_device_cache, sha256_file
from immich_usb_backup.lister import list_dir
from immich_usb_backup.lock import backup_lock
from immich_usb_backup.record import readable
from immich_usb_backup.scan import Excludes
from immich_usb_backup.status import StatusWriter
from immich_usb_backup.target import Disk, find_backup_root, inspect_mount

log = logging.getLogger(__name__)

LISTED = 100  # paths shown per kind of problem; the counts are always exact


@dataclass
class Found:
    """Paths of one kind of problem: the first ``LISTED``, and how many in all."""

    count: int = 0
    paths: list[str] = field(default_factory=list)

    def add(self, path: str) -> None:
        self.count += 1
        if len(self.paths) < LISTED:
            self.paths.append(readable(path))


@dataclass
class Report:
    disk: dict[str, Any]
    manifest_entries: int = 0
    files_on_disk: int = 0
    checked_files: int = 0
    checked_bytes: int = 0
    sample_percent: float | None = None
    missing: Found = field(default_factory=Found)
    changed: Found = field(default_factory=Found)
    unreadable: Found = field(default_factory=Found)
    unexpected: Found = field(default_factory=Found)
    bad_lines: Found = field(default_factory=Found)
    dumps_checked: int = 0
    archives_checked: int = 0
    damaged: Found = field(default_factory=Found)  # dumps and archives
    drill: DrillResult | None = None  # with --restore-drill
    last_drill: DrillOutcome | None = None  # the disk's last drill, kept in the state

    @property
    def ok(self) -> bool:
        if self.drill is not None and not self.drill.passed:
            return False
        return not any(f.count for f in (self.missing, self.changed, self.unreadable,
                                         self.unexpected, self.bad_lines, self.damaged))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok, "disk": self.disk, "manifest_entries": self.manifest_entries,
            "files_on_disk": self.files_on_disk, "checked_files": self.checked_files,
            "checked_bytes": self.checked_bytes, "sample_percent": self.sample_percent,
            "dumps_checked": self.dumps_checked, "archives_checked": self.archives_checked,
        }
        for name in ("missing", "changed", "unreadable", "unexpected", "bad_lines", "damaged"):
            found: Found = getattr(self, name)
            out[name] = {"count": found.count, "paths": found.paths}
        out["restore_drill"] = self.drill.as_dict() if self.drill else None
        out["last_restore_drill"] = asdict(self.last_drill) if self.last_drill else None
        return out


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


def _check_archive(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        return f"not a readable zip ({exc})"
    return f"{bad} inside is damaged" if bad else None


def check(config: Config, disk: Disk, sample: float | None, status: StatusWriter,
          stop: threading.Event) -> Report:
    """Check the backup folder on ``disk`` (see the module doc). Reads only."""
    root = find_backup_root(disk)
    report = Report({"uuid": disk.uuid, "label": disk.label,
                     "mount_point": str(disk.mount_point)}, sample_percent=sample)
    listing = root / manifest.NAME
    if not listing.is_file():
        raise BackupError(
            f"{listing} does not exist: this disk has no manifest to check against yet. "
            "A backup with library.manifest = true (the default) writes it.")
    work = Path(tempfile.mkdtemp(prefix="verify-", dir=config.state_dir))
    try:
        db = sqlite3.connect(work / "lists.sqlite")
        try:
            return _check(config, root, listing, db, report, sample, status, stop,
                          disk.device)
        finally:
            db.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check(config: Config, root: Path, listing: Path, db: sqlite3.Connection, report: Report,
           sample: float | None, status: StatusWriter, stop: threading.Event,
           device: str) -> Report:
    """The lists compared (the manifest against the files on the disk), then the chosen
    files, every dump and every config archive read back."""
    _compare_lists(config, root, listing, db, report, status, stop)
    _choose(db, sample)
    _read_back(root, db, report, status, stop, device)
    return report


def _compare_lists(config: Config, root: Path, listing: Path, db: sqlite3.Connection,
                   report: Report, status: StatusWriter, stop: threading.Event) -> None:
    """The manifest into table m, the disk's files into d: missing and unexpected."""
    db.executescript("""
        PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
        CREATE TABLE m (path TEXT PRIMARY KEY, digest TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE d (path TEXT PRIMARY KEY, size INTEGER NOT NULL,
                        regular INTEGER NOT NULL) WITHOUT ROWID;
    """)
    status.set_phase("verify", 0, "reading the manifest")
    for item in manifest.read(listing):
        if isinstance(item, manifest.BadLine):
            report.bad_lines.add(str(item))
            continue
        db.execute("INSERT OR REPLACE INTO m VALUES (?, ?)", (item.rel, item.digest))
    report.manifest_entries = db.execute("SELECT count(*) FROM m").fetchone()[0]

    status.set_phase("verify", 0, "listing the files on the disk")
    mirror = root / "library"
    if mirror.is_dir():
        excludes = Excludes(config.library.excludes)
        for rel, size, regular in _walk_files(mirror, excludes):
            if stop.is_set():
                raise Stopped
            db.execute("INSERT OR REPLACE INTO d VALUES (?, ?, ?)", (rel, size, int(regular)))
    report.files_on_disk = db.execute("SELECT count(*) FROM d").fetchone()[0]
    for (rel,) in db.execute("SELECT path FROM m WHERE path NOT IN (SELECT path FROM d) "
                             "ORDER BY path"):
        report.missing.add(f"library/{rel}")
    for (rel,) in db.execute("SELECT path FROM d WHERE path NOT IN (SELECT path FROM m) "
                             "ORDER BY path"):
        report.unexpected.add(f"library/{rel}")


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


def _read_back(root: Path, db: sqlite3.Connection, report: Report, status: StatusWriter,
               stop: threading.Event, device: str) -> None:
    """Hash the chosen files from the disk itself; read every dump to its end, test
    every config archive."""
    total_files, total_bytes = db.execute("SELECT count(*), coalesce(sum(size), 0) "
                                          "FROM s").fetchone()
    dumps = sorted((root / "database").glob("*.sql.gz")) if (root / "database").is_dir() else []
    archives = sorted((root / "config").glob("*.zip")) if (root / "config").is_dir() else []
    extra = sum(p.stat().st_size for p in dumps)
    status.set_phase("verify", total_bytes + extra,
                     f"reading {total_files} files back from the disk")
    done = [0]

    def on_bytes(n: int) -> None:
        done[0] += n
        status.progress(done[0])

    drop_device_cache(device)  # read the disk, not what a FUSE driver left in memory
    buf = bytearray(BLOCK)
    mirror = root / "library"
    for rel, digest, _size in db.execute("SELECT path, digest, size FROM s ORDER BY path"):
        h = sha256_file(str(mirror / rel), rel, drop_cache=True, on_bytes=on_bytes, stop=stop,
                        buf=buf)
        report.checked_files += 1
        report.checked_bytes += h.size
        if h.digest is None:
            report.unreadable.add(f"library/{rel} ({h.error})")
        elif h.digest != digest:
            report.changed.add(f"library/{rel}")
    def check_stop() -> None:
        if stop.is_set():
            raise Stopped

    for dump in dumps:
        why = dump_check(dump, on_bytes, check_stop)
        report.dumps_checked += 1
        if why:
            report.damaged.add(f"database/{dump.name}: {why}")
    for archive in archives:
        why = _check_archive(archive)
        report.archives_checked += 1
        if why:
            report.damaged.add(f"config/{archive.name}: {why}")


def _postgres(config: Config, restore_drill: bool) -> Path | None:
    """Where the drill's PostgreSQL programs are (None without the drill); raises
    drill.DrillUnavailable before anything is mounted or read."""
    return drill.find_postgres(config.database.postgres_bin_dir) if restore_drill else None


async def verify_path(config: Config, target: Path, sample: float | None,
                      restore_drill: bool = False) -> Report:
    """Check the backup disk mounted at ``target`` (left mounted, as it was found); with
    ``restore_drill``, then load its newest dump into a throwaway PostgreSQL and keep the
    outcome in the state dir."""
    bin_dir = _postgres(config, restore_drill)
    stop = threading.Event()
    with backup_lock(config.state_dir):
        disk = await inspect_mount(target)
        identity = {"uuid": disk.uuid, "label": disk.label,
                    "mount_point": str(disk.mount_point)}
        status = StatusWriter(config.state_dir, identity)
        try:
            report = await asyncio.to_thread(check, config, disk, sample, status, stop)
            if bin_dir is not None:
                root = await asyncio.to_thread(find_backup_root, disk)
                report.drill = await drill.restore_drill(bin_dir, root / "database", status)
                await asyncio.to_thread(_keep_drill, config, identity, report.drill)
            report.last_drill = await asyncio.to_thread(drill.outcome_for, config.state_dir,
                                                        disk.uuid)
            return report
        except asyncio.CancelledError:
            stop.set()
            raise
        finally:
            status.clear()


def _keep_drill(config: Config, disk: dict[str, Any], result: DrillResult) -> None:
    """The drill's outcome into the state dir (a check itself is not recorded), and the
    state dir's history page refreshed with it (when there is one)."""
    try:
        drill.record(config.state_dir, disk, result)
    except OSError as exc:
        log.warning("could not keep the restore drill's outcome in %s: %s",
                    config.state_dir, exc)
        return
    if (config.state_dir / page.NAME).exists():
        page.refresh(config)


async def verify_device(config: Config, target: str, sample: float | None,
                        restore_drill: bool = False) -> Report:
    """Check the disk ``target`` (``/dev/...`` or ``UUID=...``): mounted read-only for the
    check, if it is not mounted already, and unmounted again."""
    from immich_usb_backup.udisks import UDisks, mounted  # noqa: PLC0415 - dbus when needed

    _postgres(config, restore_drill)  # missing PostgreSQL: said before mounting anything

    udisks = await UDisks.connect()
    try:
        device = await udisks.device_for(target)
        info = await udisks.wait_for_filesystem(device)
        if info.fs_type != "exfat":
            raise Refused(f"{device} holds {info.fs_type or 'no'} file system, not exFAT")
        async with mounted(udisks, info, read_only=True) as mount:
            return await verify_path(config, mount.mount_point, sample, restore_drill)
    finally:
        udisks.close()
