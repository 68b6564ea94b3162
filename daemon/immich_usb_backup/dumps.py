"""What the product knows about Immich's database dumps.

Their names (``immich-db-backup-YYYYMMDDTHHMMSS-v<ver>-pg<ver>.sql.gz`` and the older
``immich-db-backup-<epoch-ms>.sql.gz``; the newest is told by the time in the name,
never by the file's time), their kind (a cluster dump of ``pg_dumpall``, Immich up to
2.4, or a database dump of ``pg_dump``), their completeness marker (PostgreSQL's "dump
complete" comment near the end), and ``Stream``, the one way a ``.sql.gz`` is read:
decompressed block by block, several gzip members as one stream, its end checked.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

BLOCK = 1024 * 1024
DUMP_END = b"dump complete"  # "-- PostgreSQL database (cluster) dump complete"
CLUSTER_HEADER = b"-- PostgreSQL database cluster dump"
DATABASE_HEADER = b"-- PostgreSQL database dump"
TAIL = 4096  # the end of the SQL kept to look for DUMP_END (a "\unrestrict" line may follow)

_NEW = re.compile(r"^immich-db-backup-(\d{8}T\d{6})-v[^/]*-pg[^/]*\.sql\.gz$")
_NEW_BARE = re.compile(r"^immich-db-backup-(\d{8}T\d{6})(?:-[^/]*)?\.sql\.gz$")
_OLD = re.compile(r"^immich-db-backup-(\d{10,14})\.sql\.gz$")
_VERSION = re.compile(r"-v(\d+\.\d+\.\d+)-pg")


# Names -----------------------------------------------------------------------------------

def dump_time(name: str) -> datetime | None:
    """The time in an Immich dump's name, or None when the name is not a nightly dump.

    ``immich-db-backup-20250102T020000-v1.130.0-pg14.17.sql.gz`` carries the server's local
    time (read as this machine's local time); ``immich-db-backup-1735783200000.sql.gz``
    carries milliseconds since the epoch. ``*.tmp``, ``restore-point-*`` and ``uploaded-*``
    are not nightly dumps.
    """
    if not name.startswith("immich-db-backup-") or not name.endswith(".sql.gz"):
        return None
    m = _NEW.match(name) or _NEW_BARE.match(name)
    if m:
        try:
            return datetime.strptime(m.group(1), "%Y%m%dT%H%M%S").astimezone()
        except ValueError:
            return None
    m = _OLD.match(name)
    if m:
        try:
            return datetime.fromtimestamp(int(m.group(1)) / 1000, tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def immich_version(name: str) -> str | None:
    """The Immich version in a dump's name (``-v1.130.0-pg14.17``), or None."""
    m = _VERSION.search(name)
    return m.group(1) if m else None


def newest_dump(names: list[str]) -> tuple[str, datetime] | None:
    """Pick the newest nightly dump by the time in its name; None when there is none."""
    dated = [(t, n) for n in names if (t := dump_time(n)) is not None]
    if not dated:
        return None
    t, n = max(dated)
    return n, t


def newest_in(folder: Path) -> tuple[Path, int] | None:
    """The newest nightly dump in ``folder`` (none when it is not a folder) by the time in
    its name, and its size."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    newest = newest_dump(names)
    if newest is None:
        return None
    dump = folder / newest[0]
    return dump, dump.stat().st_size


def dumps_to_prune(names: list[str], keep: int) -> list[str]:
    """Of the dump names on the disk, those beyond the ``keep`` newest."""
    dated = sorted(((t, n) for n in names if (t := dump_time(n)) is not None), reverse=True)
    return [n for _, n in dated[keep:]]


def disk_name(name: str, taken: datetime) -> str:
    """The dump's name on the disk: its own when it is an Immich name (it carries its
    time), else ``immich-db-backup-<time>-<name>.sql.gz``."""
    if dump_time(name) is not None:
        return name
    stem = name.removesuffix(".sql.gz").removesuffix(".sql")
    return f"immich-db-backup-{taken:%Y%m%dT%H%M%S}-{stem}.sql.gz"


# What is inside ------------------------------------------------------------------------------

def sql_complete(tail: bytes) -> bool:
    """Does SQL ending with ``tail`` end like a whole dump of PostgreSQL's?"""
    return DUMP_END in tail


def kind(dump: Path) -> tuple[str | None, str | None]:
    """("cluster dump" | "database dump" | None, what is wrong or None) from the first
    lines of the gzip'd dump."""
    d = zlib.decompressobj(wbits=31)
    head = b""
    try:
        with open(dump, "rb") as f:
            while len(head) < 8192 and (block := f.read(65536)):
                head += d.decompress(block, 65536)
    except zlib.error as exc:
        return None, f"not a valid gzip stream ({exc})"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror})"
    for line in head.splitlines()[:10]:
        if line.startswith(CLUSTER_HEADER):
            return "cluster dump", None
        if line.startswith(DATABASE_HEADER):
            return "database dump", None
    return None, "not a PostgreSQL dump (no \"-- PostgreSQL database dump\" line at the top)"


class Stream:
    """The SQL of a ``.sql.gz`` dump, decompressed a block at a time: iterate it for the
    decompressed bytes. gzip allows several members one after another (``cat``-ed dumps,
    some tools write them): they are one stream. ``on_bytes`` gets the compressed bytes
    of each block read. Reading stops early when the file cannot be read or is not gzip;
    afterwards ``problem`` says what is wrong with the dump (None: it is whole) and
    ``stopped_early`` whether the reading ended before the file did."""

    def __init__(self, path: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        self.path = path
        self.on_bytes = on_bytes
        self.problem: str | None = None
        self.stopped_early = False
        self._tail = b""

    def __iter__(self) -> Iterator[bytes]:
        d = zlib.decompressobj(wbits=31)
        try:
            with open(self.path, "rb") as f:
                while block := f.read(BLOCK):
                    if self.on_bytes is not None:
                        self.on_bytes(len(block))
                    data = d.decompress(block)
                    while d.unused_data:  # the next member
                        rest = d.unused_data
                        d = zlib.decompressobj(wbits=31)
                        data += d.decompress(rest)
                    if data:
                        self._tail = (self._tail + data)[-TAIL:]
                        yield data
        except zlib.error as exc:
            self.problem, self.stopped_early = f"not a valid gzip stream ({exc})", True
            return
        except OSError as exc:
            self.problem = f"cannot be read ({exc.strerror or exc})"
            self.stopped_early = True
            return
        if not d.eof:
            self.problem = "the gzip stream is cut short (an incomplete copy)"
        elif not sql_complete(self._tail):
            self.problem = "the SQL does not end with PostgreSQL's \"dump complete\" line"


def check(path: Path, on_bytes: Callable[[int], None] | None = None,
          stop: Callable[[], None] | None = None) -> str | None:
    """Read the dump ``path`` to its end; say what is wrong, or None. ``stop`` is called
    between blocks (it raises to stop)."""
    stream = Stream(path, on_bytes)
    for _ in stream:
        if stop is not None:
            stop()
    return stream.problem
