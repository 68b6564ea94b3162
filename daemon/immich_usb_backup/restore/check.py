"""The asset check against the restored server: every asset row of the restored
database has its file in the upload location, with Immich's SHA-1.

The rows come from the database itself when psql reaches it (``COPY (SELECT ...) TO
STDOUT`` of the asset tables, read back into files of the work folder and given to
``assets.DumpReader`` as the ``COPY`` blocks of a dump), or, for ``immich-api``, from
the dump Immich loaded. The files are looked up in what the copy kept: the SHA-1 of
each file it wrote, computed in the same read as the copy (``files.DIGESTS_TABLE``);
a file the copy did not write (``--merge``: it was there) is read now.
``assetcheck``/``assetstore`` do the rest, as in a backup.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from immich_usb_backup import dumps
from immich_usb_backup.assetcheck import AssetCheck, Lookup, Seen
from immich_usb_backup.assetstore import check_dump
from immich_usb_backup.hashing import BLOCK, sha256_file
from immich_usb_backup.restore.files import DIGESTS_TABLE
from immich_usb_backup.restore.sqlstream import quote
from immich_usb_backup.restore.targets import Rows
from immich_usb_backup.text import plural, word

COPIED = ("matched", "differs", "unlisted")  # states of files the copy wrote


def restored_lookup(db_path: Path, dest: Path) -> tuple[Lookup, Callable[[], None]]:
    """A ``Lookup`` of the restored upload location ``dest``, and its closing function."""
    db = sqlite3.connect(db_path, check_same_thread=False)
    buf = bytearray(BLOCK)
    states = ",".join(f"'{s}'" for s in COPIED)

    def lookup(rels: Sequence[str]) -> list[Seen]:
        marks = ",".join("?" * len(rels))
        known = dict(db.execute(
            f"SELECT path, sha1 FROM {DIGESTS_TABLE} WHERE path IN ({marks}) "  # noqa: S608
            f"AND state IN ({states}) AND sha1 IS NOT NULL", list(rels)).fetchall())
        out = []
        for rel in rels:
            sha1 = known.get(rel)
            if sha1 is not None:
                out.append(Seen(True, sha1, "disk"))
                continue
            path = os.path.join(dest, rel)
            if not os.path.isfile(path):
                out.append(Seen(False))
                continue
            h = sha256_file(path, rel, buf=buf)  # left as it was (--merge): read it now
            out.append(Seen(True, h.sha1, "kept"))
        return out

    return lookup, db.close


def chunks_read_back(rows: Rows, asset_rows: Path, file_rows: Path | None
                     ) -> Callable[[], Iterable[bytes]]:
    """The rows read back, as the ``COPY`` blocks of a dump ``DumpReader`` reads."""
    def blocks() -> Iterator[bytes]:
        yield b"-- PostgreSQL database dump\n\n"
        for table, columns, path in ((rows.asset_table, rows.asset_columns, asset_rows),
                                     (rows.file_table, rows.file_columns, file_rows)):
            if table is None or path is None:
                continue
            names = ", ".join(quote(c) for c in columns)
            yield f"COPY public.{quote(table)} ({names}) FROM stdin;\n".encode()
            with open(path, "rb") as f:
                while block := f.read(BLOCK):
                    yield block
            yield b"\\.\n\n"
        yield b"-- PostgreSQL database dump complete\n"
    return blocks


def chunks_of_dump(dump: Path) -> Callable[[], Iterable[bytes]]:
    return lambda: iter(dumps.Stream(dump))


def run_check(chunks: Callable[[], Iterable[bytes]], lookup: Lookup,
              media_location: str | None, stop: Any) -> AssetCheck:
    """The check (blocking: in a thread)."""
    return check_dump("restored", 0, chunks, lookup, media_location=media_location,
                      stop=stop)


def passed(found: AssetCheck) -> bool:
    """Whether the check found every original, each with Immich's checksum."""
    return (found.checked and not found.missing and not found.differ and not found.not_read
            and not found.problems())


def describe(found: AssetCheck, dest: Path) -> str:
    """The summary's line about the check, in numbers."""
    if not found.checked:
        return "not made (" + "; ".join(found.dump_problems) + ")"
    n = found.originals
    parts = [f"{plural(n, 'asset')} in the database"]
    if n and found.on_disk == n:
        parts.append(f"all under {dest}")
    else:
        parts.append(f"{found.on_disk} under {dest}, {found.missing} missing")
    parts.append(f"{found.matched} with Immich's checksum")
    if found.differ:
        parts.append(f"{found.differ} {word(found.differ, 'differs', 'differ')}")
    if found.no_checksum:
        parts.append(f"{found.no_checksum} without a checksum")
    t = found.tally
    skipped = [f"{c} {what}" for c, what in ((found.trashed, "in the trash"),
                                              (t.external, "external"),
                                              (t.offline, "offline")) if c]
    if skipped:
        parts.append("besides: " + ", ".join(skipped))
    if found.files and found.files == found.files_on_disk:
        parts.append(f"{plural(found.files, 'asset file')} (thumbnails, ...) there")
    elif found.files:
        parts.append(f"{found.files_on_disk} of {plural(found.files, 'asset file')} "
                     "(thumbnails, ...) there")
    return ", ".join(parts)
