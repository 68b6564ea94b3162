"""File-system helpers for everything written on the backup disk outside the rsync mirror.

Safety rule 1: every destination is checked to lie inside the backup folder, after
resolving links, before anything is written (``BackupRoot.path``).
Safety rule 7: every file is written to a temporary name, flushed, then renamed
(``atomic_write``, ``atomic_copy``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from immich_usb_backup.errors import Refused

COPY_BLOCK = 4 * 1024 * 1024
TEMP_PREFIX = ".iub-tmp-"


class BackupRoot:
    """The backup folder on the disk: the only place this program writes to.

    ``path(*parts)`` returns a destination and refuses (raises Refused) any that would
    resolve, links followed, outside the folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))

    def path(self, *parts: str) -> Path:
        """Return ``root/parts...``; raise Refused when it would lie outside the root."""
        candidate = self.root.joinpath(*parts)
        ensure_inside(self.root, candidate)
        return candidate

    def mkdir(self, *parts: str) -> Path:
        """Create ``root/parts...`` (and parents inside the root) and return it."""
        target = self.path(*parts)
        target.mkdir(parents=True, exist_ok=True)
        ensure_inside(self.root, target)
        return target


def ensure_inside(root: Path, candidate: Path) -> None:
    """Raise Refused unless ``candidate`` (links resolved) is ``root`` or inside it."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(candidate)
    if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
        raise Refused(
            f"refusing to write {candidate}: it resolves to {real}, outside the backup "
            f"folder {real_root}"
        )


class Inside:
    """``ensure_inside`` for the many entries of one run under one ``root``, without
    resolving every path from the top through a slow (FUSE) file system.

    For operations on an entry itself, which never follow a link at its name (rename,
    unlink, rmdir, mkdir): the entry is inside ``root`` when its folder is. A folder is
    inside when its parent is and it is a real folder, not a link (a link is resolved
    in full); each folder is looked at once and remembered (a bounded number).
    """

    def __init__(self, root: Path, remember: int = 4096) -> None:
        self.root = root
        self.top = os.path.normpath(root)
        self.remember = remember
        self._known: set[str] = {self.top}

    def entry(self, path: Path) -> None:
        """Raise Refused unless ``path``'s folder (links resolved) lies inside ``root``."""
        self._folder(os.path.dirname(os.path.normpath(path)))

    def _folder(self, folder: str) -> None:
        if folder in self._known:
            return
        if not folder.startswith(self.top + "/"):
            ensure_inside(self.root, Path(folder))  # raises: outside, or above the root
            return
        self._folder(os.path.dirname(folder))
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            return  # not made yet: mkdir makes a real folder
        if stat.S_ISLNK(st.st_mode):
            ensure_inside(self.root, Path(folder))
        if len(self._known) >= self.remember:
            self._known = {self.top}
        self._known.add(folder)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename is durable only after this)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # some FUSE file systems refuse fsync on dirs
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temp_beside(final: Path) -> Iterator[tuple[Path, BinaryIO]]:
    tmp = final.with_name(f"{TEMP_PREFIX}{secrets.token_hex(4)}-{final.name}")
    f = open(tmp, "xb")  # noqa: SIM115 - closed below, before the rename
    try:
        yield tmp, f
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write(
    root: BackupRoot,
    final: Path,
    write: Callable[[BinaryIO], None],
    mtime_ns: int | None = None,
) -> None:
    """Write ``final`` inside ``root`` via a temporary file: write, flush, fsync, rename.

    ``write`` receives the open temporary file. If it raises, the old ``final`` (if any)
    is left untouched and the temporary file is removed.
    """
    ensure_inside(root.root, final)
    with _temp_beside(final) as (tmp, f):
        write(f)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_write_bytes(root: BackupRoot, final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically (see ``atomic_write``)."""

    def write(f: BinaryIO) -> None:
        f.write(data)

    atomic_write(root, final, write)


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file of the state dir (not the backup disk: no containment check) the same
    way: a temporary file in its folder, flushed, fsynced, renamed over ``path``. A reader
    sees the old file or the new one; on failure the old file stays, the temporary goes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_copy(
    root: BackupRoot,
    source: Path,
    final: Path,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Copy ``source`` to ``final`` atomically, streaming in blocks. Return bytes copied."""
    copied = 0

    def write(f: BinaryIO) -> None:
        nonlocal copied
        with open(source, "rb") as src:
            while block := src.read(COPY_BLOCK):
                f.write(block)
                copied += len(block)
                if progress:
                    progress(len(block))

    atomic_write(root, final, write, mtime_ns=source.stat().st_mtime_ns)
    return copied


def remove_stale_temps(directory: Path) -> None:
    """Remove temporary files an interrupted run left in ``directory``."""
    if not directory.is_dir():
        return
    for entry in os.scandir(directory):
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """All of ``data`` to ``fd`` (``os.write`` may take part of it: a pipe, a signal)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def free_bytes(path: Path) -> int:
    """Bytes available to us on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def cluster_size(path: Path) -> int:
    """The allocation unit of the file system holding ``path`` (at least 512)."""
    st = os.statvfs(path)
    return max(512, st.f_frsize or st.f_bsize)


def allocated(size: int, cluster: int) -> int:
    """Bytes a file of ``size`` occupies with clusters of ``cluster`` bytes."""
    return -(-size // cluster) * cluster
