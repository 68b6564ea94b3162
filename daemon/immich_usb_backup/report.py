"""The backup history as one self-contained HTML page, readable on a phone.

``render_html`` turns history records (as :mod:`immich_usb_backup.history` stores them,
oldest first) into a single page: no network, no external assets, no JavaScript, inline
CSS only. The page shows the last run and its status in words, a strip of the last
:data:`STRIP_RUNS` runs as coloured bars (oldest left, newest right), a legend, and a
table of every run given, newest first. Every value taken from a record is escaped.
Given the disks' last restore drills (``verify --restore-drill``, kept in the state dir
by :mod:`immich_usb_backup.drill`), it also says when each disk's last drill ran, and
how it went.

``write_html`` writes such a page atomically, so a web server or a browser never sees
half a file.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from immich_usb_backup import __version__, clock
from immich_usb_backup.fsutil import replace_file
from immich_usb_backup.record import STATUSES, RunRecord
from immich_usb_backup.text import human_bytes, short_duration

if TYPE_CHECKING:
    from immich_usb_backup.drill import DrillOutcome
    from immich_usb_backup.overview import DiskSummary

STRIP_RUNS = 30
"""How many runs the coloured strip shows at most (the table shows all it is given)."""

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

_CSS = """
:root {
  color-scheme: light dark;
  --bg: #f6f7f9; --card: #ffffff; --fg: #1f2937; --muted: #6b7280; --line: #e5e7eb;
  --empty: #eceef1;
  --success: #16a34a; --partial: #f59e0b; --failed: #dc2626; --interrupted: #9ca3af;
  --unknown: #6b7280;
  --success-badge: #15803d; --partial-badge: #b45309; --failed-badge: #b91c1c;
  --interrupted-badge: #4b5563; --unknown-badge: #374151;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #111827; --card: #1f2937; --fg: #f3f4f6; --muted: #9ca3af; --line: #374151;
    --empty: #2b3544;
  }
}
*, *::before, *::after { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; text-size-adjust: 100%; }
body {
  margin: 0; background: var(--bg); color: var(--fg);
  font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans",
        "DejaVu Sans", sans-serif;
}
main { max-width: 76rem; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.5rem; margin: .25rem 0 1rem; }
h2 { font-size: 1.1rem; margin: 0 0 .75rem; }
.card {
  background: var(--card); border: 1px solid var(--line); border-radius: .75rem;
  padding: 1rem 1.25rem; margin-bottom: 1rem;
}
.card > :last-child { margin-bottom: 0; }
.tally { margin: .6rem 0 0; }
.summary { border-left: .5rem solid var(--unknown); }
.summary.status-success { border-left-color: var(--success); }
.summary.status-partial { border-left-color: var(--partial); }
.summary.status-failed, .summary.status-refused { border-left-color: var(--failed); }
.summary.status-interrupted { border-left-color: var(--interrupted); }
.summary .verdict { font-size: 1.35rem; font-weight: 700; margin: 0 0 .25rem; }
.summary p { margin: .25rem 0; }
.muted { color: var(--muted); }
.strip {
  list-style: none; margin: 0; padding: 0; display: flex; gap: 3px;
  height: 3rem; align-items: stretch;
}
.bar {
  flex: 1 1 0; min-width: 2px; border-radius: 3px;
  background: var(--unknown);
}
.bar a { display: block; height: 100%; border-radius: inherit; }
.bar a:hover, .bar a:focus { outline: 2px solid var(--fg); outline-offset: 1px; }
.bar.empty, .swatch.empty { background: var(--empty); }
.swatch.empty { border: 1px solid var(--line); }
.strip-axis {
  display: flex; justify-content: space-between; font-size: .8rem; color: var(--muted);
  margin-top: .35rem;
}
.status-success { --c: var(--success); --b: var(--success-badge); }
.status-partial { --c: var(--partial); --b: var(--partial-badge); }
.status-failed, .status-refused { --c: var(--failed); --b: var(--failed-badge); }
.status-interrupted { --c: var(--interrupted); --b: var(--interrupted-badge); }
.status-unknown { --c: var(--unknown); --b: var(--unknown-badge); }
.bar[class*="status-"] { background: var(--c); }
.legend {
  list-style: none; margin: .9rem 0 0; padding: 0; display: flex; flex-wrap: wrap;
  gap: .35rem 1.1rem; font-size: .9rem;
}
.legend li { display: inline-flex; align-items: center; gap: .4rem; }
.swatch { width: .9rem; height: .9rem; border-radius: 3px; background: var(--c); }
.badge {
  display: inline-block; padding: .1rem .55rem; border-radius: 999px; color: #fff;
  background: var(--b); font-size: .85rem; font-weight: 600; white-space: nowrap;
}
.table-wrap { overflow-x: auto; -webkit-overflow-scrolling: touch; }
table { border-collapse: collapse; width: 100%; font-size: .95rem; }
th, td { text-align: left; vertical-align: top; padding: .55rem .6rem; }
thead th {
  font-size: .8rem; text-transform: uppercase; letter-spacing: .04em;
  color: var(--muted); border-bottom: 2px solid var(--line); white-space: nowrap;
}
tbody tr { border-bottom: 1px solid var(--line); }
tbody tr:last-child { border-bottom: none; }
tbody td:first-child { border-left: 4px solid var(--c); white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.disk { overflow-wrap: break-word; min-width: 8rem; }
td.problems { min-width: 14rem; }
ul.problems { margin: 0; padding-left: 1.1rem; }
ul.problems li { overflow-wrap: anywhere; }
details summary { cursor: pointer; color: var(--muted); }
ul.drills { list-style: none; margin: 0; padding: 0; }
ul.drills li { margin: .25rem 0; overflow-wrap: anywhere; }
.none { color: var(--muted); }
.nw { white-space: nowrap; }
.vh {
  position: absolute; width: 1px; height: 1px; overflow: hidden;
  clip: rect(0 0 0 0); white-space: nowrap;
}
footer { font-size: .85rem; color: var(--muted); margin: 1.5rem 0 1rem; }
@media (max-width: 40rem) {
  main { padding: .75rem; }
  h1 { font-size: 1.3rem; }
  .card { padding: .85rem 1rem; }
  .strip { gap: 2px; height: 2.75rem; }
  table, thead, tbody, tr, th, td { display: block; }
  table { font-size: 1rem; }
  thead { position: absolute; width: 1px; height: 1px; overflow: hidden;
          clip: rect(0 0 0 0); }
  tbody tr {
    border: 1px solid var(--line); border-left: .4rem solid var(--c);
    border-radius: .6rem; margin-bottom: .75rem; padding: .4rem .8rem;
  }
  tbody tr:last-child { border-bottom: 1px solid var(--line); }
  tbody td, tbody td:first-child {
    display: grid; grid-template-columns: 6.5rem minmax(0, 1fr); gap: .5rem;
    padding: .3rem 0; border: none; white-space: normal; min-width: 0;
  }
  td.num { text-align: left; }
  tbody td::before { content: attr(data-label); color: var(--muted); font-size: .9rem; }
  tbody td > .v { min-width: 0; justify-self: start; max-width: 100%; }
  td.disk, td.problems { min-width: 0; }
}
"""


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
    recs = list(records)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="color-scheme" content="light dark">',
        f'<meta name="generator" content="immich-usb-backup {_e(__version__)}">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{_e(title)}</h1>",
        _summary(recs, now),
    ]
    if disks:
        parts.append(_disks(disks, now, remind_after_days))
    if drills:
        parts.append(_drills(drills, now))
    if recs:
        parts += [_strip(recs), _table(recs)]
    host = next((r.host for r in reversed(recs) if r.host), "")
    on_host = f" for <strong>{_e(host)}</strong>" if host else ""
    runs = f"{len(recs)} run{'' if len(recs) == 1 else 's'}"
    parts += [
        f'<footer>Generated {_time_element(now)}{on_host} by <span class="nw">'
        f"immich-usb-backup {_e(__version__)}</span>. {runs} in this report.</footer>",
        "</main>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(parts)


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


# parts of the page --------------------------------------------------------------------


def _summary(recs: list[RunRecord], now: datetime) -> str:
    if not recs:
        return ('<section class="card summary" data-status="none">'
                '<p class="verdict">No backups yet</p>'
                '<p class="muted">Plug in an approved backup disk to make the first one.</p>'
                "</section>")
    last = recs[-1]
    status = _status(last)
    when = _parse_time(last.started_at)
    verdict = _VERDICTS.get(status, f"Backup status: {status}")
    lines = [
        f'<section class="card summary {_css_class(status)}" data-status="{_e(status)}">',
        f'<p class="verdict">{_e(verdict)}</p>',
        f"<p>Last run: {_when(last.started_at)}"
        + (f' <span class="muted">({_e(_ago(when, now))})</span>' if when else "")
        + f" on {_e(_disk_name(last))}</p>",
        f"<p>{_e(_copied(last))}</p>",
    ]
    if status != "success":
        ok = next((r for r in reversed(recs) if _status(r) == "success"), None)
        if ok is None:
            lines.append('<p class="muted">No successful backup in this report.</p>')
        else:
            ok_when = _parse_time(ok.started_at)
            ago = f" ({_e(_ago(ok_when, now))})" if ok_when else ""
            lines.append(f'<p class="muted">Last successful backup: '
                         f"{_when(ok.started_at)}{ago}</p>")
    problems = _problems(last)
    if problems:
        lines.append(f"<p>{len(problems)} problem{'' if len(problems) == 1 else 's'}: "
                     f"{_e(problems[0])}{' …' if len(problems) > 1 else ''}</p>")
    lines.append("</section>")
    return "\n".join(lines)


def _disks(disks: Sequence[DiskSummary], now: datetime, remind_after_days: int) -> str:
    from immich_usb_backup.overview import overdue  # noqa: PLC0415 - plain functions

    rows = []
    for d in disks:
        age = d.age_days(now)
        late = overdue(age, remind_after_days)
        when = (_when(d.last_backup_at) if d.last_backup_at else "never")
        ago = ("" if age is None else f'<span class="muted"> ({age} day'
               f'{"" if age == 1 else "s"} ago)</span>')
        space = (f"{_e(human_bytes(d.free_bytes))} free of {_e(human_bytes(d.size_bytes))}"
                 if d.free_bytes is not None and d.size_bytes else "-")
        check = ("-" if d.last_verify_at is None else
                 f"{_when(d.last_verify_at)}, "
                 f'{"passed" if d.last_verify_passed else "<strong>FAILED</strong>"}')
        flag = (f' <span class="badge">no backup for {age} days</span>' if late else "")
        cells = [
            ("Disk", "disk", f"{_e(d.label or '-')}{flag}"),
            ("UUID", "uuid", f'<span class="nw">{_e(d.uuid)}</span>'),
            ("Last backup", "time", f"{when}{ago}"),
            ("Space then", "num", space),
            ("Files", "num", "-" if d.files is None else f"{d.files:,}"),
            ("Last check", "check", check),
        ]
        tds = "".join(f'<td class="{cls}" data-label="{label}"><div class="v">{body}</div>'
                      "</td>" for label, cls, body in cells)
        css = "disk overdue status-failed" if late else "disk"
        rows.append(f'<tr class="{css}" data-uuid="{_e(d.uuid)}">{tds}</tr>')
    head = "".join(f'<th scope="col">{c}</th>' for c in
                   ("Disk", "UUID", "Last backup", "Space then", "Files", "Last check"))
    return "\n".join([
        '<section class="card disks" aria-labelledby="disks-h">',
        f'<h2 id="disks-h">Disks ({len(disks)})</h2>',
        '<div class="table-wrap"><table>',
        f"<thead><tr>{head}</tr></thead>",
        "<tbody>", *rows, "</tbody>",
        "</table></div>",
        "</section>",
    ])


def _drills(drills: Sequence[DrillOutcome], now: datetime) -> str:
    items = []
    for d in drills:
        status = "success" if d.passed else "failed"
        when = _parse_time(d.at)
        ago = f' <span class="muted">({_e(_ago(when, now))})</span>' if when else ""
        line = (f"Last restore drill: {_when(d.at)}{ago}, "
                f'<span class="badge">{"passed" if d.passed else "failed"}</span> '
                f"({_e(d.dump or '-')})")
        if not d.passed:
            line += (f'<br><span class="muted">{_e(d.problem)}</span>' if d.problem else "")
            line += (f'<br><span class="muted">Last passed: {_when(d.last_passed_at)} '
                     f"({_e(d.last_passed_dump)})</span>" if d.last_passed_at else
                     '<br><span class="muted">No drill of this disk has passed yet.</span>')
        disk = f"<strong>{_e(d.disk_name)}</strong>: " if len(drills) > 1 else ""
        items.append(f'<li class="{_css_class(status)}" data-drill="{status}">{disk}{line}'
                     "</li>")
    disk = "" if len(drills) > 1 else f" of {_e(drills[0].disk_name)}"
    return "\n".join([
        '<section class="card drills" aria-labelledby="drills-h">',
        f'<h2 id="drills-h">Restore drill{"s" if len(drills) > 1 else ""}{disk}</h2>',
        f'<ul class="drills">{"".join(items)}</ul>',
        '<p class="muted">A drill loads the newest database dump on the disk into a '
        "throwaway PostgreSQL: <code>immich-usb-backup verify DISK --restore-drill</code>."
        "</p>",
        "</section>",
    ])


def _strip(recs: list[RunRecord]) -> str:
    shown = recs[-STRIP_RUNS:]
    first_index = len(recs) - len(shown)
    items = ['<li class="bar empty" aria-hidden="true"></li>'] * (STRIP_RUNS - len(shown))
    for i, r in enumerate(shown, start=first_index):
        status = _status(r)
        tip = f"{_plain_time(r.started_at)} · {status} · {_disk_name(r)}"
        items.append(
            f'<li class="bar {_css_class(status)}" data-status="{_e(status)}" '
            f'title="{_e(tip)}"><a href="#run-{i}"><span class="vh">{_e(tip)}</span></a></li>'
        )
    counts = {s: sum(1 for r in shown if _status(r) == s) for s in STATUSES}
    tally = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    legend = "".join(
        f'<li class="{_css_class(s)}"><span class="swatch" aria-hidden="true"></span>'
        f"{_e(label)}</li>"
        for s, label in (("success", "success"), ("partial", "partial"),
                         ("failed", "failed / refused"), ("interrupted", "interrupted"))
    )
    if len(shown) < STRIP_RUNS:
        legend += '<li><span class="swatch empty" aria-hidden="true"></span>no run yet</li>'
    return "\n".join([
        '<section class="card" aria-labelledby="strip-h">',
        f'<h2 id="strip-h">Last {len(shown)} run{"" if len(shown) == 1 else "s"}</h2>',
        f'<ol class="strip" aria-label="runs, oldest first">{"".join(items)}</ol>',
        '<div class="strip-axis" aria-hidden="true"><span>older</span><span>newest</span>'
        "</div>",
        f'<ul class="legend" aria-label="legend">{legend}</ul>',
        f'<p class="muted tally">{_e(tally)}</p>' if tally else "",
        "</section>",
    ])


_COLUMNS = ("Time", "Disk", "Mode", "Status", "Files", "Copied", "Duration", "Problems")


def _table(recs: list[RunRecord]) -> str:
    head = "".join(f'<th scope="col">{c}</th>' for c in _COLUMNS)
    rows = [_row(i, r) for i, r in reversed(list(enumerate(recs)))]
    return "\n".join([
        '<section class="card" aria-labelledby="runs-h">',
        f'<h2 id="runs-h">All runs in this report, newest first ({len(recs)})</h2>',
        '<div class="table-wrap">',
        "<table>",
        f"<thead><tr>{head}</tr></thead>",
        "<tbody>",
        *rows,
        "</tbody>",
        "</table>",
        "</div>",
        "</section>",
    ])


def _row(index: int, r: RunRecord) -> str:
    status = _status(r)
    uuid = r.disk.uuid or ""
    disk_title = f' title="UUID {_e(uuid)}"' if uuid and r.disk.label else ""
    files, size, seconds = r.files_transferred, r.bytes_transferred, r.duration_s
    cells = [
        ("Time", "time", _when(r.started_at)),
        ("Disk", "disk", f"<span{disk_title}>{_e(_disk_name(r))}</span>"),
        ("Mode", "mode", _e(r.mode or "-")),
        ("Status", "status", f'<span class="badge">{_e(status)}</span>'),
        ("Files", "num files", "?" if files is None else f"{files:,}"),
        ("Copied", "num bytes", "?" if size is None else _e(human_bytes(size))),
        ("Duration", "num duration",
         "?" if seconds is None else _e(short_duration(seconds))),
        ("Problems", "problems", _problem_list(_problems(r))),
    ]
    tds = "".join(f'<td class="{cls}" data-label="{label}"><div class="v">{body}</div></td>'
                  for label, cls, body in cells)
    return (f'<tr id="run-{index}" class="{_css_class(status)}" '
            f'data-status="{_e(status)}">{tds}</tr>')


def _copied(r: RunRecord) -> str:
    files, size, seconds = r.files_transferred, r.bytes_transferred, r.duration_s
    took = "" if seconds is None else f" in {short_duration(seconds)}"
    if files == 0 and size == 0:
        return f"Nothing was copied{took}."
    what = "? files" if files is None else f"{files:,} file{'' if files == 1 else 's'}"
    amount = "?" if size is None else human_bytes(size)
    return f"Copied {what}, {amount}{took}."


def _problem_list(problems: list[str]) -> str:
    if not problems:
        return '<span class="none">none</span>'
    items = [f"<li>{_e(p)}</li>" for p in problems]
    out = f'<ul class="problems">{"".join(items[:PROBLEMS_SHOWN])}</ul>'
    rest = items[PROBLEMS_SHOWN:]
    if rest:
        out += (f"<details><summary>{len(rest)} more</summary>"
                f'<ul class="problems">{"".join(rest)}</ul></details>')
    return out


# values -------------------------------------------------------------------------------


def _e(value: str) -> str:
    return html.escape(value, quote=True)


def _status(r: RunRecord) -> str:
    return r.status or "unknown"


def _css_class(status: str) -> str:
    return f"status-{status}" if status in STATUSES else "status-unknown"


def _disk_name(r: RunRecord) -> str:
    return r.disk.name or "-"


def _problems(r: RunRecord) -> list[str]:
    return r.problems


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


def _time_element(t: datetime) -> str:
    return f'<time datetime="{_e(t.isoformat(timespec="seconds"))}">{_e(_readable(t))}</time>'


def _when(value: Any) -> str:
    t = _parse_time(value)
    if t is None:
        return _e(str(value) if value else "?")
    return _time_element(t)


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
            n = s // size
            return f"{n} {unit}{'' if n == 1 else 's'} ago"
    raise AssertionError("unreachable")  # pragma: no cover
