"""Unit tests for the run history, the live status and the backup lock (plain folders)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from immich_usb_backup import history, status
from immich_usb_backup.errors import Refused
from immich_usb_backup.lock import LOCK_NAME, backup_lock, is_running
from immich_usb_backup.record import RunRecord
from immich_usb_backup.status import STATUS_NAME, StatusWriter, read_status

DISK = {"label": "Backup-A", "uuid": "1234-ABCD", "mount_point": "/media/backup"}


def record(n: int, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "started_at": f"2025-01-0{n}T02:00:00+01:00",
        "finished_at": f"2025-01-0{n}T02:00:05+01:00",
        "status": "success",
        "trigger": "plug",
        "mode": "quick",
        "disk": {"uuid": f"UUID-{n}", "label": f"Disk-{n}"},
        "target": "/media/backup",
        "files_transferred": n,
        "bytes_transferred": n * 1024,
        "duration_s": 5,
        "problems": [],
        "host": "nas",
        "version": "0.1.0",
        "steps": {},
    }
    base.update(extra)
    return base


def table_of(recs: list[dict[str, Any]]) -> str:
    return history.format_table([RunRecord.from_dict(r) for r in recs])


def append(state: Path, rec: dict[str, Any]) -> None:
    history.append(state, RunRecord.from_dict(rec))


# A line as the release before the typed record wrote it (flow.py's dict), verbatim.
OLD_LINE = (
    '{"started_at": "2026-11-20T18:02:11+01:00", "finished_at": "2026-11-20T18:03:40+01:00", '
    '"status": "partial", "trigger": "plug", "mode": "verify", "disk": {"uuid": "6F9C-FA9C", '
    '"label": "Backup"}, "target": "/media/root/Backup", "files_transferred": 14, '
    '"bytes_transferred": 48213377, "duration_s": 89.4, "problems": ["library: skipped '
    'upload/a/b/what?.jpg: exFAT cannot hold a name with ?"], "host": "nas", "version": '
    '"0.1.0", "steps": {"database": {"files": 1, "bytes": 1234, "dump": '
    '"immich-db-backup-20261120T020000-v1.130.0-pg14.17.sql.gz"}, "config": {"files": 1, '
    '"bytes": 5120, "archive": "config-2026-11-20T180211.zip", "files_in_archive": 3}, '
    '"library": {"files": 12, "bytes": 48206023, "pruned_days": ["2026-10-01"], '
    '"deleted": 1, "kept": 2, "keep_day": "2026-11-20", "keep_days": 30, "source_files": '
    '207, "source_bytes": 912345678, "compared": 33, "manifest": {"entries": 207, '
    '"hashed": 12, "left_out": 0}}}, "notifications": [{"event": "started", "ok": true}, '
    '{"event": "finished", "ok": false, "error": "JSON (notify.urls #1): timed out after '
    '10 s"}]}\n'
)


def test_a_line_the_previous_release_wrote_loads_and_is_written_back_unchanged(
        tmp_path: Path) -> None:
    (tmp_path / history.HISTORY_NAME).write_text(OLD_LINE, encoding="utf-8")
    (run,) = history.load_runs(tmp_path, None)
    assert (run.status, run.mode, run.trigger) == ("partial", "verify", "plug")
    assert (run.disk.uuid, run.disk.label) == ("6F9C-FA9C", "Backup")
    assert (run.files_transferred, run.bytes_transferred, run.duration_s) == (
        14, 48213377, 89.4)
    assert run.problems == ["library: skipped upload/a/b/what?.jpg: exFAT cannot hold a "
                            "name with ?"]
    assert run.steps["library"].files == 12
    assert run.steps["library"].extra["kept"] == 2
    assert run.notifications[1]["ok"] is False
    again = tmp_path / "again"
    history.append(again, run)
    assert (again / history.HISTORY_NAME).read_text(encoding="utf-8") == OLD_LINE


def test_a_run_record_written_now_has_the_fields_the_contract_names(tmp_path: Path) -> None:
    from immich_usb_backup.steps.library import LibraryResult

    run = RunRecord.begin("cli", "quick", "/media/backup")
    run.steps["library"] = LibraryResult(files=3, bytes=300, source_files=10,
                                         source_bytes=1000, kept=1, keep_day="2026-12-01",
                                         keep_days=30)
    run.status = "success"
    run.conclude([])
    history.append(tmp_path, run)
    (stored,) = history.last_records(tmp_path, None)
    for key in ("started_at", "finished_at", "status", "trigger", "mode", "disk",
                "files_transferred", "bytes_transferred", "duration_s", "problems"):
        assert key in stored, key
    assert stored["files_transferred"] == 3 and stored["bytes_transferred"] == 300
    assert stored["steps"]["library"] == {
        "files": 3, "bytes": 300, "kept": 1, "keep_day": "2026-12-01", "keep_days": 30,
        "source_files": 10, "source_bytes": 1000}
    assert datetime.fromisoformat(stored["finished_at"]).utcoffset() is not None


# history -----------------------------------------------------------------------------


def test_appended_records_are_read_back_oldest_first(tmp_path: Path) -> None:
    state = tmp_path / "state"
    records = [record(1), record(2, status="partial"), record(3, status="refused")]
    for r in records:
        append(state, r)
    assert list(history.iter_records(state)) == records
    assert history.last_records(state, None) == records


def test_append_writes_one_line_per_record_and_creates_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    append(state, record(1, problems=["Müller: photo 日本.jpg"]))
    append(state, record(2))
    lines = (state / history.HISTORY_NAME).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["problems"] == ["Müller: photo 日本.jpg"]
    assert "Müller" in lines[0]  # stored readable, not \u-escaped


def test_last_records_returns_the_last_n_oldest_first(tmp_path: Path) -> None:
    for i in range(1, 6):
        append(tmp_path, record(i))
    last = history.last_records(tmp_path, 2)
    assert [r["files_transferred"] for r in last] == [4, 5]
    assert [r["files_transferred"] for r in history.last_records(tmp_path, 1)] == [5]


def test_last_records_with_n_above_the_count_returns_everything(tmp_path: Path) -> None:
    append(tmp_path, record(1))
    append(tmp_path, record(2))
    assert [r["files_transferred"] for r in history.last_records(tmp_path, 10)] == [1, 2]


def test_no_history_file_means_no_records(tmp_path: Path) -> None:
    assert list(history.iter_records(tmp_path / "never-created")) == []
    assert history.last_records(tmp_path, 5) == []


def test_damaged_line_is_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    append(tmp_path, record(1))
    with open(tmp_path / history.HISTORY_NAME, "a", encoding="utf-8") as f:
        f.write('{"status": "succ')  # a power cut mid-append
        f.write("\n")
    append(tmp_path, record(2))
    with caplog.at_level(logging.WARNING, logger=history.__name__):
        got = history.last_records(tmp_path, None)
    assert [r["files_transferred"] for r in got] == [1, 2]
    assert any("line 2" in m and "damaged" in m for m in caplog.messages)


def test_blank_and_non_object_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / history.HISTORY_NAME
    path.write_text('\n[1, 2]\n"text"\n' + json.dumps(record(1)) + "\n\n")
    assert [r["files_transferred"] for r in history.iter_records(tmp_path)] == [1]


def test_format_table_shows_each_runs_status_and_disk_label() -> None:
    records = [
        record(1),
        record(2, status="refused", problems=["would delete 90 of 100 files"]),
        record(3, status="failed"),
    ]
    table = table_of(records)
    lines = table.splitlines()
    assert len(lines) == 1 + len(records)
    assert lines[0].split()[:2] == ["started", "status"]
    for line, r in zip(lines[1:], records, strict=True):
        assert r["status"] in line
        assert r["disk"]["label"] in line
    assert "2025-01-02 02:00:00" in lines[2]
    assert "1: would delete 90 of 100 files" in lines[2]


def test_format_table_falls_back_to_uuid_then_dash_for_the_disk() -> None:
    table = table_of([
        record(1, disk={"label": "", "uuid": "ABCD-0001"}),
        record(2, disk=None),
    ])
    lines = table.splitlines()
    assert "ABCD-0001" in lines[1]
    assert " - " in lines[2]


def test_format_table_shortens_a_long_first_problem() -> None:
    long_problem = "not backed up: " + "x" * 200
    line = table_of([record(1, problems=[long_problem, "second"])]).splitlines()[1]
    assert "2: not backed up: xxx" in line
    assert line.endswith("...")
    assert "x" * 100 not in line


@pytest.mark.parametrize(
    ("seconds", "shown"), [(5, "5s"), (59.4, "59s"), (125, "2m05s"), (3660, "1h01m")]
)
def test_format_table_shows_durations_readably(seconds: float, shown: str) -> None:
    line = table_of([record(1, duration_s=seconds)]).splitlines()[1]
    assert f" {shown} " in f" {line} "


def test_format_table_tolerates_missing_fields() -> None:
    table = table_of([{"status": "interrupted"}])
    assert "interrupted" in table.splitlines()[1]


# backup lock -------------------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from immich_usb_backup.lock import backup_lock
    with backup_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    """
)


@contextlib.contextmanager
def lock_held_elsewhere(state: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the backup lock until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(state)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def test_second_backup_in_another_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with lock_held_elsewhere(state) as holder, pytest.raises(Refused) as info:  # noqa: SIM117
        with backup_lock(state):
            pytest.fail("got the lock while another process holds it")
    message = str(info.value)
    assert f"process {holder.pid}" in message
    assert "already running" in message


def test_lock_is_free_again_after_the_holder_ends(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with lock_held_elsewhere(state):
        assert is_running(state)
    assert not is_running(state)
    entered = False
    with backup_lock(state):
        entered = True
    assert entered


def test_lock_held_here_refuses_a_process_probing_with_flock(tmp_path: Path) -> None:
    state = tmp_path / "state"
    probe = textwrap.dedent(
        """
        import fcntl, os, sys
        fd = os.open(sys.argv[1], os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("busy", os.pread(fd, 32, 0).decode().strip())
        else:
            print("free")
        """
    )

    def ask() -> str:
        out = subprocess.run([sys.executable, "-c", probe, str(state / LOCK_NAME)],
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip()

    with backup_lock(state):
        assert ask() == f"busy {os.getpid()}"
    assert ask() == "free"


def test_lock_is_released_when_the_block_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), backup_lock(tmp_path):
        assert is_running(tmp_path)
        raise RuntimeError("boom")
    assert not is_running(tmp_path)
    assert (tmp_path / LOCK_NAME).read_text() == ""


def test_is_running_only_while_the_lock_is_held(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert not is_running(state)  # no lock file at all
    with backup_lock(state):
        assert is_running(state)
    assert (state / LOCK_NAME).exists()
    assert not is_running(state)  # the file stays, the lock does not


# live status -------------------------------------------------------------------------


def test_status_is_idle_without_a_lock_even_with_a_stale_status_file(tmp_path: Path) -> None:
    stale = {"state": "running", "pid": 999999, "phase": "copy", "percent": 42.0}
    (tmp_path / STATUS_NAME).write_text(json.dumps(stale))
    (tmp_path / LOCK_NAME).write_text("999999\n")  # a crashed run's lock file, not held
    assert read_status(tmp_path) == {"state": "idle"}


def test_status_while_the_lock_is_held_is_the_writers_snapshot(tmp_path: Path) -> None:
    with backup_lock(tmp_path):
        writer = StatusWriter(tmp_path, DISK)
        writer.set_phase("copy", 1000, "copying photos")
        got = read_status(tmp_path)
        assert got == json.loads(json.dumps(writer.snapshot()))
        assert got["state"] == "running"
        assert got["phase"] == "copy"
        assert got["detail"] == "copying photos"
        assert got["pid"] == os.getpid()
        assert got["disk"] == DISK
    assert read_status(tmp_path) == {"state": "idle"}


def test_status_while_held_by_another_process_reads_its_file(tmp_path: Path) -> None:
    snapshot = {"state": "running", "pid": 1, "phase": "scan", "percent": 0.0}
    (tmp_path / STATUS_NAME).write_text(json.dumps(snapshot))
    with lock_held_elsewhere(tmp_path):
        assert read_status(tmp_path) == snapshot
    assert read_status(tmp_path) == {"state": "idle"}


def test_status_while_held_but_not_yet_written_is_starting(tmp_path: Path) -> None:
    with backup_lock(tmp_path):
        got = read_status(tmp_path)
    assert got["state"] == "running"
    assert got["phase"] == "starting"
    assert got["percent"] == 0.0
    assert got["eta_s"] is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(status, "time", SimpleNamespace(monotonic=fake.monotonic,
                                                        time=lambda: 1_700_000_000.0))
    return fake


def test_percent_is_bytes_done_over_total(tmp_path: Path, clock: FakeClock) -> None:
    w = StatusWriter(tmp_path, DISK)
    w.set_phase("copy", 8000)
    w.progress(2000)
    snap = w.snapshot()
    assert snap["percent"] == 25.0
    assert snap["bytes_done"] == 2000
    assert snap["bytes_total"] == 8000
    w.progress(1)
    assert w.snapshot()["percent"] == 0.0
    w.progress(2667)
    assert w.snapshot()["percent"] == 33.3


def test_percent_is_capped_at_100_and_eta_at_zero(tmp_path: Path, clock: FakeClock) -> None:
    w = StatusWriter(tmp_path, DISK)
    w.set_phase("copy", 1000)
    clock.now += 2
    w.progress(1500)
    snap = w.snapshot()
    assert snap["percent"] == 100.0
    assert snap["eta_s"] == 0


def test_phase_without_a_total_has_zero_percent_and_no_eta(
    tmp_path: Path, clock: FakeClock
) -> None:
    w = StatusWriter(tmp_path, DISK)
    w.set_phase("scan", 0)
    clock.now += 5
    w.progress(0, "5000 files compared")
    snap = w.snapshot()
    assert snap["percent"] == 0.0
    assert snap["eta_s"] is None
    assert snap["detail"] == "5000 files compared"


def test_eta_is_unknown_until_a_rate_is_measured(tmp_path: Path, clock: FakeClock) -> None:
    w = StatusWriter(tmp_path, DISK)
    w.set_phase("copy", 10_000)
    clock.now += 0.5
    w.progress(500)
    assert w.snapshot()["eta_s"] is None
    assert w.snapshot()["rate_bps"] == 0


def test_rate_and_eta_follow_the_smoothed_transfer_rate(tmp_path: Path, clock: FakeClock) -> None:
    w = StatusWriter(tmp_path, DISK)
    w.set_phase("copy", 10_000)
    clock.now += 1
    w.progress(1000)  # first sample: 1000 B/s
    snap = w.snapshot()
    assert snap["rate_bps"] == 1000
    assert snap["eta_s"] == 9  # 9000 bytes left at 1000 B/s
    assert snap["percent"] == 10.0

    clock.now += 1
    w.progress(3000)  # sample 2000 B/s, smoothed 0.3 * 2000 + 0.7 * 1000 = 1300
    snap = w.snapshot()
    assert snap["rate_bps"] == 1300
    assert snap["eta_s"] == round(7000 / 1300)


def test_new_phase_resets_progress_and_rate(tmp_path: Path, clock: FakeClock) -> None:
    w = StatusWriter(tmp_path, DISK)
    w.set_phase("copy", 10_000)
    clock.now += 1
    w.progress(5000)
    w.set_phase("verify", 2000, "checking")
    snap = w.snapshot()
    assert snap["phase"] == "verify"
    assert snap["bytes_done"] == 0
    assert snap["bytes_total"] == 2000
    assert snap["rate_bps"] == 0
    assert snap["eta_s"] is None
    assert snap["detail"] == "checking"


def test_status_file_is_written_at_most_twice_a_second(tmp_path: Path, clock: FakeClock) -> None:
    w = StatusWriter(tmp_path, DISK)
    w.set_phase("copy", 1000)  # forced write
    on_disk = lambda: json.loads((tmp_path / STATUS_NAME).read_text())  # noqa: E731
    assert on_disk()["bytes_done"] == 0
    clock.now += 0.1
    w.progress(100)
    assert on_disk()["bytes_done"] == 0
    clock.now += 0.5
    w.progress(200)
    assert on_disk()["bytes_done"] == 200
    assert not list(tmp_path.glob(f".{STATUS_NAME}.*"))  # no temporary left behind


def test_clear_removes_the_status_file_and_tolerates_a_missing_one(tmp_path: Path) -> None:
    w = StatusWriter(tmp_path, DISK)
    w.set_phase("copy", 10)
    assert (tmp_path / STATUS_NAME).exists()
    w.clear()
    assert not (tmp_path / STATUS_NAME).exists()
    w.clear()


def test_run_on_a_device_without_the_system_bus_says_what_to_start_and_records_it(
    tmp_path: Path,
) -> None:
    upload = tmp_path / "immich"
    (upload / "upload").mkdir(parents=True)
    (upload / "upload" / ".immich").write_bytes(b"")
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(f'[immich]\nupload_location = "{upload}"\n\n[state]\ndir = "{state}"\n')
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}
    r = subprocess.run([sys.executable, "-m", "immich_usb_backup", "-c", str(config), "run",
                        "/dev/sdz1"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "backup FAILED" in r.stdout and "  disk:     /dev/sdz1" in r.stdout
    assert out.count("cannot reach the system D-Bus") == 1, out
    assert "systemctl start dbus udisks2" in out
    (rec,) = history.last_records(state, None)
    assert rec["status"] == "failed" and rec["target"] == "/dev/sdz1"
    assert "could not be used" in rec["problems"][0]
