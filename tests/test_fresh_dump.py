"""A fresh database dump at backup time: from Immich's API, from a command, or a dump
another tool writes (``dump_glob``), onto a real exFAT disk.

Immich itself cannot run here: its API is a local HTTP server written in the test that
answers the two endpoints as Immich does (401 for a wrong key, 404 for the new endpoint
on an "old" server) and writes a real dump through ``.tmp`` and a rename after a delay.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import EMPTY_IMMICH_DUMP, ExfatDisk, LoopWatch, Server, note_loop_blocks, run_cli

pytestmark = pytest.mark.exfat

KEY = "s3cr3t-immich-api-key-4f1c2b9e"
FRESH_BODY = EMPTY_IMMICH_DUMP.replace(b"\n\nCOPY", b"\nSELECT 'fresh';\n\nCOPY")


@pytest.fixture(autouse=True)
def _loop_never_blocked(no_blocked_loop: LoopWatch) -> LoopWatch:
    return no_blocked_loop


class FakeImmich:
    """Immich's two ways to start the database backup job; the job writes a dump into
    ``dumps`` after ``delay`` seconds, as Immich does: ``<name>.tmp``, then renamed."""

    def __init__(self, dumps: Path, *, old: bool = False, delay: float = 1.5,
                 writes: bool = True) -> None:
        self.dumps, self.old, self.delay, self.writes = dumps, old, delay, writes
        self.calls: list[tuple[str, str, str | None, dict[str, str]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                fake.calls.append((self.command, self.path, self.headers.get("x-api-key"),
                                   body))
                new = (self.command, self.path) == ("POST", "/api/jobs")
                old_ = (self.command, self.path) == ("PUT", "/api/jobs/backupDatabase")
                if (new and fake.old) or not (new or old_):
                    self.send_response(404)
                elif self.headers.get("x-api-key") != KEY:
                    self.send_response(401)
                elif (new and body == {"name": "backup-database"}) or (
                        old_ and body == {"command": "start"}):
                    self.send_response(204 if new else 200)
                    if fake.writes:
                        threading.Thread(target=fake.write_dump, daemon=True).start()
                else:
                    self.send_response(400)
                self.end_headers()

            do_POST = do_PUT = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.written: list[str] = []

    def write_dump(self) -> None:
        time.sleep(self.delay)
        name = (f"immich-db-backup-{datetime.now(UTC):%Y%m%dT%H%M%S}-v2.5.0-pg16.4"
                ".sql.gz")
        tmp = self.dumps / (name + ".tmp")
        with gzip.open(tmp, "wb") as f:
            for _ in range(3):  # written in pieces, as a real dump grows
                f.write(FRESH_BODY[:-40])
                f.flush()
                time.sleep(0.2)
            f.write(FRESH_BODY)
        os.rename(tmp, self.dumps / name)
        self.written.append(name)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def immich_api(server: Server) -> Iterator[FakeImmich]:
    fake = FakeImmich(server.upload / "backups")
    yield fake
    fake.close()


def api_config(server: Server, url: str, key: str = KEY, extra: str = "") -> None:
    key_file = server.root / "immich-api-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    server.config_path.write_text(
        f'[immich]\nupload_location = "{server.upload}"\nurl = "{url}"\n'
        f'api_key_file = "{key_file}"\n\n'
        f'[database]\nsource = "immich-api"\n{extra}\n'
        f'[config_backup]\npaths = ["{server.etc}", "{key_file}"]\n\n'
        f'[state]\ndir = "{server.state}"\n')


def last(server: Server) -> dict[str, object]:
    r = run_cli("history", "--json", config=server.config_path)
    return json.loads(r.stdout)[-1]  # type: ignore[no-any-return]


def disk_dumps(disk: ExfatDisk) -> list[str]:
    return sorted(p.name for p in (disk.marker / "database").iterdir())


def nightly(server: Server) -> str:
    (name,) = [p.name for p in (server.upload / "backups").glob("immich-db-backup-*")]
    return name


# Immich's API ------------------------------------------------------------------------

def test_a_fresh_dump_from_immich_is_waited_for_and_copied(
    make_exfat, server: Server, immich_api: FakeImmich
) -> None:
    api_config(server, immich_api.url)
    old = nightly(server)
    disk = make_exfat()
    proc = subprocess.Popen(
        [sys.executable, "-m", "immich_usb_backup", "-c", str(server.config_path), "-v",
         "run", str(disk.mount_point)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    waiting = ""
    for _ in range(200):
        st = json.loads(run_cli("status", "--json", config=server.config_path).stdout)
        if "waiting for Immich's database dump" in str(st.get("detail")):
            waiting = str(st["detail"])
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    note_loop_blocks("run", err)

    assert proc.returncode == 0, out + err
    assert waiting.startswith("waiting for Immich's database dump (")
    assert [c[:2] for c in immich_api.calls] == [("POST", "/api/jobs")]
    (fresh,) = immich_api.written
    assert fresh in disk_dumps(disk) and old not in disk_dumps(disk)
    copy = disk.marker / "database" / fresh
    assert copy.read_bytes() == (server.upload / "backups" / fresh).read_bytes()
    with gzip.open(copy) as f:
        assert f.read().endswith(FRESH_BODY)
    rec = last(server)
    assert rec["status"] == "success" and rec["problems"] == []
    # the key is a secret: nowhere in what the run wrote or said
    written = [p for root in (server.state, disk.mount_point) for p in root.rglob("*")
               if p.is_file()]
    assert written
    for path in written:
        data = path.read_bytes()
        if path.suffix == ".zip":
            data = subprocess.run(["unzip", "-p", str(path)], capture_output=True).stdout
        assert KEY.encode() not in data, path
    assert KEY not in out + err


def test_an_older_immich_is_asked_the_old_way(make_exfat, server: Server) -> None:
    fake = FakeImmich(server.upload / "backups", old=True, delay=0.5)
    try:
        api_config(server, fake.url)
        disk = make_exfat()
        r = run_cli("run", str(disk.mount_point), config=server.config_path)
    finally:
        fake.close()
    assert r.returncode == 0, r.stdout + r.stderr
    assert [c[:2] for c in fake.calls] == [("POST", "/api/jobs"),
                                           ("PUT", "/api/jobs/backupDatabase")]
    assert fake.written[0] in disk_dumps(disk)


@pytest.mark.parametrize("how", ["wrong key", "unreachable", "too slow"])
def test_without_a_fresh_dump_the_nightly_one_is_copied_and_the_reason_named(
    make_exfat, server: Server, how: str
) -> None:
    fake = FakeImmich(server.upload / "backups", writes=how != "too slow")
    url = fake.url
    if how == "unreachable":
        fake.close()  # nothing listens there any more
    try:
        api_config(server, url, key="not-the-key" if how == "wrong key" else KEY,
                   extra="fresh_timeout_s = 3\n")
        disk = make_exfat()
        t0 = time.monotonic()
        r = run_cli("run", str(disk.mount_point), config=server.config_path)
        took = time.monotonic() - t0
    finally:
        if how != "unreachable":
            fake.close()
    assert r.returncode == 1, r.stdout + r.stderr
    rec = last(server)
    assert rec["status"] == "partial"
    (problem,) = rec["problems"]  # type: ignore[misc]
    expected = {"wrong key": "Immich refused the API key (HTTP 401)",
                "unreachable": f"Immich could not be reached at {url}",
                "too slow": "did not appear in"}[how]
    assert expected in problem and "copied the newest nightly dump instead" in problem
    assert nightly(server) in disk_dumps(disk)  # the photos' backup did not lose a dump
    assert took < 60


def test_check_says_when_the_key_file_can_be_read_by_others(server: Server) -> None:
    api_config(server, "http://127.0.0.1:9")
    (server.root / "immich-api-key").chmod(0o644)
    r = run_cli("check", config=server.config_path)
    assert r.returncode == 1
    assert "can be read by others (mode 0644)" in r.stdout
    assert "chmod 600" in r.stdout
    assert KEY not in r.stdout + r.stderr


# A command ---------------------------------------------------------------------------

def command_config(server: Server, script: str, extra: str = "") -> None:
    argv = json.dumps([sys.executable, "-c", script])
    server.write_config(f'[database]\nsource = "command"\ncommand = {argv}\n{extra}')


def test_a_dump_command_is_compressed_onto_the_disk(make_exfat, server: Server) -> None:
    command_config(server, f"import sys; sys.stdout.buffer.write({FRESH_BODY!r} * 2000)")
    disk = make_exfat()

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    made = [n for n in disk_dumps(disk) if n.endswith("-python3.sql.gz")
            or "-python" in n]
    assert len(made) == 1, disk_dumps(disk)
    with gzip.open(disk.marker / "database" / made[0]) as f:
        assert f.read() == FRESH_BODY * 2000
    assert (disk.marker / "database" / made[0]).stat().st_size < len(FRESH_BODY) * 200
    assert last(server)["problems"] == []
    assert not list((disk.marker / "database").glob(".*")), "a temporary file was left"


@pytest.mark.parametrize(("script", "expected"), [
    ("import sys; sys.stderr.write('pg_dump: error: connection refused\\n'); sys.exit(3)",
     "failed with status 3: pg_dump: error: connection refused"),
    ("import sys; sys.stdout.write('-- PostgreSQL database dump\\nCOPY x')",
     "wrote an incomplete dump"),
    ("pass", "wrote nothing (an empty dump)"),
    ("import time; time.sleep(30)", "did not finish within 2 s"),
])
def test_a_failing_dump_command_is_a_problem_and_the_nightly_dump_is_copied(
    make_exfat, server: Server, script: str, expected: str
) -> None:
    command_config(server, script, extra="fresh_timeout_s = 2\n")
    disk = make_exfat()

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 1, r.stdout + r.stderr
    rec = last(server)
    assert rec["status"] == "partial"
    (problem,) = rec["problems"]  # type: ignore[misc]
    assert expected in problem, problem
    assert disk_dumps(disk) == [nightly(server)]
    assert not list((disk.marker / "database").glob(".*"))


# Dumps other tools write -------------------------------------------------------------

def test_a_dump_named_without_a_time_is_found_by_glob_and_stored_with_its_time(
    make_exfat, server: Server, tmp_path: Path
) -> None:
    backup_dir = tmp_path / "var-backup-postgresql"
    backup_dir.mkdir()
    dump = backup_dir / "immich.sql.gz"
    with gzip.open(dump, "wb") as f:
        f.write(FRESH_BODY)
    older = backup_dir / "other.sql.gz"
    with gzip.open(older, "wb") as f:
        f.write(b"old\n")
    os.utime(older, (time.time() - 7200, time.time() - 7200))
    server.write_config(f'[database]\ndump_glob = "{backup_dir}/*.sql.gz"\n')
    disk = make_exfat()

    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    again = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    stamp = datetime.fromtimestamp(dump.stat().st_mtime).strftime("%Y%m%dT%H%M%S")
    assert disk_dumps(disk) == [f"immich-db-backup-{stamp}-immich.sql.gz"]
    assert again.returncode == 0
    assert last(server)["steps"]["database"]["files"] == 0  # type: ignore[index]
