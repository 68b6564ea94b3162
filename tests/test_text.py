"""Counts meet their nouns in the right number, in every message, summary and page.

Every text the product shows a person is rendered with the counts 0, 1 and 2, and read
for "1 files", "2 file", "file(s)" and the like.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from immich_usb_backup import cliformat, messages, overview, report, text
from immich_usb_backup.assetcheck import AssetCheck
from immich_usb_backup.drill import DrillOutcome
from immich_usb_backup.history import format_table
from immich_usb_backup.record import RunRecord
from immich_usb_backup.steps.assets import AssetsResult
from immich_usb_backup.steps.database import DatabaseResult
from immich_usb_backup.steps.library import LibraryResult

NOW = datetime(2026, 12, 1, 0, 6, tzinfo=timezone(timedelta(hours=1)))
NOUNS = ("file", "day", "dump", "archive", "problem", "run", "service", "disk", "entry",
         "copy", "folder", "minute", "hour", "second", "reminder", "byte", "sector", "asset",
         "path", "error")
_PLURAL = "|".join(text.plural_of(n) for n in NOUNS)
_SINGULAR = "|".join(NOUNS)
WRONG = [
    re.compile(rf"(?<![\d.,])1 (?:{_PLURAL})\b"),  # "1 files"
    re.compile(rf"(?<![\d.,])(?:0|[2-9]|\d\d+) (?:{_SINGULAR})\b(?!s|-)"),  # "2 file"
    re.compile(r"\w\(s\)"),  # "file(s)"
    re.compile(r"\b1 (?:were|are|have)\b|\bit were\b|\bthey was\b"),
]


def wrong_numbers(shown: str) -> list[str]:
    return [m.group(0) for pattern in WRONG for m in pattern.finditer(shown)]


def test_plural_and_word() -> None:
    assert [text.plural(n, "file") for n in (0, 1, 2)] == ["0 files", "1 file", "2 files"]
    assert text.plural(2, "entry") == "2 entries" and text.plural(2, "day") == "2 days"
    assert text.plural(None, "file") == "? files"
    assert text.plural(3, "changed file") == "3 changed files"
    assert text.plural(2, "person", "people") == "2 people"
    assert [text.word(n, "was") for n in (1, 2)] == ["was", "were"]
    assert text.duration(95.3) == "1 min 35 s" and text.short_duration(95) == "1m35s"


def record(n: int) -> RunRecord:
    r = RunRecord.begin("plug", "verify", "/media/backup", NOW)
    r.disk.uuid, r.disk.label = "6F5F-FDC3", "Backup"
    r.steps["database"] = DatabaseResult(files=n, bytes=n * 1000, dump="d.sql.gz")
    r.steps["assets"] = AssetsResult(line=AssetCheck(originals=n, on_disk=n, matched=n,
                                                     not_read=n, trashed=n).line())
    r.steps["library"] = LibraryResult(
        files=n, bytes=n, moved=n, deleted=n, kept=n, keep_day="2026-12-01", keep_days=n,
        source_files=n, compared=n, changed_while_copied=n, leftovers=n)
    r.conclude([f"problem {i}" for i in range(n)], NOW + timedelta(seconds=n))
    r.status = "partial" if n else "success"
    return r


@pytest.mark.parametrize("n", [0, 1, 2])
def test_every_message_and_summary_says_counts_in_the_right_number(n: int) -> None:
    r = record(n)
    end = messages.DiskEnd("powered-off", free_bytes=n, size_bytes=10)
    shown: list[Any] = [
        messages.started("Backup", "6F5F-FDC3", [f"library: {text.plural(n, 'file')}"], n, n),
        messages.finished(r, end),
        messages.refused(r, end),
        messages.needs_approval("Backup", "6F5F-FDC3", "/dev/sdb1", "approve", end),
        messages.reminder(f"No backup for {text.plural(n, 'day')}", n),
        messages.state_damaged("the state file x was damaged"),
        messages.disk_health("Backup", "6F5F-FDC3", f"Backup: {text.plural(n, 'sector')} "
                             f"reallocated since 2026-11-30 ({n} before)"),
    ]
    lines = [f"{m.title}\n{m.body}" for m in shown]
    lines.append(cliformat.format_summary(r))
    lines.append(format_table([r] * n))
    reminder = overview.Reminder(n, [overview.DiskSummary(
        "6F5F-FDC3", "Backup", None, (NOW - timedelta(days=n)).isoformat())])
    lines.append(overview.text(reminder, NOW))
    lines.append(report.render_html([r] * max(n, 1), drills=[DrillOutcome(
        "6F5F-FDC3", "Backup", NOW.isoformat(), bool(n), "d.sql.gz",
        failed_statements=n)] * n, disks=[], remind_after_days=7, generated_at=NOW))
    for shown_text in lines:
        assert wrong_numbers(shown_text) == [], shown_text


def test_the_check_catches_a_wrong_number() -> None:
    assert wrong_numbers("Copied: 1 files, 2 file, 3 dump(s)") == ["1 files", "2 file",
                                                                    "3 dump", "p(s)"]
    assert wrong_numbers("1 file, 2 files, 0 days, 1.5 GiB, 2 file-names") == []
