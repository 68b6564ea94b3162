"""Feeding a dump to psql: gunzip'd, adjusted, through FIFOs, in a thread.

Immich's documented fix of the search path is applied (the line
``set_config('search_path', '', false)`` replaced, as its restore guide's ``sed``
does). psql runs without ``ON_ERROR_STOP``, so one failed statement (an extension this
machine lacks) does not stop the rest, and three adjustments keep one failure from
hiding others: every ``COPY ... FROM stdin`` block goes through a FIFO of its own (when
its table could not be made, psql would read the rows as SQL); a database dump's roles
are made first; a cluster dump's databases get the throwaway cluster's C locale.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from immich_usb_backup import dumps
from immich_usb_backup.drill.postgres import SUPERUSER
from immich_usb_backup.fsutil import write_all

LONG_LINE = 1 << 20  # a line longer than this is passed on in pieces
# Immich's restore guide: sed "s/OLD/NEW/g" between gunzip and psql
SEARCH_PATH_OLD = b"SELECT pg_catalog.set_config('search_path', '', false);"
SEARCH_PATH_NEW = b"SELECT pg_catalog.set_config('search_path', 'public, pg_catalog', true);"
_COPY = re.compile(rb"^COPY (?P<table>.+?)(?: \(.*\))? FROM stdin;\r?\n$")
_OWNER = re.compile(rb"^ALTER .* OWNER TO (?P<role>\"(?:[^\"]|\"\")+\"|[A-Za-z_][\w$]*);\r?\n$")
_LOCALE = re.compile(rb"\s+(?:LOCALE_PROVIDER|LOCALE|LC_COLLATE|LC_CTYPE|ICU_LOCALE|ICU_RULES|"
                     rb"BUILTIN_LOCALE|COLLATION_VERSION)\s*=\s*(?:'(?:[^']|'')*'|\w+)")


# the psql commands pg_dump and pg_dumpall write; any other is not run
PSQL_COMMANDS = (b"\\connect ", b"\\restrict ", b"\\unrestrict ", b"\\encoding ")


class Stopped(Exception):
    """The drill was cancelled: the feeding thread stops."""


class Feeder:
    """Streams the dump, gunzip'd and adjusted (see the module doc), into psql's FIFO.

    Runs in a thread. A ``COPY ... FROM stdin`` block becomes ``COPY ... FROM '<fifo>'``
    followed by ``COPY (SELECT 1) TO '<marker>'``: the server opens the FIFO when the
    COPY starts (its rows are then written into it), or, when the COPY failed, psql goes
    on and the server writes the marker (its rows are then skipped)."""

    def __init__(self, dump: Path, folder: Path, cluster_dump: bool, user: str | None,
                 on_bytes: Callable[[int], None]) -> None:
        """``on_bytes``: given the bytes of each block of the dump read (gzip'd)."""
        self.dump = dump
        self.folder = folder
        self.fifo = folder / "dump.sql"
        self.copy_prefix = str(folder / "copy-")
        self.cluster_dump = cluster_dump
        self.user = user
        self.on_bytes = on_bytes
        self.stop = threading.Event()
        self.reader_gone = threading.Event()  # psql ended
        self.problem: str | None = None
        self.failed_copies: list[str] = []
        self.roles: set[bytes] = {SUPERUSER.encode()}
        self.copies = 0
        self.skipped_commands = 0  # psql commands left out (PSQL_COMMANDS)
        self._out = -1
        self._copy = -1  # the FIFO of the COPY block being fed; -2: its rows are skipped
        self._fifo: Path | None = None  # that FIFO's path

    def make_fifo(self) -> None:
        self._mkfifo(self.fifo)

    def _mkfifo(self, path: Path) -> None:
        os.mkfifo(path, 0o600)
        if self.user:
            account = pwd.getpwnam(self.user)
            os.chown(path, account.pw_uid, account.pw_gid)

    def run(self) -> None:
        try:
            self._out = self._open_writer(self.fifo, None)
            if self._out < 0:
                return
            self._feed()
        except Stopped:
            pass
        except BrokenPipeError:
            if not self.reader_gone.is_set() and not self.stop.is_set():
                self.problem = "psql stopped reading the dump"
        finally:
            for fd in (self._copy, self._out):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._copy = self._out = -1

    def _open_writer(self, path: Path, marker: Path | None) -> int:
        """Open the FIFO ``path`` for writing once a reader has it open; -1 when psql
        ended first, or (``marker`` given) the server wrote ``marker`` first."""
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
            else:
                os.set_blocking(fd, True)
                return fd
            if self.stop.is_set():
                raise Stopped
            if self.reader_gone.is_set() or (marker is not None and marker.exists()):
                return -1
            time.sleep(0.01)

    def _feed(self) -> None:
        stream = dumps.Stream(self.dump, self.on_bytes)
        pending = b""
        line_start = True  # whether ``pending`` starts a line
        for data in stream:
            if self.stop.is_set():
                raise Stopped
            pending += data
            start = 0
            while (end := pending.find(b"\n", start)) >= 0:
                self._line(pending[start:end + 1], line_start)
                line_start = True
                start = end + 1
            pending = pending[start:]
            if len(pending) > LONG_LINE:
                self._line(pending, line_start, whole=False)
                pending, line_start = b"", False
        if stream.stopped_early:
            self.problem = f"{stream.problem}; the load stopped there"
            return
        if pending:
            self._line(pending, line_start)
        if stream.problem and "cut short" in stream.problem:
            self.problem = f"{stream.problem}: only its beginning could be loaded"
        else:
            self.problem = stream.problem

    def _line(self, line: bytes, line_start: bool, whole: bool = True) -> None:
        if self._copy != -1:  # in the rows of a COPY block
            if line_start and whole and line.rstrip(b"\r\n") == b"\\.":
                self._end_copy()
            elif self._copy >= 0:
                try:
                    write_all(self._copy, line)
                except BrokenPipeError:  # the COPY failed on a row: skip the rest
                    self._close_copy(-2)
            return
        if line_start and whole:
            line = self._adjust(line)
            if self._copy != -1:
                return
        write_all(self._out, line)

    def _adjust(self, line: bytes) -> bytes:
        """The line as psql gets it; starts a COPY block (and writes it) itself. A psql
        command other than those pg_dump writes (``\\connect``, ``\\restrict``) is
        left out: a dump from a disk is not trusted to run ``\\!`` shell commands."""
        if line.startswith(b"\\") and not line.startswith(PSQL_COMMANDS):
            self.skipped_commands += 1
            return b"-- a psql command, left out by the drill\n"
        if line.startswith(SEARCH_PATH_OLD):
            return line.replace(SEARCH_PATH_OLD, SEARCH_PATH_NEW, 1)
        m = _COPY.match(line)
        if m:
            self._start_copy(line, m.group("table").decode(errors="replace"))
            return b""
        if self.cluster_dump and line.startswith(b"CREATE DATABASE "):
            return _LOCALE.sub(b"", line)
        if not self.cluster_dump:
            m = _OWNER.match(line)
            if m and m.group("role").strip(b'"') not in self.roles:
                role = m.group("role")
                self.roles.add(role.strip(b'"'))
                return (b"DO $drill$BEGIN CREATE ROLE " + role + b"; EXCEPTION WHEN OTHERS "
                        b"THEN NULL; END$drill$; " + line)
        return line

    def _start_copy(self, line: bytes, table: str) -> None:
        self.copies += 1
        fifo = Path(f"{self.copy_prefix}{self.copies}.fifo")
        marker = Path(f"{self.copy_prefix}{self.copies}.done")
        self._mkfifo(fifo)
        statement = line.rstrip(b"\r\n").removesuffix(b"FROM stdin;")
        write_all(self._out, statement + b"FROM " + _literal(fifo) + b";\n"
                   + b"COPY (SELECT 1) TO " + _literal(marker) + b";\n")
        fd = self._open_writer(fifo, marker)
        if fd < 0:
            self.failed_copies.append(table)
        self._copy = fd if fd >= 0 else -2
        self._fifo = fifo

    def _end_copy(self) -> None:
        self._close_copy(-1)
        if self._fifo is not None:
            with contextlib.suppress(OSError):
                self._fifo.unlink()
            self._fifo = None

    def _close_copy(self, then: int) -> None:
        if self._copy >= 0:
            with contextlib.suppress(OSError):
                os.close(self._copy)
        self._copy = then


def _literal(path: Path) -> bytes:
    return b"'" + str(path).replace("'", "''").encode() + b"'"
