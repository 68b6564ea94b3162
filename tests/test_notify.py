"""Notifications: what arrives at real endpoints on loopback, and what never leaks.

The endpoints are real servers in this process: an HTTP server for Apprise's
``json://`` (each POSTed JSON body kept) and an aiosmtpd SMTP server for ``mailto://``
(each message kept). Runs go through the real command line onto a real exFAT loop disk
(see conftest); the plain-data parts (messages, URL sources, masking) are tested alone.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from helpers import ExfatDisk, Server, run_cli
from immich_usb_backup import masking, messages, notify
from immich_usb_backup.config import Event, NotifyConfig, parse_config
from immich_usb_backup.errors import ConfigError
from immich_usb_backup.record import RunRecord
from immich_usb_backup.steps.library import LibraryResult

SECRET = "s3cret-Pa55"  # noqa: S105 - the password that must never leak


# Real endpoints -----------------------------------------------------------------------

class Hook:
    """An HTTP endpoint for ``json://``: keeps every JSON body; answers ``status`` after
    ``delay`` seconds."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.status = status
        self.delay = delay
        self.received: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.mounted_at_arrival: list[str] = []
        self.cond = threading.Condition()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with hook.cond:
                    hook.received.append(json.loads(body))
                    hook.paths.append(self.path)
                    hook.mounted_at_arrival.append(Path("/proc/mounts").read_text())
                    hook.cond.notify_all()
                time.sleep(hook.delay)
                try:
                    self.send_response(hook.status)
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:  # the client gave up (timeout tests)
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook", auth: str = "") -> str:
        return f"json://{auth}127.0.0.1:{self.port}{path}"

    def wait_for(self, n: int, timeout: float = 30) -> list[dict[str, Any]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.received) >= n, timeout), \
                f"expected {n} messages, got {self.received}"
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    """An SMTP server (aiosmtpd) on a free loopback port: keeps every message."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[EmailMessage] = []
        self.cond = threading.Condition()
        box = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
                with box.cond:
                    box.messages.append(msg)  # type: ignore[arg-type]
                    box.cond.notify_all()
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def url(self) -> str:
        return (f"mailto://127.0.0.1:{self.port}?from=backup@example.com"
                "&to=me@example.com&mode=insecure")

    def wait_for(self, n: int, timeout: float = 30) -> list[EmailMessage]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.messages) >= n, timeout), \
                f"expected {n} mails, got {len(self.messages)}"
            return list(self.messages)

    def close(self) -> None:
        self.controller.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def text_of(mail: EmailMessage) -> str:
    part = mail.get_body(preferencelist=("plain",))
    assert part is not None, mail
    return str(part.get_content())  # type: ignore[attr-defined]


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    m = Mailbox()
    yield m
    m.close()


def notify_config(server: Server, *urls: str, extra: str = "") -> None:
    server.write_config("[notify]\nurls = [" + ", ".join(json.dumps(u) for u in urls)
                        + f"]\n{extra}")


def last_record(server: Server) -> dict[str, Any]:
    lines = (server.state / "history.jsonl").read_text().splitlines()
    return json.loads(lines[-1])  # type: ignore[no-any-return]


# Runs on a real exFAT disk, through the real command line --------------------------------

@pytest.mark.exfat
def test_a_successful_run_sends_started_then_finished_by_webhook_and_mail(
    make_exfat, server: Server, hook: Hook, mailbox: Mailbox
) -> None:
    disk = make_exfat()
    notify_config(server, hook.url(), mailbox.url())

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    started, finished = hook.wait_for(2)
    assert started["title"] == "Immich backup: started on Backup"
    assert started["type"] == "info"
    body = started["message"]
    assert f"to the disk Backup (UUID {last_record(server)['disk']['uuid']})" in body
    assert "What will be copied:" in body
    assert "- database: immich-db-backup-" in body
    assert "- config: an archive of 1 configured path" in body
    n_files = sum(len(files) for _, _, files in os.walk(server.upload))
    assert f"- library: {n_files} of {n_files} files to copy" in body
    assert "Do not unplug the disk until" in body

    assert finished["title"] == "Immich backup: success on Backup"
    assert finished["type"] == "success"
    body = finished["message"]
    rec = last_record(server)
    assert "ended: success." in body
    assert f"Copied: {rec['files_transferred']} files," in body
    assert "Free space left on the disk: " in body and " MiB of " in body
    assert "Problems" not in body
    assert body.endswith(f"The disk is synced, and is still mounted at {disk.mount_point}, "
                         "as it was found: eject it there, then it is safe to "
                         "unplug.")

    mails = mailbox.wait_for(2)
    assert [m["Subject"] for m in mails] == [started["title"], finished["title"]]
    assert "What will be copied:" in text_of(mails[0])
    assert "ended: success." in text_of(mails[1])
    assert rec["notifications"] == [{"event": "started", "ok": True},
                                    {"event": "finished", "ok": True}]
    print("\n--- started ---\n" + started["title"] + "\n" + started["message"])
    print("--- finished ---\n" + finished["title"] + "\n" + finished["message"])


@pytest.mark.exfat
def test_a_partial_run_says_partial_and_names_the_files(
    make_exfat, server: Server, hook: Hook
) -> None:
    disk = make_exfat()
    odd = server.upload / "upload" / "odd"
    odd.mkdir()
    (odd / "a:b?.jpg").write_bytes(b"1")
    (odd / "fine.jpg").write_bytes(b"2")
    notify_config(server, hook.url())

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 1
    _, finished = hook.wait_for(2)
    assert finished["title"] == "Immich backup: partial on Backup"
    assert finished["type"] == "warning"
    body = finished["message"]
    assert "ended: partial." in body and "Not everything could be copied" in body
    assert "Problems (1):" in body
    assert "upload/odd/a:b?.jpg" in body and "exFAT cannot store" in body
    print("\n--- partial ---\n" + finished["title"] + "\n" + body)


@pytest.mark.exfat
def test_a_refused_run_sends_only_why_and_what_to_do(
    make_exfat, server: Server, hook: Hook
) -> None:
    disk = make_exfat(marker=False)
    notify_config(server, hook.url())

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 1
    (msg,) = hook.wait_for(1)
    assert msg["title"] == "Immich backup: refused on Backup"
    assert msg["type"] == "warning"
    body = msg["message"]
    assert "was refused: nothing was copied or deleted." in body
    assert "Why: this disk has no `immich-server-backups` folder at its root" in body
    assert "What to do:" in body
    assert "as it was found: eject it there, then it is safe to unplug." in body
    assert last_record(server)["notifications"] == [{"event": "refused", "ok": True}]
    time.sleep(0.5)
    assert len(hook.received) == 1  # no "started", no "finished"
    print("\n--- refused ---\n" + msg["title"] + "\n" + body)


@pytest.mark.exfat
def test_sigterm_mid_copy_sends_interrupted(make_exfat, server: Server, hook: Hook) -> None:
    disk = make_exfat(size_mb=128)
    (server.upload / "upload" / "video.mp4").write_bytes(os.urandom(12 * 1024 * 1024))
    notify_config(server, hook.url(), extra="[library]\nbwlimit_kib = 1024\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "immich_usb_backup", "-c", str(server.config_path), "run",
         str(disk.mount_point)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    (started,) = hook.wait_for(1)
    assert "12.0 MiB" in started["message"] or "MiB" in started["message"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = json.loads(run_cli("status", "--json", config=server.config_path).stdout)
        if st.get("phase") == "library" and st.get("percent", 0) > 1:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 1, out + err
    _, finished = hook.wait_for(2)
    assert finished["title"] == "Immich backup: interrupted on Backup"
    assert "ended: interrupted." in finished["message"]
    assert "The backup was stopped before it finished" in finished["message"]
    assert "- the backup was interrupted; the next run finishes the job" in finished["message"]
    assert "The disk is synced, and is still mounted" in finished["message"]
    rec = last_record(server)
    assert rec["status"] == "interrupted"
    print("\n--- interrupted ---\n" + finished["title"] + "\n" + finished["message"])
    assert rec["notifications"] == [{"event": "started", "ok": True},
                                    {"event": "finished", "ok": True}]


@pytest.mark.exfat
def test_failing_endpoints_never_fail_the_backup_and_leak_no_secret(
    make_exfat, server: Server
) -> None:
    broken = Hook(status=500)
    refused_port = free_port()  # nothing listens there
    try:
        disk = make_exfat()
        notify_config(server, f"json://user:{SECRET}@127.0.0.1:{refused_port}/",
                      broken.url(auth=f"user:{SECRET}@"))

        r = run_cli("-v", "run", str(disk.mount_point), config=server.config_path)

        assert r.returncode == 0, r.stdout + r.stderr
        rec = last_record(server)
        assert rec["status"] == "success"
        started, finished = rec["notifications"]
        assert started["event"] == "started" and finished["event"] == "finished"
        for outcome in (started, finished):
            assert outcome["ok"] is False
            assert "JSON (notify.urls #1): " in outcome["error"]
            assert "JSON (notify.urls #2): " in outcome["error"]
            assert "error=500" in outcome["error"]
        assert len(broken.wait_for(2)) == 2  # it was asked, and answered 500
        assert "notification finished: 0 sent, not sent: JSON (notify.urls #1)" in r.stderr
        assert "apprise" in r.stderr  # Apprise's own lines are there, masked
        assert_no_secret(r.stdout + r.stderr, server, disk)
    finally:
        broken.close()


def assert_no_secret(output: str, server: Server, disk: ExfatDisk) -> None:
    assert SECRET not in output
    for path in server.state.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    subprocess.run(["sync"], check=True)
    disk_bytes = Path(disk.device).read_bytes()  # everything on the disk, even free space
    assert SECRET.encode() not in disk_bytes


@pytest.mark.exfat
def test_a_slow_endpoint_times_out_without_holding_up_the_run(
    make_exfat, server: Server
) -> None:
    slow = Hook(delay=20)
    try:
        disk = make_exfat()
        notify_config(server, slow.url(), extra="timeout_s = 2\n")
        t0 = time.monotonic()

        r = run_cli("run", str(disk.mount_point), config=server.config_path)

        took = time.monotonic() - t0
        assert r.returncode == 0, r.stdout + r.stderr
        rec = last_record(server)
        assert rec["status"] == "success"
        assert rec["notifications"] == [
            {"event": "started", "ok": False,
             "error": "JSON (notify.urls #1): timed out after 2 s"},
            {"event": "finished", "ok": False,
             "error": "JSON (notify.urls #1): timed out after 2 s"}]
        # "started" is sent while the copy runs; only "finished" adds its timeout at the
        # end (and no sending thread holds the process until the server answers)
        assert took < rec["duration_s"] + 2 * 2 + 5, (took, rec["duration_s"])
    finally:
        slow.close()


@pytest.mark.exfat
def test_urls_come_from_the_urls_file_and_the_environment_too(
    make_exfat, server: Server, hook: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = make_exfat()
    urls_file = server.root / "notify-urls"
    urls_file.write_text(f"# my services\n\n  {hook.url('/from-file')}\n# {hook.url('/no')}\n")
    urls_file.chmod(0o600)
    server.write_config(f'[notify]\nurls_file = "{urls_file}"\nevents = ["finished"]\n')
    monkeypatch.setenv(notify.ENV_URLS, f"{hook.url('/env-1')}, {hook.url('/env-2')}")

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    hook.wait_for(3)
    time.sleep(0.5)
    assert sorted(hook.paths) == ["/env-1", "/env-2", "/from-file"]
    assert {m["title"] for m in hook.received} == {"Immich backup: success on Backup"}
    assert last_record(server)["notifications"] == [{"event": "finished", "ok": True}]


@pytest.mark.exfat
def test_an_unreadable_urls_file_is_recorded_and_the_backup_goes_on(
    make_exfat, server: Server, hook: Hook
) -> None:
    disk = make_exfat()
    missing = server.root / "no-such-file"
    server.write_config(f'[notify]\nurls = ["{hook.url()}"]\nurls_file = "{missing}"\n'
                        'events = ["finished"]\n')

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    hook.wait_for(1)
    (outcome,) = last_record(server)["notifications"]
    assert outcome == {"event": "finished", "ok": False,
                       "error": f"notify.urls_file {missing}: cannot read: No such file or "
                                "directory"}


@pytest.mark.exfat
def test_files_holding_notification_urls_stay_off_the_disk(
    make_exfat, server: Server, hook: Hook
) -> None:
    import zipfile

    disk = make_exfat()
    urls_file = server.etc / "notify-urls"
    urls_file.write_text(f"json://user:{SECRET}@127.0.0.1:{hook.port}/\n")
    server.config_path = server.etc / "config.toml"  # inside the archived folder
    server.write_config(f'[notify]\nurls = ["json://user:{SECRET}@127.0.0.1:{hook.port}/a"]\n'
                        f'urls_file = "{urls_file}"\n')

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    (archive,) = (disk.marker / "config").iterdir()
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        note = zf.read("RESTORE.txt").decode()
    assert os.path.relpath(server.etc / "immich-config.json", "/") in names
    assert not any(n.endswith(("notify-urls", "config.toml")) for n in names)
    assert "Left out on purpose" in note
    assert str(urls_file) in note and str(server.config_path) in note
    assert_no_secret(r.stdout + r.stderr, server, disk)


# A disk we mount: "safe to unplug" only once it is unmounted --------------------------------

@pytest.mark.exfat
@pytest.mark.usefixtures("no_blocked_loop")  # the flow runs in this process
def test_a_disk_detached_by_the_run_is_unmounted_before_the_finished_message(
    make_exfat, server: Server, hook: Hook
) -> None:
    from helpers import unmount
    from immich_usb_backup import flow
    from immich_usb_backup.config import load_config

    disk = make_exfat()
    notify_config(server, hook.url())
    config = load_config(server.config_path)

    async def detach() -> messages.DiskState:
        await asyncio.to_thread(unmount, disk.mount_point)
        return "powered-off"

    record = asyncio.run(flow.run_backup(config, disk.mount_point, detach=detach))

    assert record.status == "success"
    _, finished = hook.wait_for(2)
    assert finished["title"] == "Immich backup: success on Backup"
    assert str(disk.mount_point) not in hook.mounted_at_arrival[1]
    assert finished["message"].endswith(
        "The disk was unmounted and powered off: it is safe to unplug.")
    assert "still mounted" not in finished["message"]
    print("\n--- finished, detached ---\n" + finished["title"] + "\n" + finished["message"])
    assert last_record(server)["notifications"][-1] == {"event": "finished", "ok": True}


@pytest.mark.usefixtures("no_blocked_loop")  # the flow runs in this process
def test_a_marked_disk_that_is_not_approved_gets_the_approve_command(
    server: Server, hook: Hook
) -> None:
    from immich_usb_backup import flow
    from immich_usb_backup.config import load_config

    notify_config(server, hook.url())
    config = load_config(server.config_path)

    asyncio.run(flow._record_needs_approval(
        config, "/dev/sdz1", "1A2B-3C4D", "Holiday", "plug", messages.DiskEnd("unmounted")))

    (msg,) = hook.wait_for(1)
    assert msg["title"] == "Immich backup: disk Holiday needs approval"
    assert msg["type"] == "warning"
    body = msg["message"]
    assert "The disk Holiday (UUID 1A2B-3C4D) was plugged into" in body
    assert "\n    sudo immich-usb-backup approve UUID=1A2B-3C4D\n" in body
    assert body.endswith("The disk was unmounted: it is safe to unplug.")
    rec = last_record(server)
    assert rec["status"] == "refused"
    assert rec["notifications"] == [{"event": "needs_approval", "ok": True}]
    print("\n--- needs_approval ---\n" + msg["title"] + "\n" + body)


@pytest.mark.usefixtures("no_blocked_loop")  # the flow runs in this process
def test_a_disk_that_cannot_be_used_sends_a_failed_message(server: Server, hook: Hook) -> None:
    from immich_usb_backup import flow
    from immich_usb_backup.config import load_config

    notify_config(server, hook.url())
    config = load_config(server.config_path)

    asyncio.run(flow._record_simple(config, "failed", "/dev/sdz1", "1A2B-3C4D", "Holiday",
                                    "plug", "the disk Holiday could not be used: timeout"))

    (msg,) = hook.wait_for(1)
    assert msg["title"] == "Immich backup: failed on Holiday"
    assert msg["type"] == "failure"
    assert "- the disk Holiday could not be used: timeout" in msg["message"]
    assert msg["message"].endswith("The disk is not mounted: it is safe to unplug.")


@pytest.mark.usefixtures("no_blocked_loop")  # the flow runs in this process
def test_disabled_events_and_no_urls_send_and_record_nothing(
    server: Server, hook: Hook
) -> None:
    from immich_usb_backup import flow
    from immich_usb_backup.config import load_config

    notify_config(server, hook.url(), extra='events = ["finished"]\n')
    asyncio.run(flow._record_needs_approval(
        load_config(server.config_path), "/dev/sdz1", None, None, "plug",
        messages.DiskEnd("unmounted")))
    server.write_config()
    asyncio.run(flow._record_needs_approval(
        load_config(server.config_path), "/dev/sdz1", None, None, "plug",
        messages.DiskEnd("unmounted")))

    time.sleep(0.3)
    assert hook.received == []
    records = [json.loads(x) for x in (server.state / "history.jsonl").read_text().split("\n")
               if x]
    assert [r.get("notifications") for r in records] == [None, None]


# The messages, from plain data ------------------------------------------------------------

def record(**overrides: Any) -> RunRecord:
    """A run record as the flow fills it; ``steps`` gives the library step's fields."""
    base: dict[str, Any] = {
        "status": "success", "disk": {"uuid": "1A2B-3C4D", "label": "Backup"},
        "target": "/media/backup", "host": "nas", "files_transferred": 12,
        "bytes_transferred": 3 * 1024 * 1024, "duration_s": 75.0, "problems": [],
    }
    steps = overrides.pop("steps", {})
    run = RunRecord.from_dict(base | overrides)
    if "library" in steps:
        run.steps["library"] = LibraryResult(**steps["library"])
    return run


@pytest.mark.parametrize(("state", "sentence"), [
    ("powered-off", "The disk was unmounted and powered off: it is safe to unplug."),
    ("unmounted", "The disk was unmounted: it is safe to unplug."),
    ("not-mounted", "The disk is not mounted: it is safe to unplug."),
    ("gone", "The disk was removed before the backup ended."),
    ("busy", "The disk could not be unmounted (see the server's log): do not unplug it yet."),
])
def test_the_finished_message_says_safe_to_unplug_only_when_it_is(
    state: messages.DiskState, sentence: str
) -> None:
    msg = messages.finished(record(), messages.DiskEnd(state, wrote=True, free_bytes=2 << 30,
                                                   size_bytes=4 << 30))
    assert msg.body.endswith("\n" + sentence)
    assert msg.body.count("safe to unplug") == (1 if "safe to unplug" in sentence else 0)
    assert "Copied: 12 files, 3.0 MiB, in 1 min 15 s." in msg.body
    assert "Free space left on the disk: 2.0 GiB of 4.0 GiB." in msg.body
    assert msg.title == "Immich backup: success on Backup"


def test_the_finished_message_says_what_was_set_aside_and_compared() -> None:
    steps = {"library": {"kept": 3, "keep_day": "2026-11-27", "keep_days": 30,
                         "compared": 120}}
    msg = messages.finished(record(steps=steps), messages.DiskEnd("unmounted"))
    assert ("Set aside: 3 files deleted or changed on the server, kept in "
            "deleted/2026-11-27/ on the disk for 30 days.") in msg.body
    assert "Compared by content with the server: 120 files." in msg.body
    assert "did not complete" not in msg.body
    failed = messages.finished(record(status="failed", steps={"library": {"mismatches": 1}}),
                             messages.DiskEnd("unmounted"))
    assert "Everything was copied, but the check found copies" in failed.body
    assert "did not complete" not in failed.body
    plain = messages.finished(record(steps={"library": {"kept": 0}}), messages.DiskEnd("unmounted"))
    assert "Set aside" not in plain.body and "Compared" not in plain.body


def test_the_finished_message_shows_the_first_problems_and_counts_the_rest() -> None:
    problems = [f"problem {i}" for i in range(1, 9)]
    msg = messages.finished(record(status="failed", problems=problems),
                          messages.DiskEnd("unmounted"))
    assert msg.kind == "failure"
    assert "Problems (8):\n- problem 1\n" in msg.body and "- problem 5\n" in msg.body
    assert "problem 6" not in msg.body
    assert "- ... and 3 more: run `immich-usb-backup history` on the server" in msg.body


def test_a_disk_someone_else_mounted_is_to_be_ejected_there_first() -> None:
    msg = messages.needs_approval("Holiday", None, "/dev/sdz1", "sudo immich-usb-backup "
                                "approve /dev/sdz1", messages.DiskEnd("left-mounted", "/media/h"))
    assert msg.title == "Immich backup: disk Holiday needs approval"
    assert "\n    sudo immich-usb-backup approve /dev/sdz1\n" in msg.body
    assert msg.body.endswith("The disk is still mounted at /media/h, as it was found: eject "
                             "it there, then it is safe to unplug.")


def test_a_run_on_an_unknown_target_is_named_by_its_path() -> None:
    msg = messages.end_message(record(status="refused", disk={"uuid": None, "label": None},
                                    problems=["/mnt/x is not the mount point of a disk"]),
                             messages.DiskEnd("left-mounted", "/mnt/x"))
    assert msg.event == "refused"
    assert msg.title == "Immich backup: refused on /media/backup"
    assert "Why: /mnt/x is not the mount point of a disk" in msg.body


# Where the URLs come from ------------------------------------------------------------------

def test_env_urls_split_on_whitespace_and_commas_but_keep_commas_inside_a_url() -> None:
    text = " ntfy://a ,json://h/x\n mailto://u:p@h?to=a@x.org,b@x.org,  tgram://t/c "
    assert notify.split_urls(text) == [
        "ntfy://a", "json://h/x", "mailto://u:p@h?to=a@x.org,b@x.org", "tgram://t/c"]
    assert notify.split_urls("  ") == []


def test_urls_file_skips_comment_lines_but_keeps_a_hash_inside_a_url(tmp_path: Path) -> None:
    f = tmp_path / "urls"
    f.write_text("# comment\n\n  slack://T/B/C/#general  \n   # indented comment\nntfy://t\n")
    assert notify.read_urls_file(f) == ["slack://T/B/C/#general", "ntfy://t"]


def test_collect_urls_names_each_url_by_its_origin(tmp_path: Path) -> None:
    f = tmp_path / "urls"
    f.write_text("ntfy://b\n")
    cfg = NotifyConfig(urls=("ntfy://a",), urls_file=f)
    sources, problems = notify.collect_urls(cfg, {notify.ENV_URLS: "ntfy://c"})
    assert [(s.origin, s.url) for s in sources] == [
        ("notify.urls #1", "ntfy://a"), (f"{f} #1", "ntfy://b"),
        (f"${notify.ENV_URLS} #1", "ntfy://c")]
    assert problems == []
    _, problems = notify.collect_urls(NotifyConfig(urls_file=tmp_path / "nope"), {})
    assert problems == [f"notify.urls_file {tmp_path / 'nope'}: cannot read: No such file "
                        "or directory"]


def test_a_bad_url_in_the_config_is_an_error_that_does_not_show_it(tmp_path: Path) -> None:
    data = {"immich": {"upload_location": str(tmp_path)},
            "notify": {"urls": ["ntfy://ok", f"user:{SECRET}@smtp.example.org"],
                       "events": ["finished", "exploded"]}}
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cfg.toml")
    text = "\n".join(info.value.problems)
    assert 'notify.events: item 2: must be one of "started", "finished"' in text
    assert SECRET not in text
    data["notify"]["events"] = ["finished"]  # type: ignore[index]
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cfg.toml")
    assert info.value.problems == [
        "cfg.toml: notify.urls: item 2 is not an Apprise URL (scheme://...); see "
        "docs/notifications.md"]


def test_an_url_apprise_does_not_know_is_recorded_without_showing_it(hook: Hook) -> None:
    notifier = notify.Notifier(NotifyConfig(urls=(f"nosuch://user:{SECRET}@x", hook.url())))
    asyncio.run(notifier.send(messages.Message(Event.FINISHED, "t", "b")))
    assert hook.wait_for(1)[0]["title"] == "t"
    assert notifier.outcomes == [{"event": "finished", "ok": False, "error":
                                  "notify.urls #1: not a URL Apprise understands "
                                  "(scheme 'nosuch')"}]


def test_a_notifier_that_breaks_records_it_and_never_raises(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    import apprise

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("plugin bug")

    monkeypatch.setattr(apprise.Apprise, "instantiate", explode)
    notifier = notify.Notifier(NotifyConfig(urls=("json://127.0.0.1:1/",)))
    asyncio.run(notifier.send(messages.Message(Event.FINISHED, "t", "b")))
    assert notifier.outcomes == [{"event": "finished", "ok": False, "error":
                                  "cannot prepare the notifications: "
                                  "RuntimeError('plugin bug')"}]


# Masking -----------------------------------------------------------------------------------

def _secrets_of(url: str) -> set[str]:
    import apprise

    plugin = apprise.Apprise.instantiate(url)
    assert plugin is not None, url
    return masking.secrets_in(url, plugin.url(privacy=True), plugin.url(privacy=False))


@pytest.mark.parametrize(("url", "secret"), [
    ("json://user:s3cretpw@127.0.0.1:8080/hook", "s3cretpw"),
    ("mailto://me:app%40pass99@gmail.com", "app@pass99"),
    ("mailtos://me:pw12345@smtp.example.org?from=me@example.org", "pw12345"),
    ("tgram://123456789:AAHsecretTOKENxyz/987654", "123456789:AAHsecretTOKENxyz"),
    ("tgram://123456789:AAHsecretTOKENxyz/987654", "AAHsecretTOKENxyz"),
    ("ntfys://ntfy.example.org/topic?token=tk_abcdef1234", "tk_abcdef1234"),
    ("ntfys://bob:hunter22@ntfy.example.org/topic", "hunter22"),
    ("mailtos://backup%40example.org:pw%3Aword9@mail.example.org:587?smtp=mail.example.org"
     "&from=backup@example.org&to=me@example.org", "pw:word9"),
    ("discord://1234/abcdWEBHOOKsecret", "abcdWEBHOOKsecret"),
])
def test_the_secret_parts_of_a_url_are_found_and_masked(url: str, secret: str) -> None:
    found = _secrets_of(url)
    assert secret in found
    masking.register_secrets(found)
    for text in (url, f"POST https://api.example/bot{secret}/send failed", secret):
        masked = masking.mask(text)
        assert secret not in masked, masked
        assert "***" in masked


def test_hosts_and_plain_words_are_not_taken_for_secrets() -> None:
    found = _secrets_of("mailto://me:pw12345@smtp.example.org?from=me@example.org&mode=ssl")
    assert not found & {"mailto", "mailtos", "smtp.example.org", "me", "from", "mode", "ssl"}
    found = _secrets_of("json://127.0.0.1:8080/hook")
    assert found == set()


def test_a_password_is_masked_even_before_apprise_parsed_the_url() -> None:
    assert masking.secrets_in("json://user:pa%2Fss@h/") >= {"pa%2Fss", "pa/ss"}
    assert masking.mask("json://user:whatever@h/") == "json://user:***@h/"


def test_apprise_and_urllib3_log_lines_are_masked() -> None:
    # What reaches the root logger's handlers (the journal, stderr). Not caplog: pytest
    # also attaches its capture to loggers that do not propagate.
    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    masking.register_secrets({"tok3n-in-path"})
    notify.guard_library_logs()
    root, keep = logging.getLogger(), Keep()
    level = root.level
    root.addHandler(keep)
    root.setLevel(logging.DEBUG)
    try:
        logging.getLogger("apprise").warning("POST https://h/tok3n-in-path failed")
        logging.getLogger("urllib3.connectionpool").debug('"POST /x/%s" 500', "tok3n-in-path")
    finally:
        root.removeHandler(keep)
        root.setLevel(level)
    assert [r.getMessage() for r in keep.records] == [
        "POST https://h/*** failed", '"POST /x/***" 500']
    assert [r.name for r in keep.records] == ["apprise", "urllib3.connectionpool"]


def test_apprise_is_imported_only_when_a_message_is_sent_somewhere() -> None:
    code = textwrap.dedent("""
        import asyncio, sys
        from immich_usb_backup import cli, daemon, flow, messages, notify
        from immich_usb_backup.config import Event, NotifyConfig
        message = messages.Message(Event.FINISHED, "t", "b")
        asyncio.run(notify.Notifier(NotifyConfig(), environ={}).send(message))
        print("apprise" in sys.modules)
        asyncio.run(notify.Notifier(NotifyConfig(urls=("json://127.0.0.1:9/x",),
                                                 timeout_s=1), environ={}).send(message))
        print("apprise" in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]


def test_check_send_test_sends_one_message_and_says_how_each_service_answered(
    server: Server, hook: Hook
) -> None:
    broken = Hook(status=500)
    try:
        notify_config(server, hook.url(), broken.url(), "bogus://nothing")
        r = run_cli("check", "--send-test", config=server.config_path)
    finally:
        broken.close()
    assert r.returncode == 1, r.stdout + r.stderr
    (msg,) = hook.wait_for(1)
    assert msg["title"] == "Immich backup: test message"
    lines = r.stdout.splitlines()
    assert "test message to 3 services:" in lines
    assert "  JSON (notify.urls #1): sent" in lines
    assert any(line.startswith("  JSON (notify.urls #2): NOT sent: ") for line in lines)
    assert any("notify.urls #3" in line and "cannot be used" in line for line in lines)
    assert "bogus://nothing" not in r.stdout  # a URL is never shown
    notify_config(server, hook.url())
    ok = run_cli("check", "--send-test", config=server.config_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
