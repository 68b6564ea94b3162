"""The preflight scan: one streaming walk of the source and the mirror side by side.

Given the upload location and the mirror folder on the disk, ``scan`` decides, for every
entry, what the mirror needs: copy (new or changed by size or modification time, with a
one-second window as exFAT stores times coarsely), delete (in the mirror, not in the
source), or nothing. Files exFAT cannot hold are reported, never silently lost.

It holds one folder's listing at a time (plus the names of folders still to visit, and
at most 64 listings per side read ahead by ``lister``'s helper processes), and
writes the work to do into files in the state dir: the copy lists (NUL-separated paths
for ``rsync --files-from --from0``, in batches) and the delete list. So the run knows
every number the safety rules need (files to delete, bytes to write) before anything is
written, without ever holding the whole tree in memory.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from immich_usb_backup.fsutil import allocated
from immich_usb_backup.lister import Entry, Lister
from immich_usb_backup.policy import exfat_fold, exfat_name_problem

MODIFY_WINDOW_NS = 1_000_000_000
# A copy on the disk known not to be the server's file (it changed while it was copied,
# or it differed when compared) gets this time, so that the next run copies it again:
# 1980-01-01 12:00 UTC, on or after exFAT's first day in every time zone.
STALE_MTIME = 315_576_000
STALE_WINDOW_NS = 2 * MODIFY_WINDOW_NS  # exFAT keeps times in 10 ms or 2 s units
BATCH_FILES = 50_000
PROBLEMS_KEPT = 100
LOOKAHEAD_FOLDERS = 16  # folders listed ahead of the walk
FILES_LIST = "files"  # in the run's work folder: every file of the mirror after the run
# rsync's temporary name for NAME while it copies it (receiver.c: ".NAME.XXXXXX", the
# X's from mkstemp): left in the mirror when an older version's rsync was killed
_RSYNC_TEMP = re.compile(r"^\.(.+)\.[A-Za-z0-9]{6}$", re.DOTALL)


class Problems:
    """Problems of a run: the first ``PROBLEMS_KEPT`` kept word for word, the rest counted."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.more = 0

    def add(self, text: str) -> None:
        if len(self.items) < PROBLEMS_KEPT:
            self.items.append(text)
        else:
            self.more += 1

    def __len__(self) -> int:
        return len(self.items) + self.more

    def as_list(self) -> list[str]:
        if self.more:
            return [*self.items, f"... and {self.more} more problems like these"]
        return list(self.items)


@dataclass
class Plan:
    """What the mirror needs. Sizes in bytes; ``*_alloc`` are allocated bytes on the disk."""

    source_files: int = 0
    source_bytes: int = 0
    source_alloc: int = 0
    mirror_files: int = 0
    copy_files: int = 0
    copy_bytes: int = 0
    copy_alloc: int = 0
    replaced_alloc: int = 0
    largest_replaced_alloc: int = 0
    delete_files: int = 0
    delete_dirs: int = 0
    delete_alloc: int = 0
    skipped_files: int = 0
    replaced_files: int = 0
    leftover_files: int = 0  # rsync's temporary files of a killed copy: removed, not kept
    leftover_alloc: int = 0
    copy_lists: list[Path] = field(default_factory=list)
    delete_list: Path | None = None
    files_list: Path | None = None


class Excludes:
    """``library.excludes`` patterns, matched against paths relative to the source root.

    A pattern with no ``/`` matches a name at any depth (``thumbs``, ``*.tmp``); a pattern
    that starts with ``/`` or has one inside matches the whole relative path from the top
    (``/thumbs``, ``upload/abc``). A trailing ``/`` is ignored. A matching folder is
    skipped with everything in it. In the mirror, excluded paths are left as they are:
    never deleted, never counted.
    """

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.names: list[str] = []
        self.paths: list[str] = []
        for p in patterns:
            body = p.strip("/")
            if p.startswith("/") or "/" in body:
                self.paths.append(body)
            else:
                self.names.append(body)

    def __bool__(self) -> bool:
        return bool(self.names or self.paths)

    def match(self, rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(name, p) for p in self.names) or any(
            fnmatch.fnmatchcase(rel, p) for p in self.paths
        )


class _ListWriter:
    """NUL-separated path lists in batches of ``BATCH_FILES``."""

    def __init__(self, directory: Path, stem: str, batch: int = BATCH_FILES) -> None:
        self.directory = directory
        self.stem = stem
        self.batch = batch
        self.paths: list[Path] = []
        self._f: BinaryIO | None = None
        self._count = 0

    def add(self, record: bytes) -> None:
        if self._f is None or self._count >= self.batch:
            self._open_next()
        assert self._f is not None
        self._f.write(record)
        self._count += 1

    def _open_next(self) -> None:
        if self._f:
            self._f.close()
        path = self.directory / f"{self.stem}-{len(self.paths):04d}"
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.paths.append(path)
        self._count = 0

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None


def _in_order(entries: list[Entry]) -> list[Entry]:
    """Sort a folder's entries by name (names are unique in a folder, so the tuples sort
    by name): code point order, the same as UTF-8 byte order for every name exFAT can
    hold, so the walk's order does not depend on the locale."""
    entries.sort()
    return entries


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def scan(
    source: Path,
    mirror: Path,
    work_dir: Path,
    excludes: Excludes,
    cluster: int,
    problems: Problems,
    *,
    list_files: bool = False,
    on_progress: Callable[[int], None] | None = None,
    batch: int = BATCH_FILES,
) -> Plan:
    """Walk ``source`` and ``mirror`` together and return the Plan (see the module doc).

    The delete list holds ``F`` (a file to remove), ``D`` (a folder to remove, after
    everything in it), ``R`` (a file the copy will replace with a newer version) and
    ``T`` (rsync's temporary file of a killed copy, ``.NAME.XXXXXX`` beside a NAME the
    server has: removed, never kept as a server deletion) records. ``list_files`` also
    writes the files list: every file the mirror holds after the run, with its size and
    time in the source and whether it is copied now (see ``read_files_list``).
    ``on_progress`` is called with the number of source files seen so far, every few
    thousand files.
    """
    plan = Plan()
    copies = _ListWriter(work_dir, "copy", batch)
    deletes_path = work_dir / "delete"
    files_out: BinaryIO | None = None
    if list_files:
        plan.files_list = work_dir / FILES_LIST
        files_out = open(plan.files_list, "wb")  # noqa: SIM115 - closed below
    with open(deletes_path, "wb") as deletes:
        plan.delete_list = deletes_path
        walk = _Walk(source, mirror, excludes, cluster, problems, on_progress,
                     plan, copies, deletes, files_out)
        try:
            walk.run()
        finally:
            walk.close()
            if files_out is not None:
                files_out.close()
    copies.close()
    plan.copy_lists = copies.paths
    return plan


class _Walk:
    """One scan's side-by-side walk of the source and the mirror, one folder at a time.

    It holds the folders still to visit, the lists it writes (copy list, delete list and,
    when asked for, the files list) and the counters of the Plan it fills in.
    """

    def __init__(
        self,
        source: Path,
        mirror: Path,
        excludes: Excludes,
        cluster: int,
        problems: Problems,
        on_progress: Callable[[int], None] | None,
        plan: Plan,
        copies: _ListWriter,
        deletes: BinaryIO,
        files_out: BinaryIO | None,
    ) -> None:
        self.source = source
        self.mirror = mirror
        self.excludes = excludes
        self.cluster = cluster
        self.problems = problems
        self.on_progress = on_progress
        self.plan = plan
        self.copies = copies
        self.deletes = deletes
        self.files_out = files_out
        self.next_report = 5000  # the source file count at which on_progress is called next
        self.to_visit: list[tuple[str, bool]] = [("", mirror.is_dir())]  # (folder, in mirror?)
        self.source_ahead = Lister()
        self.mirror_ahead = Lister(helpers=2)  # the disk (FUSE, USB) is the slow side
        self.source_dir = str(source).rstrip("/") + "/"  # for joining relative paths
        self.mirror_dir = str(mirror).rstrip("/") + "/"
        self.asked: set[str] = set()  # folders to visit whose listings were asked for
        self.names: dict[str, str] = {}  # the folder being compared: its source names

    def close(self) -> None:
        self.source_ahead.close()
        self.mirror_ahead.close()

    def run(self) -> None:
        """Visit every folder, depth first in sorted order: compare its entries with the
        mirror's, list the mirror's leftovers for deletion, then go into its subfolders."""
        to_visit = self.to_visit
        while to_visit:
            rel, in_mirror = to_visit.pop()
            self.asked.discard(rel)
            src_entries, mirrored = self._list_folder(rel, in_mirror)
            copied_before = self.plan.copy_files
            subdirs = self._compare_entries(rel, src_entries, mirrored)
            if not in_mirror and rel and self.plan.copy_files == copied_before:
                # A new folder with no file copied into it (empty, or only subfolders):
                # listed itself. One that gets files is created by rsync as their parent
                # (--files-from implies --relative), faster than an entry of its own.
                self.copies.add(os.fsencode(rel) + b"\0")
            if mirrored:
                self._delete_leftovers(rel, mirrored)
            to_visit.extend(reversed(subdirs))
            self._list_ahead()

    def _list_folder(self, rel: str, in_mirror: bool) -> tuple[list[Entry], dict[str, Entry]]:
        """The folder's source entries, sorted, and its mirror entries by exFAT-folded name."""
        src_entries = _in_order(self.source_ahead.get(self.source_dir + rel))
        mirrored: dict[str, Entry] = {}
        if in_mirror:
            mirrored = {exfat_fold(e[0]): e for e in self.mirror_ahead.get(self.mirror_dir + rel)}
        return src_entries, mirrored

    def _compare_entries(
        self, rel: str, src_entries: list[Entry], mirrored: dict[str, Entry]
    ) -> list[tuple[str, bool]]:
        """Decide for each source entry of folder ``rel``: skip it (excluded, or exFAT
        cannot hold it), or count it and copy, replace or keep it. Take the matched entries
        out of ``mirrored``; return the subfolders to visit, with whether the mirror has
        them. The hot loop, once per file: add no function call to it."""
        plan, copies, deletes, files_out = self.plan, self.copies, self.deletes, self.files_out
        excludes, cluster, on_progress = self.excludes, self.cluster, self.on_progress
        next_report = self.next_report
        seen: dict[str, str] = {}
        subdirs: list[tuple[str, bool]] = []
        prefix = f"{rel}/" if rel else ""
        any_excludes = bool(excludes)
        for e in src_entries:
            name, kind, size, mtime_ns = e
            child = prefix + name
            key = exfat_fold(name)
            if any_excludes and excludes.match(child):
                mirrored.pop(key, None)
                continue
            why = exfat_name_problem(name)
            if why is None and (kind in {"link", "other"} or key in seen):
                why = _not_storable(self.source, rel, child, kind, seen.get(key))
            if why is not None:
                self.problems.add(f"not backed up: {child}: {why}")
                plan.skipped_files += 1
                continue
            seen[key] = name
            old = mirrored.pop(key, None)
            if kind == "dir":
                subdirs.append(self._source_folder(rel, child, name, old))
                continue
            # a regular file
            alloc = -(-size // cluster) * cluster  # fsutil.allocated, inlined
            plan.source_files += 1
            plan.source_bytes += size
            plan.source_alloc += alloc
            if plan.source_files >= next_report and on_progress:
                on_progress(plan.source_files)
                next_report += 5000
            if old is not None and (old[1] != "file" or old[0] != name):
                self._delete(_join(rel, old[0]), old)
                old = None
            if old is not None:
                plan.mirror_files += 1
                unchanged = (old[2] == size
                             and abs(old[3] - mtime_ns) <= MODIFY_WINDOW_NS)
                if files_out is not None:
                    files_out.write(files_record(
                        b"U" if unchanged else b"C", size, mtime_ns, child))
                if unchanged:
                    continue
                old_alloc = allocated(old[2], cluster)
                plan.replaced_files += 1
                plan.replaced_alloc += old_alloc
                plan.largest_replaced_alloc = max(plan.largest_replaced_alloc, old_alloc)
                deletes.write(delete_record(b"R", child, old[2], old[3]))
            elif files_out is not None:
                files_out.write(files_record(b"C", size, mtime_ns, child))
            plan.copy_files += 1
            plan.copy_bytes += size
            plan.copy_alloc += alloc
            copies.add(os.fsencode(child) + b"\0")
        self.next_report = next_report
        self.names = seen
        return subdirs

    def _source_folder(
        self, rel: str, child: str, name: str, old: Entry | None
    ) -> tuple[str, bool]:
        """A source subfolder ``child``: what the mirror has under its name (``old``) goes
        if it is not this very folder. Return it as a folder to visit, with whether the
        mirror has it (one it lacks is created by the copy, see ``run``)."""
        if old is not None and (old[1] != "dir" or old[0] != name):
            self._delete(_join(rel, old[0]), old)
            old = None
        return child, old is not None

    def _delete_leftovers(self, rel: str, mirrored: dict[str, Entry]) -> None:
        """The mirror's entries of folder ``rel`` that no source entry matched go, in
        sorted order (excluded ones stay)."""
        for old in _in_order(list(mirrored.values())):
            child = _join(rel, old[0])
            if self.excludes.match(child):
                continue
            if old[1] == "file" and self._rsync_temp(old[0]):
                self.plan.leftover_files += 1
                self.plan.leftover_alloc += allocated(old[2], self.cluster)
                self.deletes.write(delete_record(b"T", child, old[2], old[3]))
                continue
            self._delete(child, old)

    def _rsync_temp(self, name: str) -> bool:
        """Is the mirror's file ``name``, which the server lacks, rsync's temporary file
        for a file of this folder that the server has (``.NAME.XXXXXX``)?"""
        m = _RSYNC_TEMP.match(name)
        return m is not None and exfat_fold(m.group(1)) in self.names

    def _delete(self, rel: str, entry: Entry) -> None:
        """Put a mirror entry on the delete list: a file, or a folder with all in it."""
        plan = self.plan
        if entry[1] == "dir":
            self._delete_tree(rel)
        else:
            plan.delete_files += 1
            plan.mirror_files += 1
            plan.delete_alloc += allocated(entry[2], self.cluster)
            self.deletes.write(delete_record(b"F", rel, *_size_time(entry[1], entry[2],
                                                                     entry[3])))

    def _delete_tree(self, rel: str) -> bool:
        """Append a mirror folder and everything in it to the delete list, deepest first.

        Excluded paths inside are kept (with the folders holding them). Return True when
        the folder itself is listed for removal. Its subfolders are listed ahead, as the
        walk's are (a folder Immich emptied by moving its files holds one or two).
        """
        plan, excludes, cluster = self.plan, self.excludes, self.cluster
        removable = True
        entries = _in_order(self.mirror_ahead.get(self.mirror_dir + rel))
        subdirs = [self.mirror_dir + _join(rel, e[0]) for e in entries if e[1] == "dir"]
        below = 0  # subfolders passed so far
        for name, kind, size, mtime_ns in entries:
            child = _join(rel, name)
            if excludes.match(child):
                removable = False
            elif kind == "dir":
                self.mirror_ahead.want(subdirs[below:below + LOOKAHEAD_FOLDERS])
                below += 1
                removable = self._delete_tree(child) and removable
            else:
                plan.delete_files += 1
                plan.mirror_files += 1
                plan.delete_alloc += allocated(size, cluster)
                self.deletes.write(delete_record(b"F", child, *_size_time(kind, size,
                                                                           mtime_ns)))
        if removable:
            plan.delete_dirs += 1
            self.deletes.write(delete_record(b"D", rel, 0, 0))
        return removable


    def _list_ahead(self) -> None:
        """Ask for the listings (both sides) of the folders the walk visits next: the top
        of the stack of folders to visit."""
        asked, sources, mirrors = self.asked, [], []
        for child, child_in_mirror in reversed(self.to_visit[-LOOKAHEAD_FOLDERS:]):
            if child in asked:
                continue
            # Marked even when a lister does not take it (not started, at its limit):
            # the walk then reads it itself, a third reader beside the disk's two
            # helpers. Asking again instead was measured slower (200k files on
            # exfat-fuse: 8.3 -> 9.0 s), see bench/README.md.
            asked.add(child)
            sources.append(self.source_dir + child)
            if child_in_mirror:
                mirrors.append(self.mirror_dir + child)
        if sources:
            self.source_ahead.want(sources)
        if mirrors:
            self.mirror_ahead.want(mirrors)


def _not_storable(
    source: Path, rel: str, child: str, kind: str, case_twin: str | None
) -> str | None:
    """Why exFAT cannot hold the source entry ``child`` of folder ``rel`` beyond its name:
    a symbolic link, a socket, device or pipe, or a name that differs only in case from
    ``case_twin``, already seen in that folder. None when it can."""
    if kind == "link":
        target = _readlink(os.path.join(source, child))
        return f"symbolic link (exFAT cannot store links; it points to {target})"
    if kind == "other":
        return "not a regular file or folder (socket, device or pipe)"
    if case_twin is not None:
        return (
            f"differs only in case from {_join(rel, case_twin)}; exFAT cannot "
            "hold both in one folder"
        )
    return None


def read_records(path: Path, fields: int) -> Iterator[list[bytes]]:
    """Yield the records of a NUL-separated list file, ``fields`` fields each, streaming."""
    with open(path, "rb") as f:
        pending = b""
        while chunk := f.read(1 << 16):
            pending += chunk
            parts = pending.split(b"\0")
            pending = parts.pop()
            whole = len(parts) - len(parts) % fields
            if whole < len(parts):
                pending = b"\0".join([*parts[whole:], pending])
            for i in range(0, whole, fields):
                yield parts[i:i + fields]


def read_paths(path: Path) -> Iterator[str]:
    """Yield the paths of a NUL-separated path list (a copy list), streaming."""
    for (rel,) in read_records(path, 1):
        yield os.fsdecode(rel)


def delete_record(kind: bytes, rel: str, size: int, mtime_ns: int) -> bytes:
    """A delete list record: the kind, the path, and the size and time the mirror's
    entry had when the scan listed it (0 for folders, -1 for links and the like)."""
    return b"%s\0%s\0%d\0%d\0" % (kind, os.fsencode(rel), size, mtime_ns)


def _size_time(kind: str, size: int, mtime_ns: int) -> tuple[int, int]:
    """A delete record's size and time: -1 for an entry that is not a regular file."""
    return (size, mtime_ns) if kind == "file" else (-1, -1)


def read_delete_records(path: Path) -> Iterator[tuple[str, str, int, int]]:
    """Yield (kind, relative path, size, mtime_ns) from a delete list; kind is "F" (a
    file to remove), "D" (a folder, after everything in it: subfolders of a deleted
    folder come first, deepest first), "R" (a file the copy replaces) or "T" (a temporary
    file a killed rsync left in the mirror: removed, never set aside)."""
    for kind, rel, size, mtime_ns in read_records(path, 4):
        yield kind.decode(), os.fsdecode(rel), int(size), int(mtime_ns)


@dataclass(frozen=True)
class FileRecord:
    """One file of the mirror after the run: copied now (``copied``) or already there;
    ``changed``: copied, but the server's file changed while it was (flag ``X``, set
    after the copy), so the disk's copy is not the file the scan saw."""

    rel: str
    size: int
    mtime_ns: int
    copied: bool
    changed: bool = False


def files_record(flag: bytes, size: int, mtime_ns: int, rel: str) -> bytes:
    return b"%s\0%d\0%d\0%s\0" % (flag, size, mtime_ns, os.fsencode(rel))


def read_files_list(path: Path) -> Iterator[FileRecord]:
    """Yield the files list ``scan(list_files=True)`` wrote, in the walk's order."""
    for flag, size, mtime_ns, rel in read_records(path, 4):
        yield FileRecord(os.fsdecode(rel), int(size), int(mtime_ns), flag != b"U",
                         flag == b"X")


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"
