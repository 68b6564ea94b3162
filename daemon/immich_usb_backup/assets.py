"""Immich's asset rows, read from a database dump as it streams by, without PostgreSQL.

Given the dump's decompressed bytes as an iterable of chunks of any size (blocks or
lines), ``DumpReader.rows`` yields one ``AssetRow`` per row of the ``asset`` table
(``assets`` before Immich renamed it) and one ``FileRow`` per row of ``asset_file``
(``asset_files``), in the dump's order, holding no more than one row and one chunk. The
other tables' rows (the search embeddings make most of a dump) are skipped by searching
for the end of their block, not read line by line.

Both kinds of dump Immich writes carry these as ``COPY public.asset (col, ...) FROM
stdin;`` blocks: a cluster dump (``pg_dumpall``, up to 2.4) and a database dump
(``pg_dump``, 2.5+). Columns are found by name in the block's header; values are decoded
as COPY's text format defines them. After the rows, ``DumpReader.problems`` names what
kept the reader from a full answer (no asset table, rows it could not read, a block cut
short). See docs/usage.md, "The asset check".
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from immich_usb_backup.text import plural

ASSET_TABLES = ("asset", "assets")  # "assets" before Immich 1.137
FILE_TABLES = ("asset_file", "asset_files")
MAX_LINE = 1 << 20  # a longer line is not a row of these tables: skipped, never held
KEEP = 5  # examples of unreadable rows kept for the message

CLUSTER_DUMP = "cluster dump"
DATABASE_DUMP = "database dump"
_KINDS = ((b"-- PostgreSQL database cluster dump", CLUSTER_DUMP),
          (b"-- PostgreSQL database dump", DATABASE_DUMP))

_COPY = re.compile(
    rb'COPY\s+(?:(?:public|"public")\.)?(?P<table>"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
    rb"\s*(?:\((?P<columns>.*)\))?\s*FROM\s+stdin;\s*$")
_COLUMN = re.compile(rb'\s*("(?:[^"]|"")*"|[^,\s]+)\s*(?:,|$)')
_DBNAME = re.compile(rb"dbname='((?:[^'\\]|\\.)*)'")
_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.DOTALL)
_LETTERS = {ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r",
            ord("t"): b"\t", ord("v"): b"\v"}
_BYTEA_ESCAPE = re.compile(rb"\\(?:([0-7]{3})|\\)")


@dataclass(frozen=True, slots=True)
class AssetRow:
    """One asset as the dump has it. Paths are ``os.fsdecode``'d (bytes that are not
    UTF-8 kept as the scan of the files keeps them)."""

    id: str | None
    original_path: str | None
    checksum: bytes | None  # the 20-byte SHA-1 Immich recorded (None: NULL or unreadable)
    trashed: bool  # deletedAt set, or status "trashed"
    external: bool  # isExternal, a libraryId, or a checksum of the path (sha1-path)
    offline: bool
    algorithm: str | None  # checksumAlgorithm (2.7+): "sha1" or "sha1-path"
    status: str | None  # "active", "trashed", "deleted" (newer versions)
    sidecar_path: str | None = None  # older versions: the sidecar's path in the row
    encoded_video_path: str | None = None


@dataclass(frozen=True, slots=True)
class FileRow:
    """One row of ``asset_file``: a thumbnail, preview, sidecar, ... of an asset."""

    asset_id: str | None
    type: str | None
    path: str | None


Row = AssetRow | FileRow


@dataclass
class _Block:
    table: str  # "asset" or "asset_file" as the dump names it
    is_asset: bool
    index: dict[str, int]  # column name -> position
    width: int
    rows: int = 0


@dataclass
class DumpReader:
    """Reads one dump; its fields say what it found once ``rows`` has run to the end."""

    kind: str | None = None  # CLUSTER_DUMP, DATABASE_DUMP, or None (no header seen)
    database: str | None = None  # the database whose tables were read (cluster dumps)
    asset_table: str | None = None  # "asset" or "assets" once its block was seen
    file_table: str | None = None
    columns: tuple[str, ...] = ()  # of the asset table
    asset_rows: int = 0
    file_rows: int = 0
    bad_rows: int = 0  # rows that could not be read (wrong field count, too long)
    bad_examples: list[str] = field(default_factory=list)
    other_databases: list[str] = field(default_factory=list)  # asset tables not read
    cut_short: str | None = None  # the table whose block the dump ended in
    missing_columns: tuple[str, ...] = ()
    complete: bool = False  # PostgreSQL's "dump complete" line seen
    _connected: str | None = None

    @property
    def found(self) -> bool:
        """Whether the dump has an asset table with the columns the check needs."""
        return self.asset_table is not None and not self.missing_columns

    @property
    def problems(self) -> list[str]:
        """What kept this reading from a full answer, in words (empty when nothing did)."""
        out = []
        if self.asset_table is None:
            out.append("the dump holds no asset table (asset or assets): it may come "
                       "from an Immich version whose tables this version does not know; "
                       "no asset could be checked")
        elif self.missing_columns:
            out.append(f"the dump's {self.asset_table} table has no column "
                       f"{', '.join(self.missing_columns)}: no asset could be checked")
        if self.bad_rows:
            out.append(f"{plural(self.bad_rows, 'row')} of the asset tables could not be "
                       "read (for example: "
                       f"{'; '.join(self.bad_examples)})")
        if self.cut_short:
            out.append(f"the dump ends inside the rows of {self.cut_short}: it is cut "
                       "short, the assets after that point were not checked")
        if self.other_databases:
            out.append(f"the dump holds asset tables of more than one database: "
                       f"{self.database} was checked, not {', '.join(self.other_databases)}")
        return out

    def rows(self, chunks: Iterable[bytes]) -> Iterator[Row]:
        """The rows of the asset and asset file tables, one at a time (see the module
        doc). May be called once per reader."""
        buf = b""
        block: _Block | None = None  # the block whose rows are being read
        skipping = False  # in the rows of a table we do not read
        midline = False  # buf starts inside a line whose start was dropped (too long)
        for chunk in chunks:
            buf = buf + chunk if buf else chunk
            pos = 0
            while True:
                if skipping:
                    end = _block_end(buf, pos, midline)
                    if end < 0:
                        buf, midline = _skip_rest(buf, pos, midline)
                        pos = 0
                        break
                    pos, skipping, midline = end, False, False
                    continue
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    break
                line, pos = buf[pos:nl], nl + 1
                if midline:  # the end of an over-long line
                    midline = False
                    continue
                if block is not None:
                    if line == b"\\.":
                        block = None
                    else:
                        row = self._row(block, line)
                        if row is not None:
                            yield row
                    continue
                block, skipping = self._outside(line)
            buf = buf[pos:] if pos else buf
            if len(buf) > MAX_LINE:  # no line end in sight: not a line worth keeping
                if block is not None:
                    self._bad(block, buf[:80] + b"...")
                buf, midline = b"", True
        if buf == b"\\." and not midline:  # the last line, without its line end
            block = None
        elif buf and block is None and not skipping and not midline:
            self._outside(buf)
        if block is not None:  # a row without its line end is cut short too: not read
            self.cut_short = block.table

    # outside the rows ------------------------------------------------------------------

    def _outside(self, line: bytes) -> tuple[_Block | None, bool]:
        """A line of SQL: a COPY header starts a block (read or skipped)."""
        if line.startswith(b"COPY "):
            m = _COPY.match(line)
            if m is None:
                return None, True  # a COPY we cannot parse: its rows are not ours
            table = _identifier(m.group("table"))
            if table not in ASSET_TABLES and table not in FILE_TABLES:
                return None, True
            if self._connected != self.database and self.database is not None:
                if table in ASSET_TABLES:
                    self.other_databases.append(str(self._connected))
                return None, True
            is_asset = table in ASSET_TABLES
            if (self.asset_table if is_asset else self.file_table) is not None:
                return None, True  # a second one in one database: the first counts
            self.database = self._connected
            columns = [_identifier(c) for c in _COLUMN.findall(m.group("columns") or b"")]
            block = _Block(table, is_asset, {c: i for i, c in enumerate(columns)},
                           len(columns))
            if is_asset:
                self.asset_table, self.columns = table, tuple(columns)
                self.missing_columns = tuple(c for c in ("originalPath", "checksum")
                                             if c not in block.index)
                if self.missing_columns:
                    return None, True
            else:
                self.file_table = table
                if "path" not in block.index:
                    return None, True
            return block, False
        if line.startswith(b"\\connect "):
            m = _DBNAME.search(line)
            raw = m.group(1) if m else line.split()[-1].strip(b'"')
            self._connected = raw.decode("utf-8", "replace")
        elif line.startswith(b"-- PostgreSQL database"):
            if line.endswith(b" dump complete"):  # a cluster dump: each database's too
                self.complete = (self.kind == CLUSTER_DUMP) == (b" cluster " in line)
            elif self.kind is None:
                self.kind = next((kind for header, kind in _KINDS
                                  if line.startswith(header)), None)
        return None, False

    # rows --------------------------------------------------------------------------------

    def _bad(self, block: _Block, line: bytes) -> None:
        self.bad_rows += 1
        if len(self.bad_examples) < KEEP:
            self.bad_examples.append(f"{block.table} row {block.rows + 1}: "
                                     f"{shown(os.fsdecode(line[:80]))}")
        block.rows += 1

    def _row(self, block: _Block, line: bytes) -> Row | None:
        fields = split_fields(line)
        if len(fields) != block.width:
            self._bad(block, line)
            return None
        block.rows += 1
        ix = block.index

        def text(name: str) -> str | None:
            i = ix.get(name)
            return None if i is None else decode_text(fields[i])

        if not block.is_asset:
            self.file_rows += 1
            return FileRow(text("assetId"), text("type"), text("path"))
        self.asset_rows += 1
        algorithm, status = text("checksumAlgorithm"), text("status")
        raw = fields[ix["checksum"]]
        external = (_true(text("isExternal")) or text("libraryId") is not None
                    or algorithm == "sha1-path")
        return AssetRow(
            id=text("id"),
            original_path=text("originalPath"),
            checksum=None if raw == b"\\N" else decode_bytea(raw),
            trashed=text("deletedAt") is not None or status == "trashed",
            external=external,
            offline=_true(text("isOffline")),
            algorithm=algorithm,
            status=status,
            sidecar_path=text("sidecarPath"),
            encoded_video_path=text("encodedVideoPath"),
        )


# COPY's text format ----------------------------------------------------------------------

def split_fields(line: bytes) -> list[bytes]:
    """The raw fields of a row: split at each tab that is not escaped. pg_dump writes a
    tab in a value as ``\\t``; only a backslash right before a tab needs the slow path."""
    if b"\\\t" not in line:
        return line.split(b"\t")
    fields, start, i, n = [], 0, 0, len(line)
    while i < n:
        c = line[i]
        if c == 0x5C:  # a backslash: the next byte is escaped, whatever it is
            i += 2
            continue
        if c == 0x09:
            fields.append(line[start:i])
            start = i + 1
        i += 1
    fields.append(line[start:])
    return fields


def _unescape_one(m: re.Match[bytes]) -> bytes:
    octal, hexa, other = m.groups()
    if octal is not None:
        return bytes([int(octal, 8) & 0xFF])
    if hexa is not None:
        return bytes([int(hexa, 16)])
    return _LETTERS.get(other[0], other)


def unescape(field_: bytes) -> bytes:
    """A field's bytes as COPY's text format defines them: ``\\b \\f \\n \\r \\t \\v``,
    ``\\`` and 1-3 octal digits, ``\\x`` and 1-2 hex digits, any other ``\\c`` is c."""
    return _ESCAPE.sub(_unescape_one, field_) if b"\\" in field_ else field_


def decode_text(field_: bytes) -> str | None:
    """A text value: None for ``\\N``; bytes that are not UTF-8 kept (surrogateescape)."""
    if field_ == b"\\N":
        return None
    return os.fsdecode(unescape(field_))


def decode_bytea(field_: bytes) -> bytes | None:
    """A bytea value, hex (``\\\\x0123...``, PostgreSQL's default output) or escape
    format; None when it is neither."""
    if field_.startswith(b"\\\\x"):
        try:
            return bytes.fromhex(field_[3:].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    value = unescape(field_)
    if value.startswith(b"\\x"):
        try:
            return bytes.fromhex(value[2:].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
    return _BYTEA_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]) if m.group(1)
                             else b"\\", value)


def _true(value: str | None) -> bool:
    return value in ("t", "true")


def _identifier(raw: bytes) -> str:
    """A column or table name as PostgreSQL means it: quoted as written, else folded."""
    if raw.startswith(b'"') and raw.endswith(b'"') and len(raw) >= 2:
        return raw[1:-1].replace(b'""', b'"').decode("utf-8", "replace")
    return raw.decode("utf-8", "replace").lower()


def _block_end(buf: bytes, pos: int, midline: bool) -> int:
    """Where the line after a block's end marker ``\\.`` starts, or -1 when ``buf`` (from
    ``pos``, which is a line start unless ``midline``) does not hold the marker."""
    if not midline and buf.startswith(b"\\.\n", pos):
        return pos + 3
    end = buf.find(b"\n\\.\n", pos)
    return -1 if end < 0 else end + 4


def _skip_rest(buf: bytes, pos: int, midline: bool) -> tuple[bytes, bool]:
    """What to keep of ``buf`` when its rest holds no end marker: only a last partial
    line that may still become one (``\\`` or ``\\.``)."""
    last = buf.rfind(b"\n", pos)
    if last >= 0:
        tail, midline = buf[last + 1:], False
    else:
        tail = buf[pos:]
    if not midline and tail in (b"", b"\\", b"\\."):
        return tail, False
    return b"", True


# Showing what a dump holds -----------------------------------------------------------------

_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), *range(0x7F, 0xA0)]}
_CONTROL.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x5C: "\\\\"})


def shown(text: str) -> str:
    """``text`` (a path from a dump, attacker-controlled) safe to show on one line: control
    characters and backslashes escaped, bytes that are not UTF-8 as ``\\xNN``."""
    text = text.translate(_CONTROL)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                       else c if not 0xD800 <= ord(c) <= 0xDFFF else "\\ufffd"
                       for c in text)
