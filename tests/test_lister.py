"""The scan's folder listings read ahead by a helper process (``lister``)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from immich_usb_backup import scan as scan_mod
from immich_usb_backup.lister import Lister, list_dir
from immich_usb_backup.scan import Excludes, Problems, read_delete_records, read_files_list

BASE_NS = 1_700_000_000_000_000_000


def tree(root: Path, folders: int = 60) -> list[str]:
    """``folders`` leaf folders of a few files each, in Immich's layout, with a link, a
    pipe and a name that is not UTF-8 in the first one. Returns every folder's path."""
    paths = [str(root)]
    for i in range(folders):
        leaf = root / "upload" / "user" / f"{i % 7:02x}" / f"{i:02x}"
        leaf.mkdir(parents=True, exist_ok=True)
        for j in range(i % 4 + 1):
            f = leaf / f"IMG_{i:03d}_{j}.jpg"
            f.write_bytes(b"x" * (i * 10 + j))
            os.utime(f, ns=(BASE_NS + i, BASE_NS + i * 1000 + j))
    first = root / "upload" / "user" / "00" / "00"
    (first / "link.jpg").symlink_to("IMG_000_0.jpg")
    os.mkfifo(first / "pipe")
    (first / os.fsdecode(b"bad-\xff\xfe.jpg")).write_bytes(b"raw")
    for dirpath, dirnames, _ in os.walk(root):
        paths += [os.path.join(dirpath, d) for d in dirnames]
    return sorted(set(paths))


@pytest.mark.parametrize("helpers", [1, 2])
def test_listings_from_the_helper_are_what_reading_directly_gives(
    tmp_path: Path, helpers: int
) -> None:
    folders = tree(tmp_path / "lib")
    ahead = Lister(start_after=0, helpers=helpers)
    try:
        ahead.want(folders)
        assert [h.proc.returncode for h in ahead.helpers] == [None] * helpers  # they run
        if helpers == 2:  # asked in turn
            assert abs(len(ahead.helpers[0].asked) - len(ahead.helpers[1].asked)) <= 1
        assert len(ahead.owner) == min(len(folders), ahead.limit)
        for n, folder in enumerate(folders):
            assert sorted(ahead.get(folder)) == sorted(list_dir(folder)), folder
            ahead.want(folders[n + 1:])  # what is asked already is not asked twice
        assert not ahead.owner and not ahead.answers
        helper = ahead.helpers[0]
    finally:
        ahead.close()
    assert helper.proc.returncode is not None  # closed means ended


def test_the_helper_holds_at_most_limit_listings(tmp_path: Path) -> None:
    folders = tree(tmp_path / "lib")
    ahead = Lister(limit=5, start_after=0)
    try:
        ahead.want(folders)
        assert len(ahead.owner) == 5
        ahead.get(folders[4])  # read past four others: they are held, not asked again
        assert len(ahead.answers) == 4 and not ahead.owner
        ahead.want(folders)
        assert len(ahead.answers) + len(ahead.owner) == 5
    finally:
        ahead.close()


def test_an_error_listing_a_folder_is_raised_by_get_as_reading_it_would(tmp_path: Path) -> None:
    folders = tree(tmp_path / "lib")
    not_a_folder = str(tmp_path / "lib" / "upload" / "user" / "00" / "00" / "IMG_000_0.jpg")
    gone = str(tmp_path / "lib" / "no-such-folder")
    ahead = Lister(start_after=0)
    try:
        ahead.want([not_a_folder, gone, folders[0]])
        with pytest.raises(NotADirectoryError) as err:
            ahead.get(not_a_folder)
        assert err.value.filename == not_a_folder
        with pytest.raises(FileNotFoundError):
            ahead.get(gone)
        assert sorted(ahead.get(folders[0])) == sorted(list_dir(folders[0]))
    finally:
        ahead.close()


def test_a_helper_that_is_killed_is_replaced_by_reading_directly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folders = []
    for n in range(6):  # listings larger than a pipe holds: the helper cannot be ahead
        folder = tmp_path / f"big-{n}"
        folder.mkdir()
        for i in range(1500):
            (folder / f"IMG_{i:05d}_{'x' * 40}.jpg").touch()
        folders.append(str(folder))
    ahead = Lister(start_after=0)
    try:
        ahead.want(folders)
        proc = ahead.helpers[0].proc
        first = ahead.get(folders[0])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with caplog.at_level(logging.WARNING, logger="immich_usb_backup.lister"):
            listings = [ahead.get(f) for f in folders[1:]]
            ahead.want(folders)  # asks nothing of a helper that has gone
        assert [sorted(x) for x in [first, *listings]] == [sorted(list_dir(f)) for f in folders]
        assert "a folder listing helper ended early" in caplog.text
        assert not ahead.helpers
    finally:
        ahead.close()


def test_a_helper_that_cannot_start_leaves_the_reading_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folders = tree(tmp_path / "lib")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    ahead = Lister(start_after=0)
    with caplog.at_level(logging.WARNING, logger="immich_usb_backup.lister"):
        ahead.want(folders)
    assert not ahead.helpers
    assert "cannot start the folder listing helper" in caplog.text
    assert sorted(ahead.get(folders[3])) == sorted(list_dir(folders[3]))


def test_no_helper_for_a_small_tree(tmp_path: Path) -> None:
    ahead = Lister(start_after=3)
    ahead.want([str(tmp_path), str(tmp_path / "a")])
    ahead.want([str(tmp_path / "b")])
    assert not ahead.helpers  # three folders: read here, no process started
    ahead.want([str(tmp_path / "c")])
    assert len(ahead.helpers) == 1  # the fourth starts it
    ahead.close()


def scan_lists(source: Path, mirror: Path, work: Path) -> dict[str, object]:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    problems = Problems()
    plan = scan_mod.scan(source, mirror, work, Excludes(("*.tmp",)), 4096, problems,
                         list_files=True)
    copies = b"".join(p.read_bytes() for p in plan.copy_lists)
    assert plan.delete_list is not None and plan.files_list is not None
    return {"counts": (plan.source_files, plan.copy_files, plan.delete_files,
                       plan.delete_dirs, plan.mirror_files, plan.replaced_files),
            "copies": copies, "deletes": list(read_delete_records(plan.delete_list)),
            "files": list(read_files_list(plan.files_list)), "problems": problems.as_list()}


def test_a_scan_with_the_helper_plans_exactly_what_one_without_plans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, mirror = tmp_path / "src", tmp_path / "mirror"
    tree(source, folders=120)
    tree(mirror, folders=90)  # new folders, missing folders, changed and equal files
    tree(mirror / "moved-away", folders=80)  # a whole tree to delete, listed ahead too
    (mirror / "upload" / "user" / "00" / "old-only").mkdir()
    (mirror / "upload" / "user" / "00" / "old-only" / "gone.jpg").write_bytes(b"g")
    (source / "upload" / "user" / "01" / "01" / "skip.tmp").write_bytes(b"t")
    started: dict[int, int] = {}  # id of a Lister: the helpers it ran

    class Watched(Lister):
        def want(self, paths: list[str]) -> None:
            super().want(paths)
            started[id(self)] = max(started.get(id(self), 0), len(self.helpers))


    monkeypatch.setattr(scan_mod, "Lister", Watched)
    with_helper = scan_lists(source, mirror, tmp_path / "work")
    assert ("D", "moved-away", 0, 0) in with_helper["deletes"]  # type: ignore[operator]
    assert sorted(started.values()) == [1, 2]  # the source's helper, the mirror's two

    class Direct(Lister):
        def __init__(self, helpers: int = 1) -> None:
            super().__init__(start_after=10**9, helpers=helpers)

    monkeypatch.setattr(scan_mod, "Lister", Direct)
    assert scan_lists(source, mirror, tmp_path / "work") == with_helper
