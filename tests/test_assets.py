"""The asset check on real dumps: Immich-shaped databases in a real PostgreSQL
(tests/immich_db.py), dumped with the real ``pg_dump`` and ``pg_dumpall`` through ``gzip
--rsyncable``, read back by ``assets.DumpReader``, turned into files by
``assetcheck.Classifier`` and checked against a folder of real photos
(../shared/sample-assets) whose SHA-1s are in the rows: one changed after upload, one
missing, trashed, external, offline and deleted rows, each of the path styles Immich has
written. Also: a dump far larger than the reader may hold (its peak memory measured), a
dump without an asset table, a dump cut short, values COPY must escape and names that are
not UTF-8, and the state the check keeps (``assetstore``)."""

from __future__ import annotations

import gzip
import hashlib
import os
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import SAMPLE_ASSETS, need
from immich_db import (
    USER_ID,
    Asset,
    AssetFile,
    Postgres,
    _gunzip_chunks,
    _gunzip_lines,
    add_embeddings,
    create_database,
    immich_db,
    many_assets,
    many_checksum,
    postgres,
    sha1,
)
from immich_usb_backup.assetcheck import (
    AssetCheck,
    Classifier,
    Lookup,
    Seen,
    check,
)
from immich_usb_backup.assets import (
    AssetRow,
    DumpReader,
    decode_text,
)
from immich_usb_backup.assetstore import (
    AssetStore,
    MirrorIndex,
    check_dump,
    disk_lookup,
    kept_or_checked,
)
from immich_usb_backup.hashcache import HashCache
from immich_usb_backup.hashing import sha256_file
from immich_usb_backup.scan import Excludes, Problems, read_files_list, scan

__all__ = ["postgres"]  # the fixture, imported for pytest

MEDIA = (".jpg", ".jpeg", ".heic", ".avif", ".jxl", ".png", ".webp")
PREFIXES = {"docker": "/data/", "docker before 1.136": "/usr/src/app/upload/",
            "relative (old Immich)": "upload/", "NixOS": "/var/lib/immich/"}


def sample_media() -> list[Path]:
    need(SAMPLE_ASSETS.is_dir(), f"needs the sample assets in {SAMPLE_ASSETS}")
    found = sorted(p for p in SAMPLE_ASSETS.rglob("*") if p.suffix.lower() in MEDIA)
    assert len(found) >= 12, found
    return found


def sample_sidecar() -> Path:
    return next(iter(sorted(SAMPLE_ASSETS.rglob("*.xmp"))))


def read_disk(root: Path) -> Lookup:
    """A lookup that reads each file on ``root`` (the disk's copy), as verify does."""
    return disk_lookup(root)


def run_check(dump: Path, root: Path, media_location: str | None = None,
              probe: bool = True) -> tuple[DumpReader, AssetCheck]:
    """The check of ``dump`` against the files in ``root``, read anew. ``probe=False``:
    the prefix from the rows alone, without asking the mirror."""
    reader = DumpReader()
    if not probe:
        lookup = read_disk(root)
        classifier = Classifier(media_location)
        result = check(classifier.items(reader.rows(_gunzip_lines(dump))), lookup,
                       classifier.tally)
        result.dump_problems = reader.problems
        return reader, result
    result = check_dump(dump.name, dump.stat().st_size, lambda: _gunzip_lines(dump),
                        read_disk(root), media_location=media_location, reader=reader)
    return reader, result


# A library and the database that describes it ----------------------------------------

@dataclass
class Library:
    root: Path  # the upload location as the disk holds it (library/ on the disk)
    assets: list[Asset]
    files: list[AssetFile]
    changed: str  # path inside root of the file changed after upload
    missing: str  # of the original that is gone
    missing_sidecar: str


def put(root: Path, rel: str, source: Path | bytes) -> bytes:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = source if isinstance(source, bytes) else source.read_bytes()
    path.write_bytes(data)
    return data


def make_library(root: Path, prefix: str, *, old: bool) -> Library:
    """Twelve real photos laid out as Immich does, the rows that describe them (paths
    with ``prefix``), and what went wrong since: one changed, one missing, a sidecar
    missing. Rows: 10 originals, 2 in the trash (one of whose files is gone), one
    external, one offline and (new schema) one being deleted; asset files: a thumbnail,
    a preview that is missing, two sidecars of which one is missing."""
    media = sample_media()[:12]
    assets: list[Asset] = []
    rels: list[str] = []
    for i, src in enumerate(media):
        if i == 10:
            rel = f"encoded-video/{USER_ID}/ab/cd/{i:04d}-MP.mp4"  # a motion photo's video
        elif i == 11:
            rel = f"library/admin/2024/06/{src.name}"  # the storage template is on
        else:
            rel = f"upload/{USER_ID}/{i:02x}/ab/{i:04d}{src.suffix.lower()}"
        data = put(root, rel, src)
        rels.append(rel)
        assets.append(Asset(prefix + rel, sha1(data), trashed=i in (8, 9)))
    changed, missing = rels[6], rels[7]
    with open(root / changed, "r+b") as f:  # bit rot after the upload
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    (root / missing).unlink()
    (root / rels[9]).unlink()  # in the trash, and since emptied
    put(root, "upload/offline.jpg", b"offline")
    assets += [Asset("/mnt/photos/holiday.jpg", sha1(b"external"), external=True),
               Asset(prefix + "upload/offline.jpg", sha1(b"offline"), offline=True)]
    if not old:
        assets.append(Asset(prefix + "upload/gone.jpg", sha1(b"gone"), status="deleted"))
    thumb = f"thumbs/{USER_ID}/ab/cd/{assets[0].id}-thumbnail.webp"
    put(root, thumb, b"RIFF thumbnail")
    preview = f"thumbs/{USER_ID}/ab/cd/{assets[0].id}-preview.jpeg"
    sidecar, missing_sidecar = rels[1] + ".xmp", rels[2] + ".xmp"
    put(root, sidecar, sample_sidecar())
    files = [AssetFile(assets[0].id, "thumbnail", prefix + thumb),
             AssetFile(assets[0].id, "preview", prefix + preview)]
    if old:
        assets[1].sidecar_path = prefix + sidecar
        assets[2].sidecar_path = prefix + missing_sidecar
    else:
        files += [AssetFile(assets[1].id, "sidecar", prefix + sidecar),
                  AssetFile(assets[2].id, "sidecar", prefix + missing_sidecar)]
    return Library(root, assets, files, changed, missing, missing_sidecar)


def dump_of(pg: Postgres, tmp: Path, name: str, library: Library, *, old: bool,
            cluster: bool, **kw: object) -> Path:
    immich_db(pg, name, library.assets, library.files, old=old, **kw)  # type: ignore[arg-type]
    return pg.dump(name, tmp / f"immich-db-backup-{name}.sql.gz", cluster=cluster)


def expected_line(old: bool) -> str:
    deleting = "" if old else ", 1 being deleted"
    return ("assets: 10 in the database, 9 on the disk, 1 missing, 8 matched by Immich's "
            "checksum, 1 differs; 2 in the trash (1 of them no longer on the disk); "
            f"skipped 1 external, 1 offline{deleting}; 2 of 4 asset files on the disk")


def sha1_hex(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()  # noqa: S324  (Immich's checksum)


# The check on real dumps -----------------------------------------------------------------

@pytest.mark.parametrize("style", list(PREFIXES))
@pytest.mark.parametrize(("old", "cluster"), [(False, False), (True, True)],
                         ids=["asset, pg_dump", "assets, pg_dumpall"])
def test_each_original_is_found_by_path_and_proven_by_immichs_checksum(
    postgres: Postgres, tmp_path: Path, style: str, old: bool, cluster: bool,
) -> None:
    prefix = PREFIXES[style]
    library = make_library(tmp_path / "library", prefix, old=old)
    name = f"immich_{'old' if old else 'new'}_{list(PREFIXES).index(style)}"
    dump = dump_of(postgres, tmp_path, name, library, old=old, cluster=cluster)

    reader, result = run_check(dump, library.root)

    assert reader.kind == ("cluster dump" if cluster else "database dump")
    assert reader.asset_table == ("assets" if old else "asset")
    assert reader.file_table == ("asset_files" if old else "asset_file")
    assert reader.database == (name if cluster else None)
    assert reader.complete and reader.problems == []
    assert result.tally.prefix == prefix
    assert result.line() == expected_line(old)
    original = (library.root / library.changed).read_bytes()
    recorded = next(a.checksum for a in library.assets if a.original_path.endswith(
        library.changed))
    assert recorded is not None
    assert result.problems() == [
        f"assets: library/{library.missing} is not on the disk: Immich has it in its "
        "database",
        f"assets: library/{library.changed} changed or damaged since it was uploaded: the "
        f"disk's copy has SHA-1 {sha1_hex(original)}, Immich recorded {recorded.hex()}",
        f"assets: the sidecar library/{library.missing_sidecar} is not on the disk",
    ]
    assert result.files_missing == {"preview": 1, "sidecar": 1}


def test_the_dumps_carry_restrict_lines_and_the_reader_reads_past_them(
    postgres: Postgres, tmp_path: Path,
) -> None:
    library = make_library(tmp_path / "library", "/data/", old=False)
    dump = dump_of(postgres, tmp_path, "restricted", library, old=False, cluster=True)
    text = gzip.decompress(dump.read_bytes())
    if b"\n\\restrict " not in text:  # pg_dump before 15.14, 16.10, 17.6: added by hand
        text = text.replace(b"\n\\connect ", b"\n\\restrict abc\n\\connect ")
    reader = DumpReader()
    rows = list(reader.rows([text]))
    assert sum(isinstance(r, AssetRow) for r in rows) == len(library.assets)
    assert reader.complete and reader.problems == []


def test_chunks_of_any_size_give_the_same_rows(postgres: Postgres, tmp_path: Path) -> None:
    library = make_library(tmp_path / "library", "/data/", old=False)
    dump = dump_of(postgres, tmp_path, "chunks", library, old=False, cluster=False,
                   embeddings=5)
    whole = gzip.decompress(dump.read_bytes())
    want = list(DumpReader().rows(_gunzip_lines(dump)))
    assert len(want) == len(library.assets) + len(library.files)
    for size in (1, 2, 3, 7, 4096):
        pieces = [whole[i:i + size] for i in range(0, len(whole), size)]
        assert list(DumpReader().rows(pieces)) == want, size


def test_the_media_location_setting_wins_over_what_the_rows_suggest(
    postgres: Postgres, tmp_path: Path,
) -> None:
    # every original in an album folder named "upload" (storage template {{album}}): the
    # rows share two prefixes, /data/ and /data/library/admin/
    root = tmp_path / "library"
    assets = []
    for src in sample_media()[:4]:
        data = put(root, f"library/admin/upload/{src.name}", src)
        assets.append(Asset(f"/data/library/admin/upload/{src.name}", sha1(data)))
    immich_db(postgres, "album", assets)
    dump = postgres.dump("album", tmp_path / "album.sql.gz")

    guessed = run_check(dump, root, probe=False)[1]  # from the rows alone: the longer one
    assert guessed.tally.prefix == "/data/library/admin/"
    assert guessed.missing == 4
    probed = run_check(dump, root)[1]  # asking the mirror which one holds the files
    assert probed.tally.prefix == "/data/" and probed.matched == 4
    for setting in ("/data", "/data/"):
        result = run_check(dump, root, media_location=setting, probe=False)[1]
        assert (result.tally.prefix, result.tally.prefix_set) == ("/data/", True)
        assert result.line() == ("assets: 4 in the database, all on the disk, 4 matched by "
                                 "Immich's checksum")
    wrong = run_check(dump, root, media_location="/photos")[1]
    assert wrong.line() == "assets: 0 in the database; 4 outside the upload location"
    (problem,) = wrong.problems()
    assert problem.startswith("assets: 4 assets of the upload location are not under "
                              "/photos/, so not checked (for example /data/library/admin/")
    assert "set [immich] media_location" in problem


def test_paths_with_tabs_newlines_backslashes_and_bytes_that_are_not_utf8(
    postgres: Postgres, tmp_path: Path,
) -> None:
    root = tmp_path / "library"
    names = ["tab\there.jpg", "new\nline.jpg", "back\\slash\\t.jpg", "quote'\"s.jpg",
             "ends with backslash\\", "carriage\rreturn.jpg", "bad-\udcff\udcfe.jpg",
             "Grüße 😀.jpg"]
    assets = []
    for i, name in enumerate(names):
        rel = f"upload/{USER_ID}/ab/cd/{name}"
        data = put(root, rel, f"photo {i}".encode())
        assets.append(Asset(f"/data/{rel}", sha1(data)))
    gone = f"upload/{USER_ID}/ab/cd/lost\n\x1b[31mred\udcff.jpg"
    assets.append(Asset(f"/data/{gone}", sha1(b"lost")))
    # a database that takes any bytes, as one made with SQL_ASCII does
    immich_db(postgres, "hostile", assets, encoding="SQL_ASCII")
    dump = postgres.dump("hostile", tmp_path / "hostile.sql.gz")

    reader = DumpReader()
    rows = [r for r in reader.rows(_gunzip_chunks(dump)) if isinstance(r, AssetRow)]
    assert [r.original_path for r in rows] == [a.original_path for a in assets]
    reader, result = run_check(dump, root)
    assert result.originals == 9 and result.matched == 8 and result.missing == 1
    (problem,) = result.problems()
    assert "\n" not in problem and "\x1b" not in problem
    assert problem == ("assets: library/upload/" + USER_ID + "/ab/cd/lost\\n\\x1b[31mred"
                       "\\xff.jpg is not on the disk: Immich has it in its database")
    state = tmp_path / "state"
    state.mkdir()
    store = AssetStore(state)  # kept and recalled as they were, bytes and all
    size = dump.stat().st_size
    for _ in range(2):
        kept = check_dump(dump.name, size, lambda: _gunzip_chunks(dump), read_disk(root),
                          store=store)
        assert (kept.line(), kept.problems()) == (result.line(), result.problems())
    assert store.recall(dump.name, size, None) is not None
    store.close()


def test_copy_escapes_are_decoded_as_postgresql_reads_them(postgres: Postgres) -> None:
    raw = [b"\\101\\x42\\103", b"a\\\\b", b"\\z\\N", b"\\b\\f\\n\\r\\t\\v", b"\\0011",
           b"x\\\\", b"\\xff\\376", b"\\x4g"]
    create_database(postgres, "escapes", encoding="SQL_ASCII")
    body = b"".join(b"%d\t%s\n" % (i, r) for i, r in enumerate(raw))
    postgres.psql(b"CREATE TABLE t (n int, v text);\nCOPY t (n, v) FROM stdin;\n" + body
                  + b"\\.\n", db="escapes")
    got = postgres.run("psql", "-X", "-At", "--dbname=escapes", "-c",
                       "SELECT encode(convert_to(v, 'SQL_ASCII'), 'hex') FROM t ORDER BY n")
    want = [bytes.fromhex(h) for h in got.decode().split()]
    assert [os.fsencode(decode_text(r) or "") for r in raw] == want
    assert decode_text(b"\\N") is None


def test_a_dump_without_an_asset_table_is_a_named_problem(postgres: Postgres,
                                                          tmp_path: Path) -> None:
    create_database(postgres, "future")
    postgres.psql('CREATE TABLE media_item (id uuid PRIMARY KEY, "originalPath" text);'
                  "INSERT INTO media_item VALUES (gen_random_uuid(), '/data/upload/x.jpg');",
                  db="future")
    dump = postgres.dump("future", tmp_path / "future.sql.gz")
    reader, result = run_check(dump, tmp_path)
    assert not reader.found and reader.asset_rows == 0
    assert not result.checked
    assert result.line() == ("assets: not checked (the dump holds no asset table (asset or "
                             "assets): it may come from an Immich version whose tables this "
                             "version does not know; no asset could be checked)")
    assert result.problems() == [f"assets: {reader.problems[0]}"]


def test_an_asset_table_without_checksums_is_a_named_problem(postgres: Postgres,
                                                             tmp_path: Path) -> None:
    create_database(postgres, "nochecksum")
    postgres.psql('CREATE TABLE asset (id uuid PRIMARY KEY, "originalPath" text);',
                  db="nochecksum")
    dump = postgres.dump("nochecksum", tmp_path / "nochecksum.sql.gz")
    reader, result = run_check(dump, tmp_path)
    assert not reader.found and not result.checked
    assert reader.problems == ["the dump's asset table has no column checksum: no asset "
                               "could be checked"]


def test_a_dump_cut_short_in_the_asset_rows_says_so(postgres: Postgres,
                                                    tmp_path: Path) -> None:
    library = make_library(tmp_path / "library", "/data/", old=False)
    dump = dump_of(postgres, tmp_path, "cut", library, old=False, cluster=False)
    text = gzip.decompress(dump.read_bytes())
    start = text.index(library.assets[3].id.encode())  # of the fourth row
    for cut in (start, start + 60):  # before it, inside it
        reader = DumpReader()
        rows = list(reader.rows([text[:cut]]))
        assert len(rows) == 3 and reader.cut_short == "asset" and not reader.complete
    assert reader.problems == ["the dump ends inside the rows of asset: it is cut short, "
                               "the assets after that point were not checked"]


def test_asset_tables_of_a_second_database_are_named_not_mixed_in(
    postgres: Postgres, tmp_path: Path,
) -> None:
    one = make_library(tmp_path / "one", "/data/", old=False)
    two = make_library(tmp_path / "two", "/data/", old=False)
    immich_db(postgres, "a_first", one.assets, one.files)
    immich_db(postgres, "b_second", two.assets, two.files)
    dump = tmp_path / "both.sql.gz"
    postgres.dump("a_first", dump, cluster=True)  # a_first only: made again with both
    others = [d for d in postgres.psql("SELECT datname FROM pg_database WHERE NOT "
                                       "datistemplate").split()
              if d not in ("a_first", "b_second", "postgres")]
    text = postgres.run("pg_dumpall", "--clean", "--if-exists",
                        *(f"--exclude-database={d}" for d in others))
    dump.write_bytes(gzip.compress(text))
    reader = DumpReader()
    rows = list(reader.rows(_gunzip_lines(dump)))
    assert reader.database == "a_first"
    assert {r.id for r in rows if isinstance(r, AssetRow)} == {a.id for a in one.assets}
    assert reader.problems == ["the dump holds asset tables of more than one database: "
                               "a_first was checked, not b_second"]


# Streaming -----------------------------------------------------------------------------------

def test_a_dump_far_larger_than_the_reader_may_hold_is_read_in_bounded_memory(
    postgres: Postgres, tmp_path: Path,
) -> None:
    create_database(postgres, "big")
    postgres.psql(BIG_SCHEMA, db="big")
    rows = 60_000
    many_assets(postgres, "big", rows)
    add_embeddings(postgres, "big", 20_000)
    dump = postgres.dump("big", tmp_path / "big.sql.gz", fast=True)
    size = [0]

    def counted(chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            size[0] += len(chunk)
            yield chunk

    tracemalloc.start()
    try:
        reader = DumpReader()
        classifier = Classifier()
        count = {"rows": 0}

        def lookup(rels: Sequence[str]) -> list[Seen]:
            count["rows"] += len(rels)
            return [Seen(True, None)] * len(rels)

        rows_read = reader.rows(counted(_gunzip_chunks(dump, 1 << 16)))
        result = check(classifier.items(rows_read), lookup, classifier.tally)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size[0] > 100 * 2**20  # the dump, unzipped: 100 MiB and more
    assert reader.asset_rows == rows and result.originals == rows == count["rows"]
    assert result.not_read == rows and reader.problems == []
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # while the rows alone are more:
    first = next(r for r in DumpReader().rows(_gunzip_chunks(dump))
                 if isinstance(r, AssetRow))
    assert first.checksum == many_checksum(1)
    assert first.original_path == f"/data/upload/{USER_ID}/{first.checksum.hex()[:2]}/" \
                                  f"{first.checksum.hex()[2:4]}/1.jpg"


BIG_SCHEMA = f"""
CREATE TABLE "user" (id uuid PRIMARY KEY);
INSERT INTO "user" VALUES ('{USER_ID}');
CREATE TABLE asset (id uuid PRIMARY KEY, "ownerId" uuid NOT NULL REFERENCES "user"(id),
                    "originalPath" text NOT NULL, checksum bytea NOT NULL,
                    "deletedAt" timestamptz, "libraryId" uuid,
                    "isOffline" boolean NOT NULL DEFAULT false);
CREATE TABLE smart_search ("assetId" uuid PRIMARY KEY, embedding real[] NOT NULL);
"""  # noqa: S608  (test data from constants)


# What the check keeps ------------------------------------------------------------------------

def test_a_dump_is_read_once_and_its_items_recalled_as_they_were(
    postgres: Postgres, tmp_path: Path,
) -> None:
    library = make_library(tmp_path / "library", "/data/", old=False)
    dump = dump_of(postgres, tmp_path, "remembered", library, old=False, cluster=False)
    state = tmp_path / "state"
    state.mkdir()
    store = AssetStore(state)
    size = dump.stat().st_size
    assert store.recall(dump.name, size, None) is None

    reads = []

    def chunks() -> Iterator[bytes]:
        reads.append(1)
        return _gunzip_chunks(dump)

    first = check_dump(dump.name, size, chunks, read_disk(library.root), store=store)
    recalled = store.recall(dump.name, size, None)
    assert recalled is not None
    assert recalled.tally == first.tally and recalled.problems == [] and recalled.found
    again = check_dump(dump.name, size, chunks, read_disk(library.root), store=store)
    assert reads == [1]  # read once
    assert again.line() == first.line() == expected_line(False)
    assert again.problems() == first.problems()
    sampled = check_dump(dump.name, size, chunks, read_disk(library.root), store=store,
                         sample=3)
    assert sampled.originals + sampled.trashed == 3 and sampled.sampled_from == 10
    assert store.recall(dump.name, size + 1, None) is None  # another dump of that name
    assert store.recall(dump.name, size, "/data") is None  # read with another setting
    store.close()


def test_in_a_backup_the_check_joins_the_stored_dump_with_the_files_list_and_the_cache(
    postgres: Postgres, tmp_path: Path,
) -> None:
    library = make_library(tmp_path / "library", "/data/", old=False)
    dump = dump_of(postgres, tmp_path, "joined", library, old=False, cluster=False)
    mirror, work, state = tmp_path / "mirror", tmp_path / "work", tmp_path / "state"
    for folder in (mirror, work, state):
        folder.mkdir()
    plan = scan(library.root, mirror, work, Excludes(()), 4096, Problems(), list_files=True)
    assert plan.files_list is not None
    cache = HashCache(state)  # as the copy-time hasher leaves it: the server's digests
    for rec in read_files_list(plan.files_list):
        h = sha256_file(str(library.root / rec.rel), rec.rel)
        assert h.digest is not None
        cache.put(rec.rel, h.size, h.mtime_ns, h.digest, h.sha1)
    cache.commit()
    store = AssetStore(state)
    index = MirrorIndex(work / "assets-index.sqlite", state, source=library.root)
    index.add_files_list(plan.files_list)
    try:
        result = check_dump(dump.name, dump.stat().st_size, lambda: _gunzip_chunks(dump),
                            index, store=store)
        again = check_dump(dump.name, dump.stat().st_size, lambda: iter(()), index,
                           store=store)  # recalled: the dump is not read again
    finally:
        index.close()
        store.close()
        cache.close()
    assert result.line() == again.line() == expected_line(False)
    problems = result.problems()
    assert problems == again.problems()
    assert problems[0] == (f"assets: library/{library.missing} is missing from the server "
                           "and from the disk: Immich has it in its database")
    assert "the server's file (and the disk's copy of it) has SHA-1" in problems[1]
    assert AssetCheck.from_state(result.state()).problems() == problems


def test_a_run_that_changed_nothing_gets_the_kept_outcome_without_a_look(
    postgres: Postgres, tmp_path: Path,
) -> None:
    library = make_library(tmp_path / "library", "/data/", old=False)
    dump = dump_of(postgres, tmp_path, "memo", library, old=False, cluster=False)
    store = AssetStore(tmp_path)
    size = dump.stat().st_size
    asked: list[int] = []
    disk = read_disk(library.root)

    def counting(rels: Sequence[str]) -> list[Seen]:
        asked.append(len(rels))
        return list(disk(rels))

    def check() -> AssetCheck:
        return check_dump(dump.name, size, lambda: _gunzip_chunks(dump), counting,
                          store=store)

    first = kept_or_checked(store, "disk-a", "key-1", check)
    looked = sum(asked)
    assert looked >= len(library.assets) - 3  # every local row, and the asset files
    again = kept_or_checked(store, "disk-a", "key-1", check)
    assert sum(asked) == looked  # not looked up again
    assert (again.line(), again.problems()) == (first.line(), first.problems())
    kept_or_checked(store, "disk-a", "key-2", check)  # something changed: checked again
    assert sum(asked) > looked
    store.close()
