"""The HTML history report: markup, escaping, the CLI, and a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO, need, run_cli
from immich_usb_backup import history, report
from immich_usb_backup.record import RunRecord
from immich_usb_backup.text import human_bytes

STATUSES = ("success", "partial", "failed", "refused", "interrupted")
HOSTILE = "<script>alert(1)</script>"
ARTIFACTS = REPO / "test-artifacts"
TZ = timezone(timedelta(hours=1))
BASE = datetime(2025, 1, 6, 2, 0, 0, tzinfo=TZ)


def record(n: int, status: str = "success", **extra: Any) -> dict[str, Any]:
    started = BASE + timedelta(days=n)
    base: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": (started + timedelta(seconds=95)).isoformat(timespec="seconds"),
        "status": status,
        "trigger": "plug",
        "mode": "quick",
        "disk": {"uuid": f"UUID-{n:04d}", "label": f"Disk-{n}"},
        "files_transferred": 1342,
        "bytes_transferred": 1288490189,
        "duration_s": 95.3,
        "problems": [] if status == "success" else [f"problem of run {n}"],
        "target": "/media/backup",
        "host": "nas",
        "version": "0.1.0",
        "steps": {},
    }
    base.update(extra)
    return base


def runs(recs: list[dict[str, Any]]) -> list[RunRecord]:
    return [RunRecord.from_dict(r) for r in recs]


def render(recs: list[dict[str, Any]], **kwargs: Any) -> str:
    return report.render_html(runs(recs), **kwargs)


def one_of_each() -> list[dict[str, Any]]:
    recs = [record(i, s) for i, s in enumerate(STATUSES)]
    recs[1]["disk"] = {"uuid": "6F9C-FA9C", "label": "Bäckup Disk"}
    return recs


class Page(HTMLParser):
    """Start tags with their attributes, the text of each table row, and all the text."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.row_texts: list[str] = []
        self.text: list[str] = []
        self.style = ""
        self._row: list[str] | None = None
        self._in_style = False
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "tr" and "data-status" in a:
            self._row = []
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row is not None:
            self.row_texts.append(" ".join(self._row))
            self._row = None
        if tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.style += data
            return
        self.text.append(data)
        if self._row is not None:
            self._row.append(data)

    def all(self, tag: str, cls: str | None = None) -> list[dict[str, str]]:
        return [a for t, a in self.tags
                if t == tag and (cls is None or cls in a.get("class", "").split())]

    @property
    def bars(self) -> list[dict[str, str]]:
        """The strip's bars for runs, left to right (empty slots left out)."""
        return [a for a in self.all("li", "bar") if "data-status" in a]

    @property
    def rows(self) -> list[dict[str, str]]:
        """The table's rows for runs, top to bottom."""
        return [a for a in self.all("tr") if "data-status" in a]

    def colour_var(self, status: str) -> str:
        """The CSS colour variable that ``.status-<status>`` maps ``--c`` to."""
        for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", self.style):
            names = {s.strip() for s in selectors.split(",")}
            m = re.search(r"--c:\s*var\((--[\w-]+)\)", body)
            if f".status-{status}" in names and m:
                return m.group(1)
        raise AssertionError(f"no colour rule for status {status}")


def local(iso: str) -> datetime:
    return datetime.fromisoformat(iso).astimezone()


# render_html -------------------------------------------------------------------------


def test_each_status_has_its_bar_row_class_data_status_and_colour() -> None:
    page = Page(render(one_of_each()))

    assert [b["data-status"] for b in page.bars] == list(STATUSES)
    for bar, status in zip(page.bars, STATUSES, strict=True):
        assert f"status-{status}" in bar["class"].split()
    assert sorted(r["data-status"] for r in page.rows) == sorted(STATUSES)
    for row in page.rows:
        assert f"status-{row['data-status']}" in row["class"].split()
    assert [a.get("class") for a in page.all("span", "badge")] == ["badge"] * 5

    colours = {s: page.colour_var(s) for s in STATUSES}
    assert colours == {"success": "--success", "partial": "--partial", "failed": "--failed",
                       "refused": "--failed", "interrupted": "--interrupted"}
    root = re.search(r":root\s*\{([^}]*)\}", page.style)
    assert root is not None
    values = {v: re.search(rf"{v}:\s*(#[0-9a-f]{{6}})", root.group(1)) for v in
              ("--success", "--partial", "--failed", "--interrupted")}
    hexes = {v: m.group(1) for v, m in values.items() if m}
    assert len(set(hexes.values())) == 4, hexes  # four distinct colours
    legend = "".join(page.text)
    for word in ("success", "partial", "failed / refused", "interrupted"):
        assert word in legend


def test_hostile_label_and_problems_are_escaped_everywhere() -> None:
    quote_label = 'x" onmouseover="alert(2)'
    recs = [
        record(0, "partial", disk={"uuid": "1", "label": HOSTILE},
               problems=["Tom & Jerry <b>bold</b> 'single' \"double\"", "日本 Müller.jpg"]),
        record(1, "failed", disk={"uuid": "2", "label": quote_label}, problems=[HOSTILE]),
    ]
    markup = render(recs)
    page = Page(markup)

    assert "<script" not in markup.lower()
    assert "<b>bold</b>" not in markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markup
    assert "Tom &amp; Jerry &lt;b&gt;bold&lt;/b&gt;" in markup
    assert not any("onmouseover" in attrs for _tag, attrs in page.tags)
    assert not page.all("b")
    # the text a reader sees is the original text
    newest, oldest = page.row_texts
    assert quote_label in newest and HOSTILE in newest
    assert HOSTILE in oldest
    assert "Tom & Jerry <b>bold</b> 'single' \"double\"" in oldest
    assert "日本 Müller.jpg" in oldest
    assert any(HOSTILE in b["title"] for b in page.bars)
    assert any(quote_label in b["title"] for b in page.bars)


def test_no_records_says_no_backups_yet_and_is_still_a_whole_page() -> None:
    markup = render([])
    page = Page(markup)

    assert markup.startswith("<!DOCTYPE html>")
    assert "No backups yet" in page.text
    assert not page.bars and not page.rows and not page.all("table")
    assert page.all("meta")[0] == {"charset": "utf-8"}
    assert any(m.get("name") == "viewport" and "width=device-width" in m["content"]
               for m in page.all("meta"))
    assert markup.rstrip().endswith("</html>")


def test_the_strip_shows_only_the_last_30_runs_oldest_left_and_the_table_all() -> None:
    recs = [record(i, STATUSES[i % 5]) for i in range(40)]
    page = Page(render(recs))

    assert len(page.bars) == report.STRIP_RUNS == 30
    assert [b["data-status"] for b in page.bars] == [r["status"] for r in recs[10:]]
    for bar, r in zip(page.bars, recs[10:], strict=True):
        assert bar["title"].endswith(f" · {r['status']} · {r['disk']['label']}")
    assert len(page.rows) == 40
    assert "Last 30 runs" in page.text


def test_fewer_runs_than_the_strip_fill_the_left_with_empty_slots() -> None:
    page = Page(render([record(0), record(1, "failed")]))
    slots = page.all("li", "bar")
    assert len(slots) == 30
    assert ["data-status" in s for s in slots] == [False] * 28 + [True, True]
    assert [b["data-status"] for b in page.bars] == ["success", "failed"]


def test_the_table_lists_the_newest_run_first() -> None:
    recs = [record(i, s) for i, s in enumerate(STATUSES)]
    page = Page(render(recs))

    assert [r["data-status"] for r in page.rows] == list(reversed(STATUSES))
    assert [t.split()[0] for t in page.row_texts] == [
        report._readable(local(r["started_at"])).split()[0] for r in reversed(recs)
    ]
    for text, r in zip(page.row_texts, reversed(recs), strict=True):
        assert r["disk"]["label"] in text
    # each bar links to its row
    assert [b for t, a in page.tags if t == "a" and (b := a.get("href"))] == [
        f"#run-{i}" for i in range(5)]
    assert [r["id"] for r in page.rows] == [f"run-{i}" for i in reversed(range(5))]


def test_the_page_is_self_contained() -> None:
    recs = [*one_of_each(), record(9, "partial", problems=["see https://example.org/x"])]
    markup = render(recs)
    page = Page(markup)
    # a problem may quote a URL as text; the page itself refers to nothing outside
    recs[-1]["problems"] = ["no link"]
    clean = render(recs)

    assert "http://" not in clean and "https://" not in clean
    assert "<script" not in markup and "<link" not in markup and "@import" not in markup
    assert "url(" not in page.style
    assert not [a for _t, a in page.tags if "src" in a]
    assert all(a["href"].startswith("#") for a in page.all("a"))


def test_header_row_values_are_readable_and_every_problem_is_listed() -> None:
    problems = [f"problem {i} & more" for i in range(7)]
    recs = [
        record(0, "success", bytes_transferred=1288490189, duration_s=95.3),
        record(1, "failed", files_transferred=12345, bytes_transferred=512,
               duration_s=3725, problems=problems),
    ]
    now = local(recs[-1]["finished_at"]) + timedelta(hours=5)
    markup = render(recs, generated_at=now, title="My & backups")
    page = Page(markup)
    text = "".join(page.text)

    assert "<title>My &amp; backups</title>" in markup
    assert "Backup failed" in text
    last = report._readable(local(recs[-1]["started_at"]))
    assert f"Last run: {last}" in text
    assert "(5 hours ago)" in text
    assert "Last successful backup: " + report._readable(local(recs[0]["started_at"])) in text
    newest, oldest = page.row_texts
    assert "12,345" in newest and "512 B" in newest and "1h02m" in newest
    assert human_bytes(1288490189) == "1.2 GiB"
    assert "1.2 GiB" in oldest and "1m35s" in oldest and "1,342" in oldest
    assert "quick" in oldest and "none" in oldest
    for p in problems:
        assert p in newest
    assert [t for t in page.text if t.startswith("problem ")] == problems  # each a <li>
    assert "7 problems: problem 0 & more …" in text  # the header names the first
    assert "6 more" not in text and "4 more" in text  # 3 open, 4 behind <details>


def test_damaged_values_still_render() -> None:
    recs: list[dict[str, Any]] = [
        {"status": "weird", "started_at": "not a time", "disk": None,
         "files_transferred": "many", "bytes_transferred": None, "problems": "one string"},
        {},
    ]
    page = Page(render(recs))
    assert [r["data-status"] for r in page.rows] == ["unknown", "weird"]
    assert all("status-unknown" in r["class"].split() for r in page.rows)
    weird = page.row_texts[1]
    assert "not a time" in weird and "one string" in weird and "?" in weird


def test_naive_times_are_taken_as_local() -> None:
    r = record(0, started_at="2025-03-01T10:30:00")
    page = Page(render([r]))
    assert "Sat 1 Mar 2025, 10:30" in page.row_texts[0]


# write_html --------------------------------------------------------------------------


def test_write_html_replaces_the_file_atomically_and_leaves_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text("old page")
    report.write_html(out, runs(one_of_each()))

    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert "Bäckup Disk" in out.read_bytes().decode("utf-8")
    assert os.stat(out).st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_write_html_keeps_the_old_page_when_the_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "report.html"
    out.write_text("old page")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)  # wherever the page is written from
    with pytest.raises(OSError, match="No space"):
        report.write_html(out, runs(one_of_each()))
    assert out.read_text() == "old page"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


# the command line --------------------------------------------------------------------


def write_state(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    state = tmp_path / "state"
    for r in records:
        history.append(state, RunRecord.from_dict(r))
    config = tmp_path / "config.toml"
    config.write_text(f'[immich]\nupload_location = "{tmp_path / "immich"}"\n\n'
                      f'[state]\ndir = "{state}"\n')
    return config


def test_cli_history_html_writes_the_page_and_says_so(tmp_path: Path) -> None:
    config = write_state(tmp_path, one_of_each())
    out = tmp_path / "out" / "backups.html"
    out.parent.mkdir()

    r = run_cli("history", "--html", str(out), config=config)

    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wrote {out} (5 runs)\n"
    page = Page(out.read_text(encoding="utf-8"))
    assert [b["data-status"] for b in page.bars] == list(STATUSES)
    assert [r["data-status"] for r in page.rows] == list(reversed(STATUSES))
    assert "Bäckup Disk" in " ".join(page.row_texts)


def test_cli_history_html_respects_last(tmp_path: Path) -> None:
    config = write_state(tmp_path, [record(i, STATUSES[i % 5]) for i in range(40)])
    out = tmp_path / "backups.html"

    r = run_cli("history", "--last", "2", "--html", str(out), config=config)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wrote {out} (2 runs)\n"
    page = Page(out.read_text(encoding="utf-8"))
    assert [r["data-status"] for r in page.rows] == ["interrupted", "refused"]

    r = run_cli("history", "--html", str(out), config=config)
    assert r.stdout == f"wrote {out} (40 runs)\n"
    page = Page(out.read_text(encoding="utf-8"))
    assert len(page.rows) == 40 and len(page.bars) == 30


def test_cli_history_html_with_no_history(tmp_path: Path) -> None:
    config = write_state(tmp_path, [])
    out = tmp_path / "backups.html"
    r = run_cli("history", "--html", str(out), config=config)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wrote {out} (0 runs)\n"
    assert "No backups yet" in out.read_text(encoding="utf-8")


def test_cli_history_html_errors(tmp_path: Path) -> None:
    config = write_state(tmp_path, one_of_each())
    missing = tmp_path / "no-such-folder" / "backups.html"
    r = run_cli("history", "--html", str(missing), config=config)
    assert r.returncode == 2
    assert f"cannot write {missing}" in r.stderr
    assert not missing.parent.exists()

    r = run_cli("history", "--json", "--html", str(tmp_path / "x.html"), config=config)
    assert r.returncode == 2
    assert "not allowed with argument" in r.stderr


# a real browser ----------------------------------------------------------------------


def find_chromium() -> str | None:
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
            *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_chromium_renders_the_page_and_saves_screenshots(tmp_path: Path) -> None:
    exe = find_chromium()
    need(exe is not None, "needs Chromium (apt-get install chromium)")
    assert exe is not None
    config = write_state(tmp_path, one_of_each())
    ARTIFACTS.mkdir(exist_ok=True)
    page_path = ARTIFACTS / "history-report.html"
    r = run_cli("history", "--html", str(page_path), config=config)
    assert r.returncode == 0, r.stderr
    url = page_path.resolve().as_uri()

    dom = chromium(exe, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr
    page = Page(dom.stdout)
    assert [b["data-status"] for b in page.bars] == list(STATUSES)
    assert [r["data-status"] for r in page.rows] == list(reversed(STATUSES))
    assert len(page.row_texts) == 5
    assert any("Bäckup Disk" in t for t in page.row_texts)
    assert "BÃ" not in dom.stdout  # the page was decoded as UTF-8
    assert "Backup interrupted" in page.text  # the last run, in words

    for name, size in (("phone", "412,915"), ("desktop", "1280,800")):
        shot = ARTIFACTS / f"history-report-{name}-{size.replace(',', 'x')}.png"
        shot.unlink(missing_ok=True)
        res = chromium(exe, tmp_path / f"profile-{name}", "--hide-scrollbars",
                       "--run-all-compositor-stages-before-draw",
                       f"--screenshot={shot}", f"--window-size={size}", url)
        assert res.returncode == 0, res.stderr
        assert shot.is_file(), res.stderr
        assert shot.stat().st_size > 10_000, f"{shot} looks empty"
        assert png_size(shot) == tuple(int(x) for x in size.split(","))


def test_disks_and_drills_panels_show_each_disk_escaped_and_mark_the_overdue() -> None:
    from immich_usb_backup.drill import DrillOutcome
    from immich_usb_backup.overview import DiskSummary

    now = BASE + timedelta(days=30)
    disks = [DiskSummary("6F5F-FDC3", HOSTILE, None, (now - timedelta(days=2)).isoformat(),
                         "success", 3 * 1024**3, 4 * 1024**3, 1234,
                         (now - timedelta(days=2)).isoformat(), True),
             DiskSummary("1A2B-3C4D", "Offsite", None, (now - timedelta(days=9)).isoformat(),
                         "success", None, None, None, None, None)]
    drills = [DrillOutcome("6F5F-FDC3", HOSTILE, now.isoformat(), True, "dump-1.sql.gz"),
              DrillOutcome("1A2B-3C4D", "Offsite", now.isoformat(), False, "dump-2.sql.gz",
                           problem="<b>relation missing</b>")]
    markup = render([record(0)], generated_at=now, disks=disks, drills=drills,
                    remind_after_days=7)
    page = Page(markup)

    assert "<script" not in markup and "<b>relation" not in markup
    rows = page.all("tr", "disk")
    assert [r["data-uuid"] for r in rows] == ["6F5F-FDC3", "1A2B-3C4D"]
    assert ["overdue" in r["class"].split() for r in rows] == [False, True]
    text = "".join(page.text)
    assert "no backup for 9 days" in text and "(2 days ago)" in text
    assert "3.0 GiB free of 4.0 GiB" in text and "1,234" in text
    assert [li["data-drill"] for li in page.all("li") if "data-drill" in li] == [
        "success", "failed"]
    assert "Restore drills" in text and "<b>relation missing</b>" in text
    assert "No drill of this disk has passed yet." in text
    one = Page(render([record(0)], generated_at=now, drills=drills[:1]))
    assert f"Restore drill of {HOSTILE} (6F5F-FDC3)" in "".join(one.text)
