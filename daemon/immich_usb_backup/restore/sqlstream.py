"""The SQL a restore feeds psql: the dump, gunzip'd and adjusted, in one transaction.

- ``BEGIN`` first and ``COMMIT`` last, written only once the whole dump went through
  and ended whole (``dumps.Stream``): a dump cut short, a psql that stopped, a killed
  restore all end the session inside the transaction, and PostgreSQL keeps the database
  as it was. (``psql --single-transaction`` would commit at the end of its input,
  whatever that end was.) psql runs with ``ON_ERROR_STOP``: one failed statement and
  nothing is kept.
- Immich's documented fix of the search path (the drill's ``SEARCH_PATH_OLD`` and
  ``SEARCH_PATH_NEW``, the line its restore guide's ``sed`` replaces).
- psql commands: the ``\\restrict`` / ``\\unrestrict`` guards pg_dump writes are left
  out (older psql programs stop at them; no other command passes here, which is what
  they guard against), ``\\connect`` selects a database of a cluster dump, any other
  ends the load before its ``COMMIT`` (a dump from a disk is not trusted to run ``\\!``).
- A cluster dump (``pg_dumpall``, Immich up to 2.4) is loaded as a database dump: only
  the statements after its ``\\connect`` to Immich's database, up to the end of that
  database's part, into the target's database (its roles, other databases and their
  ``DROP``/``CREATE DATABASE`` are left out).
- ``replace``: the target's schema ``public`` dropped and made again first, inside the
  same transaction, as Immich's own restore does.

The rows of ``COPY ... FROM stdin`` blocks pass untouched, found by their end marker
rather than line by line.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from immich_usb_backup import dumps
from immich_usb_backup.drill.feeder import SEARCH_PATH_NEW, SEARCH_PATH_OLD
from immich_usb_backup.fsutil import write_all

OUT_BLOCK = 1 << 20  # bytes handed to psql at a time
LONG_LINE = 1 << 20  # a line of SQL longer than this is passed on in pieces
BEGIN = b"BEGIN;\n"
COMMIT = b"COMMIT;\n"
REPLACE = (b"DROP SCHEMA IF EXISTS public CASCADE;\n"
           b"CREATE SCHEMA public AUTHORIZATION pg_database_owner;\n"
           b"GRANT USAGE ON SCHEMA public TO PUBLIC;\n"
           b"COMMENT ON SCHEMA public IS 'standard public schema';\n")
GUARDS = (b"\\restrict ", b"\\unrestrict ")
DATABASE_END = b"-- PostgreSQL database dump complete"  # each database's, in a cluster dump
SYSTEM_DATABASES = ("postgres", "template0", "template1")
_COPY = re.compile(rb"^COPY .* FROM stdin;\r?$")
_CONNECT_NEW = re.compile(rb"dbname='((?:[^'\\]|\\.)*)'")
_DROP_DATABASE = re.compile(rb'^DROP DATABASE (?:IF EXISTS )?("(?:[^"]|"")+"|[^\s;]+);')
_ALTER_DATABASE = re.compile(rb'^ALTER DATABASE ("(?:[^"]|"")+"|[^\s;]+) ')


class SqlStream:
    """The SQL psql gets for the dump ``dump`` (iterate it for the bytes). After the
    iteration, ``committed`` says whether the ``COMMIT`` was sent, and ``problem`` why
    not (or what else was wrong)."""

    def __init__(self, dump: Path, *, cluster_database: str | None = None,
                 target_database: str | None = None, replace: bool = False,
                 on_bytes: Callable[[int], None] | None = None,
                 stop: threading.Event | None = None) -> None:
        """``cluster_database``: for a cluster dump, the database whose statements are
        loaded (None: the dump is a database dump, loaded whole). ``target_database``:
        the database they go into (``ALTER DATABASE`` statements are pointed at it)."""
        self.dump = dump
        self.cluster_database = cluster_database
        self.target_database = target_database
        self.replace = replace
        self.on_bytes = on_bytes
        self.stop = stop or threading.Event()
        self.committed = False
        self.problem: str | None = None
        self.found_database = cluster_database is None

    def __iter__(self) -> Iterator[bytes]:
        out = bytearray(BEGIN + (REPLACE if self.replace else b""))
        for piece in self._pieces():
            out += piece
            if len(out) >= OUT_BLOCK:
                yield bytes(out)
                out.clear()
            if self.stop.is_set():
                self.problem = self.problem or "the restore was stopped"
                return
            if self.problem:
                yield bytes(out)  # what came before the problem: psql fails or rolls back
                return
        if self.problem:  # found at the end (the dump cut short): no COMMIT
            yield bytes(out)
            return
        if not self.found_database:
            self.problem = (f"the cluster dump holds no database "
                            f"{self.cluster_database}: nothing was loaded")
            return
        out += COMMIT
        self.committed = True
        yield bytes(out)

    def _pieces(self) -> Iterator[bytes]:
        """The dump's SQL as psql gets it (without BEGIN and COMMIT), in pieces."""
        stream = dumps.Stream(self.dump, self.on_bytes)
        buf = b""
        pos = 0
        in_copy = False
        at_line_start = True
        keep = self.cluster_database is None  # a cluster dump: until its \connect
        for data in stream:
            buf = buf[pos:] + data if pos < len(buf) else data
            pos = 0
            while True:
                if in_copy:
                    end = _copy_end(buf, pos, at_line_start)
                    if end < 0:  # the rows go on in the next block: pass what is here
                        cut = max(pos, buf.rfind(b"\n", pos) + 1)
                        if cut > pos:
                            if keep:
                                yield buf[pos:cut]
                            pos, at_line_start = cut, True
                        if len(buf) - pos > LONG_LINE:  # a very long row
                            if keep:
                                yield buf[pos:]
                            pos, at_line_start = len(buf), False
                        break
                    if keep:
                        yield buf[pos:end]
                    pos, in_copy, at_line_start = end, False, True
                    continue
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    if len(buf) - pos > LONG_LINE:  # a very long statement: pass it on
                        if keep and at_line_start and self._refuse(buf[pos:pos + 1]):
                            return
                        if keep:
                            yield buf[pos:]
                        pos, at_line_start = len(buf), False
                    break
                line = buf[pos:nl + 1]
                pos = nl + 1
                if not at_line_start:  # the end of a long line, passed on in pieces
                    at_line_start = True
                    if keep:
                        yield line
                    continue
                if _COPY.match(line.rstrip(b"\n")):
                    in_copy = True
                    if keep:
                        yield line
                    continue
                if line.startswith(b"\\"):
                    if line.startswith(b"\\connect "):
                        keep = self._connect(line)
                        continue
                    if line.startswith(GUARDS):  # psql's, of pg_dump 17.6+: left out
                        continue
                    if keep:
                        self._refuse(line)
                        return
                    continue
                if keep and self.cluster_database is not None and line.startswith(
                        DATABASE_END):  # the end of the database's own pg_dump
                    keep = False
                    continue
                if keep:
                    yield self._adjust(line)
        tail = buf[pos:]
        if tail and keep and not in_copy:  # a last line without its line end
            if not at_line_start:
                yield tail
            elif tail.startswith(GUARDS):  # left out, as above
                pass
            elif self._refuse(tail):
                return
            else:
                yield self._adjust(tail)
        if stream.problem:
            self.problem = f"{self.dump.name}: {stream.problem}"

    def _refuse(self, line: bytes) -> bool:
        if not line.startswith(b"\\"):
            return False
        command = line.split()[0].decode("utf-8", "replace")[:40]
        self.problem = (f"{self.dump.name} holds the psql command {command}, which "
                        "pg_dump does not write: the load was stopped, nothing was "
                        "changed")
        return True

    def _connect(self, line: bytes) -> bool:
        """A cluster dump's ``\\connect``: whether the statements after it are loaded."""
        if self.cluster_database is None:
            self.problem = ("the dump holds a \\connect: it is not a database dump; "
                            "the load was stopped, nothing was changed")
            return False
        name = connect_target(line)
        if name == self.cluster_database:
            self.found_database = True
            return True
        return False

    def _adjust(self, line: bytes) -> bytes:
        if line.startswith(SEARCH_PATH_OLD):
            return line.replace(SEARCH_PATH_OLD, SEARCH_PATH_NEW, 1)
        if self.target_database and line.startswith(b"ALTER DATABASE "):
            m = _ALTER_DATABASE.match(line)
            if m and _unquote(m.group(1)) != self.target_database:
                return (b"ALTER DATABASE " + quote(self.target_database).encode()
                        + line[m.end(1):])
        return line


def _copy_end(buf: bytes, pos: int, at_line_start: bool) -> int:
    """Where the line after a COPY block's end marker ``\\.`` starts in ``buf`` (from
    ``pos``), or -1 when the marker is not there yet."""
    if at_line_start and buf.startswith((b"\\.\n", b"\\.\r\n"), pos):
        return buf.index(b"\n", pos) + 1
    end = buf.find(b"\n\\.\n", pos)
    end_crlf = buf.find(b"\n\\.\r\n", pos)
    if end_crlf >= 0 and (end < 0 or end_crlf < end):
        return end_crlf + 5
    return -1 if end < 0 else end + 4


def connect_target(line: bytes) -> str:
    """The database of a ``\\connect`` line: ``\\connect immich``, ``\\connect
    "Immich DB"`` or pg_dumpall's ``\\connect -reuse-previous=on "dbname='immich'"``."""
    m = _CONNECT_NEW.search(line)
    if m:
        return re.sub(rb"\\(.)", rb"\1", m.group(1)).decode("utf-8", "replace")
    word = line.split()[-1] if len(line.split()) > 1 else b""
    return _unquote(word)


def cluster_databases(dump: Path, limit: int = 1 << 20) -> list[str]:
    """The databases a cluster dump made with ``--clean`` drops at its top (those it
    holds, but ``postgres`` and ``template1``), read from its first ``limit`` bytes."""
    found: list[str] = []
    seen = 0
    pending = b""
    for data in dumps.Stream(dump):
        seen += len(data)
        lines = (pending + data).split(b"\n")
        pending = lines.pop()
        for line in lines:
            m = _DROP_DATABASE.match(line)
            if m:
                found.append(_unquote(m.group(1)))
            elif line.startswith(b"\\connect ") or (found and line.startswith(b"CREATE ROLE ")):
                return found  # the drops are all at the top
        if seen >= limit:
            break
    return found


def choose_database(candidates: list[str], target: str | None) -> str | None:
    """Of a cluster dump's databases, Immich's: the one named like the target's, else
    the only one that is not PostgreSQL's own; None when that does not say."""
    own = [c for c in candidates if c not in SYSTEM_DATABASES]
    if target in own:
        return target
    if len(own) == 1:
        return own[0]
    return None


def quote(name: str) -> str:
    """``name`` as an SQL identifier, always quoted."""
    return '"' + name.replace('"', '""') + '"'


def _unquote(raw: bytes) -> str:
    text = raw.strip().decode("utf-8", "replace")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].replace('""', '"')
    return text


def write_to(stream: SqlStream, fd: int) -> None:
    """Feed ``stream`` into the pipe ``fd`` (closed at the end); in a thread. psql gone
    early is noted in ``stream.problem`` unless something else was wrong first."""
    import os  # noqa: PLC0415 - only the feeding thread writes

    try:
        for block in stream:
            write_all(fd, block)
    except BrokenPipeError:
        stream.committed = False
        stream.problem = stream.problem or "psql stopped reading the dump"
    finally:
        os.close(fd)
