"""The keep area: ``immich-server-backups/deleted/YYYY-MM-DD/``.

A file the mirror would delete (removed on the server) or overwrite (changed on the
server) is moved here instead, under the day of the run and its path inside
``library/``. So a photo deleted by mistake, or encrypted by ransomware on the server,
is still on the disk for ``library.keep_deleted_days`` days. Dated folders older than
that are removed at the start of a later backup. Folders whose names are not dates are
never touched.

A second version of the same path on the same day does not replace the first one (the
first is the one from before the mishap): it is kept as ``name (2).ext``, ``(3)``, ...
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from immich_usb_backup import layout
from immich_usb_backup.fsutil import BackupRoot, Inside, allocated, ensure_inside

FOLDER = layout.DELETED
_DAY = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
MAX_VERSIONS = 1000


def day_name(day: date) -> str:
    return day.isoformat()


def run_day(keep_days: int, started: date) -> str | None:
    """The keep area's folder for a run started on ``started``, or None when deletions
    are not kept (``keep_days`` 0)."""
    return day_name(started) if keep_days else None


def _folder_day(name: str) -> date | None:
    m = _DAY.match(name)
    if not m:
        return None
    try:
        return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def expired(names: list[str], today: date, keep_days: int) -> list[str]:
    """Of the folder names in ``deleted/``, the dated ones older than ``keep_days``."""
    cutoff = today - timedelta(days=keep_days)
    return sorted(n for n in names if (d := _folder_day(n)) is not None and d < cutoff)


@dataclass
class KeepSurvey:
    """What the keep area holds now (allocated bytes) and what this run will prune."""

    files: int = 0
    alloc: int = 0
    prune: list[str] = field(default_factory=list)
    prune_files: int = 0
    prune_alloc: int = 0


def _tree_usage(path: str, cluster: int) -> tuple[int, int]:
    files = alloc = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            files += 1
            alloc += allocated(st.st_size, cluster)
    return files, alloc


def survey(root: BackupRoot, today: date, keep_days: int, cluster: int) -> KeepSurvey:
    """Read the keep area (reads only): its size, and the dated folders past their time."""
    result = KeepSurvey()
    area = root.root / FOLDER
    if not area.is_dir():
        return result
    names = [e.name for e in os.scandir(area) if e.is_dir(follow_symlinks=False)]
    result.prune = expired(names, today, keep_days)
    for name in names:
        files, alloc = _tree_usage(str(area / name), cluster)
        result.files += files
        result.alloc += alloc
        if name in result.prune:
            result.prune_files += files
            result.prune_alloc += alloc
    return result


def prune(root: BackupRoot, names: list[str]) -> None:
    """Remove the dated folders ``names`` (as ``survey`` listed them) from the keep area."""
    for name in names:
        if _folder_day(name) is None:  # never anything but a dated folder
            raise ValueError(f"not a dated keep folder: {name}")
        path = root.path(FOLDER, name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


def _free_name(path: Path) -> Path:
    """``path`` if nothing is there, else ``stem (2).ext``, ``(3)``, ... (exFAT compares
    names without regard to case; ``exists`` asks the file system, so that holds)."""
    if not os.path.lexists(path):
        return path
    stem, dot, ext = path.name.rpartition(".")
    if not dot or not stem:
        stem, ext = path.name, ""
    for n in range(2, MAX_VERSIONS):
        name = f"{stem} ({n}).{ext}" if ext else f"{stem} ({n})"
        candidate = path.with_name(name)
        if not os.path.lexists(candidate):
            return candidate
    raise OSError(f"more than {MAX_VERSIONS} versions of {path.name} kept on one day")


def move_into(root: BackupRoot, mirror: Path, rel: str, day: str,
              inside_mirror: Inside | None = None) -> Path:
    """Move the mirror's file ``rel`` into ``deleted/<day>/rel``; return where it went.

    Both paths are checked to lie inside the backup folder (links resolved) first
    (``inside_mirror``: the run's checker of the mirror, which remembers its folders).
    """
    source = mirror / rel
    (inside_mirror or Inside(mirror)).entry(source)
    target = root.path(FOLDER, day, rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    ensure_inside(root.root, target.parent)
    target = _free_name(target)
    os.rename(source, target)
    return target
