"""The backup history: one JSON record per run, appended to ``<state dir>/history.jsonl``.

Appending one line per run keeps every write small and the file readable after any crash;
readers skip a line they cannot parse (a power cut mid-append) and say so in the log.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from immich_usb_backup import state
from immich_usb_backup.record import RunRecord
from immich_usb_backup.text import human_bytes, short_duration

HISTORY_NAME = state.HISTORY


def append(state_dir: Path, record: RunRecord) -> None:
    """Append ``record`` as one line and flush it to disk."""
    state.append_line(state_dir, HISTORY_NAME, record.to_dict())


def iter_records(state_dir: Path) -> Iterator[dict[str, Any]]:
    """Every record as it is stored (a JSON object), oldest first."""
    return state.iter_lines(state_dir, HISTORY_NAME)


def last_records(state_dir: Path, n: int | None,
                 disk: str | None = None) -> list[dict[str, Any]]:
    """The last ``n`` records as stored (all when None), oldest first: what
    ``history --json`` prints, unchanged. ``disk``: only the runs onto the disk with
    this file system UUID (any case)."""
    records = iter_records(state_dir)
    if disk is not None:
        wanted = disk.strip().upper()
        records = (r for r in records if isinstance(r.get("disk"), dict)
                   and str(r["disk"].get("uuid") or "").upper() == wanted)
    return list(collections.deque(records, maxlen=n))


def load_runs(state_dir: Path, n: int | None, disk: str | None = None) -> list[RunRecord]:
    """The last ``n`` records (all when None), oldest first, read into ``RunRecord``."""
    return [RunRecord.from_dict(r) for r in last_records(state_dir, n, disk)]


def format_table(records: list[RunRecord]) -> str:
    """A table a person reads at a glance: one row a run, newest last."""

    header = ("started", "status", "trigger", "mode", "disk", "files", "copied", "took",
              "problems")
    rows = [header]
    for r in records:
        first = f"{len(r.problems)}: {r.problems[0]}" if r.problems else ""
        if len(first) > 60:
            first = first[:57] + "..."
        rows.append((
            r.started_at[:19].replace("T", " "),
            r.status,
            r.trigger,
            r.mode,
            r.disk.name or "-",
            "?" if r.files_transferred is None else str(r.files_transferred),
            "?" if r.bytes_transferred is None else human_bytes(r.bytes_transferred),
            "?" if r.duration_s is None else short_duration(r.duration_s),
            first,
        ))
    return columns(rows)


def columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows of text (the first a header) as aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)
