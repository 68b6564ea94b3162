"""The backup history as one self-contained HTML page, readable on a phone.

``render_html`` turns history records (as :mod:`immich_usb_backup.history` stores them,
oldest first) into a single page: no network, no external assets, no JavaScript, inline
CSS only. The page shows the last run and its status in words, a strip of the last
:data:`STRIP_RUNS` runs as coloured bars (oldest left, newest right), a legend, and a
table of every run given, newest first. Given the disks' last restore drills and every
approved disk's summary, it also shows those.

The markup is in Jinja2 templates (``templates/``, autoescaped: every value taken from a
record is escaped there); this module builds the plain view they show (``view``), which
the web UI's pages reuse with the same templates (``environment``, ``CSS``).

``write_html`` writes such a page atomically, so a web server or a browser never sees
half a file.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from immich_usb_backup import __version__, clock
from immich_usb_backup.fsutil import replace_file
from immich_usb_backup.record import STATUSES, RunRecord
from immich_usb_backup.text import human_bytes, plural, short_duration

if TYPE_CHECKING:
    import jinja2

    from immich_usb_backup.drill import DrillOutcome
    from immich_usb_backup.overview import DiskSummary

STRIP_RUNS = 30
"""How many runs the coloured strip shows at most (the table shows all it is given)."""

WEEK_DAYS = 7
"""How many days the web UI's backup page shows as a strip."""

DEFAULT_TITLE = "Immich USB backups"

PROBLEMS_SHOWN = 3
"""Problems shown open in a table cell; the rest sit in a ``<details>`` of the same cell."""

# status -> the header's sentence about the last run
_VERDICTS: dict[str, str] = {
    "success": "Backup succeeded",
    "partial": "Backup finished, but needs attention",
    "failed": "Backup failed",
    "refused": "Backup refused",
    "interrupted": "Backup interrupted",
}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@functools.cache
def environment() -> jinja2.Environment:
    """The templates of ``templates/``, autoescaped (``.html``), loaded once. Jinja2 is
    imported here, when a page is first made: an idle daemon does not hold it (11 MiB)."""
    import jinja2  # noqa: PLC0415

    return jinja2.Environment(
        loader=jinja2.PackageLoader("immich_usb_backup", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@functools.cache
def css() -> str:
    """The pages' style sheet (``templates/style.css``): inline in the page files, served
    as a file by the web UI."""
    return (resources.files("immich_usb_backup") / "templates" / "style.css").read_text(
        encoding="utf-8")


def render_html(
    records: Sequence[RunRecord],
    generated_at: datetime | None = None,
    title: str = DEFAULT_TITLE,
    drills: Sequence[DrillOutcome] = (),
    disks: Sequence[DiskSummary] = (),
    remind_after_days: int = 0,
) -> str:
    """Return one complete HTML document (``str``) for ``records``.

    ``records`` are history records oldest first, as :func:`history.load_runs` returns
    them; the page shows them all in its table, newest first, and the last
    :data:`STRIP_RUNS` of them as bars, oldest left. ``generated_at`` (default: now) is
    printed in the footer and used for "... ago"; a naive value is taken as local time.
    Times are shown in this machine's local time zone.

    Contract, relied on by tests and by people reading the page:

    - self-contained: no ``http://``/``https://`` reference, no script, inline CSS only;
    - every bar (``li.bar``) and table row (``tbody tr``) carries ``data-status`` with the
      record's status and the class ``status-<s>`` (``status-unknown`` for a status not
      in :data:`record.STATUSES`); failed and refused share the red colour;
    - every value from a record is HTML-escaped; damaged values (a time that does not
      parse, a count that is not a number) are shown as they are or as ``?``;
    - with no records the page says "No backups yet" and has no table;
    - ``drills`` (each disk's last restore drill, as ``drill.load_outcomes`` gives them):
      one line each, "Last restore drill: <time>, passed (<dump>)" (or failed, with the
      last pass), in a ``section.drills`` after the summary; none given, no section;
    - ``disks`` (every approved disk, as ``overview.disks`` gives them): a "Disks" panel,
      ``section.disks``, a row each (``tr.disk``, ``data-uuid``): label, UUID, last backup
      and its age, free space and files then, last content check; a disk whose last
      backup is ``remind_after_days`` old or more has the class ``overdue`` and says so.
    """
    now = (generated_at or clock.now()).astimezone()
    page = view(records, now, drills, disks, remind_after_days)
    from markupsafe import Markup  # noqa: PLC0415 - with Jinja2, when a page is made

    return environment().get_template("history.html").render(
        title=title, version=__version__, static="", view=page,
        css=Markup(css()))  # noqa: S704 - our own style sheet, not input


def write_html(
    path: Path,
    records: Sequence[RunRecord],
    generated_at: datetime | None = None,
    title: str = DEFAULT_TITLE,
    drills: Sequence[DrillOutcome] = (),
    disks: Sequence[DiskSummary] = (),
    remind_after_days: int = 0,
) -> None:
    """Render ``records`` and write the page to ``path`` atomically (UTF-8, mode 0644).

    The page goes to a temporary file in the same folder, is flushed and fsynced, then
    replaces ``path`` with ``os.replace``: a reader sees the old page or the new one,
    never part of one. The folder must exist; an ``OSError`` is raised as it comes and
    the temporary file is removed.
    """
    replace_file(path, render_html(records, generated_at=generated_at, title=title,
                                   drills=drills, disks=disks,
                                   remind_after_days=remind_after_days).encode("utf-8"))


# The view: what the templates show, as plain values ---------------------------------------


@dataclass(frozen=True)
class When:
    """A time as the page shows it: ``iso`` for ``<time datetime>`` (None when the value
    did not parse, then ``text`` is the value as it was)."""

    iso: str | None
    text: str


def view(records: Sequence[RunRecord], now: datetime, drills: Sequence[DrillOutcome] = (),
         disks: Sequence[DiskSummary] = (), remind_after_days: int = 0) -> dict[str, Any]:
    """Everything ``history.html`` (and the web UI's history page) shows, as plain
    values: ``summary``, ``disks``, ``drills``, ``strip``, ``table``, ``footer``."""
    recs = list(records)
    host = next((r.host for r in reversed(recs) if r.host), "")
    return {
        "summary": summary(recs, now),
        "disks": disk_rows(disks, now, remind_after_days),
        "drills": drill_items(drills, now),
        "strip": strip(recs) if recs else None,
        "table": table(recs) if recs else None,
        "footer": {"generated": _time(now), "host": host, "version": __version__,
                   "runs": plural(len(recs), "run")},
    }


def summary(recs: list[RunRecord], now: datetime) -> dict[str, Any] | None:
    """The last run in words (None without runs)."""
    if not recs:
        return None
    last = recs[-1]
    status = _status(last)
    ok = None
    if status != "success":
        good = next((r for r in reversed(recs) if _status(r) == "success"), None)
        if good is not None:
            ok = {"when": _when(good.started_at), "ago": _ago(_parse_time(good.started_at),
                                                              now)}
    problems = last.problems
    return {
        "status": status, "css": _css_class(status),
        "verdict": _VERDICTS.get(status, f"Backup status: {status}"),
        "last": _when(last.started_at), "ago": _ago(_parse_time(last.started_at), now),
        "disk": _disk_name(last), "copied": _copied(last), "ok": ok,
        "problems": problems, "problems_text": plural(len(problems), "problem"),
    }


def disk_rows(disks: Sequence[DiskSummary], now: datetime,
              remind_after_days: int) -> list[dict[str, Any]]:
    """Every approved disk at a glance; ``late``: no backup for ``remind_after_days``."""
    from immich_usb_backup.overview import overdue  # noqa: PLC0415 - plain functions

    rows = []
    for d in disks:
        age = d.age_days(now)
        rows.append({
            "uuid": d.uuid, "label": d.label or "-", "age": age,
            "age_text": "" if age is None else f"{plural(age, 'day')} ago",
            "late": overdue(age, remind_after_days),
            "when": _when(d.last_backup_at) if d.last_backup_at else None,
            "space": (f"{human_bytes(d.free_bytes)} free of {human_bytes(d.size_bytes)}"
                      if d.free_bytes is not None and d.size_bytes else "-"),
            "files": "-" if d.files is None else f"{d.files:,}",
            "check": None if d.last_verify_at is None else
            {"when": _when(d.last_verify_at), "passed": bool(d.last_verify_passed)},
            "late_text": "" if age is None else f"no backup for {plural(age, 'day')}",
            "health": str((d.health or {}).get("line") or "-"),
        })
    return rows


def drill_items(drills: Sequence[DrillOutcome], now: datetime) -> dict[str, Any] | None:
    """Each disk's last restore drill (None without any)."""
    if not drills:
        return None
    items = []
    for d in drills:
        status = "success" if d.passed else "failed"
        items.append({
            "status": status, "css": _css_class(status), "passed": d.passed,
            "disk": d.disk_name, "when": _when(d.at), "ago": _ago(_parse_time(d.at), now),
            "dump": d.dump or "-", "problem": d.problem,
            "last_passed": {"when": _when(d.last_passed_at), "dump": d.last_passed_dump}
            if d.last_passed_at else None,
        })
    return {"multi": len(items) > 1, "entries": items}


def strip(recs: list[RunRecord]) -> dict[str, Any]:
    """The last :data:`STRIP_RUNS` runs as bars, oldest left; ``index`` is the run's
    place in ``recs`` (its table row is ``#run-<index>``)."""
    shown = recs[-STRIP_RUNS:]
    first = len(recs) - len(shown)
    bars = [{"index": i, "status": _status(r), "css": _css_class(_status(r)),
             "tip": _tip(r)} for i, r in enumerate(shown, start=first)]
    counts = {s: sum(1 for r in shown if _status(r) == s) for s in STATUSES}
    return {"bars": bars, "empty": STRIP_RUNS - len(shown),
            "shown_text": plural(len(shown), "run"),
            "tally": ", ".join(f"{n} {s}" for s, n in counts.items() if n)}


def week(recs: Sequence[RunRecord], now: datetime, days: int = WEEK_DAYS) -> dict[str, Any]:
    """The runs of the last ``days`` days (today included), a column a day, oldest left."""
    today = now.date()
    columns: list[dict[str, Any]] = []
    for back in range(days - 1, -1, -1):
        day = today - timedelta(days=back)
        columns.append({"date": day.isoformat(), "runs": [],
                        "name": "today" if back == 0 else _WEEKDAYS[day.weekday()]})
    first = today - timedelta(days=days - 1)
    for r in recs:
        t = _parse_time(r.started_at)
        if t is None or not first <= t.astimezone(now.tzinfo).date() <= today:
            continue
        status = _status(r)
        columns[(t.astimezone(now.tzinfo).date() - first).days]["runs"].append(
            {"status": status, "css": _css_class(status), "tip": _tip(r)})
    n = sum(len(c["runs"]) for c in columns)
    ok = sum(1 for c in columns for r in c["runs"] if r["status"] == "success")
    tally = (f"{plural(n, 'run')} in {days} days, {ok} successful" if n
             else f"no run in the last {days} days")
    return {"days": columns, "tally": tally}


def table(recs: list[RunRecord]) -> dict[str, Any]:
    """Every run given, newest first."""
    rows = []
    for i, r in reversed(list(enumerate(recs))):
        status = _status(r)
        files, size, seconds = r.files_transferred, r.bytes_transferred, r.duration_s
        rows.append({
            "index": i, "status": status, "css": _css_class(status),
            "when": _when(r.started_at), "disk": _disk_name(r),
            "uuid_title": (r.disk.uuid or "") if r.disk.label else "",
            "mode": r.mode or "-",
            "files": "?" if files is None else f"{files:,}",
            "size": "?" if size is None else human_bytes(size),
            "duration": "?" if seconds is None else short_duration(seconds),
            "problems": r.problems,
            "checks": _checks(r),
        })
    return {"rows": rows, "problems_shown": PROBLEMS_SHOWN,
            "heading": f"All runs in this report, newest first ({len(recs)})"}


# values -------------------------------------------------------------------------------


def _checks(r: RunRecord) -> list[str]:
    """The run's one-line proofs: the asset check (``assets: ...``), the disk's health."""
    out = []
    assets = r.steps.get("assets")
    line = getattr(assets, "line", None) or (assets.extra.get("line") if assets else None)
    if isinstance(line, str):
        out.append(line)
    if r.health and isinstance(r.health.get("line"), str):
        out.append(r.health["line"])
    return out


def _tip(r: RunRecord) -> str:
    return f"{_plain_time(r.started_at)} · {_status(r)} · {_disk_name(r)}"


def _copied(r: RunRecord) -> str:
    files, size, seconds = r.files_transferred, r.bytes_transferred, r.duration_s
    took = "" if seconds is None else f" in {short_duration(seconds)}"
    if files == 0 and size == 0:
        return f"Nothing was copied{took}."
    what = "? files" if files is None else f"{files:,} file{'' if files == 1 else 's'}"
    amount = "?" if size is None else human_bytes(size)
    return f"Copied {what}, {amount}{took}."


def _status(r: RunRecord) -> str:
    return r.status or "unknown"


def _css_class(status: str) -> str:
    return f"status-{status}" if status in STATUSES else "status-unknown"


def _disk_name(r: RunRecord) -> str:
    return r.disk.name or "-"


def _parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time in local time (a naive one is taken as local), or None."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).astimezone()
    except ValueError:
        return None


def _readable(t: datetime) -> str:
    """``Mon 6 Jan 2025, 02:00``: the same in every locale."""
    return (f"{_WEEKDAYS[t.weekday()]} {t.day} {_MONTHS[t.month - 1]} {t.year}, "
            f"{t:%H:%M}")


def _plain_time(value: Any) -> str:
    t = _parse_time(value)
    if t is not None:
        return _readable(t)
    return str(value) if value else "?"


def _time(t: datetime) -> When:
    return When(t.isoformat(timespec="seconds"), _readable(t))


def _when(value: Any) -> When:
    t = _parse_time(value)
    if t is None:
        return When(None, str(value) if value else "?")
    return _time(t)


def _ago(t: datetime | None, now: datetime) -> str:
    if t is None:
        return ""
    s = int((now - t).total_seconds())
    if s < -60:
        return "in the future"
    if s < 60:
        return "just now"
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if s >= size:
            return f"{plural(s // size, unit)} ago"
    raise AssertionError("unreachable")  # pragma: no cover
