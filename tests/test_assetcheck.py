"""The asset check's parts on plain data: COPY's fields and bytea, the media location,
classifying rows, the check's counts and words, sampling, and what it keeps between runs
(``assetstore``: the dumps it read, the mirror's index joined with the hash cache).
The same parts on real dumps: tests/test_assets.py."""

from __future__ import annotations

import random
import sqlite3
import threading
from pathlib import Path

from immich_usb_backup.assetcheck import (
    AssetCheck,
    Classifier,
    Derived,
    Original,
    Sample,
    Seen,
    Tally,
    check,
    check_pairs,
    find_prefix,
)
from immich_usb_backup.assets import (
    AssetRow,
    DumpReader,
    FileRow,
    Row,
    decode_bytea,
    split_fields,
)
from immich_usb_backup.assetstore import (
    AssetStore,
    MirrorIndex,
    excluded_by,
    mirror_fingerprint,
)
from immich_usb_backup.hashcache import HashCache
from immich_usb_backup.scan import Excludes, files_record, read_files_list


def put(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_fields_split_at_each_tab_that_is_not_escaped() -> None:
    assert split_fields(b"a\tb\\tc\td") == [b"a", b"b\\tc", b"d"]
    assert split_fields(b"a\\\\\tb") == [b"a\\\\", b"b"]  # an escaped backslash, then a tab
    assert split_fields(b"a\\\tb\tc") == [b"a\\\tb", b"c"]  # a tab taken as data


def test_bytea_in_hex_and_in_escape_format() -> None:
    digest = bytes(range(20))
    assert decode_bytea(b"\\\\x" + digest.hex().encode()) == digest
    assert decode_bytea(b"\\\\001\\\\002ab\\\\\\\\") == b"\x01\x02ab\\"
    assert decode_bytea(b"\\\\xzz") is None


def test_the_prefix_is_the_one_most_paths_share_then_the_longest() -> None:
    assert find_prefix(["/data/upload/u/x.jpg", "/data/library/a/x.jpg"]) == "/data/"
    assert find_prefix(["upload/upload/u/x.jpg", "upload/library/a/x.jpg"]) == "upload/"
    assert find_prefix(["upload/u/ab/x.jpg"]) == ""
    assert find_prefix(["/srv/library/immich/upload/u/x.jpg",
                        "/srv/library/immich/library/a/x.jpg"]) == "/srv/library/immich/"
    assert find_prefix(["/mnt/photos/x.jpg", "x.jpg"]) is None
    paths = [f"/var/lib/immich/upload/u/{i}.jpg" for i in range(9)] + ["/old/upload/x.jpg"]
    assert find_prefix(paths) == "/var/lib/immich/"


def test_a_path_that_climbs_out_of_the_upload_location_is_outside_it() -> None:
    rows: list[Row] = [AssetRow("1", p, bytes(20), False, False, False, None, None)
                       for p in ("/data/upload/ok.jpg", "/data/upload/../../etc/passwd",
                                 "/data/upload//x.jpg", "/data/", "/data/./upload/y.jpg")]
    classifier = Classifier("/data")
    items = list(classifier.items(rows))
    assert items == [Original("upload/ok.jpg", "00" * 20)]
    assert classifier.tally.outside == 4


def test_a_sample_keeps_at_most_its_size_each_original_equally_likely() -> None:
    items: list[Original | Derived] = [Original(f"upload/{i}.jpg", "aa" * 20)
                                       for i in range(100)]
    items.append(Derived("thumbs/x.webp", "thumbnail"))
    hits = {i: 0 for i in range(100)}
    rng = random.Random(7)  # noqa: S311  (a sample, not a secret)
    for _ in range(400):
        sample = Sample(10, rng)
        sample.take(items)
        assert len(sample.kept) == 10 and sample.seen == 100
        for item in sample.kept:
            hits[int(item.rel.split("/")[1].split(".")[0])] += 1
    assert min(hits.values()) > 10 and max(hits.values()) < 80  # about 40 each
    result = check(sample.kept, lambda rels: [Seen(True, None)] * len(rels))
    result.sampled_from = sample.seen
    assert result.line() == ("assets: 10 of 100 in the database checked (a sample), all on "
                             "the disk, 0 matched by Immich's checksum, 10 not read yet")


def test_the_line_names_each_count_in_the_right_number() -> None:
    one = AssetCheck(originals=1, on_disk=1, differ=1)
    assert one.line() == ("assets: 1 in the database, all on the disk, 0 matched by "
                          "Immich's checksum, 1 differs")
    result = check([Derived("thumbs/a.webp", "thumbnail")], lambda r: [Seen(True)])
    assert result.line() == "assets: 0 in the database; 1 asset file on the disk"


def test_an_excluded_path_is_counted_not_missing() -> None:
    items = [Original("encoded-video/u/a-MP.mp4", "aa" * 20),
             Original("upload/u/b.jpg", "bb" * 20),
             Derived("thumbs/u/c.webp", "thumbnail")]
    result = check(items, lambda rels: [Seen(False)] * len(rels),
                   excluded=lambda rel: rel.startswith(("encoded-video/", "thumbs/")))
    assert (result.excluded, result.missing, result.files_missing) == (1, 1, {})
    assert result.line() == ("assets: 2 in the database, 0 on the disk, 1 missing, 1 "
                             "excluded from the backup, 0 matched by Immich's checksum; 0 of "
                             "1 asset file on the disk")


def test_beyond_the_first_few_problems_of_a_kind_are_counted() -> None:
    items = [Original(f"upload/{i}.jpg", "aa" * 20) for i in range(30)]
    result = check(items, lambda rels: [Seen(False, on_server=False)] * len(rels), keep=3)
    problems = result.problems()
    assert problems == [
        *(f"assets: library/upload/{i}.jpg is missing from the server and from the disk: "
          "Immich has it in its database" for i in range(3)),
        "assets: ... and 27 more like the above",
    ]


def test_the_servers_copy_or_the_disks_is_named_when_a_checksum_differs() -> None:
    items = [Original("upload/a.jpg", "aa" * 20, trashed=True)]
    server = check(items, lambda r: [Seen(True, "bb" * 20, "server")])
    disk = check(items, lambda r: [Seen(True, "bb" * 20, "disk")])
    assert server.problems() == [
        f"assets: library/upload/a.jpg (in the trash) changed or damaged since it was "
        f"uploaded: the server's file (and the disk's copy of it) has SHA-1 {'bb' * 20}, "
        f"Immich recorded {'aa' * 20}"]
    assert "the disk's copy has SHA-1" in disk.problems()[0]


# What the check keeps ------------------------------------------------------------------------

def test_a_reading_that_stopped_half_way_is_not_recalled(tmp_path: Path) -> None:
    store = AssetStore(tmp_path)
    stop = threading.Event()
    items = (Original(f"upload/{i}.jpg", None) for i in range(5000))
    for n, _ in enumerate(store.remember("d.sql.gz", 1, None, items,
                                         lambda: (Classifier().tally, [], True), stop)):
        if n == 2500:
            stop.set()
    assert store.recall("d.sql.gz", 1, None) is None
    store.close()


def test_only_the_newest_dumps_are_remembered(tmp_path: Path) -> None:
    store = AssetStore(tmp_path)
    for n in range(5):
        for _ in store.remember(f"d{n}", 1, None, [Original("upload/a.jpg", None)],
                                lambda: (Classifier().tally, [], True)):
            pass
    assert [store.recall(f"d{n}", 1, None) is not None for n in range(5)] == [
        False, False, True, True, True]
    store.close()


def test_a_damaged_store_is_started_again(tmp_path: Path) -> None:
    (tmp_path / "assets.sqlite").write_bytes(b"not a database" * 100)
    store = AssetStore(tmp_path)
    assert store.recall("d", 1, None) is None
    store.close()


def test_the_mirror_index_answers_from_the_files_list_and_the_hash_cache(
    tmp_path: Path,
) -> None:
    source, state = tmp_path / "source", tmp_path / "state"
    state.mkdir()
    put(source, "upload/on-server-only.jpg", b"x")
    cache = HashCache(state)
    cache.put("upload/a.jpg", 10, 100, "a" * 64, "1" * 40)
    cache.put("upload/b.jpg", 20, 200, "b" * 64)  # from before SHA-1 was kept
    cache.put("upload/c.jpg", 30, 300, "c" * 64, "3" * 40)
    cache.commit()
    index = MirrorIndex(tmp_path / "work-index.sqlite", state, source)
    index.add([("upload/a.jpg", 10, 100), ("upload/b.jpg", 20, 200),
               ("upload/c.jpg", 31, 300)])  # c changed since it was hashed
    assert index.lookup(["upload/a.jpg", "upload/b.jpg", "upload/c.jpg",
                         "upload/on-server-only.jpg", "upload/nowhere.jpg"]) == [
        Seen(True, "1" * 40), Seen(True, None), Seen(True, None),
        Seen(False, on_server=True), Seen(False, on_server=False)]
    index.close()
    cache.close()
    assert not (tmp_path / "work-index.sqlite").exists()


def test_the_mirror_index_works_without_a_hash_cache(tmp_path: Path) -> None:
    index = MirrorIndex(tmp_path / "i.sqlite", tmp_path)
    index.add([("upload/a.jpg", 1, 1)])
    assert index.lookup(["upload/a.jpg", "upload/b.jpg"]) == [Seen(True, None), Seen(False)]
    index.close()


def test_file_rows_before_asset_rows_find_the_same_prefix() -> None:
    rows: list[Row] = [FileRow("1", "thumbnail", "/usr/src/app/upload/thumbs/u/a.webp"),
                       AssetRow("1", "/usr/src/app/upload/upload/u/a.jpg", bytes(20), False,
                                False, False, None, None)]
    classifier = Classifier()
    assert list(classifier.items(rows)) == [Derived("thumbs/u/a.webp", "thumbnail"),
                                            Original("upload/u/a.jpg", "00" * 20)]
    assert classifier.tally.prefix == "/usr/src/app/upload/"


def test_the_files_list_is_read_as_the_scan_wrote_it(tmp_path: Path) -> None:
    names = ["upload/a.jpg", "upload/tab\there.jpg", "upload/bad-\udcff.jpg",
             *(f"thumbs/{i:06d}-thumbnail.webp" for i in range(30_000))]  # blocks of 1 MiB
    files_list = tmp_path / "files"
    with open(files_list, "wb") as out:
        for i, rel in enumerate(names):
            out.write(files_record(b"C" if i % 2 else b"K", i, 10**18 + i, rel))
    index = MirrorIndex(tmp_path / "index.sqlite", tmp_path)
    index.add_files_list(files_list)
    records = list(read_files_list(files_list))
    assert [r.rel for r in records] == names
    # a name that is not UTF-8 cannot be on exFAT: left out, never matched
    assert [s.present for s in index.lookup(names[:5])] == [True, True, False, True, True]
    db = sqlite3.connect(tmp_path / "index.sqlite")
    assert sorted(db.execute("SELECT path, size, mtime_ns FROM f")) == sorted(
        (r.rel, r.size, r.mtime_ns) for r in records if r.rel != names[2])
    db.close()
    index.close()


def test_a_kept_outcome_comes_back_only_under_its_key(tmp_path: Path) -> None:
    result = check([Original("upload/a.jpg", "aa" * 20), Derived("thumbs/b.webp", "preview")],
                   lambda rels: [Seen(False, on_server=True)] * len(rels), Tally(rows=3,
                                                                               external=1))
    store = AssetStore(tmp_path)
    store.keep_result("disk-a", "key-1", result)
    assert store.result("disk-a", "key-2") is None
    assert store.result("disk-b", "key-1") is None
    back = store.result("disk-a", "key-1")
    assert back is not None
    assert back.line() == result.line() and back.problems() == result.problems()
    assert back.as_dict() == result.as_dict()
    store.close()


def test_the_mirrors_fingerprint_follows_the_files_list(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(files_record(b"K", 1, 2, "upload/x.jpg"))
    b.write_bytes(files_record(b"K", 1, 3, "upload/x.jpg"))
    assert mirror_fingerprint(a) == mirror_fingerprint(a) != mirror_fingerprint(b)


def test_the_check_counted_by_sqlite_is_the_check_counted_one_by_one(tmp_path: Path) -> None:
    rng = random.Random(3)  # noqa: S311  (test data)
    source = tmp_path / "source"
    items: list[Original | Derived] = []
    cache = HashCache(tmp_path)
    index = MirrorIndex(tmp_path / "index.sqlite", tmp_path, source=source)
    files = []
    for i in range(3000):
        rel = f"{rng.choice(['upload', 'thumbs', 'encoded-video'])}/u/{i:05d}.jpg"
        want = rng.choice([None, f"{i:040x}", f"{i:040x}", f"{i:040x}"])
        if rng.random() < 0.3:
            items.append(Derived(rel, rng.choice(["thumbnail", "preview", "sidecar"])))
        else:
            items.append(Original(rel, want, trashed=rng.random() < 0.1))
        where = rng.random()
        if where < 0.85:
            files.append((rel, i, i))
            known = rng.random()
            if known < 0.6:
                cache.put(rel, i, i, "a" * 64, f"{i:040x}")  # agrees
            elif known < 0.7:
                cache.put(rel, i, i, "a" * 64, f"{i + 1:040x}")  # differs
            elif known < 0.8:
                cache.put(rel, i, i + 1, "a" * 64, f"{i:040x}")  # at another time: unread
        elif where < 0.9:
            put(source, rel, b"on the server only")
    cache.commit()
    index.add(files)
    store = AssetStore(tmp_path)
    for _ in store.remember("d", 1, None, items, lambda: (Tally(), [], True)):
        pass
    recalled = store.recall("d", 1, None)
    assert recalled is not None

    def excluded(rel: str) -> bool:
        return rel.startswith("encoded-video/")

    one_by_one = check_pairs(index.pairs(store, recalled.dump), Tally(), excluded=excluded,
                             keep=5)
    by_sqlite = index.check_stored(store, recalled.dump, Tally(), excluded=excluded, keep=5)
    assert by_sqlite.state() == one_by_one.state()
    assert one_by_one.missing and one_by_one.differ and one_by_one.not_read
    assert one_by_one.excluded and one_by_one.trashed_missing and one_by_one.no_checksum
    store.close()
    index.close()
    cache.close()


def test_a_share_is_drawn_as_the_items_pass_and_never_empty() -> None:
    items: list[Original | Derived] = [Original(f"upload/{i}.jpg", "aa" * 20)
                                       for i in range(10_000)]
    rng = random.Random(11)  # noqa: S311  (a sample, not a secret)
    sample = Sample(rng=rng)
    drawn = list(sample.share(iter(items), 5))
    assert 400 < len(drawn) < 600 and sample.seen == 10_000
    assert len(drawn) == len({d.rel for d in drawn})
    tiny = Sample(rng=rng)
    assert len(list(tiny.share(items[:3], 0.001))) == 1  # at least one
    assert list(Sample(rng=rng).share([Derived("thumbs/a.webp", "preview")], 50)) == []


def test_rows_that_cannot_be_read_are_counted_and_shown_escaped() -> None:
    text = (b"COPY public.asset (id, \"originalPath\", checksum) FROM stdin;\n"
            b"1\t/data/upload/a.jpg\t\\\\x" + b"00" * 20 + b"\n"
            b"2\ttoo\tmany\tfields\x1b\n"
            b"3\t/data/upload/b.jpg\n"
            b"\\.\n")
    reader = DumpReader()
    rows = list(reader.rows([text]))
    assert [r.original_path for r in rows if isinstance(r, AssetRow)] == [
        "/data/upload/a.jpg"]
    assert reader.problems == [
        "2 rows of the asset tables could not be read (for example: asset row 2: "
        "2\\ttoo\\tmany\\tfields\\x1b; asset row 3: 3\\t/data/upload/b.jpg)"]


def test_a_path_is_excluded_by_its_own_name_or_by_a_folder_above_it() -> None:
    excluded = excluded_by(Excludes(("/thumbs", "*.tmp", "upload/skip")))
    assert excluded("thumbs/u/ab/x-thumbnail.webp")
    assert excluded("upload/u/a.tmp") and excluded("upload/skip/x.jpg")
    assert not excluded("upload/u/thumbs.jpg") and not excluded("library/thumbs2/x.jpg")
