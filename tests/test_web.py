"""The web UI (web/) over real HTTP on loopback (aiohttp's test server and client), asking
a real control socket answered by a stand-in for the daemon (test_control): the JSON API,
and every security rule: sessions, CSRF tokens, Origin, the slowed and limited logins,
the cookie's flags, the headers, escaping of hostile disk labels."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from helpers import run_cli
from immich_usb_backup import clock, history
from immich_usb_backup.config import Config, parse_config
from immich_usb_backup.control import ControlServer
from immich_usb_backup.record import RunRecord
from immich_usb_backup.web import security
from immich_usb_backup.web.app import make_app
from test_control import DaemonStandIn

PASSWORD = "correct horse battery"  # noqa: S105 - the tests' own
HOSTILE = "<script>alert(1)</script>"
HOSTILE_MODEL = '"><img src=x onerror=alert(2)>'


def make_config(tmp_path: Path, **web: Any) -> Config:
    state = tmp_path / "state"
    config = parse_config({
        "immich": {"upload_location": str(tmp_path / "immich")},
        "web": {"listen": "127.0.0.1:8429", "password_file": str(state / "web-password"),
                "socket": str(tmp_path / "control.sock"), **web},
        "state": {"dir": str(state)},
    }, "test")
    security.write_password(config.web.password_file, PASSWORD, config.web.group)
    return config


def a_run(label: str = "Backup", minutes_ago: int = 60, status: str = "success") -> RunRecord:
    started = clock.now() - timedelta(minutes=minutes_ago)
    return RunRecord.from_dict({
        "started_at": clock.iso(started), "finished_at": clock.iso(started),
        "status": status, "trigger": "web", "mode": "quick",
        "disk": {"uuid": "6F5F-FDC3", "label": label}, "files_transferred": 3,
        "bytes_transferred": 2048, "duration_s": 1.5, "problems": []})


class Handler(DaemonStandIn):
    """The stand-in, with a disk plugged in whose label and model are hostile."""

    def __init__(self, label: str = HOSTILE) -> None:
        super().__init__()
        self.plugged = [{"device": "/dev/sdz1", "label": label, "uuid": "6F5F-FDC3",
                         "size": 256 * 1024 * 1024, "model": HOSTILE_MODEL,
                         "mount_point": None, "marker": None, "approved": True,
                         "any_marked": False, "free_bytes": None, "free_bytes_at": None},
                        {"device": "/dev/sdy1", "label": "New", "uuid": "1234-ABCD",
                         "size": 1024 ** 3, "model": "Stick", "mount_point": None,
                         "marker": None, "approved": False, "any_marked": False,
                         "free_bytes": None, "free_bytes_at": None}]

    async def disks(self) -> list[dict[str, Any]]:
        return self.plugged


@contextlib.asynccontextmanager
async def started(tmp_path: Path, *, daemon: bool = True, handler: Handler | None = None,
                  **web_keys: Any) -> AsyncIterator[tuple[TestClient, Handler, Config]]:
    config = make_config(tmp_path, **web_keys)
    handler = handler or Handler()
    server = ControlServer(config.web.socket, config.web.group, handler)
    if daemon:
        await server.start()
    client = TestClient(TestServer(make_app(config)))
    await client.start_server()
    try:
        yield client, handler, config
    finally:
        await client.close()
        await server.stop()


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())


async def login(client: TestClient, **headers: str) -> str:
    r = await client.post("/api/login", json={"password": PASSWORD}, headers=headers)
    assert r.status == 200, await r.text()
    csrf: str = (await r.json())["csrf"]
    return csrf


def origin(client: TestClient) -> str:
    return f"http://127.0.0.1:{client.port}"


class Tags(HTMLParser):
    def __init__(self, markup: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.scripts.append(data)


# sessions --------------------------------------------------------------------------------


def test_every_page_and_endpoint_but_the_login_needs_a_session(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path) as (client, handler, _):
            for path in ("/", "/history", "/approve?disk=6F5F-FDC3"):
                r = await client.get(path, allow_redirects=False)
                assert (r.status, r.headers["Location"]) == (303, "/login"), path
            for path in ("/api/status", "/api/disks", "/api/history", "/api/events"):
                r = await client.get(path)
                assert r.status == 401, path
                assert (await r.json())["error"] == "unauthorized"
            for name in ("backup", "approve", "verify", "cancel", "logout"):
                r = await client.post(f"/api/{name}", json={"disk": "6F5F-FDC3"})
                assert r.status == 401, name
            r = await client.post("/action/backup", data={"disk": "6F5F-FDC3"},
                                  allow_redirects=False)
            assert (r.status, r.headers["Location"]) == (303, "/login")
            assert handler.calls == []  # nothing reached the daemon
            for path in ("/login", "/static/style.css", "/static/app.js"):
                assert (await client.get(path)).status == 200, path
            for path in ("/static/..%2Fconfig.toml", "/static/nope.js"):
                assert (await client.get(path)).status == 404, path

    run(main)


def test_login_sets_an_httponly_strict_cookie_secure_only_behind_tls(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path) as (client, _, _):
            r = await client.post("/api/login", json={"password": PASSWORD})
            cookie = r.headers["Set-Cookie"]
            assert re.search(r"iub_session=[\w-]{40,};", cookie)
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert "Secure" not in cookie  # plain HTTP: a Secure cookie would never return
            assert set(await r.json()) == {"csrf"}
            assert (await client.get("/api/status")).status == 200
            r = await client.post("/api/login", json={"password": PASSWORD},
                                  headers={"X-Forwarded-Proto": "https"})
            assert "Secure" in r.headers["Set-Cookie"]  # from a trusted proxy (loopback)
            # (a browser, like this client, then sends it over TLS only)
            assert (await client.get("/api/status")).status == 401

    run(main)


def test_x_forwarded_proto_from_an_untrusted_peer_is_ignored(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path, trusted_proxies=[]) as (client, _, _):
            r = await client.post("/api/login", json={"password": PASSWORD},
                                  headers={"X-Forwarded-Proto": "https"})
            assert r.status == 200 and "Secure" not in r.headers["Set-Cookie"]

    run(main)


def test_logout_ends_the_session(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path) as (client, _, _):
            csrf = await login(client)
            assert (await client.post("/api/logout")).status == 403  # needs the token too
            r = await client.post("/api/logout", headers={"X-CSRF-Token": csrf})
            assert r.status == 200 and "Max-Age=0" in r.headers["Set-Cookie"]
            assert (await client.get("/api/status")).status == 401

    run(main)


def test_a_wrong_password_is_answered_after_a_second_and_limited_per_address(
        tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path) as (client, _, _):
            them = {"X-Forwarded-For": "198.51.100.7"}  # behind the (loopback) proxy
            for i in range(security.MAX_FAILURES):
                t0 = time.monotonic()
                r = await client.post("/api/login", json={"password": f"guess {i}"},
                                      headers=them)
                assert r.status == 401
                assert time.monotonic() - t0 >= security.LOGIN_DELAY_S
                assert "Set-Cookie" not in r.headers
            # now even the right password is refused from there, slowly too
            t0 = time.monotonic()
            r = await client.post("/api/login", json={"password": PASSWORD}, headers=them)
            assert r.status == 429 and "Retry-After" in r.headers
            assert time.monotonic() - t0 >= security.LOGIN_DELAY_S
            # parallel guesses from one address wait their turn: no faster than one a second
            other = {"X-Forwarded-For": "198.51.100.9"}
            t0 = time.monotonic()
            answers = await asyncio.gather(*(client.post(
                "/api/login", json={"password": "x"}, headers=other) for _ in range(3)))
            assert [a.status for a in answers] == [401] * 3
            assert time.monotonic() - t0 >= 3 * security.LOGIN_DELAY_S
            # another address is not held up
            ok = await client.post("/api/login", json={"password": PASSWORD},
                                   headers={"X-Forwarded-For": "198.51.100.8"})
            assert ok.status == 200
            # the form login is counted the same way
            r = await client.post("/login", data={"password": PASSWORD}, headers=them)
            assert r.status == 429

    run(main)


def test_login_with_bad_bodies(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path) as (client, _, _):
            for body in (b"not json", b"[]", b'{"password": 5}', b"{}"):
                r = await client.post("/api/login", data=body,
                                      headers={"Content-Type": "application/json"})
                assert r.status in (400, 401), body
            r = await client.post("/api/login", data=b"x" * 100_000,
                                  headers={"Content-Type": "application/json"})
            assert r.status == 413

    run(main)


# CSRF and Origin ----------------------------------------------------------------------------


def test_actions_need_the_csrf_token_and_this_site_s_origin(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path) as (client, handler, _):
            csrf = await login(client)
            body = {"disk": "6F5F-FDC3", "mode": "quick"}
            r = await client.post("/api/backup", json=body)
            assert r.status == 403 and "CSRF" in (await r.json())["message"]
            r = await client.post("/api/backup", json=body, headers={"X-CSRF-Token": "x"})
            assert r.status == 403
            for bad in ("http://evil.example", "null", f"https://127.0.0.1:{client.port}"):
                r = await client.post("/api/backup", json=body,
                                      headers={"X-CSRF-Token": csrf, "Origin": bad})
                assert r.status == 403, bad
                assert "Origin" in (await r.json())["message"]
            r = await client.post("/api/backup", json=body, headers={
                "X-CSRF-Token": csrf, "Referer": "http://evil.example/page"})
            assert r.status == 403
            assert handler.calls == []
            # the login is checked for its Origin too (login CSRF)
            r = await client.post("/api/login", json={"password": PASSWORD},
                                  headers={"Origin": "http://evil.example"})
            assert r.status == 403
            r = await client.post("/api/backup", json=body,
                                  headers={"X-CSRF-Token": csrf, "Origin": origin(client)})
            assert r.status == 202
            assert (await r.json())["started"]["mode"] == "quick"
            # a form's token is the field, not the header
            r = await client.post("/action/cancel", data={"csrf": "wrong"},
                                  allow_redirects=False)
            assert r.status == 403

    run(main)


def test_a_second_backup_is_409_with_the_running_one(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path) as (client, _handler, _):
            csrf = await login(client)
            h = {"X-CSRF-Token": csrf}
            first = await client.post("/api/backup", json={"disk": "6F5F-FDC3"}, headers=h)
            assert first.status == 202
            second = await client.post("/api/backup", json={"disk": "6F5F-FDC3",
                                                            "mode": "full"}, headers=h)
            assert second.status == 409
            body = await second.json()
            assert body["error"] == "busy"
            assert body["running"]["state"] == "running"
            assert body["running"]["phase"] == "library"
            status = await (await client.get("/api/status")).json()
            assert status["state"] == "running" and status["daemon"] is True
            r = await client.post("/api/backup", json={"disk": "6F5F-FDC3", "mode": "fast"},
                                  headers=h)
            assert r.status == 400
            assert (await client.post("/api/cancel", headers=h)).status == 200
            assert (await (await client.get("/api/status")).json())["state"] == "idle"

    run(main)


# the API's shapes ------------------------------------------------------------------------------


def test_the_api_answers_in_the_command_line_s_shapes(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path) as (client, handler, config):
            for i in range(3):
                history.append(config.state_dir, a_run(f"Disk-{i}", 60 - i))
            csrf = await login(client)
            h = {"X-CSRF-Token": csrf}
            assert await (await client.get("/api/status")).json() == {"state": "idle",
                                                                      "daemon": True}
            assert await (await client.get("/api/disks")).json() == handler.plugged
            runs = await (await client.get("/api/history?last=2")).json()
            assert runs == history.last_records(config.state_dir, 2)  # history --json
            assert [r["disk"]["label"] for r in runs] == ["Disk-1", "Disk-2"]
            assert len(await (await client.get("/api/history")).json()) == 3
            for bad in ("0", "-1", "two", ""):
                assert (await client.get(f"/api/history?last={bad}")).status == 400
            r = await client.post("/api/approve", json={"disk": "1234-ABCD",
                                                        "create_marker": True}, headers=h)
            assert r.status == 200 and (await r.json())["created_marker"] is True
            assert handler.calls[-1] == ("approve", ("1234-ABCD", True))
            r = await client.post("/api/verify", json={"disk": "X"}, headers=h)
            assert r.status == 404  # the stand-in knows no disk X
            r = await client.post("/api/verify", json={"disk": "X", "restore_drill": True},
                                  headers=h)
            assert r.status == 500 and "boom" in (await r.json())["message"]  # its drill
            r = await client.post("/api/drill", json={"disk": "X"}, headers=h)  # the button's
            assert r.status == 500 and "boom" in (await r.json())["message"]
            r = await client.post("/api/approve", json={"disk": "1234-ABCD",  # a form's value
                                                        "create_marker": "on"}, headers=h)
            assert r.status == 200 and handler.calls[-1] == ("approve", ("1234-ABCD", True))
            assert (await client.post("/api/backup", json={}, headers=h)).status == 400
            assert (await client.post("/api/format", json={}, headers=h)).status == 404

    run(main)


def test_events_are_server_sent_events_of_the_status(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path) as (client, _handler, _):
            csrf = await login(client)
            r = await client.get("/api/events")
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert "Content-Security-Policy" in r.headers

            async def event() -> dict[str, Any]:
                while True:
                    line = (await r.content.readline()).decode()
                    if line.startswith("data: "):
                        data: dict[str, Any] = json.loads(line[6:])
                        return data

            assert await event() == {"state": "idle", "daemon": True}
            await client.post("/api/backup", json={"disk": "6F5F-FDC3"},
                              headers={"X-CSRF-Token": csrf})
            stamps = []
            async with asyncio.timeout(10):
                while len(stamps) < 5:
                    if (await event())["state"] == "running":
                        stamps.append(time.monotonic())
            assert stamps[-1] - stamps[0] < 4 * 0.5
            r.close()

    run(main)


# the pages ----------------------------------------------------------------------------------


def test_every_answer_has_the_csp_and_pages_have_no_inline_script(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path) as (client, _, config):
            history.append(config.state_dir, a_run())
            answers = [await client.get("/login"), await client.get("/api/status")]
            await login(client)
            for path in ("/", "/history", "/approve?disk=1234-ABCD", "/api/status",
                         "/static/app.js", "/nowhere"):
                answers.append(await client.get(path))
            for r in answers:
                csp = r.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "default-src 'none'" in csp
                assert "unsafe-inline" not in csp
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert r.headers["X-Frame-Options"] == "DENY"
                if r.content_type == "text/html":
                    page = Tags(await r.text())
                    assert not page.scripts, "an inline script"
                    srcs = [a["src"] for t, a in page.tags if t == "script"]
                    assert srcs in ([], ["/static/app.js"])
                    for _t, attrs in page.tags:
                        assert not [k for k in attrs if k.startswith("on") or k == "style"]
                        for k in ("src", "href", "action"):
                            assert not attrs.get(k, "/").startswith(("http:", "https:",
                                                                     "//")), attrs

    run(main)


def test_a_hostile_disk_label_and_model_are_escaped_on_every_page(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path) as (client, _, config):
            history.append(config.state_dir, a_run(HOSTILE_MODEL))
            await login(client)
            for path in ("/", "/history", "/approve?disk=6F5F-FDC3"):
                markup = await (await client.get(path)).text()
                page = Tags(markup)
                assert "<script>alert" not in markup and "<img" not in markup, path
                assert not [a for t, a in page.tags if t == "img"]
                assert not page.scripts
            home = await (await client.get("/")).text()
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in home
            assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in home
            approve = await (await client.get("/approve?disk=6F5F-FDC3")).text()
            assert "Nothing on this disk is formatted" in approve
            assert "&lt;script&gt;" in approve and "256.0 MiB" in approve
            hostile_uuid = await client.get('/approve?disk="><script>x</script>')
            assert hostile_uuid.status == 404
            assert "<script>x" not in await hostile_uuid.text()

    run(main)


def test_the_backup_page_shows_the_disks_the_buttons_and_the_week(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path) as (client, _, config):
            history.append(config.state_dir, a_run("Backup", 30, "partial"))
            await login(client)
            page = Tags(await (await client.get("/")).text())
            forms = [a for t, a in page.tags if t == "form"]
            assert {"action": "/action/backup", "method": "post", "data-api": "/api/backup",
                    "class": "act backup"} in forms
            links = [a.get("href") for t, a in page.tags if t == "a"]
            assert "/approve?disk=1234-ABCD" in links  # the unapproved disk
            days = [a for t, a in page.tags if t == "li" and "day" in a.get("class", "")]
            assert len(days) == 7
            bars = [a for t, a in page.tags if t == "span" and a.get("data-status")]
            assert [b["data-status"] for b in bars] == ["partial"]
            buttons = [a for t, a in page.tags if t == "button" and "data-idle-only" in a]
            assert buttons and not any("disabled" in b for b in buttons)

    run(main)


def test_a_form_button_works_without_javascript(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path) as (client, handler, _):
            await login(client)
            home = Tags(await (await client.get("/")).text())
            csrf = next(a["value"] for t, a in home.tags
                        if t == "input" and a.get("name") == "csrf")
            r = await client.post("/action/backup", data={"csrf": csrf, "disk": "6F5F-FDC3",
                                                          "mode": "verify"},
                                  allow_redirects=False)
            assert (r.status, r.headers["Location"]) == (303, "/")
            assert handler.calls[-1] == ("backup", ("6F5F-FDC3", "verify"))
            page = await (await client.get("/")).text()
            assert "Backup of 6F5F-FDC3 started (verify mode)." in page
            tags = Tags(page)
            buttons = [a for t, a in tags.tags if t == "button" and "data-idle-only" in a]
            assert buttons and all("disabled" in b for b in buttons)  # a run is on
            r = await client.post("/action/backup", data={"csrf": csrf, "disk": "6F5F-FDC3"},
                                  allow_redirects=False)
            assert r.status == 303
            assert "a backup is running" in await (await client.get("/")).text()

    run(main)


def test_without_the_daemon_the_page_says_so_and_shows_the_history(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path, daemon=False) as (client, _handler, config):
            history.append(config.state_dir, a_run("Offsite"))
            csrf = await login(client)
            home = await (await client.get("/")).text()
            assert "the daemon is not running" in home.lower()
            assert "Offsite" in home  # the week's strip, from the state dir
            hist = await (await client.get("/history")).text()
            assert "the daemon is not running" in hist.lower() and "Offsite" in hist
            assert await (await client.get("/api/status")).json() == {"state": "idle",
                                                                      "daemon": False}
            r = await client.get("/api/disks")
            assert r.status == 503 and (await r.json())["error"] == "daemon-unavailable"
            r = await client.post("/api/backup", json={"disk": "6F5F-FDC3"},
                                  headers={"X-CSRF-Token": csrf})
            assert r.status == 503
            assert len(await (await client.get("/api/history")).json()) == 1

    run(main)


# the commands ---------------------------------------------------------------------------------


def test_web_refuses_to_start_without_a_password_or_an_address(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(f'[immich]\nupload_location = "{tmp_path}/immich"\n[state]\ndir = "{state}"\n'
                      f'[web]\nlisten = "127.0.0.1:1"\npassword_file = "{state}/pw"\n')
    r = run_cli("web", config=config, timeout=60)
    assert r.returncode == 2
    assert "no web password is set" in r.stderr and "web-password" in r.stderr
    config.write_text(f'[immich]\nupload_location = "{tmp_path}/immich"\n'
                      f'[state]\ndir = "{state}"\n')
    r = run_cli("web", config=config, timeout=60)
    assert r.returncode == 2 and "[web] listen" in r.stderr
    config.write_text(f'[immich]\nupload_location = "{tmp_path}/immich"\n[web]\nlisten = "8429"\n')
    r = run_cli("web", config=config, timeout=60)
    assert r.returncode == 2 and "web.listen: must be HOST:PORT" in r.stderr


def test_web_password_reads_standard_input_and_stores_only_a_hash(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(f'[immich]\nupload_location = "{tmp_path}/immich"\n[state]\ndir = "{state}"\n'
                      f'[web]\npassword_file = "{state}/pw"\n')
    argv = [sys.executable, "-m", "immich_usb_backup", "-c", str(config), "web-password"]
    r = subprocess.run(argv, input="short\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "at least 8" in r.stderr
    assert not (state / "pw").exists()
    r = subprocess.run(argv, input=f"{PASSWORD}\n", capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    stored = (state / "pw").read_text()
    assert PASSWORD not in stored and stored.startswith("scrypt$")
    assert stat.S_IMODE((state / "pw").stat().st_mode) == 0o640
    assert security.check_password(PASSWORD, stored)
    assert not security.check_password(PASSWORD + "x", stored)


# the history followed as it grows ----------------------------------------------------------


def test_the_follower_agrees_with_a_full_read_as_the_history_grows(tmp_path: Path) -> None:
    from immich_usb_backup import approvals, overview
    from immich_usb_backup.web.follow import Follower

    config = make_config(tmp_path)
    state = config.state_dir
    approvals.add(state, approvals.Approval("6F5F-FDC3", "Backup", clock.iso(clock.now())))
    follower = Follower(config, keep=5)

    def same() -> None:
        assert follower.disks() == overview.disks(config)
        assert [r.to_dict() for r in follower.runs(5)] == [
            r.to_dict() for r in history.load_runs(state, 5)]

    same()  # no history yet
    for i, status in enumerate(("success", "failed", "partial", "success", "refused",
                                "success", "interrupted")):
        history.append(state, a_run(f"Disk-{i}", 100 - i, status))
        same()
    # a half-written line (a power cut mid-append) waits; the rest of it comes later
    line = json.dumps(a_run("Late", 1).to_dict()) + "\n"
    with open(state / "history.jsonl", "a") as f:
        f.write(line[:20])
    assert follower.runs(1)[0].disk.label == "Disk-6"
    with open(state / "history.jsonl", "a") as f:
        f.write(line[20:])
    assert follower.runs(1)[0].disk.label == "Late"
    same()
    # the file replaced by a shorter one, and an approval added: read again from the top
    (state / "history.jsonl").write_text(line)
    same()
    approvals.add(state, approvals.Approval("1234-ABCD", "New", clock.iso(clock.now())))
    same()
    assert [d.uuid for d in follower.disks()] == [d.uuid for d in overview.disks(config)]
