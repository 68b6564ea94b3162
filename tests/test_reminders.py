"""A disk in the drawer is not a backup: every disk at a glance, the reminder, and the
heartbeat for an outside monitor."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from helpers import LoopWatch, Server, run_cli
from immich_usb_backup import overview
from immich_usb_backup.config import load_config
from test_notify import Hook, notify_config

# Tests of the product's functions pass a fixed time: six minutes past midnight, where
# "one a day" as a calendar date and as 24 hours differ, in a zone that is not UTC.
NOW = datetime(2026, 12, 1, 0, 6, tzinfo=timezone(timedelta(hours=1)))
# The command line reads the real clock (clock.now): its tests' records are made relative
# to it, in whole days, so no hour of the day changes what they see.
REAL_NOW = datetime.now().astimezone().replace(microsecond=0)


def run_record(uuid: str, label: str, days_ago: float, status: str = "success",
               mode: str = "quick", now: datetime = NOW, **extra: Any) -> dict[str, Any]:
    at = (now - timedelta(days=days_ago)).isoformat(timespec="seconds")
    rec: dict[str, Any] = {
        "started_at": at, "finished_at": at, "status": status, "trigger": "plug",
        "mode": mode, "disk": {"uuid": uuid, "label": label}, "target": "/media/x",
        "files_transferred": 1, "bytes_transferred": 10, "duration_s": 1.0,
        "problems": [], "host": "nas", "version": "0.1.0",
        "steps": {"library": {"files": 1, "bytes": 10, "source_files": 1234}},
        "disk_free_bytes": 3 << 30, "disk_size_bytes": 4 << 30,
    }
    rec.update(extra)
    return rec


def write_state(state: Path, runs: list[dict[str, Any]],
                approved: list[tuple[str, str, float]], now: datetime = NOW) -> None:
    state.mkdir(parents=True, exist_ok=True)
    (state / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    (state / "disks.toml").write_text(tomli_w.dumps({"disk": [
        {"uuid": u, "label": label,
         "approved_at": (now - timedelta(days=d)).isoformat(timespec="seconds")}
        for u, label, d in approved]}))


def two_disks(server: Server, now: datetime = NOW) -> None:
    write_state(server.state, [
        run_record("AAAA-0001", "Offsite", 23, now=now),
        run_record("AAAA-0002", "Backup", 12, mode="verify",
                   steps={"library": {"files": 0, "bytes": 0, "compared": 40,
                                      "mismatches": 1}}, status="failed", now=now),
        run_record("AAAA-0002", "Backup", 9, now=now),
        run_record("FFFF-0009", "Stranger", 1, now=now),  # not approved: not ours
    ], [("AAAA-0001", "Offsite", 40), ("AAAA-0002", "Backup", 30)], now=now)


# The reminder, from plain data ----------------------------------------------------------

def test_a_reminder_is_due_after_the_days_and_names_every_disk(server: Server) -> None:
    two_disks(server)
    config = load_config(server.config_path)
    reminder = overview.due(config, NOW)
    assert reminder is not None and reminder.days == 9
    assert overview.text(reminder, NOW) == (
        "No backup for 9 days: plug in Backup (last backed up 9 days ago) or "
        "Offsite (23 days ago)")


def test_at_most_one_reminder_in_24_hours_across_midnight_and_none_when_off(
    server: Server,
) -> None:
    two_disks(server)
    config = load_config(server.config_path)
    overview.mark_sent(server.state, NOW - timedelta(minutes=10))  # yesterday, 23:56
    assert overview.due(config, NOW) is None  # a new date, but not a new day
    assert overview.due(config, NOW + timedelta(hours=23, minutes=49)) is None
    assert overview.due(config, NOW + timedelta(hours=23, minutes=51)) is not None
    # the daemon's timer never wakes for nothing: every 6 hours at most, and at the end
    # of the 24 hours
    assert overview.next_check_in(config, NOW) == 6 * 3600
    wait = overview.next_check_in(config, NOW + timedelta(hours=20))
    assert wait == pytest.approx((3 * 60 + 50) * 60)
    server.write_config("[notify]\nremind_after_days = 0\n")
    assert overview.due(load_config(server.config_path), NOW + timedelta(days=1)) is None


def test_the_last_reminders_time_is_read_back_in_any_zone(server: Server) -> None:
    overview.mark_sent(server.state, NOW)
    sent = overview.last_sent(server.state)
    assert sent == NOW and sent is not None and sent.utcoffset() == timedelta(hours=1)


def test_a_recent_backup_or_nothing_approved_means_no_reminder(server: Server) -> None:
    write_state(server.state, [run_record("AAAA-0001", "Offsite", 3)],
                [("AAAA-0001", "Offsite", 40)])
    config = load_config(server.config_path)
    assert overview.due(config, NOW) is None
    write_state(server.state, [run_record("FFFF-0009", "Stranger", 30)], [])
    assert overview.due(load_config(server.config_path), NOW) is None


def test_a_disk_never_backed_up_counts_from_its_approval(server: Server) -> None:
    write_state(server.state, [], [("AAAA-0003", "New", 8)])
    reminder = overview.due(load_config(server.config_path), NOW)
    assert reminder is not None
    assert overview.text(reminder, NOW) == "No backup for 8 days: plug in New (never backed up)"


def test_the_timer_wakes_when_a_reminder_can_next_be_due(server: Server) -> None:
    write_state(server.state, [run_record("AAAA-0001", "Offsite", 6.5)],
                [("AAAA-0001", "Offsite", 40)])
    wait = overview.next_check_in(load_config(server.config_path), NOW)
    assert 0 < wait <= 12 * 3600  # half a day from now it turns 7 days old


# The command line -------------------------------------------------------------------------

@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


def test_remind_sends_once_a_day(server: Server, hook: Hook,
                                 no_blocked_loop: LoopWatch) -> None:
    notify_config(server, hook.url())
    two_disks(server, REAL_NOW)  # the newest backup 9 days before now

    first = run_cli("remind", config=server.config_path)
    second = run_cli("remind", config=server.config_path)

    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("sent: No backup for ")
    (msg,) = hook.wait_for(1)
    assert msg["title"].startswith("Immich backup: no backup for ")
    assert "plug in Backup (last backed up" in msg["message"]
    assert msg["type"] == "warning"
    assert second.returncode == 0 and second.stdout.strip() == "no reminder due"
    time.sleep(0.5)
    assert len(hook.received) == 1


def test_disks_all_lists_every_approved_disk_with_its_last_backup(server: Server) -> None:
    two_disks(server, REAL_NOW)
    r = run_cli("disks", "--all", "--json", config=server.config_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["label"] for row in rows] == ["Backup", "Offsite"]
    backup, offsite = rows
    assert backup["files"] == 1234 and backup["free_bytes"] == 3 << 30
    assert backup["last_verify_passed"] is False and backup["last_verify_at"]
    assert offsite["overdue"] is True and offsite["last_verify_at"] is None
    table = run_cli("disks", "--all", config=server.config_path)
    assert table.returncode == 0
    assert "OVERDUE" in table.stdout and "3.0 GiB of 4.0 GiB" in table.stdout
    assert "FAILED" in table.stdout


def test_history_disk_shows_only_that_disks_runs(server: Server) -> None:
    two_disks(server, REAL_NOW)
    r = run_cli("history", "--json", "--disk", "aaaa-0002", config=server.config_path)
    assert [x["disk"]["label"] for x in json.loads(r.stdout)] == ["Backup", "Backup"]
    none = run_cli("history", "--disk", "0000-0000", config=server.config_path)
    assert none.returncode == 0 and "no backups onto 0000-0000 yet" in none.stdout


# The heartbeat ------------------------------------------------------------------------

class Monitor:
    """An outside monitor's push endpoint: answers ``status``, or never."""

    def __init__(self, status: int = 200, answer: bool = True) -> None:
        self.hits: list[str] = []
        self.release = threading.Event()
        monitor = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                monitor.hits.append(self.path)
                if not answer:
                    monitor.release.wait(30)
                    return
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"OK")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ping/TOKEN-7c1e"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.exfat
def test_a_successful_backup_pings_every_heartbeat_and_a_silent_one_fails_nothing(
    make_exfat, server: Server, no_blocked_loop: LoopWatch
) -> None:
    ok, broken, silent = Monitor(), Monitor(status=500), Monitor(answer=False)
    try:
        urls = json.dumps([ok.url, broken.url, silent.url])
        server.write_config(f"[notify]\nheartbeat_urls = {urls}\ntimeout_s = 1\n")
        disk = make_exfat()
        t0 = time.monotonic()
        r = run_cli("run", str(disk.mount_point), config=server.config_path)
        took = time.monotonic() - t0
    finally:
        for m in (ok, broken, silent):
            m.close()
    assert r.returncode == 0, r.stdout + r.stderr
    assert ok.hits == ["/ping/TOKEN-7c1e"] and len(broken.hits) == 1 and len(silent.hits) == 1
    rec = json.loads((server.state / "history.jsonl").read_text().splitlines()[-1])
    assert rec["status"] == "success"
    beats = [n for n in rec["notifications"] if n["event"] == "heartbeat"]
    assert beats == [
        {"event": "heartbeat", "ok": True},
        {"event": "heartbeat", "ok": False, "error": "notify.heartbeat_urls #2: HTTP 500"},
        {"event": "heartbeat", "ok": False,
         "error": "notify.heartbeat_urls #3: timed out after 1 s"},
    ]
    assert took < 30
    written = (server.state / "history.jsonl").read_text() + r.stdout + r.stderr
    assert "TOKEN-7c1e" not in written and "/ping/" not in written


@pytest.mark.exfat
def test_no_heartbeat_after_a_backup_that_did_not_succeed(
    make_exfat, server: Server, no_blocked_loop: LoopWatch
) -> None:
    ok = Monitor()
    try:
        server.write_config(f"[notify]\nheartbeat_urls = [\"{ok.url}\"]\n")
        (server.upload / "upload" / "bad:name.jpg").write_bytes(b"x")  # partial
        disk = make_exfat()
        r = run_cli("run", str(disk.mount_point), config=server.config_path)
    finally:
        ok.close()
    assert r.returncode == 1
    assert ok.hits == []


def test_the_history_page_has_a_disks_panel_with_the_overdue_one_marked(
    server: Server, tmp_path: Path
) -> None:
    from html.parser import HTMLParser

    two_disks(server, REAL_NOW)
    page = tmp_path / "page.html"
    r = run_cli("history", "--html", str(page), config=server.config_path)
    assert r.returncode == 0, r.stderr

    class Rows(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[dict[str, str | None]] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = dict(attrs)
            if tag == "tr" and "disk" in (a.get("class") or "").split():
                self.rows.append(a)

    parser = Rows()
    markup = page.read_text()
    parser.feed(markup)
    by_uuid = {row["data-uuid"]: row for row in parser.rows}
    assert set(by_uuid) == {"AAAA-0001", "AAAA-0002"}  # approved ones only
    assert all("overdue" in (row["class"] or "") for row in parser.rows)  # 9 and 23 days
    assert re.search(r"no backup for 2[23] days", markup)
    assert "3.0 GiB free of 4.0 GiB" in markup
    assert "FAILED" in markup  # Backup's last content check found a difference
    server.write_config("[notify]\nremind_after_days = 30\n")
    run_cli("history", "--html", str(page), config=server.config_path)
    assert 'class="disk overdue' not in page.read_text()


def test_a_disk_approved_in_the_config_without_any_backup_is_listed_last(
    server: Server,
) -> None:
    two_disks(server)
    server.write_config('[disks]\napproved = ["BBBB-0000"]\n')
    config = load_config(server.config_path)
    assert [d.uuid for d in overview.disks(config)] == ["AAAA-0002", "AAAA-0001", "BBBB-0000"]
    assert overview.next_check_in(config, NOW) > 0
