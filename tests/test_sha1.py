"""SHA-1 beside SHA-256: taken in the same read (``hashing``), kept in the hash cache
beside the SHA-256 (an older cache upgraded in place), put there by every reader (the
copy-time hasher, the manifest, verify and full modes, moves), and still there after a
run that reads nothing. The asset check compares it with Immich's checksum."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from helpers import ExfatDisk, Server, run_cli, tree
from immich_usb_backup.hashcache import CACHE_NAME, Digests, HashCache
from immich_usb_backup.hashing import BLOCK, sha256_file
from immich_usb_backup.rsync import CopyHasher
from immich_usb_backup.scan import Excludes, Problems, read_files_list, scan


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()  # noqa: S324  (Immich's checksum)


@pytest.mark.parametrize("size", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 7])
def test_one_read_gives_the_sha256_and_the_sha1_at_every_size(tmp_path: Path,
                                                                 size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    h = sha256_file(str(path), "f")
    assert h.digest == hashlib.sha256(data).hexdigest()
    assert h.sha1 == sha1(data)


def test_a_file_that_cannot_be_read_has_no_sha1(tmp_path: Path) -> None:
    h = sha256_file(str(tmp_path / "gone"), "gone")
    assert h.digest is None and h.sha1 is None and h.error


def old_cache(state: Path, rows: list[tuple[str, int, int, str]]) -> None:
    """A hash cache as the versions before SHA-1 wrote it."""
    db = sqlite3.connect(state / CACHE_NAME)
    db.executescript("""
        CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER NOT NULL,
                            mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE disks (disk TEXT PRIMARY KEY, manifest_size INTEGER,
                            manifest_mtime_ns INTEGER,
                            manifest_complete INTEGER NOT NULL DEFAULT 0,
                            rotation INTEGER NOT NULL DEFAULT 0);
    """)
    db.executemany("INSERT INTO files VALUES (?,?,?,?)", rows)
    db.execute("INSERT INTO disks (disk, manifest_size, manifest_mtime_ns, manifest_complete)"
               " VALUES ('disk-a', 10, 20, 1)")
    db.commit()
    db.close()


def test_an_older_cache_is_upgraded_in_place_and_its_sha1s_are_not_known_yet(
    tmp_path: Path,
) -> None:
    old_cache(tmp_path, [("a.jpg", 1, 2, "a" * 64), ("b.jpg", 3, 4, "b" * 64)])
    cache = HashCache(tmp_path)
    assert cache.lookup("a.jpg", 1, 2) == "a" * 64  # nothing lost
    assert cache.manifest_state("disk-a") == (10, 20, True)
    assert cache.digests_many([("a.jpg", 1, 2), ("b.jpg", 3, 5), ("c.jpg", 0, 0)]) == [
        Digests("a" * 64, None), None, None]
    cache.put("a.jpg", 1, 2, "a" * 64, "1" * 40)
    cache.close()
    again = HashCache(tmp_path)  # opened again: the new column is there, not added twice
    assert again.digests_many([("a.jpg", 1, 2)]) == [Digests("a" * 64, "1" * 40)]
    again.close()


def test_a_put_without_sha1_keeps_the_one_known_for_the_same_content(tmp_path: Path) -> None:
    cache = HashCache(tmp_path)
    cache.put_many([("p.jpg", 10, 100, "a" * 64, "1" * 40),
                    ("q.jpg", 10, 100, "b" * 64, "2" * 40)])
    cache.put_many([("p.jpg", 10, 200, "a" * 64, None),  # touched: same content
                    ("q.jpg", 11, 300, "c" * 64, None)])  # changed: its SHA-1 is not known
    cache.put("r.jpg", 1, 1, "d" * 64)  # the four-field form callers used before
    assert cache.digests_many([("p.jpg", 10, 200), ("q.jpg", 11, 300), ("r.jpg", 1, 1)]) == [
        Digests("a" * 64, "1" * 40), Digests("c" * 64, None), Digests("d" * 64, None)]
    assert cache.lookup_many([("p.jpg", 10, 200)]) == ["a" * 64]
    assert cache.sha1_for("p.jpg", "a" * 64) == "1" * 40
    assert cache.sha1_for("p.jpg", "e" * 64) is None  # other content: not its SHA-1
    assert cache.sha1_for("q.jpg", "c" * 64) is None
    cache.close()


def test_the_copy_hasher_reads_a_file_again_when_only_its_sha1_is_missing(
    tmp_path: Path,
) -> None:
    source, mirror, work = tmp_path / "src", tmp_path / "mirror", tmp_path / "work"
    for i in range(30):
        p = source / f"d{i % 3}" / f"f{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(100 + i))
    mirror.mkdir()
    work.mkdir()
    plan = scan(source, mirror, work, Excludes(()), 4096, Problems(), list_files=True)
    assert plan.files_list is not None
    records = list(read_files_list(plan.files_list))
    both, only_sha256 = records[0], records[1]
    cache = HashCache(tmp_path)
    cache.put(both.rel, both.size, both.mtime_ns, "a" * 64, "1" * 40)  # known: not again
    cache.put(only_sha256.rel, only_sha256.size, only_sha256.mtime_ns, "b" * 64)
    hasher = CopyHasher(str(source), plan.files_list, cache)
    hasher.copied = 1 << 62
    hasher.run()
    assert hasher.hashed == 29
    for rec in records:
        data = (source / rec.rel).read_bytes()
        got = cache.digests_many([(rec.rel, rec.size, rec.mtime_ns)])[0]
        want = (Digests("a" * 64, "1" * 40) if rec is both
                else Digests(hashlib.sha256(data).hexdigest(), sha1(data)))
        assert got == want
    cache.close()


# On a real exFAT disk, through the command line -----------------------------------------

def cached(server: Server) -> dict[str, tuple[str, str | None]]:
    db = sqlite3.connect(server.state / CACHE_NAME)
    try:
        return {p: (a, b) for p, a, b in db.execute("SELECT path, sha256, sha1 FROM files")}
    finally:
        db.close()


@pytest.mark.exfat
def test_a_backup_keeps_each_files_sha1_and_a_run_that_copies_nothing_reads_nothing(
    make_exfat, server: Server,
) -> None:
    disk: ExfatDisk = make_exfat()
    first = run_cli("-v", "run", str(disk.mount_point), config=server.config_path)
    assert first.returncode == 0, first.stderr
    files = tree(server.upload)
    known = cached(server)
    for rel in files:
        data = (server.upload / rel).read_bytes()
        assert known[rel] == (hashlib.sha256(data).hexdigest(), sha1(data)), rel

    again = run_cli("-v", "run", str(disk.mount_point), config=server.config_path)
    assert again.returncode == 0, again.stderr
    assert "hashing while copying" not in again.stderr  # nothing copied, nothing read
    assert cached(server) == known


@pytest.mark.exfat
def test_verify_mode_fills_in_the_sha1s_an_older_cache_lacks(make_exfat,
                                                              server: Server) -> None:
    disk: ExfatDisk = make_exfat()
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    db = sqlite3.connect(server.state / CACHE_NAME)
    db.execute("UPDATE files SET sha1 = NULL")  # as an upgraded cache has them
    db.commit()
    db.close()
    r = run_cli("run", str(disk.mount_point), "--mode", "full", config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    known = cached(server)
    for rel in tree(server.upload):
        assert known[rel][1] == sha1((server.upload / rel).read_bytes()), rel


@pytest.mark.exfat
def test_a_file_immich_moved_keeps_its_sha1_without_being_read(make_exfat,
                                                                 server: Server) -> None:
    disk: ExfatDisk = make_exfat()
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    photo = sorted((server.upload / "upload").rglob("*.jpg"))[0]
    old_rel = str(photo.relative_to(server.upload))
    want = cached(server)[old_rel]
    moved = server.upload / "library" / "anna" / "2024" / photo.name
    moved.parent.mkdir(parents=True, exist_ok=True)
    os.rename(photo, moved)  # as Immich's storage template does: size and time kept
    r = run_cli("-v", "run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "moved" in r.stderr  # renamed on the disk, not copied, not read
    assert "hashing while copying: 1 file" not in r.stderr
    assert cached(server)[str(moved.relative_to(server.upload))] == want
    got = subprocess.run(["sha1sum", str(disk.marker / "library" / moved.relative_to(
        server.upload))], capture_output=True, text=True, check=True).stdout.split()[0]
    assert got == want[1]


def test_the_generation_changes_with_every_put_and_survives_a_reopening(tmp_path: Path) -> None:
    cache = HashCache(tmp_path)
    first = cache.generation()
    cache.put_many([])  # nothing put: nothing changed
    assert cache.generation() == first
    cache.put("a.jpg", 1, 1, "a" * 64, "1" * 40)
    second = cache.generation()
    assert second != first
    cache.close()
    again = HashCache(tmp_path)
    assert again.generation() == second
    again.put_many([("b.jpg", 1, 1, "b" * 64, None)])
    assert again.generation() != second
    again.close()
