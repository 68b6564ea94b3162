"""The web UI end to end in a real browser: Debian's Chromium (driven by Playwright) on
the page of ``immich-usb-backup web``, which asks the real daemon on the real stack
(udevd, UDisks2, an exFAT disk image on a loop device) through its control socket.

A person logs in, sees the plugged disk, approves it after the confirmation, clicks
"Back up now", sees the bar move and the buttons disabled, then the run in the week's
strip and in the history. Each page's screenshot goes to docs/images/ (web-*.png).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import stack as st
from helpers import REPO, LoopWatch, Server, need
from immich_usb_backup import history
from immich_usb_backup.web import security
from test_daemon_e2e import plugs  # noqa: F401 - the fixture: disks pulled at the end

PASSWORD = "a long test password"  # noqa: S105 - the test's own
CHROMIUM = Path("/usr/bin/chromium")
IMAGES = REPO / "docs" / "images"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LIBRARY_MB = 48  # copied at BWLIMIT: long enough to watch the bar move
BWLIMIT_KIB = 8 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Process:
    """A product process (``daemon`` or ``web``) in asyncio's debug mode, its output in
    a file that is scanned for a blocked event loop at the end."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        self.file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env={**env, "PYTHONASYNCIODEBUG": "1"},
                                     stdout=self.file, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, words: str, timeout: float = 60) -> None:
        st.wait_for(lambda: words in self.text() or self.proc.poll() is not None,
                    f"{self.name}: {words}", timeout)
        assert self.proc.poll() is None, f"{self.name} exited:\n{self.text()}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.file.close()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Started product processes, stopped at the end (before the disks are pulled: this
    fixture is set up after ``plugs``), the web UI's log checked for a blocked event
    loop (the daemon's blocks are told as warnings)."""
    started: list[Process] = []
    yield started
    watch = LoopWatch()
    for p in reversed(started):
        p.stop()
        found = watch.scan(p.name, p.text())
        if p.name != "web":  # Chromium shares the two cores with rsync and FUSE here: the
            # daemon's loop is held to the 100 ms by test_daemon_e2e, without a browser
            for block in found:
                warnings.warn(f"event loop: {block}", stacklevel=1)
            watch.blocks = [b for b in watch.blocks if b not in found]
    assert not watch.blocks, "the event loop was blocked:\n" + "\n".join(watch.blocks)


def fill_library(server: Server) -> None:
    folder = server.upload / "upload" / "9f1d6c1a-user" / "ef" / "01"
    folder.mkdir(parents=True)
    for i in range(LIBRARY_MB):
        (folder / f"VID_{i:04d}.mp4").write_bytes(os.urandom(1024 * 1024))


def test_log_in_approve_back_up_now_and_watch_it_in_chromium(
        real_stack: st.Stack, server: Server, plugs: list[st.Plug],  # noqa: F811
        processes: list[Process], tmp_path: Path) -> None:
    need(CHROMIUM.exists(), "needs Debian's Chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        need(False, "needs Playwright (pip install playwright; the browser is Debian's)")
        raise
    fill_library(server)
    port = free_port()
    run_dir = tmp_path / "run"
    server.write_config(
        f"[library]\nbwlimit_kib = {BWLIMIT_KIB}\n\n"
        f'[web]\nlisten = "127.0.0.1:{port}"\npassword_file = "{server.state}/web-password"\n'
        f'socket = "{run_dir}/control.sock"\n')
    security.write_password(server.state / "web-password", PASSWORD, "immich-usb-backup")
    image = st.make_image(tmp_path / "disk.img", "Backup", size_mb=256)
    env = real_stack.env
    program = [sys.executable, "-m", "immich_usb_backup", "-c", str(server.config_path), "-v"]
    processes.append(Process("daemon", [*program, "daemon"], env, tmp_path / "daemon.log"))
    processes[0].wait_for("immich-usb-backup daemon ready")
    # plugged before it is approved: the daemon records that it needs approval
    plugs.append(st.plug(image))
    st.wait_for(lambda: history.last_records(server.state, None), "the needs-approval record")
    processes.append(Process("web", [*program, "web"], env, tmp_path / "web.log"))
    processes[1].wait_for("web UI on http://")
    base = f"http://127.0.0.1:{port}"
    IMAGES.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=FLAGS)
        try:
            page = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text)
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))

            page.goto(f"{base}/")
            expect(page).to_have_url(f"{base}/login")
            page.screenshot(path=IMAGES / "web-login.png")
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            expect(page).to_have_url(f"{base}/")

            # the plugged disk, not approved yet: its confirmation says what approving does
            disk = page.locator("li.plugged-disk", has_text="Backup")
            expect(disk).to_be_visible()
            disk.get_by_text("Approve…").click()
            expect(page.locator("#approve-label")).to_have_text("Backup")
            expect(page.locator("#approve-size")).to_have_text("256.0 MiB")
            expect(page.get_by_text("Nothing on this disk is formatted")).to_be_visible()
            page.screenshot(path=IMAGES / "web-approve.png")
            page.click("text=Approve this disk")
            expect(page).to_have_url(f"{base}/")

            # Back up now: the bar moves, the buttons wait
            button = page.locator("form.backup button")
            expect(button).to_be_enabled()
            page.select_option("form.backup select", "quick")
            page.screenshot(path=IMAGES / "web-backup.png")
            button.click()
            expect(page.locator("#live-progress")).to_be_visible(timeout=30_000)
            expect(button).to_be_disabled()
            seen: list[float] = []
            details: set[str] = set()
            end = time.monotonic() + 120
            while time.monotonic() < end and len(set(seen)) < 3:
                if page.locator("#live-phase").text_content() == "library":
                    details.add(page.locator("#live-detail").text_content() or "")
                    value = float(page.locator("#live-bar").get_attribute("value") or 0)
                    if 0 < value < 100 and (not seen or value != seen[-1]):
                        seen.append(value)
                        if len(seen) == 2:
                            page.screenshot(path=IMAGES / "web-backup-running.png")
                page.wait_for_timeout(100)
            assert len(set(seen)) >= 3 and seen == sorted(seen), seen
            assert any(re.fullmatch(r"\d+ of \d+ files copied", d) for d in details), details
            expect(button).to_be_disabled()
            expect(page.locator("#live-rate")).not_to_have_text("-")

            # the end: the page reloads itself, the run is in the week's strip
            expect(page.locator("#live-progress")).to_be_hidden(timeout=120_000)
            expect(page.locator("ol.days .bar[data-status=success]").last).to_be_visible(
                timeout=30_000)
            expect(page.locator("form.backup button")).to_be_enabled()
            page.screenshot(path=IMAGES / "web-backup-done.png", full_page=True)

            page.goto(f"{base}/history")
            expect(page.locator("tbody tr[data-status=success]").first).to_be_visible()
            expect(page.locator("section.schedule")).to_be_visible()
            page.screenshot(path=IMAGES / "web-history.png", full_page=True)

            phone = browser.new_context(viewport={"width": 412, "height": 915},
                                        device_scale_factor=2).new_page()
            phone.goto(f"{base}/login")
            phone.fill("#password", PASSWORD)
            phone.click("button[type=submit]")
            expect(phone.locator("li.plugged-disk")).to_be_visible()
            width = phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 412, f"the page is wider than a phone: {width}px"
            phone.screenshot(path=IMAGES / "web-backup-phone.png", full_page=True)
            assert not problems, problems  # no script error, no CSP violation
        finally:
            browser.close()

    runs = history.last_records(server.state, None)
    assert runs[0]["status"] == "refused" and runs[0]["trigger"] == "plug", runs
    assert "is not approved" in runs[0]["problems"][0]
    (web,) = [r for r in runs if r["trigger"] == "web"]
    assert web["status"] == "success" and web["mode"] == "quick", web
    assert web["files_transferred"] >= LIBRARY_MB
    assert "runs as root" in processes[1].text()  # by hand as root: it works, and warns

