"""``immich-server-backups/library.sha256``: the library's manifest, in sha256sum's format.

One line per file of ``library/``: 64 hex digits, two spaces, the path from the backup
folder (``library/upload/...``). So on any computer, without this program::

    cd immich-server-backups && sha256sum -c library.sha256     # Linux
    cd immich-server-backups && shasum -a 256 -c library.sha256 # macOS

A name holding a backslash or a line break is written the way GNU sha256sum writes it
(the line starts with a backslash; ``\\\\`` and ``\\n`` in the name). exFAT cannot
store either character, so a mirror on exFAT never needs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from immich_usb_backup import layout

NAME = layout.MANIFEST
PREFIX = layout.LIBRARY + "/"
_HEX = frozenset("0123456789abcdef")


def line(digest: str, rel: str) -> bytes:
    """The manifest line of the mirror's file ``rel`` (relative to ``library/``)."""
    name = PREFIX + rel
    if "\\" in name or "\n" in name or "\r" in name:
        escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return b"\\" + digest.encode() + b"  " + os.fsencode(escaped) + b"\n"
    return digest.encode() + b"  " + os.fsencode(name) + b"\n"


@dataclass(frozen=True)
class Entry:
    digest: str
    rel: str  # relative to library/


class BadLine(ValueError):
    pass


def parse_line(raw: bytes) -> Entry:
    """Parse one line (without its line break); raise BadLine for anything else."""
    escaped = raw.startswith(b"\\")
    if escaped:
        raw = raw[1:]
    digest, sep, name_b = raw.partition(b" ")
    if not sep or len(digest) != 64 or not set(digest.decode("ascii", "replace")) <= _HEX:
        raise BadLine("not a SHA-256 line")
    if name_b[:1] in (b" ", b"*"):  # text or binary mode marker
        name_b = name_b[1:]
    name = os.fsdecode(name_b)
    if escaped:
        name = _unescape(name)
    if not name.startswith(PREFIX) or name == PREFIX:
        raise BadLine(f"path outside library/: {name}")
    rel = name[len(PREFIX):]
    if rel.startswith("/") or any(p in ("..", ".", "") for p in rel.split("/")):
        raise BadLine(f"path not plain: {name}")
    return Entry(digest.decode(), rel)


def _unescape(name: str) -> str:
    out = []
    it = iter(name)
    for c in it:
        if c == "\\":
            nxt = next(it, "")
            out.append({"\\": "\\", "n": "\n", "r": "\r"}.get(nxt, "\\" + nxt))
        else:
            out.append(c)
    return "".join(out)


def read(path: Path) -> Iterator[Entry | BadLine]:
    """Yield the manifest's entries, streaming; a line that cannot be parsed is yielded
    as a BadLine (with its line number) instead of stopping the reading."""
    with open(path, "rb") as f:
        for number, text in enumerate(f, 1):
            raw = text.rstrip(b"\n")
            if not raw.strip():
                continue
            try:
                yield parse_line(raw)
            except BadLine as exc:
                yield BadLine(f"line {number}: {exc}")
