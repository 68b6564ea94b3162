"""``verify TARGET --restore-drill``: the newest dump on a real exFAT disk loaded into a
throwaway PostgreSQL, by the real command line.

The dumps are made the way Immich makes them, by real ``pg_dumpall --clean --if-exists``
(Immich 2.4 and older, with the old table names ``assets``, ``users``, ``albums``) and
``pg_dump`` (newer, ``asset``, ``user``, ``album``) of real PostgreSQL clusters
(tests/test_restore.py's), gzip'd into the backup folder by a real backup. Each dump
also asks for the extension ``vectors``, which this machine does not have, as Immich's
do: a failed statement that must be listed without failing the drill.

Every drill runs with its own TMPDIR, which must be empty afterwards, and no PostgreSQL
of it may be left running.
"""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

import test_restore as restore
from helpers import ExfatDisk, LoopWatch, Server, note_loop_blocks, run_cli
from immich_usb_backup import drill, report, state
from immich_usb_backup.record import RunRecord

postgres = restore.postgres  # the fixture: started clusters, stopped and removed after
Cluster = restore.Cluster

VECTORS = "CREATE EXTENSION IF NOT EXISTS vectors WITH SCHEMA public;\n"
VECTORS_ERROR = 'ERROR:  extension "vectors" is not available'
# a cluster dump loaded onto a running PostgreSQL always gives these two as well
CLUSTER_ERRORS = {VECTORS_ERROR, "ERROR:  current user cannot be dropped",
                  'ERROR:  role "postgres" already exists'}

# Immich before the tables were renamed (1.x): plural names. Its photos are offline (their
# files are not on the sample server): a backup's asset check counts them, skipped.
OLD_SCHEMA = """
SET ROLE immich;
CREATE TABLE users (id uuid PRIMARY KEY, email varchar NOT NULL, name varchar NOT NULL);
CREATE TABLE assets (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  "ownerId" uuid NOT NULL REFERENCES users(id),
  "originalPath" text NOT NULL,
  "originalFileName" varchar NOT NULL,
  checksum bytea NOT NULL DEFAULT decode('da39a3ee5e6b4b0d3255bfef95601890afd80709', 'hex'),
  "isOffline" boolean NOT NULL DEFAULT true
);
CREATE TABLE albums (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  "ownerId" uuid NOT NULL REFERENCES users(id),
  "albumName" varchar NOT NULL,
  description text NOT NULL DEFAULT ''
);
INSERT INTO users VALUES ('9f1d6c1a-0000-4000-8000-000000000001', 'anna@example.org', 'Anna'),
                         ('9f1d6c1a-0000-4000-8000-000000000002', 'ben@example.org', 'Ben');
INSERT INTO assets ("ownerId", "originalPath", "originalFileName")
  SELECT u.id, '/data/upload/' || u.name || '/' || n || '.jpg', n || '.jpg'
  FROM users u, generate_series(1, 3) n WHERE u.name = 'Anna'
  UNION ALL SELECT u.id, '/data/upload/ben/x.jpg', 'x.jpg' FROM users u WHERE u.name = 'Ben'
  UNION ALL SELECT u.id, E'/data/upload/ben/O\\'Brien\\tTab.jpg', E'O\\'Brien\\tTab.jpg'
  FROM users u WHERE u.name = 'Ben';
INSERT INTO albums ("ownerId", "albumName", description)
  SELECT id, 'Natur', 'Ausflüge; 2024' FROM users WHERE name = 'Anna'
  UNION ALL SELECT id, 'Ben''s', '' FROM users WHERE name = 'Ben';
"""


@pytest.fixture(autouse=True)
def _loop_never_blocked(no_blocked_loop: LoopWatch) -> LoopWatch:
    """Every test fails if the product's event loop was blocked for 100 ms (conftest)."""
    return no_blocked_loop


@pytest.fixture
def drill_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """TMPDIR of the commands the test runs: where the drill makes its cluster. Not under
    tmp_path, which pytest keeps out of other users' reach (the drill runs as nobody)."""
    folder = Path(tempfile.mkdtemp(prefix="immich-drill-test-"))
    folder.chmod(0o711)
    monkeypatch.setenv("TMPDIR", str(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def drill_processes(folder: Path) -> list[str]:
    """The command lines of live processes that name something under ``folder``."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
            state = cmdline.with_name("stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(a.startswith(f"{folder}/") for a in argv):
            out.append(" ".join(argv).strip())
    return out


def drill_users(folder: Path) -> set[str]:
    """The users the live processes naming something under ``folder`` run as."""
    import pwd

    users = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
            status = cmdline.with_name("status").read_text()
        except OSError:
            continue
        if any(a.startswith(f"{folder}/") for a in argv):
            uid = next(int(line.split()[1]) for line in status.splitlines()
                       if line.startswith("Uid:"))
            users.add(pwd.getpwuid(uid).pw_name)
    return users


def assert_cleaned_up(folder: Path) -> None:
    assert drill_processes(folder) == []
    assert list(folder.iterdir()) == []  # the cluster's folder (and verify's scratch) gone


def immich_dump(cluster: Cluster, folder: Path, when: datetime, cluster_dump: bool,
                extra_sql: str = "") -> Path:
    """The dump Immich would write of ``cluster``, into ``folder``: with a ``CREATE
    EXTENSION vectors`` before the first table (and ``extra_sql`` after it), gzip'd."""
    if cluster_dump:
        sql = cluster.as_postgres("pg_dumpall", "--clean", "--if-exists").decode()
    else:
        sql = cluster.as_postgres("pg_dump", "--clean", "--if-exists", "immich").decode()
    at = sql.index("CREATE TABLE")
    sql = sql[:at] + VECTORS + extra_sql + sql[at:]
    path = folder / f"immich-db-backup-{when:%Y%m%dT%H%M%S}-v1.130.0-pg{cluster.version()}.sql.gz"
    path.write_bytes(gzip.compress(sql.encode()))
    return path


def old_immich(cluster: Cluster) -> None:
    cluster.psql("CREATE ROLE immich LOGIN; CREATE DATABASE immich OWNER immich;")
    cluster.psql(OLD_SCHEMA, db="immich")


def backup(server: Server, disk: ExfatDisk) -> None:
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr


def drill_json(server: Server | None, disk: ExfatDisk, *extra: str) -> tuple[int, dict]:
    r = run_cli("verify", str(disk.mount_point), *extra, "--json",
                config=server.config_path if server else None)
    assert r.stdout.startswith("{"), r.stdout + r.stderr
    return r.returncode, json.loads(r.stdout)


def errors(result: dict) -> list[str]:
    return [s["error"] for s in result["failed_statements"]["statements"]]


def only_real_dumps(server: Server) -> Path:
    backups = server.upload / "backups"
    for fake in backups.glob("*.sql.gz"):
        fake.unlink()  # the fixture's stand-in: these tests have real ones
    return backups


# On the real stack ---------------------------------------------------------------------

@pytest.mark.exfat
def test_drill_loads_a_cluster_dump_then_a_database_dump_and_lists_the_missing_extension(
    make_exfat: Callable[..., ExfatDisk], server: Server, postgres: Callable[[str], Cluster],
    drill_tmp: Path,
) -> None:
    backups = only_real_dumps(server)
    now = datetime.now()
    # Immich 1.x: pg_dumpall, plural table names
    old = postgres("old")
    old_immich(old)
    cluster_dump = immich_dump(old, backups, now - timedelta(days=1), cluster_dump=True)
    disk = make_exfat()
    backup(server, disk)

    r = run_cli("verify", str(disk.mount_point), "--restore-drill", config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "verify OK" in out
    assert "restore drill: PASSED" in out and "PostgreSQL 15" in out
    assert f"dump:      {cluster_dump.name} (cluster dump)" in out
    assert "rows:      assets 5, users 2, albums 2 (database immich)" in out
    assert VECTORS_ERROR in out and VECTORS.strip() in out
    assert f"last restore drill: {datetime.now():%Y-%m-%d}" in out
    assert f"passed ({cluster_dump.name})" in out
    assert_cleaned_up(drill_tmp)

    # Immich 2.5: pg_dump of the one database, singular names, earthdistance's index
    # (which loads only with the search path fixed), tables owned by the role immich
    new = postgres("new")
    originals = restore.immich_database(new, server.upload)
    database_dump = immich_dump(new, backups, now, cluster_dump=False)
    backup(server, disk)

    code, result = drill_json(server, disk, "--restore-drill")
    assert code == 0, result
    drilled = result["restore_drill"]
    assert drilled["passed"] is True and drilled["problems"] == []
    assert drilled["dump"] == database_dump.name
    assert drilled["kind"] == "database dump"
    assert drilled["postgres_version"].startswith("15.")
    assert drilled["database"] == "immich"
    assert drilled["tables"] == {"assets": {"table": "asset", "rows": len(originals)},
                                 "users": {"table": "user", "rows": 1},
                                 "albums": {"table": "album", "rows": 1}}
    # nothing else failed: not the index (search path), not an owner (the role is made)
    assert errors(drilled) == [VECTORS_ERROR], drilled["failed_statements"]
    (failed,) = drilled["failed_statements"]["statements"]
    assert failed["statement"] == VECTORS.strip() and failed["database"] == "immich"
    assert drilled["failed_statements"]["count"] == 1
    assert result["last_restore_drill"]["passed"] is True
    assert result["last_restore_drill"]["dump"] == database_dump.name
    assert_cleaned_up(drill_tmp)

    # The older cluster dump, when it is the newest: its own harmless errors, and passed
    database_dump_on_disk = disk.marker / "database" / database_dump.name
    database_dump_on_disk.rename(database_dump_on_disk.with_suffix(".old"))
    code, result = drill_json(server, disk, "--restore-drill")
    assert code == 0, result
    drilled = result["restore_drill"]
    assert drilled["passed"] is True and drilled["dump"] == cluster_dump.name
    assert VECTORS_ERROR in errors(drilled)
    assert set(errors(drilled)) <= CLUSTER_ERRORS, errors(drilled)
    assert {k: v["rows"] for k, v in drilled["tables"].items()} == {
        "assets": 5, "users": 2, "albums": 2}
    database_dump_on_disk.with_suffix(".old").rename(database_dump_on_disk)

    # A plain verify shows the last drill; so does the state dir's history page
    r = run_cli("verify", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"passed ({cluster_dump.name})" in r.stdout
    page = (server.state / "history.html").read_text()
    assert "Last restore drill" in page and cluster_dump.name in page
    assert 'data-drill="success"' in page

    # Without a configuration file: a scratch state dir, and the drill still runs
    code, result = drill_json(None, disk, "--restore-drill")
    assert code == 0, result
    assert result["restore_drill"]["passed"] is True
    assert_cleaned_up(drill_tmp)


@pytest.mark.exfat
def test_drill_of_a_truncated_dump_fails_and_says_it_is_cut_short(
    make_exfat: Callable[..., ExfatDisk], server: Server, postgres: Callable[[str], Cluster],
    drill_tmp: Path,
) -> None:
    backups = only_real_dumps(server)
    source = postgres("source")
    old_immich(source)
    good = immich_dump(source, backups, datetime.now() - timedelta(days=1), cluster_dump=False)
    disk = make_exfat()
    backup(server, disk)
    code, result = drill_json(server, disk, "--restore-drill")
    assert code == 0 and result["restore_drill"]["passed"] is True, result

    # A newer dump on the disk whose copy stopped two thirds of the way (gzip cut short)
    whole = good.read_bytes()
    damaged = disk.marker / "database" / f"immich-db-backup-{datetime.now():%Y%m%dT%H%M%S}.sql.gz"
    damaged.write_bytes(whole[: len(whole) * 2 // 3])

    r = run_cli("verify", str(disk.mount_point), "--restore-drill", config=server.config_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "restore drill: FAILED" in r.stdout
    assert f"dump:      {damaged.name}" in r.stdout
    assert "the gzip stream is cut short" in r.stdout
    assert_cleaned_up(drill_tmp)

    code, result = drill_json(server, disk)
    assert code == 1  # the check itself finds the dump damaged too
    last = result["last_restore_drill"]
    assert last["passed"] is False and last["dump"] == damaged.name
    assert "cut short" in last["problem"]
    assert (last["last_passed_dump"], result["restore_drill"]) == (good.name, None)
    r = run_cli("verify", str(disk.mount_point), config=server.config_path)
    assert f"failed ({damaged.name}); last passed" in r.stdout
    assert f"({good.name})" in r.stdout


@pytest.mark.exfat
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_drill_stopped_or_killed_leaves_no_postgresql_running(
    make_exfat: Callable[..., ExfatDisk], server: Server, postgres: Callable[[str], Cluster],
    drill_tmp: Path, sig: signal.Signals,
) -> None:
    backups = only_real_dumps(server)
    source = postgres("source")
    old_immich(source)
    # a dump that keeps the drill busy loading (a statement that takes two minutes)
    immich_dump(source, backups, datetime.now(), cluster_dump=False,
                extra_sql="SELECT pg_sleep(120);\n")
    disk = make_exfat()
    backup(server, disk)

    proc = subprocess.Popen(
        [sys.executable, "-m", "immich_usb_backup", "-c", str(server.config_path), "verify",
         str(disk.mount_point), "--restore-drill"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            status = json.loads(run_cli("status", "--json", config=server.config_path).stdout)
            running = drill_processes(drill_tmp)
            server_up = any(p.split()[0].endswith("/postgres") for p in running)
            loading = any("/dump.sql" in p for p in running)  # psql reads the dump
            if status.get("phase") == "drill" and server_up and loading:
                # as root, every program of the drill runs as nobody, the loading psql too
                assert drill_users(drill_tmp) == {"nobody"}, drill_users(drill_tmp)
                break
            assert time.monotonic() < deadline, (status, running)
            time.sleep(0.2)
        time.sleep(0.5)  # psql is in its long statement
        proc.send_signal(sig)
        killed_at = time.monotonic()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if sig == signal.SIGKILL:  # nothing of it may outlive it (PostgreSQL, psql)
        while drill_processes(drill_tmp):
            assert time.monotonic() - killed_at < 1.0, drill_processes(drill_tmp)
            time.sleep(0.02)
        status = json.loads(run_cli("status", "--json", config=server.config_path).stdout)
        assert status == {"state": "idle"}  # no process holds the lock any more
        return
    note_loop_blocks("immich-usb-backup verify --restore-drill (SIGTERM)", err)
    assert proc.returncode == 1, out + err
    assert "verify interrupted" in err
    assert "Traceback" not in err
    assert_cleaned_up(drill_tmp)
    assert json.loads(run_cli("status", "--json", config=server.config_path).stdout) == {
        "state": "idle"}
    assert not (server.state / drill.STATE_NAME).exists()  # an interrupted drill is no outcome


def test_drill_without_postgresql_names_the_package_and_the_config_key(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    server.write_config(f'[database]\npostgres_bin_dir = "{tmp_path / "no-postgres"}"\n')
    r = run_cli("verify", str(tmp_path), "--restore-drill", config=server.config_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "database.postgres_bin_dir" in r.stderr and "apt install postgresql" in r.stderr

    # nothing configured, nothing on PATH or in /usr/lib/postgresql
    monkeypatch.setattr(drill.postgres, "DEBIAN_BINS", tmp_path / "usr-lib-postgresql")
    monkeypatch.setenv("PATH", str(fake_bin(tmp_path / "path", tools=("runuser",))))
    with pytest.raises(drill.DrillUnavailable) as caught:
        drill.find_postgres(None)
    assert "apt install postgresql" in str(caught.value)
    assert "database.postgres_bin_dir" in str(caught.value)


# PostgreSQL's programs are found ------------------------------------------------------------

def fake_bin(folder: Path, tools: tuple[str, ...] = drill.TOOLS) -> Path:
    folder.mkdir(parents=True)
    for tool in tools:
        (folder / tool).write_text("#!/bin/sh\n")
        (folder / tool).chmod(0o755)
    return folder


def test_postgres_is_the_configured_folder_then_path_then_the_newest_debian_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    lib = tmp_path / "lib" / "postgresql"
    fake_bin(lib / "9.6" / "bin")
    fake_bin(lib / "13" / "bin")
    newest = fake_bin(lib / "16" / "bin")
    fake_bin(lib / "17" / "bin", tools=("initdb", "pg_ctl", "postgres"))  # no psql
    monkeypatch.setattr(drill.postgres, "DEBIAN_BINS", lib)
    tools = fake_bin(tmp_path / "tools", tools=("runuser",))  # util-linux, for root
    monkeypatch.setenv("PATH", str(tools))
    assert drill.find_postgres(None) == newest

    nix = fake_bin(tmp_path / "nix" / "store" / "postgresql-17" / "bin")
    on_path = tmp_path / "sw" / "bin"
    on_path.mkdir(parents=True)
    (on_path / "initdb").symlink_to(nix / "initdb")
    monkeypatch.setenv("PATH", f"{on_path}:{tools}")
    assert drill.find_postgres(None) == nix  # links followed: its psql is beside it

    configured = fake_bin(tmp_path / "configured")
    assert drill.find_postgres(configured) == configured
    with pytest.raises(drill.DrillUnavailable, match=r"database.postgres_bin_dir: .* no psql"):
        drill.find_postgres(fake_bin(tmp_path / "half", tools=("initdb", "pg_ctl", "postgres")))


# The outcome kept in the state dir, and shown ---------------------------------------------

def result(passed: bool, dump: str, at: str) -> drill.DrillResult:
    r = drill.DrillResult(dump=dump, postgres_version="15.18", started_at=at)
    if not passed:
        r.problems.append(f"{dump}: the gzip stream is cut short")
    return r


def test_outcomes_are_kept_per_disk_with_the_last_pass_after_a_failure(tmp_path: Path) -> None:
    a = {"uuid": "6F9C-FA9C", "label": "Backup"}
    b = {"uuid": "1234-ABCD", "label": ""}
    assert drill.load_outcomes(tmp_path) == []
    drill.record(tmp_path, a, result(True, "one.sql.gz", "2025-03-01T02:00:00+00:00"))
    drill.record(tmp_path, b, result(True, "b.sql.gz", "2025-03-02T02:00:00+00:00"))
    drill.record(tmp_path, a, result(False, "two.sql.gz", "2025-03-03T02:00:00+00:00"))
    assert drill.record(tmp_path, {"uuid": "", "label": "x"}, result(True, "c", "")) is None

    last = drill.outcome_for(tmp_path, "6F9C-FA9C")
    assert last is not None
    assert (last.passed, last.dump, last.last_passed_at, last.last_passed_dump) == (
        False, "two.sql.gz", "2025-03-01T02:00:00+00:00", "one.sql.gz")
    assert "cut short" in last.problem
    assert [o.uuid for o in drill.load_outcomes(tmp_path)] == ["6F9C-FA9C", "1234-ABCD"]
    text = drill.describe(last, drill.plain_time)
    assert text.endswith("failed (two.sql.gz); last passed "
                         f"{drill.plain_time('2025-03-01T02:00:00+00:00')} (one.sql.gz)")
    assert drill.describe(None, drill.plain_time).startswith("none yet")

    (tmp_path / drill.STATE_NAME).write_text("not [ toml")
    assert drill.load_outcomes(tmp_path) == []  # a damaged file: no drills, no crash
    (damage,) = state.take_damages()  # ... kept aside, and waiting to be told
    assert "drills.toml was damaged" in str(damage)
    assert list(tmp_path.glob("drills.toml.damaged-*"))


def test_history_page_shows_each_disks_last_drill_escaped() -> None:
    passed = drill.DrillOutcome("6F9C-FA9C", "Backup", "2025-03-01T02:00:00+00:00", True,
                                "immich-db-backup-20250301T020000.sql.gz",
                                last_passed_at="2025-03-01T02:00:00+00:00")
    failed = drill.DrillOutcome("1234-ABCD", "<Zweit>", "2025-03-02T02:00:00+00:00", False,
                                "a<b>.sql.gz", problem="cut <short>")
    records = [RunRecord.from_dict({"started_at": "2025-03-01T01:00:00+00:00",
                                    "status": "success"})]
    without = report.render_html(records)
    assert "Restore drill" not in without and 'class="card drills"' not in without

    one = report.render_html(records, drills=[passed])
    assert "Last restore drill: <time" in one
    assert 'data-drill="success"' in one and ">passed</span>" in one
    assert "(immich-db-backup-20250301T020000.sql.gz)" in one
    assert "Restore drill of Backup (6F9C-FA9C)" in one

    both = report.render_html([], drills=[passed, failed])
    assert "No backups yet" in both  # the page's contract holds with drills
    assert 'data-drill="failed"' in both and ">failed</span>" in both
    assert "&lt;Zweit&gt; (1234-ABCD)" in both and "a&lt;b&gt;.sql.gz" in both
    assert "cut &lt;short&gt;" in both and "No drill of this disk has passed yet" in both
    assert "<Zweit>" not in both and "http://" not in both and "https://" not in both



def test_the_drill_runs_no_psql_command_a_dump_brings_but_those_pg_dump_writes(
    tmp_path: Path,
) -> None:
    from immich_usb_backup.drill.feeder import Feeder

    feeder = Feeder(tmp_path / "d.sql.gz", tmp_path, cluster_dump=True, user=None,
                    on_bytes=lambda n: None)
    assert feeder._adjust(b"\\connect immich\n") == b"\\connect immich\n"
    assert feeder._adjust(b"\\restrict abc\n") == b"\\restrict abc\n"
    for hostile in (b"\\! touch /tmp/owned\n", b"\\o /etc/passwd\n", b"\\copy t to 'x'\n"):
        assert feeder._adjust(hostile).startswith(b"-- ")
    assert feeder.skipped_commands == 3
