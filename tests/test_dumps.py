"""dumps.py: Immich's dump names, their kind, and reading a .sql.gz to its checked end."""

from __future__ import annotations

import gzip
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from immich_usb_backup.dumps import (
    Stream,
    check,
    disk_name,
    dump_time,
    dumps_to_prune,
    immich_version,
    kind,
    newest_dump,
)


def new_style(when: datetime) -> str:
    return f"immich-db-backup-{when:%Y%m%dT%H%M%S}-v1.130.0-pg14.17.sql.gz"


def epoch_ms_style(when: datetime) -> str:
    return f"immich-db-backup-{round(when.timestamp() * 1000)}.sql.gz"


# dump_time / newest_dump -------------------------------------------------------------


def test_dump_time_reads_the_new_style_name_as_local_time() -> None:
    t = dump_time("immich-db-backup-20250102T020000-v1.130.0-pg14.17.sql.gz")
    assert t == datetime(2025, 1, 2, 2, 0, 0).astimezone()
    assert t is not None
    assert t.tzinfo is not None


def test_dump_time_reads_the_epoch_milliseconds_name_as_utc() -> None:
    t = dump_time("immich-db-backup-1735783200000.sql.gz")
    assert t == datetime(2025, 1, 2, 2, 0, 0, tzinfo=UTC)


def test_dump_time_accepts_a_new_style_name_without_versions() -> None:
    t = dump_time("immich-db-backup-20250102T020000.sql.gz")
    assert t == datetime(2025, 1, 2, 2, 0, 0).astimezone()


@pytest.mark.parametrize(
    "name",
    [
        "immich-db-backup-20250102T020000-v1.130.0-pg14.17.sql.gz.tmp",
        "immich-db-backup-1735783200000.sql.gz.tmp",
        "restore-point-20250102T020000-v1.130.0-pg14.17.sql.gz",
        "uploaded-immich-db-backup-20250102T020000-v1.130.0-pg14.17.sql.gz",
        "uploaded-20250102T020000.sql.gz",
        "immich-db-backup-20251340T020000-v1.130.0-pg14.17.sql.gz",  # month 13
        "immich-db-backup-latest.sql.gz",
        "immich-db-backup-20250102T020000-v1.130.0-pg14.17.sql",
        "dump.sql.gz",
        ".immich",
        "notes.txt",
    ],
)
def test_names_that_are_not_nightly_dumps_have_no_time(name: str) -> None:
    assert dump_time(name) is None


def test_newest_dump_is_chosen_by_the_time_in_the_name_not_the_order() -> None:
    older = new_style(datetime(2025, 1, 1, 2))
    newest = new_style(datetime(2025, 1, 3, 2))
    middle = new_style(datetime(2025, 1, 2, 2))
    for names in ([older, newest, middle], [newest, middle, older], [middle, older, newest]):
        found = newest_dump(names)
        assert found is not None
        assert found[0] == newest
        assert found[1] == datetime(2025, 1, 3, 2).astimezone()


def test_newest_dump_compares_across_both_naming_styles() -> None:
    old_style_newer = epoch_ms_style(datetime(2025, 1, 5, 2, tzinfo=UTC))
    new_style_older = new_style(datetime(2025, 1, 2, 2))
    found = newest_dump([old_style_newer, new_style_older])
    assert found is not None
    assert found[0] == old_style_newer

    new_style_newer = new_style(datetime(2025, 1, 9, 2))
    found = newest_dump([old_style_newer, new_style_newer, new_style_older])
    assert found is not None
    assert found[0] == new_style_newer


def test_newest_dump_skips_temporary_restore_point_uploaded_and_other_files() -> None:
    real = new_style(datetime(2025, 1, 2, 2))
    names = [
        new_style(datetime(2025, 1, 9, 2)) + ".tmp",
        "restore-point-20250110T020000-v1.130.0-pg14.17.sql.gz",
        "uploaded-immich-db-backup-20250111T020000-v1.130.0-pg14.17.sql.gz",
        ".immich",
        "README.txt",
        real,
    ]
    found = newest_dump(names)
    assert found is not None
    assert found[0] == real


def test_newest_dump_is_none_without_any_dump() -> None:
    assert newest_dump([]) is None
    assert newest_dump([".immich", "x.sql.gz.tmp"]) is None


# pruning ----------------------------------------------------------------------------


def test_dumps_to_prune_keeps_the_n_newest_by_name_time() -> None:
    names = [new_style(datetime(2025, 1, day, 2)) for day in (4, 1, 5, 2, 3)]
    pruned = dumps_to_prune(names, 3)
    assert sorted(pruned) == sorted(
        [new_style(datetime(2025, 1, 1, 2)), new_style(datetime(2025, 1, 2, 2))]
    )


def test_dumps_to_prune_never_touches_files_that_are_not_dumps() -> None:
    others = ["notes.txt", new_style(datetime(2024, 1, 1, 2)) + ".tmp",
              "restore-point-20200101T000000-v1-pg1.sql.gz"]
    names = [*others, new_style(datetime(2025, 1, 1, 2)), new_style(datetime(2025, 1, 2, 2))]
    assert dumps_to_prune(names, 1) == [new_style(datetime(2025, 1, 1, 2))]


def test_dumps_to_prune_with_fewer_dumps_than_keep_prunes_nothing() -> None:
    assert dumps_to_prune([new_style(datetime(2025, 1, 1, 2))], 3) == []
    assert dumps_to_prune([], 3) == []


def test_dumps_to_prune_mixes_naming_styles_by_time() -> None:
    old_style_newest = epoch_ms_style(datetime(2025, 1, 10, 2, tzinfo=UTC))
    oldest = new_style(datetime(2025, 1, 1, 2))
    assert dumps_to_prune([old_style_newest, oldest], 1) == [oldest]


# reading a dump -----------------------------------------------------------------------

SQL = (b"--\n-- PostgreSQL database dump\n--\n\\restrict abc\nCREATE TABLE t (x int);\n"
       + b"INSERT INTO t VALUES (1);\n" * 50_000
       + b"--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict abc\n")


def test_a_whole_dump_in_several_gzip_members_reads_as_one_stream(tmp_path: Path) -> None:
    dump = tmp_path / "d.sql.gz"
    half = len(SQL) // 2
    dump.write_bytes(gzip.compress(SQL[:half]) + gzip.compress(SQL[half:]))
    seen: list[int] = []
    stream = Stream(dump, seen.append)
    assert b"".join(stream) == SQL
    assert stream.problem is None and not stream.stopped_early
    assert sum(seen) == dump.stat().st_size
    assert check(dump) is None
    assert kind(dump) == ("database dump", None)


def test_a_cut_short_or_unfinished_or_broken_dump_says_what_is_wrong(tmp_path: Path) -> None:
    whole = gzip.compress(SQL)
    (tmp_path / "cut.sql.gz").write_bytes(whole[: len(whole) // 2])
    assert "cut short" in (check(tmp_path / "cut.sql.gz") or "")
    (tmp_path / "unfinished.sql.gz").write_bytes(gzip.compress(SQL[:-60]))
    assert "dump complete" in (check(tmp_path / "unfinished.sql.gz") or "")
    (tmp_path / "noise.sql.gz").write_bytes(os.urandom(5000))
    stream = Stream(tmp_path / "noise.sql.gz")
    assert list(stream) == [] and stream.stopped_early
    assert "not a valid gzip stream" in (stream.problem or "")
    assert kind(tmp_path / "noise.sql.gz")[0] is None


def test_a_stop_between_blocks_ends_the_reading(tmp_path: Path) -> None:
    dump = tmp_path / "d.sql.gz"
    dump.write_bytes(gzip.compress(os.urandom(3 << 20) + SQL, compresslevel=1))

    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    with pytest.raises(Stop):
        check(dump, stop=stop)


def test_names_on_the_disk_and_the_version_in_a_name() -> None:
    taken = datetime(2025, 1, 2, 2, 0).astimezone()
    assert disk_name("immich.sql.gz", taken) == "immich-db-backup-20250102T020000-immich.sql.gz"
    own = "immich-db-backup-20250102T020000-v1.130.0-pg14.17.sql.gz"
    assert disk_name(own, taken) == own and immich_version(own) == "1.130.0"
    assert immich_version("immich-db-backup-1735783200000.sql.gz") is None
