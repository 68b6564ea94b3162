"""The hashing underneath the manifest: ``sha256_file``, the hash cache's batch calls,
and rsync's ``CopyHasher`` (hashing while rsync copies), on plain folders."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from pathlib import Path

import pytest

from immich_usb_backup import rsync
from immich_usb_backup.hashcache import CHUNK, HashCache, chunked
from immich_usb_backup.hashing import BLOCK, Stopped, sha256_file
from immich_usb_backup.rsync import CopyHasher
from immich_usb_backup.scan import Excludes, Problems, read_files_list, scan


@pytest.mark.parametrize("size", [0, 1, 4095, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 7])
def test_sha256_file_is_sha256_of_the_content_at_every_size(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    h = sha256_file(str(path), "f")
    assert h.digest == hashlib.sha256(data).hexdigest()
    assert (h.size, h.mtime_ns) == (size, path.stat().st_mtime_ns)


def test_sha256_file_reports_a_file_that_grows_while_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "growing"
    path.write_bytes(b"x" * 10)
    seen = []

    def grow(n: int) -> None:  # called after the first block: the file grows meanwhile
        seen.append(n)
        with open(path, "ab") as f:
            f.write(b"more")

    h = sha256_file(str(path), "growing", on_bytes=grow)
    assert seen == [10]
    assert h.digest is None and h.error == "changed while it was read"


def test_chunked_keeps_every_item_in_order() -> None:
    assert list(chunked(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunked([], 3)) == []


def test_lookup_many_answers_as_lookup_does(tmp_path: Path) -> None:
    cache = HashCache(tmp_path)
    n = 2 * CHUNK + 17  # more than one query's worth
    cache.put_many((f"p/{i}", i, i * 10, f"{i:064x}") for i in range(0, n, 2))
    asks = []
    for i in range(n):
        size, mtime = i, i * 10
        if i % 6 == 2:
            size += 1  # known, at another size
        if i % 6 == 4:
            mtime += 1  # known, at another time
        asks.append((f"p/{i}", size, mtime))
    asks.append(("p/missing", 0, 0))
    got = cache.lookup_many(asks)
    assert got == [cache.lookup(*a) for a in asks]
    assert got[0] == f"{0:064x}" and got[1] is None and got[2] is None and got[4] is None
    assert sum(g is not None for g in got) == len(range(0, n, 6))
    cache.close()


def _planned(tmp_path: Path, files: int) -> tuple[Path, Path, int]:
    """A source of ``files`` files and its scan (onto an empty mirror): the files list."""
    source, mirror, work = tmp_path / "src", tmp_path / "mirror", tmp_path / "work"
    for i in range(files):
        p = source / f"d{i % 7}" / f"f{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(100 + i))
    mirror.mkdir()
    work.mkdir()
    plan = scan(source, mirror, work, Excludes(()), 4096, Problems(), list_files=True)
    assert plan.files_list is not None
    return source, plan.files_list, plan.copy_bytes


def test_copy_hasher_puts_every_copied_file_into_the_cache(tmp_path: Path) -> None:
    source, files_list, _ = _planned(tmp_path, 1200)
    cache = HashCache(tmp_path)
    known = next(r for r in read_files_list(files_list) if r.copied)
    cache.put(known.rel, known.size, known.mtime_ns, "a" * 64, "1" * 40)  # a second disk: not again
    hasher = CopyHasher(str(source), files_list, cache)
    hasher.copied = 1 << 62
    hasher.run()
    assert hasher.hashed == 1199
    for rec in read_files_list(files_list):
        want = hashlib.sha256((source / rec.rel).read_bytes()).hexdigest()
        got = cache.lookup(rec.rel, rec.size, rec.mtime_ns)
        assert got == ("a" * 64 if rec.rel == known.rel else want)
    cache.close()


def test_copy_hasher_keeps_within_reach_of_the_copy(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rsync, "HASH_AHEAD_BYTES", 1000)
    source, files_list, total = _planned(tmp_path, 200)
    cache = HashCache(tmp_path)
    hasher = CopyHasher(str(source), files_list, cache)
    thread = threading.Thread(target=hasher.run)
    thread.start()
    time.sleep(0.5)  # rsync has reported nothing yet: at most 1000 bytes ahead of 0
    assert thread.is_alive()
    first = [r for r in read_files_list(files_list) if r.copied]
    starts = itertools.accumulate((r.size for r in first[:-1]), initial=0)
    reach = sum(start <= 1000 for start in starts)  # files starting within reach of 0 bytes
    cache.commit()
    assert sum(cache.lookup(r.rel, r.size, r.mtime_ns) is not None for r in first) <= reach
    hasher.copied = total  # rsync reports the whole copy
    thread.join(10)
    assert not thread.is_alive()
    assert all(cache.lookup(r.rel, r.size, r.mtime_ns) is not None for r in first)
    cache.close()


def test_copy_hasher_stops_when_asked_while_it_waits(tmp_path: Path) -> None:
    source, files_list, _ = _planned(tmp_path, 50)
    cache = HashCache(tmp_path)
    hasher = CopyHasher(str(source), files_list, cache)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            hasher.run()
        except Stopped as exc:
            failed.append(exc)

    thread = threading.Thread(target=run)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rsync, "HASH_AHEAD_BYTES", 0)
        thread.start()
        time.sleep(0.3)
        hasher.stop.set()
        thread.join(5)
    assert not thread.is_alive() and len(failed) == 1
    cache.close()
