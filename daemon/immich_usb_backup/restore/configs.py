"""The server's configuration back: the newest ``config/config-*.zip`` extracted into a
folder of its own beside the upload location, never over live files.

The archive holds each file under its full path on the old server without the leading
``/`` and a ``RESTORE.txt`` that lists the configured paths; what goes where is told per
configured path (``/etc/nixos`` <- ``<folder>/etc/nixos``), for the person to put back.
The archive comes from a disk: names that are absolute, hold ``..`` or are not plain
are left out and named; files are made 0600 and folders 0700 (a ``.env`` holds the
database's password), owned by the user running the restore.
"""

from __future__ import annotations

import os
import stat
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from immich_usb_backup import layout, policy
from immich_usb_backup.record import readable
from immich_usb_backup.steps.config_archive import NOTE_NAME

FILE_MODE, FOLDER_MODE = 0o600, 0o700
SHOWN = 20  # places listed in "what goes where"


@dataclass
class ConfigResult:
    archive: str | None = None
    folder: Path | None = None
    files: int = 0
    places: list[tuple[str, int]] = field(default_factory=list)  # (original path, files)
    skipped: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        return [f"config: {s}" for s in self.skipped]


def newest_archive(root: Path) -> Path | None:
    """The newest config archive in the backup folder ``root`` (by the time in its name)."""
    folder = root / layout.CONFIG
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    ordered = policy.archives_to_prune(names, 0)  # every archive, newest first
    return folder / ordered[0] if ordered else None


def destination(dest: Path, archive: Path) -> Path:
    """A folder beside ``dest`` named after ``archive`` that does not exist yet."""
    stem = archive.name.removesuffix(".zip").removeprefix("config-")
    base = dest.parent / f"{dest.name}-config-{stem}"
    candidate, n = base, 2
    while os.path.lexists(candidate):
        candidate = Path(f"{base}-{n}")
        n += 1
    return candidate


def count_files(archive: Path) -> int:
    with zipfile.ZipFile(archive) as z:
        return sum(1 for i in z.infolist() if not i.is_dir())


def extract(archive: Path, folder: Path) -> ConfigResult:
    """Extract ``archive`` into the new ``folder`` (see the module doc)."""
    result = ConfigResult(archive.name, folder)
    folder.mkdir(mode=FOLDER_MODE)
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            if info.filename.startswith("/") or any(p in ("", ".", "..") for p in parts):
                result.skipped.append(f"{readable(info.filename)} in {archive.name}: not a "
                                      "plain path inside the archive, left out")
                continue
            target = folder.joinpath(*parts)
            try:
                _make_folders(folder, parts[:-1])
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, FILE_MODE)
            except OSError as exc:  # twice in the archive, a file where a folder goes
                result.skipped.append(f"{readable(info.filename)} in {archive.name}: "
                                      f"{exc.strerror or exc}, left out")
                continue
            with z.open(info) as src, open(fd, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
            when = time.mktime((*info.date_time, 0, 0, -1))
            os.utime(target, (when, when), follow_symlinks=False)
            result.files += 1
    result.places = _places(folder)
    return result


def _make_folders(folder: Path, parts: list[str]) -> None:
    path = folder
    for part in parts:
        path = path / part
        try:
            path.mkdir(mode=FOLDER_MODE)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise


def _places(folder: Path) -> list[tuple[str, int]]:
    """The configured paths (from RESTORE.txt) with the files extracted under each; for
    an archive without the note, each top folder two levels deep."""
    configured = _configured(folder / NOTE_NAME)
    counts: dict[str, int] = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), folder)
            if rel == NOTE_NAME:
                continue
            original = "/" + rel
            place = next((c for c in configured if original == c
                          or original.startswith(c.rstrip("/") + "/")), None)
            if place is None:
                parts = rel.split("/")
                place = "/" + "/".join(parts[:2]) if len(parts) > 2 else original
            counts[place] = counts.get(place, 0) + 1
    return sorted(counts.items())


def _configured(note: Path) -> list[str]:
    """The lines under "Configured paths:" of a RESTORE.txt, longest first."""
    try:
        lines = note.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    out: list[str] = []
    inside = False
    for line in lines:
        if line.strip() == "Configured paths:":
            inside = True
        elif inside and line.startswith("  /"):
            out.append(line.strip())
        elif inside:
            break
    return sorted(out, key=len, reverse=True)
