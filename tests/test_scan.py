"""Unit tests for the preflight scan, on plain temporary folders (no exFAT needed)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from immich_usb_backup.fsutil import allocated
from immich_usb_backup.rsync import base_args as rsync_base_args
from immich_usb_backup.scan import (
    PROBLEMS_KEPT,
    Excludes,
    Plan,
    Problems,
    delete_record,
    read_delete_records,
    read_files_list,
    read_records,
    scan,
)

CLUSTER = 4096


def read_delete_list(path: Path) -> Iterator[tuple[str, str]]:
    """(kind, relative path) of each record of a delete list."""
    for kind, rel, _, _ in read_delete_records(path):
        yield kind, rel

SECOND_NS = 1_000_000_000
BASE_MTIME_NS = 1_700_000_000 * SECOND_NS


def put(root: Path, rel: str, data: bytes = b"photo", mtime_ns: int = BASE_MTIME_NS) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def mirror_of(source: Path, mirror: Path) -> None:
    """A mirror as a finished backup leaves it: same names, sizes and mtimes."""
    shutil.copytree(source, mirror, copy_function=shutil.copy2, dirs_exist_ok=True)


class Run:
    """One scan's Plan, Problems and the lists it wrote."""

    def __init__(self, plan: Plan, problems: Problems) -> None:
        self.plan = plan
        self.problems = problems

    @property
    def copies(self) -> list[str]:
        out: list[str] = []
        for path in self.plan.copy_lists:
            data = path.read_bytes()
            assert data.endswith(b"\0") or not data
            out += [os.fsdecode(p) for p in data.split(b"\0")[:-1]]
        return out

    @property
    def deletes(self) -> list[tuple[str, str]]:
        assert self.plan.delete_list is not None
        return list(read_delete_list(self.plan.delete_list))


def run_scan(
    tmp_path: Path,
    source: Path,
    mirror: Path,
    excludes: tuple[str, ...] = (),
    **kwargs: Any,
) -> Run:
    work = tmp_path / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    problems = Problems()
    plan = scan(source, mirror, work, Excludes(excludes), CLUSTER, problems, **kwargs)
    return Run(plan, problems)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "upload-location"
    put(src, "upload/user1/ab/cd/IMG_0001.jpg", b"a" * 10)
    put(src, "upload/user1/ab/cd/IMG_0002.jpg", b"b" * 5000)
    put(src, "upload/user1/ef/IMG_0003.heic", b"c" * 4096)
    put(src, "library/admin/2024/trip/DSC 1.jpg", b"d" * 4097)
    put(src, "profile/user1.jpg", b"e" * 3)
    put(src, "backups/.immich", b"")
    return src


SOURCE_FILES = {
    "upload/user1/ab/cd/IMG_0001.jpg": 10,
    "upload/user1/ab/cd/IMG_0002.jpg": 5000,
    "upload/user1/ef/IMG_0003.heic": 4096,
    "library/admin/2024/trip/DSC 1.jpg": 4097,
    "profile/user1.jpg": 3,
    "backups/.immich": 0,
}
SOURCE_DIRS = {
    "upload", "upload/user1", "upload/user1/ab", "upload/user1/ab/cd", "upload/user1/ef",
    "library", "library/admin", "library/admin/2024", "library/admin/2024/trip",
    "profile", "backups",
}
# the folders with no file of their own: listed themselves (rsync makes the others as
# the parents of their files)
LISTED_DIRS = {"upload", "upload/user1", "upload/user1/ab", "library", "library/admin",
               "library/admin/2024"}


# first run, no change ----------------------------------------------------------------


@pytest.mark.parametrize("mirror_exists", [False, True])
def test_first_run_lists_every_file_and_the_folders_no_file_makes(
    tmp_path: Path, source: Path, mirror_exists: bool
) -> None:
    mirror = tmp_path / "mirror"
    if mirror_exists:
        mirror.mkdir()
    run = run_scan(tmp_path, source, mirror)

    assert sorted(run.copies) == sorted(SOURCE_FILES.keys() | LISTED_DIRS)
    assert len(run.copies) == len(set(run.copies))
    assert run.deletes == []
    p = run.plan
    assert p.source_files == len(SOURCE_FILES)
    assert p.source_bytes == sum(SOURCE_FILES.values())
    assert p.source_alloc == sum(allocated(s, CLUSTER) for s in SOURCE_FILES.values())
    assert p.copy_files == len(SOURCE_FILES)
    assert p.copy_bytes == sum(SOURCE_FILES.values())
    assert p.copy_alloc == p.source_alloc
    assert p.mirror_files == 0
    assert p.delete_files == p.delete_dirs == p.delete_alloc == 0
    assert p.replaced_alloc == p.largest_replaced_alloc == 0
    assert p.skipped_files == 0
    assert len(run.problems) == 0


def test_allocated_sizes_round_up_to_whole_clusters(tmp_path: Path, source: Path) -> None:
    plan = run_scan(tmp_path, source, tmp_path / "mirror").plan
    # 10 -> 4096, 5000 -> 8192, 4096 -> 4096, 4097 -> 8192, 3 -> 4096, 0 -> 0
    assert plan.source_alloc == 4096 + 8192 + 4096 + 8192 + 4096 + 0


def copy_with_rsync(run: Run, source: Path, mirror: Path) -> None:
    """Copy the run's copy lists the way the library step does (its flags)."""
    mirror.mkdir(exist_ok=True)
    for batch in run.plan.copy_lists:
        subprocess.run([*rsync_base_args(), "--dirs", f"--files-from={batch}", "--from0",
                        f"{source}/", f"{mirror}/"], check=True, capture_output=True)


def folders(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}


def test_rsync_makes_every_folder_from_the_copy_lists(tmp_path: Path, source: Path) -> None:
    (source / "upload" / "user1" / "empty" / "deeper").mkdir(parents=True)
    put(source, "library/only-excluded/x.tmp")
    mirror = tmp_path / "mirror"
    run = run_scan(tmp_path, source, mirror, excludes=("*.tmp",), batch=2)
    assert "upload/user1/empty/deeper" in run.copies
    assert "upload/user1/ab/cd" not in run.copies  # made as its files' parent
    copy_with_rsync(run, source, mirror)
    assert folders(mirror) == folders(source)
    assert {str(p.relative_to(mirror)) for p in mirror.rglob("*") if p.is_file()} == set(
        SOURCE_FILES)
    assert run_scan(tmp_path, source, mirror, excludes=("*.tmp",)).copies == []


def test_second_run_without_changes_lists_nothing(tmp_path: Path, source: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror_of(source, mirror)
    run = run_scan(tmp_path, source, mirror)

    assert run.copies == []
    assert run.plan.copy_lists == []
    assert run.deletes == []
    p = run.plan
    assert p.copy_files == p.copy_bytes == p.copy_alloc == 0
    assert p.delete_files == p.delete_dirs == 0
    assert p.source_files == len(SOURCE_FILES)
    assert p.mirror_files == len(SOURCE_FILES)
    assert len(run.problems) == 0


# changed files -----------------------------------------------------------------------


def test_file_with_a_changed_size_is_listed(tmp_path: Path, source: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror_of(source, mirror)
    put(source, "profile/user1.jpg", b"e" * 9000)  # same mtime, new size
    run = run_scan(tmp_path, source, mirror)

    assert run.copies == ["profile/user1.jpg"]
    assert run.deletes == [("R", "profile/user1.jpg")]  # replaced: set aside first
    p = run.plan
    assert p.copy_files == 1
    assert p.copy_bytes == 9000
    assert p.copy_alloc == 12288
    assert p.replaced_files == 1
    assert p.replaced_alloc == 4096  # the old 3-byte file's cluster
    assert p.largest_replaced_alloc == 4096
    assert p.mirror_files == len(SOURCE_FILES)


def test_file_with_mtime_changed_by_more_than_a_second_is_listed(
    tmp_path: Path, source: Path
) -> None:
    mirror = tmp_path / "mirror"
    mirror_of(source, mirror)
    newer = BASE_MTIME_NS + 2 * SECOND_NS
    os.utime(source / "upload/user1/ef/IMG_0003.heic", ns=(newer, newer))
    run = run_scan(tmp_path, source, mirror)
    assert run.copies == ["upload/user1/ef/IMG_0003.heic"]
    assert run.plan.copy_files == 1


def test_file_with_an_older_mtime_in_the_source_is_listed(tmp_path: Path, source: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror_of(source, mirror)
    older = BASE_MTIME_NS - 5 * SECOND_NS
    os.utime(source / "profile/user1.jpg", ns=(older, older))
    assert run_scan(tmp_path, source, mirror).copies == ["profile/user1.jpg"]


@pytest.mark.parametrize("shift_ns", [SECOND_NS // 2, -SECOND_NS // 2, SECOND_NS, -SECOND_NS])
def test_mtime_change_within_one_second_is_not_listed(
    tmp_path: Path, source: Path, shift_ns: int
) -> None:
    mirror = tmp_path / "mirror"
    mirror_of(source, mirror)
    t = BASE_MTIME_NS + shift_ns
    os.utime(mirror / "upload/user1/ef/IMG_0003.heic", ns=(t, t))
    run = run_scan(tmp_path, source, mirror)
    assert run.copies == []
    assert run.plan.copy_files == 0


def test_files_list_has_every_backed_up_file_with_its_source_size_time_and_copy_flag(
    tmp_path: Path, source: Path
) -> None:
    mirror = tmp_path / "mirror"
    mirror_of(source, mirror)
    put(source, "profile/user1.jpg", b"e" * 9000)  # changed
    put(source, "upload/user1/new.jpg", b"n" * 7)  # new
    (source / "upload/bad:name.jpg").write_bytes(b"x")  # not backed up: not listed
    run = run_scan(tmp_path, source, mirror, list_files=True)

    assert run.plan.files_list is not None
    records = list(read_files_list(run.plan.files_list))
    expected = {rel: size for rel, size in SOURCE_FILES.items()}
    expected.update({"profile/user1.jpg": 9000, "upload/user1/new.jpg": 7})
    assert {r.rel: r.size for r in records} == expected
    assert {r.rel for r in records if r.copied} == {"profile/user1.jpg", "upload/user1/new.jpg"}
    for r in records:
        assert r.mtime_ns == (source / r.rel).stat().st_mtime_ns
    # the walk's order: a folder's files (by name), then its subfolders one by one
    rels = [r.rel for r in records]
    assert rels.index("upload/user1/new.jpg") < rels.index("upload/user1/ab/cd/IMG_0001.jpg")


def test_no_files_list_unless_asked(tmp_path: Path, source: Path) -> None:
    run = run_scan(tmp_path, source, tmp_path / "mirror")
    assert run.plan.files_list is None
    assert not (tmp_path / "work" / "files").exists()


def test_read_records_reads_fields_split_across_read_chunks(tmp_path: Path) -> None:
    path = tmp_path / "list"
    records = [[b"C", b"%d" % i, b"%d" % (i * 7), b"dir/" + b"x" * (i % 300)]
               for i in range(3000)]
    path.write_bytes(b"".join(b"\0".join(r) + b"\0" for r in records))
    assert list(read_records(path, 4)) == records


# deletions ---------------------------------------------------------------------------


def test_file_deleted_in_the_source_is_in_the_delete_list(tmp_path: Path, source: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror_of(source, mirror)
    (source / "upload/user1/ab/cd/IMG_0002.jpg").unlink()
    run = run_scan(tmp_path, source, mirror)

    assert run.deletes == [("F", "upload/user1/ab/cd/IMG_0002.jpg")]
    assert run.copies == []
    p = run.plan
    assert p.delete_files == 1
    assert p.delete_dirs == 0
    assert p.delete_alloc == 8192
    assert p.mirror_files == len(SOURCE_FILES)  # the deleted file is still a backed-up file
    assert p.source_files == len(SOURCE_FILES) - 1


def test_folder_deleted_in_the_source_is_listed_with_its_files_deepest_first(
    tmp_path: Path, source: Path
) -> None:
    mirror = tmp_path / "mirror"
    mirror_of(source, mirror)
    put(mirror, "library/admin/2024/trip/sub/deeper.jpg", b"z" * 100)
    (mirror / "library/admin/2024/empty").mkdir()
    shutil.rmtree(source / "library")
    run = run_scan(tmp_path, source, mirror)
    deletes = run.deletes

    expected_files = {"library/admin/2024/trip/DSC 1.jpg", "library/admin/2024/trip/sub/deeper.jpg"}
    expected_dirs = {
        "library", "library/admin", "library/admin/2024", "library/admin/2024/trip",
        "library/admin/2024/trip/sub", "library/admin/2024/empty",
    }
    assert {rel for kind, rel in deletes if kind == "F"} == expected_files
    assert {rel for kind, rel in deletes if kind == "D"} == expected_dirs
    assert len(deletes) == len(expected_files) + len(expected_dirs)
    position = {(kind, rel): i for i, (kind, rel) in enumerate(deletes)}
    for kind, rel in deletes:
        parent = rel.rsplit("/", 1)[0]
        if "/" in rel and ("D", parent) in position:
            # everything in a folder comes before the folder itself
            assert position[(kind, rel)] < position[("D", parent)], deletes
    assert deletes[-1] == ("D", "library")
    p = run.plan
    assert p.delete_files == 2
    assert p.delete_dirs == len(expected_dirs)
    assert p.delete_alloc == 8192 + 4096
    assert p.mirror_files == len(SOURCE_FILES) + 1
    assert run.copies == []


def test_read_delete_list_reads_records_across_read_chunks(tmp_path: Path) -> None:
    records = [("F" if i % 3 else "D", f"folder-{i:05d}/" + "x" * (i % 200)) for i in range(3000)]
    path = tmp_path / "delete"
    path.write_bytes(b"".join(delete_record(k.encode(), r, 1, 2) for k, r in records))
    assert path.stat().st_size > 3 * 65536
    assert list(read_delete_list(path)) == records


def test_read_delete_list_keeps_undecodable_names(tmp_path: Path) -> None:
    path = tmp_path / "delete"
    path.write_bytes(b"\0".join([b"F", b"a/\xff.jpg", b"5", b"6", b"D", b"a", b"0", b"0", b""]))
    assert list(read_delete_list(path)) == [("F", os.fsdecode(b"a/\xff.jpg")), ("D", "a")]
    assert next(read_delete_records(path)) == ("F", os.fsdecode(b"a/\xff.jpg"), 5, 6)


# names exFAT cannot hold -------------------------------------------------------------


def test_names_differing_only_in_case_copy_one_and_report_the_other(tmp_path: Path) -> None:
    source = tmp_path / "src"
    put(source, "album/Case.jpg", b"1")
    put(source, "album/case.jpg", b"22")
    run = run_scan(tmp_path, source, tmp_path / "mirror")

    copied = [c for c in run.copies if c.startswith("album/")]
    assert len(copied) == 1
    assert copied[0] in {"album/Case.jpg", "album/case.jpg"}
    other = ({"album/Case.jpg", "album/case.jpg"} - set(copied)).pop()
    problems = run.problems.as_list()
    assert len(problems) == 1
    assert other in problems[0]
    assert "case" in problems[0]
    assert run.plan.skipped_files == 1
    assert run.plan.copy_files == 1


def test_mirror_name_in_another_case_is_deleted_and_the_source_name_copied(
    tmp_path: Path,
) -> None:
    source, mirror = tmp_path / "src", tmp_path / "mirror"
    put(source, "a/photo.jpg", b"same")
    put(mirror, "a/photo.JPG", b"same")
    run = run_scan(tmp_path, source, mirror)

    assert run.deletes == [("F", "a/photo.JPG")]
    assert run.copies == ["a/photo.jpg"]
    assert run.plan.delete_files == 1
    assert run.plan.copy_files == 1
    assert len(run.problems) == 0


def test_case_renamed_file_counts_among_the_backed_up_files(tmp_path: Path) -> None:
    # mirror_files is the denominator of the max_delete_percent rule: a backup holding
    # one file, which this run deletes, must not read as "1 of the 0 files".
    source, mirror = tmp_path / "src", tmp_path / "mirror"
    put(source, "a/photo.jpg", b"same")
    put(mirror, "a/photo.JPG", b"same")
    plan = run_scan(tmp_path, source, mirror).plan
    assert plan.mirror_files == 1
    assert plan.delete_files <= plan.mirror_files


def test_mirror_file_replaced_by_a_source_folder_counts_among_the_backed_up_files(
    tmp_path: Path,
) -> None:
    source, mirror = tmp_path / "src", tmp_path / "mirror"
    put(source, "a/thing/inside.jpg", b"new")
    put(mirror, "a/thing", b"was a file")
    run = run_scan(tmp_path, source, mirror)
    assert run.deletes == [("F", "a/thing")]
    assert run.copies == ["a/thing/inside.jpg"]
    assert run.plan.mirror_files == 1
    assert run.plan.delete_files <= run.plan.mirror_files


def test_mirror_folder_in_another_case_is_deleted_and_the_source_folder_copied(
    tmp_path: Path,
) -> None:
    source, mirror = tmp_path / "src", tmp_path / "mirror"
    put(source, "Album/x.jpg", b"x")
    put(mirror, "album/x.jpg", b"x")
    run = run_scan(tmp_path, source, mirror)
    assert run.deletes == [("F", "album/x.jpg"), ("D", "album")]
    assert run.copies == ["Album/x.jpg"]
    assert run.plan.mirror_files == 1


def test_symlinks_and_forbidden_names_are_problems_not_copies(tmp_path: Path) -> None:
    source = tmp_path / "src"
    put(source, "ok.jpg", b"fine")
    put(source, "a:b.jpg", b"colon")
    put(source, "what?.jpg", b"question")
    (source / "link.jpg").symlink_to(source / "ok.jpg")
    (source / "linkdir").symlink_to(tmp_path)
    os.mkfifo(source / "pipe")
    with open(os.path.join(os.fsencode(source), b"bad\xff.jpg"), "wb") as f:
        f.write(b"latin-1 name")
    run = run_scan(tmp_path, source, tmp_path / "mirror")

    assert run.copies == ["ok.jpg"]
    problems = run.problems.as_list()
    assert len(problems) == 6, problems

    def about(name: str) -> str:
        hits = [p for p in problems if name in p]
        assert len(hits) == 1, (name, problems)
        return hits[0]

    assert "symbolic link" in about("link.jpg")
    assert "symbolic link" in about("linkdir")
    assert "exFAT cannot store" in about("a:b.jpg")
    assert "exFAT cannot store" in about("what?.jpg")
    assert "not a regular file" in about("pipe")
    assert "not valid UTF-8" in about("bad")
    assert all(p.startswith("not backed up: ") for p in problems)
    assert run.plan.skipped_files == 6
    assert run.plan.source_files == 1


def test_long_and_non_ascii_names_within_exfat_limits_are_copied(tmp_path: Path) -> None:
    source = tmp_path / "src"
    names = [
        "日" * 80 + ".jpg",  # 244 bytes of UTF-8, 84 UTF-16 units
        "\U0001f600" * 62 + ".jpg",  # 252 bytes, 128 UTF-16 units
        "Müller ü 1.jpg",
        "b" * 251 + ".jpg",  # exactly 255
    ]
    for name in names:
        put(source, name, b"x")
    run = run_scan(tmp_path, source, tmp_path / "mirror")
    assert sorted(run.copies) == sorted(names)
    assert len(run.problems) == 0


# excludes ----------------------------------------------------------------------------


def test_excludes_skip_the_source_and_leave_the_mirror_alone(tmp_path: Path) -> None:
    source, mirror = tmp_path / "src", tmp_path / "mirror"
    put(source, "upload/y/keep.jpg", b"keep")
    put(source, "upload/y/thumbs/t.webp", b"t")  # name pattern, nested
    put(source, "thumbs/user/t2.webp", b"t2")  # name pattern, top level
    put(source, "upload/x/new.jpg", b"new")  # path pattern
    put(source, "library/x/not-excluded.jpg", b"n")  # only /upload/x is excluded
    mirror_of(source, mirror)
    # excluded in the mirror only, or changed there: all must be left alone
    put(mirror, "upload/x/old-only-in-mirror.jpg", b"old")
    put(mirror, "upload/x/new.jpg", b"changed size in the mirror")
    put(mirror, "thumbs/gone-from-source.webp", b"old thumb")
    put(mirror, "upload/z/thumbs/orphan.webp", b"orphan")
    put(source, "upload/z/a.jpg", b"a")
    put(mirror, "upload/z/a.jpg", b"a")
    (source / "upload/x/new.jpg").unlink()

    run = run_scan(tmp_path, source, mirror, excludes=("thumbs", "/upload/x"))

    assert run.copies == []
    assert run.deletes == []
    p = run.plan
    assert p.source_files == 3  # keep.jpg, not-excluded.jpg, z/a.jpg
    assert p.mirror_files == 3
    assert p.delete_files == p.delete_dirs == 0
    assert p.skipped_files == 0
    assert len(run.problems) == 0


def test_excluded_mirror_files_inside_a_deleted_folder_are_not_deleted_or_counted(
    tmp_path: Path,
) -> None:
    # Excludes' contract (scan.py, docs/configuration.md): excluded paths already on the
    # disk are "never deleted, never counted", also when their folder left the source.
    source, mirror = tmp_path / "src", tmp_path / "mirror"
    put(source, "upload/keep.jpg")
    put(mirror, "upload/keep.jpg")
    put(mirror, "upload/gone/a.jpg")
    put(mirror, "upload/gone/thumbs/t.webp")
    run = run_scan(tmp_path, source, mirror, excludes=("thumbs",))
    files = [rel for kind, rel in run.deletes if kind == "F"]
    assert files == ["upload/gone/a.jpg"]
    assert ("D", "upload/gone/thumbs") not in run.deletes
    assert run.plan.delete_files == 1
    assert run.plan.mirror_files == 2


def test_excluded_files_are_not_copied_on_a_first_run(tmp_path: Path) -> None:
    source = tmp_path / "src"
    put(source, "upload/x/a.jpg")
    put(source, "upload/xy/b.jpg")
    put(source, "thumbs/c.webp")
    put(source, "library/thumbs")  # a file named like the pattern is excluded too
    put(source, "encoded-video/d.mp4")
    run = run_scan(tmp_path, source, tmp_path / "mirror",
                   excludes=("thumbs", "/upload/x", "encoded-video/"))
    assert sorted(run.copies) == ["library", "upload", "upload/xy/b.jpg"]
    assert run.plan.source_files == 1


def test_exclude_with_a_leading_slash_only_skips_the_top_level_folder(tmp_path: Path) -> None:
    # "/thumbs" is Immich's generated thumbnails; an album folder called "thumbs" deeper
    # down holds originals and must still be backed up.
    source = tmp_path / "src"
    put(source, "thumbs/user/t.webp")
    put(source, "library/admin/thumbs/original.jpg")
    run = run_scan(tmp_path, source, tmp_path / "mirror", excludes=("/thumbs",))
    assert "library/admin/thumbs/original.jpg" in run.copies
    assert not any(c.startswith("thumbs") for c in run.copies)
    assert run.plan.source_files == 1


@pytest.mark.parametrize(
    ("patterns", "rel", "matched"),
    [
        (("thumbs",), "thumbs", True),
        (("thumbs",), "upload/a/thumbs", True),
        (("thumbs",), "upload/thumbs.jpg", False),
        (("*.tmp",), "upload/a/b.tmp", True),
        (("*.tmp",), "upload/a/b.tmp.jpg", False),
        (("/upload/x",), "upload/x", True),
        (("upload/x",), "upload/x", True),
        (("/upload/x",), "library/upload/x", False),
        (("/upload/x",), "upload/xy", False),
        (("/thumbs",), "thumbs", True),
        (("/thumbs",), "upload/thumbs", False),
        (("upload/*/tmp",), "upload/u1/tmp", True),
        (("Thumbs",), "thumbs", False),
        ((), "anything", False),
    ],
)
def test_exclude_pattern_matching(patterns: tuple[str, ...], rel: str, matched: bool) -> None:
    assert Excludes(patterns).match(rel) is matched


# copy list batches -------------------------------------------------------------------


def test_copy_lists_are_split_in_batches_holding_every_path_once(tmp_path: Path) -> None:
    source = tmp_path / "src"
    expected = set()
    for i in range(10):
        rel = f"d{i % 3}/f{i}.jpg"
        put(source, rel, bytes(i))
        expected.add(rel)  # the folders are made as the files' parents
    run = run_scan(tmp_path, source, tmp_path / "mirror", batch=3)

    lists = run.plan.copy_lists
    assert len(lists) == math.ceil(len(expected) / 3)
    assert [p.name for p in lists] == [f"copy-{i:04d}" for i in range(len(lists))]
    per_list = [p.read_bytes().split(b"\0")[:-1] for p in lists]
    assert all(1 <= len(paths) <= 3 for paths in per_list)
    assert all(len(paths) == 3 for paths in per_list[:-1])
    assert sorted(run.copies) == sorted(expected)
    assert len(run.copies) == len(expected)


def test_on_progress_is_not_called_for_a_small_tree(tmp_path: Path, source: Path) -> None:
    calls: list[int] = []
    run_scan(tmp_path, source, tmp_path / "mirror", on_progress=calls.append)
    assert calls == []


# Problems ----------------------------------------------------------------------------


def test_problems_keep_the_first_ones_and_count_the_rest() -> None:
    problems = Problems()
    for i in range(PROBLEMS_KEPT + 7):
        problems.add(f"problem {i}")
    assert len(problems) == PROBLEMS_KEPT + 7
    listed = problems.as_list()
    assert len(listed) == PROBLEMS_KEPT + 1
    assert listed[:PROBLEMS_KEPT] == [f"problem {i}" for i in range(PROBLEMS_KEPT)]
    assert listed[-1].startswith("... and 7 more")


def test_problems_under_the_cap_are_listed_as_they_are() -> None:
    problems = Problems()
    problems.add("one")
    problems.add("two")
    assert len(problems) == 2
    assert problems.as_list() == ["one", "two"]
    problems.as_list().append("not stored")
    assert problems.as_list() == ["one", "two"]


def test_scan_with_more_problems_than_kept_reports_the_total(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for i in range(PROBLEMS_KEPT + 3):
        put(source, f"bad:{i:04d}.jpg")
    run = run_scan(tmp_path, source, tmp_path / "mirror")
    assert len(run.problems) == PROBLEMS_KEPT + 3
    assert run.problems.as_list()[-1].startswith("... and 3 more")
    assert run.plan.skipped_files == PROBLEMS_KEPT + 3
    assert run.copies == []
