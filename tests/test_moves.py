"""A living library on a real exFAT disk: files Immich moves are renamed on the disk, not
copied again; names that are not UTF-8 never break a run.

Each test drives the real command line against a loop-device exFAT disk (see conftest).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import ExfatDisk, LoopWatch, Server, run_cli, tree

pytestmark = pytest.mark.exfat

USER = "9f1d6c1a-user"


@pytest.fixture(autouse=True)
def _loop_never_blocked(no_blocked_loop: LoopWatch) -> LoopWatch:
    return no_blocked_loop


def history(server: Server) -> list[dict[str, object]]:
    r = run_cli("history", "--json", config=server.config_path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def run(server: Server, disk: ExfatDisk, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("run", str(disk.mount_point), *extra, config=server.config_path)


def library_step(rec: dict[str, object]) -> dict[str, object]:
    return rec["steps"]["library"]  # type: ignore[index, return-value]


def add_originals(server: Server, n: int, size: int = 3000) -> list[Path]:
    """``n`` more originals in Immich's upload layout (upload/<user>/xx/yy/)."""
    out = []
    for i in range(n):
        folder = server.upload / "upload" / USER / f"{i % 7:02x}" / f"{i % 5:02x}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"IMG_{i:04d}.jpg"
        path.write_bytes(os.urandom(size + i))
        out.append(path)
    return out


def storage_template_migration(server: Server) -> dict[str, str]:
    """Move every original from upload/<user>/xx/yy/ to library/<user>/2024/MM/ with
    rename(), as Immich does when the storage template is turned on. Return old -> new,
    relative to the upload location."""
    moved = {}
    for i, old in enumerate(sorted((server.upload / "upload" / USER).rglob("*.jpg"))):
        # unique names, as Immich makes them (it adds +1 to a name already taken)
        new = server.upload / "library" / USER / "2024" / f"{i % 12 + 1:02d}" / f"{i}-{old.name}"
        new.parent.mkdir(parents=True, exist_ok=True)
        os.rename(old, new)
        moved[str(old.relative_to(server.upload))] = str(new.relative_to(server.upload))
    for folder in sorted((server.upload / "upload" / USER).rglob("*"), reverse=True):
        if folder.is_dir():
            folder.rmdir()
    return moved


def sha256sum_check(disk: ExfatDisk) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sha256sum", "-c", "--quiet", "library.sha256"], cwd=disk.marker,
                          capture_output=True, text=True)


def digests(disk: ExfatDisk) -> dict[str, str]:
    return {rel: hashlib.sha256(data).hexdigest()
            for rel, data in tree(disk.marker / "library").items()}


def test_a_storage_template_migration_renames_on_the_disk_and_copies_nothing(
    make_exfat, server: Server
) -> None:
    add_originals(server, 200)
    disk = make_exfat()
    assert run(server, disk).returncode == 0
    mirror_before = digests(disk)

    moved = storage_template_migration(server)
    r = run(server, disk)

    assert r.returncode == 0, r.stdout + r.stderr
    rec = history(server)[-1]
    assert rec["status"] == "success"
    lib = library_step(rec)
    assert lib["moved"] == len(moved) >= 200
    assert lib["files"] == 0 and lib["bytes"] == 0, "a moved file was copied again"
    assert not lib.get("deleted") and not lib.get("kept")
    assert not (disk.marker / "deleted").exists(), "the keep area got moved files"
    assert tree(disk.marker / "library") == tree(server.upload)
    after = digests(disk)
    for old, new in moved.items():
        assert after[new] == mirror_before[old]
    assert sha256sum_check(disk).returncode == 0
    assert f"Renamed on the disk: {len(moved)} files Immich moved" in r.stdout
    # the next run has nothing to do
    again = run(server, disk)
    assert again.returncode == 0
    assert library_step(history(server)[-1])["files"] == 0


def test_files_of_the_same_size_and_time_are_told_apart_by_their_content(
    make_exfat, server: Server
) -> None:
    """Two originals with one size and one time: the times alone cannot pair them, so the
    new ones are read once on the server and matched by SHA-256."""
    a, b = add_originals(server, 2, size=5000)
    b.write_bytes(os.urandom(len(a.read_bytes())))
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    disk = make_exfat()
    assert run(server, disk).returncode == 0

    a2 = server.upload / "library" / USER / "y.jpg"  # b sorts first: pairing by order
    # alone would give a its content
    b2 = server.upload / "library" / USER / "x.jpg"
    a2.parent.mkdir(parents=True)
    os.rename(b, b2)  # moved in the other order on purpose
    os.rename(a, a2)
    r = run(server, disk)

    assert r.returncode == 0, r.stdout + r.stderr
    lib = library_step(history(server)[-1])
    assert lib["moved"] == 2 and lib["bytes"] == 0
    mirror = disk.marker / "library"
    assert (mirror / a2.relative_to(server.upload)).read_bytes() == a2.read_bytes()
    assert (mirror / b2.relative_to(server.upload)).read_bytes() == b2.read_bytes()
    assert sha256sum_check(disk).returncode == 0


def test_a_moved_file_whose_disk_copy_differs_is_copied_not_renamed(
    make_exfat, server: Server
) -> None:
    (photo,) = add_originals(server, 1, size=8000)
    disk = make_exfat()
    assert run(server, disk).returncode == 0
    on_disk = disk.marker / "library" / photo.relative_to(server.upload)
    with open(on_disk, "r+b") as f:  # damaged on the disk: shorter than it should be
        f.truncate(100)
    new = server.upload / "library" / USER / photo.name
    new.parent.mkdir(parents=True)
    os.rename(photo, new)

    r = run(server, disk)

    assert r.returncode == 0, r.stdout + r.stderr
    lib = library_step(history(server)[-1])
    assert not lib.get("moved")
    assert lib["files"] == 1 and lib["bytes"] == new.stat().st_size
    assert (disk.marker / "library" / new.relative_to(server.upload)).read_bytes() == \
        new.read_bytes()
    assert not on_disk.exists() or (disk.marker / "deleted").exists()


def test_a_run_stopped_half_way_through_the_renames_is_finished_by_the_next(
    make_exfat, server: Server
) -> None:
    """A run killed among its renames leaves some files at the new place, some at the
    old; nothing on the disk is lost and the next run copies nothing."""
    add_originals(server, 60)
    disk = make_exfat()
    assert run(server, disk).returncode == 0
    moved = storage_template_migration(server)
    mirror = disk.marker / "library"
    for old, new in list(moved.items())[: len(moved) // 2]:  # what the killed run did
        (mirror / new).parent.mkdir(parents=True, exist_ok=True)
        os.rename(mirror / old, mirror / new)

    r = run(server, disk)

    assert r.returncode == 0, r.stdout + r.stderr
    lib = library_step(history(server)[-1])
    assert lib["moved"] == len(moved) - len(moved) // 2
    assert lib["files"] == 0 and lib["bytes"] == 0
    assert tree(mirror) == tree(server.upload)
    assert sha256sum_check(disk).returncode == 0


def test_ransomware_is_still_refused_when_files_are_also_moved(
    make_exfat, server: Server
) -> None:
    """Same names with new content replace most of the library: refused, moves or not."""
    originals = add_originals(server, 50)
    disk = make_exfat()
    assert run(server, disk).returncode == 0
    before = tree(disk.marker / "library")
    for p in originals:
        p.write_bytes(b"ENCRYPTED" + os.urandom(p.stat().st_size))

    r = run(server, disk)

    assert r.returncode == 1
    rec = history(server)[-1]
    assert rec["status"] == "refused"
    assert "replace" in rec["problems"][0]  # type: ignore[index]
    assert tree(disk.marker / "library") == before


def test_a_real_deletion_is_still_counted_by_the_deletion_guard(
    make_exfat, server: Server
) -> None:
    """Most originals deleted and a few others added: nothing pairs, the run is refused."""
    originals = add_originals(server, 50)
    disk = make_exfat()
    assert run(server, disk).returncode == 0
    for p in originals:
        p.unlink()
    newcomer = server.upload / "library" / USER / "new.jpg"
    newcomer.parent.mkdir(parents=True)
    newcomer.write_bytes(os.urandom(3000))

    r = run(server, disk)

    assert r.returncode == 1
    assert history(server)[-1]["status"] == "refused"


# Names -------------------------------------------------------------------------------

def test_a_name_that_is_not_utf8_is_named_readably_and_every_output_works(
    make_exfat, server: Server, tmp_path: Path
) -> None:
    folder = os.fsencode(server.upload / "upload" / USER)
    bad = os.path.join(folder, b"bad-\xff\xfe.jpg")
    with open(bad, "wb") as f:
        f.write(os.urandom(2000))
    disk = make_exfat()

    for _ in range(2):  # and the next run too
        r = run(server, disk)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "backup PARTIAL" in r.stdout
        assert "bad-\\xff\\xfe.jpg" in r.stdout
        assert "Traceback" not in r.stderr

    recs = history(server)
    assert [x["status"] for x in recs] == ["partial", "partial"]
    assert any("bad-\\xff\\xfe.jpg" in p for p in recs[-1]["problems"])  # type: ignore[attr-defined]
    table = run_cli("history", config=server.config_path)
    assert table.returncode == 0 and "partial" in table.stdout
    page = tmp_path / "page.html"
    assert run_cli("history", "--html", str(page), config=server.config_path).returncode == 0
    assert "bad-\\xff\\xfe.jpg" in page.read_text(encoding="utf-8")
    assert "bad-\\xff\\xfe.jpg" in (server.state / "history.html").read_text(encoding="utf-8")
    status = run_cli("status", "--json", config=server.config_path)
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "idle"
    # everything else was backed up
    good = {k: v for k, v in tree(server.upload).items() if "bad-" not in k}
    assert tree(disk.marker / "library") == good


def test_a_move_onto_a_name_that_differs_only_in_case_keeps_the_old_file(
    make_exfat, server: Server
) -> None:
    """exFAT ignores case: renaming onto IMG.jpg would replace img.jpg, which the keep
    area must still get. Such a file is copied instead."""
    folder = server.upload / "library" / USER
    folder.mkdir(parents=True)
    (folder / "img.jpg").write_bytes(b"old photo " * 500)
    (photo,) = add_originals(server, 1, size=6000)
    disk = make_exfat()
    assert run(server, disk).returncode == 0
    (folder / "img.jpg").unlink()
    os.rename(photo, folder / "IMG.jpg")

    r = run(server, disk)

    assert r.returncode == 0, r.stdout + r.stderr
    lib = library_step(history(server)[-1])
    assert not lib.get("moved") and lib["files"] == 1
    mirror = disk.marker / "library"
    assert (mirror / "library" / USER / "IMG.jpg").read_bytes() == (folder / "IMG.jpg").read_bytes()
    (kept,) = (disk.marker / "deleted").rglob("img.jpg")
    assert kept.read_bytes() == b"old photo " * 500
