"""``restore``: a server back from a real backup disk in one command, and proven.

Underneath: a real backup (``run``) of a sample Immich server onto a real exFAT disk on a
loop device (conftest), whose database is an Immich-shaped one in a real PostgreSQL
(tests/immich_db.py), dumped with the real ``pg_dump`` (or ``pg_dumpall``) as Immich
does. The restore goes into a new folder and a new database of that PostgreSQL, through a
PostgreSQL URL (psql run as the ``postgres`` user, as on NixOS).

What cannot run here: docker (no engine): ``docker:CONTAINER`` is run against a stand-in
``docker`` on PATH that runs the psql, pg_dump or printenv it is given against the test
PostgreSQL, and records its argv; Immich itself: ``immich-api`` is run against a local
HTTP server that answers the endpoints as Immich 2.5+ does.

The disk of the previous release (``tests/data/restore/previous-release.img.gz``) was
written by the commit ba748ec (``git archive ba748ec daemon``, its ``python -m
immich_usb_backup run`` with PYTHONPATH at that ``daemon/``) onto a 16 MiB exFAT image:
``tools/make-previous-release-disk`` made it, and says what is on it.
"""

from __future__ import annotations

import gzip
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    REPO,
    ExfatDisk,
    LoopWatch,
    Server,
    mount_exfat,
    note_loop_blocks,
    tree,
    unmount,
)
from immich_db import Asset, AssetFile, Postgres, create_database, immich_db, postgres, sha1  # noqa: F401
from immich_usb_backup.restore import sqlstream, targets
from immich_usb_backup.restore.plan import parse_owner

TABLES = ("asset", '"user"', "asset_file", "smart_search")
PREVIOUS = REPO / "tests" / "data" / "restore" / "previous-release.img.gz"


# The sample server, its database, its backup --------------------------------------------

def url(pg: Postgres, db: str) -> str:
    return f"postgresql:///{db}?host={pg.folder}&port=5432"


def counts(pg: Postgres, db: str, tables: tuple[str, ...] = TABLES) -> dict[str, int]:
    return {t: int(pg.psql(f"SELECT count(*) FROM {t}", db=db)) for t in tables}  # noqa: S608


def has_tables(pg: Postgres, db: str) -> list[str]:
    return pg.psql("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                   "ORDER BY 1", db=db).split()


_made = iter(range(1, 1000))


def fresh_db(pg: Postgres, prefix: str = "target") -> str:
    name = f"{prefix}_{next(_made)}"
    create_database(pg, name)
    return name


def give_database(server: Server, pg: Postgres, *, cluster: bool = False) -> str:
    """Give ``server`` an Immich database listing its photos (with a thumbnail each and a
    search embedding), dumped into its backups folder as Immich does; return its name."""
    photos = sorted((server.upload / "upload").rglob("*.jpg"))
    assets = [Asset(f"/data/{p.relative_to(server.upload)}", sha1(p.read_bytes()))
              for p in photos]
    thumb = server.upload / "thumbs" / "t1.webp"
    files = [AssetFile(assets[0].id, "thumbnail", f"/data/{thumb.relative_to(server.upload)}")]
    name = f"source_{next(_made)}"
    immich_db(pg, name, assets, files, embeddings=len(assets))
    for old in (server.upload / "backups").glob("*.sql.gz"):
        old.unlink()
    when = datetime.now() + timedelta(seconds=1)
    pg.dump(name, server.upload / "backups" /
            f"immich-db-backup-{when:%Y%m%dT%H%M%S}-v2.7.0-pg15.14.sql.gz", cluster=cluster)
    return name


@pytest.fixture
def restorable(make_exfat: Callable[..., ExfatDisk], server: Server,
              postgres: Postgres) -> tuple[ExfatDisk, Server, str]:  # noqa: F811
    """A real backup of the sample server (with its database) on a real exFAT disk."""
    source = give_database(server, postgres)
    disk = make_exfat()
    r = cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    return disk, server, source


def cli(*args: str, config: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real command line, with no terminal on its standard input."""
    argv = [sys.executable, "-m", "immich_usb_backup"]
    if config is not None:
        argv += ["-c", str(config)]
    r = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, env=env)
    note_loop_blocks(f"immich-usb-backup {' '.join(args)}", r.stderr)
    return r


def restore(disk: Path, dest: Path, database: str, *more: str, config: Path | None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return cli("restore", str(disk), "--upload-location", str(dest), "--database",
               database, *more, config=config, env=env)


def snapshot(path: Path) -> dict[str, bytes] | None:
    return tree(path) if path.exists() else None


# The whole restore ---------------------------------------------------------------------

@pytest.mark.exfat
def test_restore_into_an_empty_folder_and_a_new_database_gives_the_same_files_and_rows(
    restorable: tuple[ExfatDisk, Server, str], postgres: Postgres, tmp_path: Path,  # noqa: F811
    no_blocked_loop: LoopWatch,
) -> None:
    disk, server, source = restorable
    target = fresh_db(postgres)
    parent = tmp_path / "srv"
    parent.mkdir()
    shutil.chown(parent, "nobody", "nogroup")  # the default owner: DIR's parent's
    dest = parent / "library"

    r = restore(disk.mount_point, dest, url(postgres, target), "--yes",
                config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    assert "restore OK" in r.stdout and "confirmed by --yes" in r.stdout
    assert tree(dest) == tree(server.upload) == tree(disk.marker / "library")
    assert counts(postgres, target) == counts(postgres, source)
    nobody = pwd.getpwnam("nobody")
    for path in [dest, *dest.rglob("*")]:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
        assert st.st_mode & 0o777 == (0o750 if path.is_dir() else 0o640), path
    photos = len(list((server.upload / "upload").rglob("*.jpg")))
    files = len(tree(server.upload))
    assert f"files:     {files} files" in r.stdout
    assert f"all {files} matching library.sha256" in r.stdout
    assert (f"check:     {photos} assets in the database, all under {dest}, {photos} with "
            "Immich's checksum") in r.stdout
    config_dirs = list(parent.glob("library-config-*"))
    assert len(config_dirs) == 1, list(parent.iterdir())
    restored_etc = config_dirs[0] / str(server.etc).lstrip("/")
    assert tree(restored_etc) == tree(server.etc)
    assert f"{server.etc}  <- {config_dirs[0]}{server.etc} (2 files)" in r.stdout
    assert not any(p.name.startswith(".immich-usb-backup") for p in dest.iterdir())


@pytest.mark.exfat
def test_every_refusal_leaves_the_folder_and_the_database_as_they_were(
    restorable: tuple[ExfatDisk, Server, str], postgres: Postgres, tmp_path: Path,  # noqa: F811
) -> None:
    disk, server, source = restorable
    source_rows = counts(postgres, source)
    empty_db = fresh_db(postgres)
    full = tmp_path / "full"
    full.mkdir()
    (full / "someone's.jpg").write_bytes(b"not to be touched")
    absent = tmp_path / "absent"
    immich_db(postgres, held := f"held_{next(_made)}", [Asset("/data/upload/x.jpg", sha1(b"x"))])
    before = counts(postgres, held, ("asset", '"user"'))

    cases = [
        ("a folder that is not empty", full, empty_db, ["--yes"], 1,
         f"{full} is not empty (someone's.jpg): restore never writes over files"),
        ("a database with Immich's tables", absent, held, ["--yes"], 1,
         f"the database {held} already holds Immich's tables (asset, user, 1 asset)"),
        ("no terminal and no --yes", absent, empty_db, [], 2,
         "no terminal to confirm on and no --yes: nothing was done"),
        ("a dry run", absent, empty_db, ["--dry-run"], 0,
         "restore plan (--dry-run: nothing was done)"),
        ("a dump the disk does not have", absent, empty_db, ["--dump", "nope.sql.gz", "--yes"],
         1, "--dump nope.sql.gz: no such dump"),
    ]
    for what, dest, db, more, code, said in cases:
        folder_before = snapshot(dest)
        r = restore(disk.mount_point, dest, url(postgres, db), *more,
                    config=server.config_path)
        assert r.returncode == code, (what, r.stdout, r.stderr)
        assert said in r.stdout, (what, r.stdout)
        assert snapshot(dest) == folder_before, what
        assert has_tables(postgres, empty_db) == [], what
        assert counts(postgres, held, ("asset", '"user"')) == before, what
        assert not list(tmp_path.glob("*-config-*")), what
    from immich_usb_backup.lock import backup_lock

    with backup_lock(server.state):  # a backup runs: no restore meanwhile
        r = restore(disk.mount_point, absent, url(postgres, empty_db), "--yes",
                    config=server.config_path)
    assert r.returncode == 1 and "another backup is already running" in r.stderr, r.stderr
    assert not absent.exists() and has_tables(postgres, empty_db) == []
    assert counts(postgres, source) == source_rows  # the server's own database untouched


@pytest.mark.exfat
def test_a_dry_run_shows_the_dump_the_sizes_and_the_free_space(
    restorable: tuple[ExfatDisk, Server, str], postgres: Postgres, tmp_path: Path,  # noqa: F811
) -> None:
    disk, server, _ = restorable
    (dump,) = (disk.marker / "database").glob("*.sql.gz")
    r = restore(disk.mount_point, tmp_path / "new", url(postgres, fresh_db(postgres)),
                "--dry-run", config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"database:  {dump.name} (database dump, Immich 2.7.0" in r.stdout
    assert f"into {tmp_path / 'new'} (made new)" in r.stdout
    assert "free there" in r.stdout and "refused" not in r.stdout
    listing = cli("restore", str(disk.mount_point), "--list", config=server.config_path)
    assert listing.returncode == 0, listing.stderr
    assert f"{dump.name} (newest)" in listing.stdout and "2.7.0" in listing.stdout


@pytest.mark.exfat
def test_replace_database_saves_the_old_one_next_to_the_folder_then_replaces_it(
    restorable: tuple[ExfatDisk, Server, str], postgres: Postgres, tmp_path: Path,  # noqa: F811
) -> None:
    disk, server, source = restorable
    immich_db(postgres, old := f"old_{next(_made)}",
              [Asset("/data/upload/a-photo-from-before.jpg", sha1(b"before"))])
    dest = tmp_path / "library"
    r = restore(disk.mount_point, dest, url(postgres, old), "--replace-database", "--yes",
                config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (saved,) = tmp_path.glob("immich-db-before-restore-*.sql.gz")
    assert f"saved:     the database as it was: {saved}" in r.stdout
    assert saved.stat().st_mode & 0o777 == 0o600
    sql = gzip.decompress(saved.read_bytes())
    assert b"a-photo-from-before.jpg" in sql and b"dump complete" in sql
    assert counts(postgres, old) == counts(postgres, source)
    assert postgres.psql("SELECT count(*) FROM asset WHERE \"originalPath\" LIKE "
                         "'%a-photo-from-before%'", db=old).strip() == "0"


@pytest.mark.exfat
def test_a_damaged_file_on_the_disk_is_named_and_the_exit_is_not_zero(
    restorable: tuple[ExfatDisk, Server, str], postgres: Postgres, tmp_path: Path,  # noqa: F811
) -> None:
    disk, server, _ = restorable
    photo = sorted((disk.marker / "library" / "upload").rglob("*.jpg"))[1]
    data = bytearray(photo.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit rotted in a drawer
    photo.write_bytes(bytes(data))
    rel = photo.relative_to(disk.marker)
    r = restore(disk.mount_point, tmp_path / "library", url(postgres, fresh_db(postgres)),
                "--yes", config=server.config_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "restore FAILED" in r.stdout
    assert f"files: {rel}: differs from library.sha256 (damaged on the disk)" in r.stdout
    assert f"assets: {rel} changed or damaged since it was uploaded" in r.stdout
    assert (tmp_path / "library" / rel.relative_to("library")).read_bytes() == bytes(data)


@pytest.mark.exfat
def test_merge_copies_only_what_is_missing_and_never_overwrites(
    restorable: tuple[ExfatDisk, Server, str], postgres: Postgres, tmp_path: Path,  # noqa: F811
) -> None:
    disk, server, _ = restorable
    dest = tmp_path / "library"
    for folder in ("upload", "thumbs"):  # what Immich makes when it starts on an empty one
        (dest / folder).mkdir(parents=True)
        (dest / folder / ".immich").write_bytes(b"")
    dest.chmod(0o700)  # as NixOS makes Immich's media location
    ours = sorted((server.upload / "upload").rglob("*.jpg"))[0].relative_to(server.upload)
    (dest / ours).parent.mkdir(parents=True)
    (dest / ours).write_bytes(b"the server's own, newer")
    refused = restore(disk.mount_point, dest, url(postgres, fresh_db(postgres)), "--yes",
                      config=server.config_path)
    assert refused.returncode == 1
    assert "--merge to copy only what it lacks" in refused.stdout
    r = restore(disk.mount_point, dest, url(postgres, fresh_db(postgres)), "--merge", "--yes",
                config=server.config_path)
    assert (dest / ours).read_bytes() == b"the server's own, newer"
    assert dest.stat().st_mode & 0o777 == 0o700  # DIR's own folder kept its mode
    assert "already there (left as they were)" in r.stdout
    assert (f"assets: library/{ours} changed or damaged since it was uploaded: the file "
            "the upload location already had has SHA-1") in r.stdout
    assert r.returncode == 1  # the check found the file it left as it was
    others = {k: v for k, v in tree(server.upload).items() if k != str(ours)}
    assert {k: v for k, v in tree(dest).items() if k != str(ours)} == others


# docker: a stand-in on PATH ----------------------------------------------------------------

DOCKER = """#!/bin/sh
# A stand-in for `docker exec [-i] CONTAINER PROGRAM ARGS...`: the program runs against
# the test PostgreSQL, as the postgres user, and every call is recorded.
printf '%s\\n' "$*" >> {log}
[ "$1" = exec ] || exit 125
shift
[ "$1" = -i ] && shift
[ "$1" = immich_postgres ] || {{ echo "Error: No such container: $1" >&2; exit 1; }}
shift
case "$1" in
  printenv) case "$2" in POSTGRES_USER) echo postgres;; POSTGRES_DB) echo {db};; *) exit 1;; esac;;
  psql|pg_dump) exec runuser -u postgres -- env PGHOST={host} PGPORT=5432 "$@";;
  *) exit 127;;
esac
"""


@pytest.mark.exfat
def test_docker_target_runs_psql_through_docker_exec_into_the_containers_database(
    restorable: tuple[ExfatDisk, Server, str], postgres: Postgres, tmp_path: Path,  # noqa: F811
) -> None:
    disk, server, source = restorable
    target = fresh_db(postgres, "docker")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "docker.log"
    (bin_dir / "docker").write_text(DOCKER.format(log=log, db=target, host=postgres.folder))
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    r = restore(disk.mount_point, tmp_path / "library", "docker:immich_postgres", "--yes",
                config=server.config_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert counts(postgres, target) == counts(postgres, source)
    calls = log.read_text().splitlines()
    assert "exec immich_postgres printenv POSTGRES_DB" in calls
    assert (f"exec -i immich_postgres psql -X -q --username=postgres --dbname={target} "
            "-v ON_ERROR_STOP=1") in calls
    assert any(c.startswith(f"exec immich_postgres psql -X -q --username=postgres "
                            f"--dbname={target} -v ON_ERROR_STOP=1 -c COPY (SELECT")
               for c in calls)
    again = restore(disk.mount_point, tmp_path / "again", "docker:immich_postgres",
                    "--replace-database", "--yes", config=server.config_path, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (f"exec immich_postgres pg_dump --username=postgres --clean --if-exists "
            f"{target}") in log.read_text().splitlines()
    (saved,) = tmp_path.glob("immich-db-before-restore-*.sql.gz")
    assert b"dump complete" in gzip.decompress(saved.read_bytes())
    assert counts(postgres, target) == counts(postgres, source)


# immich-api: a local server that answers like Immich 2.5+ ---------------------------------

KEY = "restore-api-key-7d1f0c2a"


class FakeImmich:
    """Immich's endpoints a restore uses. ``mode``: ``ok`` (restores, comes back), ``fail``
    (reports the restore failed), ``old`` (2.4: no database-backups API)."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.uploads: dict[str, bytes] = {}
        self.maintenance = False
        self.status: dict[str, object] = {}
        self.restored: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def answer(self, code: int, body: object = None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/api/server/version":
                    minor = 4 if fake.mode == "old" else 5
                    return self.answer(200, {"major": 2, "minor": minor, "patch": 0})
                if self.path == "/api/server/config":
                    return self.answer(200, {"maintenanceMode": fake.maintenance})
                if self.path == "/api/admin/maintenance/status" and fake.maintenance:
                    return self.answer(200, fake.status)
                if self.path == "/api/admin/database-backups" and fake.mode != "old":
                    if self.headers.get("x-api-key") != KEY:
                        return self.answer(401, {"message": "Invalid API key"})
                    return self.answer(200, {"backups": [
                        {"filename": n, "filesize": len(b)} for n, b in fake.uploads.items()]})
                return self.answer(404, {"message": "Not found"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("x-api-key") != KEY:
                    return self.answer(401, {"message": "Invalid API key"})
                if self.path == "/api/admin/database-backups/upload":
                    boundary = self.headers["Content-Type"].split("boundary=")[1].encode()
                    part = body.split(b"--" + boundary)[1]
                    head, _, content = part.partition(b"\r\n\r\n")
                    name = head.split(b'filename="')[1].split(b'"')[0].decode()
                    fake.uploads["uploaded-" + name] = content.removesuffix(b"\r\n")
                    return self.answer(201)
                if self.path == "/api/admin/maintenance":
                    request = json.loads(body)
                    if request["restoreBackupFilename"] not in fake.uploads:
                        return self.answer(400, {"message": "no such backup"})
                    fake.restored.append(request["restoreBackupFilename"])
                    self.answer(201)
                    threading.Thread(target=fake.run_restore, daemon=True).start()
                    return None
                return self.answer(404, {"message": "Not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def run_restore(self) -> None:
        time.sleep(0.5)
        self.maintenance = True
        self.status = {"active": True, "action": "restore_database", "task": "restore",
                       "progress": 0.5}
        time.sleep(2.5)
        if self.mode == "fail":
            self.status = {"active": True, "action": "restore_database", "task": "error",
                           "error": "Something went wrong, see logs!"}
            return
        self.maintenance = False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def immich_api() -> Iterator[Callable[[str], FakeImmich]]:
    made: list[FakeImmich] = []

    def make(mode: str = "ok") -> FakeImmich:
        made.append(FakeImmich(mode))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def api_config(server: Server, fake: FakeImmich, key: str = KEY) -> None:
    key_file = server.root / "immich-api-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    server.config_path.write_text(
        f'[immich]\nupload_location = "{server.upload}"\nurl = "{fake.url}"\n'
        f'api_key_file = "{key_file}"\n\n[config_backup]\npaths = ["{server.etc}"]\n\n'
        f'[state]\ndir = "{server.state}"\n')


@pytest.mark.exfat
def test_immich_api_uploads_the_dump_byte_for_byte_and_waits_for_immich_to_come_back(
    restorable: tuple[ExfatDisk, Server, str], immich_api: Callable[[str], FakeImmich],
    tmp_path: Path, no_blocked_loop: LoopWatch,
) -> None:
    disk, server, _ = restorable
    fake = immich_api("ok")
    api_config(server, fake)
    (dump,) = (disk.marker / "database").glob("*.sql.gz")
    dest = tmp_path / "library"
    refused = restore(disk.mount_point, dest, "immich-api", "--yes",
                      config=server.config_path)
    assert refused.returncode == 1 and "say --replace-database" in refused.stdout
    r = restore(disk.mount_point, dest, "immich-api", "--replace-database", "--yes",
                config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake.uploads == {f"uploaded-{dump.name}": dump.read_bytes()}
    assert fake.restored == [f"uploaded-{dump.name}"]
    assert f"uploaded as uploaded-{dump.name}; Immich answered again" in r.stdout
    assert KEY not in r.stdout + r.stderr
    assert tree(dest) == tree(server.upload)


@pytest.mark.exfat
@pytest.mark.parametrize(("mode", "key", "code", "said"), [
    ("ok", "a-wrong-key", 1, "Immich refused the API key (HTTP 401)"),
    ("old", KEY, 1, "Immich 2.4.0 at"),
    ("fail", KEY, 1, "Immich reports that the restore failed (Something went wrong, "
                     "see logs!)"),
])
def test_immich_api_refused_key_old_server_and_failed_restore_are_told(
    restorable: tuple[ExfatDisk, Server, str], immich_api: Callable[[str], FakeImmich],
    tmp_path: Path, mode: str, key: str, code: int, said: str,
) -> None:
    disk, server, _ = restorable
    fake = immich_api(mode)
    api_config(server, fake, key)
    dest = tmp_path / "library"
    r = restore(disk.mount_point, dest, "immich-api", "--replace-database", "--yes",
                config=server.config_path)
    assert r.returncode == code, r.stdout + r.stderr
    assert said in r.stdout, r.stdout
    if mode != "fail":  # refused in the plan: nothing was done
        assert not dest.exists() and fake.uploads == {}
    assert key not in r.stdout + r.stderr


def test_a_404_for_the_backup_api_names_the_immich_version_it_needs() -> None:
    from immich_usb_backup import immich

    fake = FakeImmich("old")
    try:
        with pytest.raises(immich.ImmichError, match=r"HTTP 404.*Immich 2\.5 or newer"):
            immich.database_backups(fake.url, KEY)
    finally:
        fake.close()


# The disk of the previous release -----------------------------------------------------------

@pytest.mark.exfat
def test_a_disk_written_by_the_previous_release_restores_its_cluster_dump(
    make_exfat: Callable[..., ExfatDisk], postgres: Postgres, tmp_path: Path,  # noqa: F811
) -> None:
    image = tmp_path / "previous.img"
    image.write_bytes(gzip.decompress(PREVIOUS.read_bytes()))
    device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()
    mount = tmp_path / "mnt"
    mount.mkdir()
    try:
        mount_exfat(device, mount)
        try:
            target = fresh_db(postgres, "immich")
            dest = tmp_path / "library"
            env = {**os.environ, "IMMICH_USB_BACKUP_CONFIG": str(tmp_path / "none.toml")}
            r = restore(mount, dest, url(postgres, target), "--yes", config=None, env=env)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "(a cluster dump: the statements of its database immich)" in r.stdout
            assert tree(dest) == tree(mount / "immich-server-backups" / "library")
            assert counts(postgres, target, ("assets", "users")) == {"assets": 3, "users": 2}
            assert "check:     3 assets in the database, all under" in r.stdout
        finally:
            unmount(mount)
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


# The SQL psql gets (no PostgreSQL needed) ----------------------------------------------------

def dump_file(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "immich-db-backup-20250101T020000-v2.7.0-pg16.4.sql.gz"
    path.write_bytes(gzip.compress(body))
    return path


DATABASE_DUMP = (b"--\n-- PostgreSQL database dump\n--\n\\restrict abc\n"
                 b"SELECT pg_catalog.set_config('search_path', '', false);\n"
                 b"CREATE TABLE public.asset (id int, p text);\n"
                 b"COPY public.asset (id, p) FROM stdin;\n1\t\\\\x01\n\\N\ta\\\\b\n\\.\n"
                 b"-- PostgreSQL database dump complete\n\\unrestrict abc\n")


def test_the_stream_is_one_transaction_with_immichs_fix_and_the_rows_untouched(
    tmp_path: Path,
) -> None:
    stream = sqlstream.SqlStream(dump_file(tmp_path, DATABASE_DUMP), replace=True)
    sql = b"".join(stream)
    assert sql.startswith(sqlstream.BEGIN + sqlstream.REPLACE) and sql.endswith(b"COMMIT;\n")
    assert b"set_config('search_path', 'public, pg_catalog', true);" in sql
    assert b"\nCOPY public.asset (id, p) FROM stdin;\n1\t\\\\x01\n\\N\ta\\\\b\n\\.\n" in sql
    assert b"\\restrict" not in sql and b"\\unrestrict" not in sql
    assert stream.committed and stream.problem is None


@pytest.mark.parametrize(("body", "why"), [
    (DATABASE_DUMP.replace(b"CREATE TABLE", b"\\! touch /tmp/owned\nCREATE TABLE"),
     "holds the psql command \\!, which pg_dump does not write"),
    (DATABASE_DUMP[:-60], "does not end with PostgreSQL's"),
])
def test_a_dump_with_a_foreign_psql_command_or_cut_short_gets_no_commit(
    tmp_path: Path, body: bytes, why: str,
) -> None:
    stream = sqlstream.SqlStream(dump_file(tmp_path, body))
    sql = b"".join(stream)
    assert not stream.committed and b"COMMIT" not in sql
    assert why in (stream.problem or ""), stream.problem
    assert b"\\!" not in sql


def test_a_cluster_dump_gives_only_the_statements_of_immichs_database(tmp_path: Path) -> None:
    body = (b"-- PostgreSQL database cluster dump\n"
            b"DROP DATABASE IF EXISTS immich;\nDROP DATABASE IF EXISTS other;\n"
            b"CREATE ROLE postgres;\n\\connect template1\nCREATE TABLE t1 (x int);\n"
            b"CREATE DATABASE immich;\n"
            b"\\connect -reuse-previous=on \"dbname='immich'\"\n"
            b"ALTER DATABASE immich SET search_path TO public;\n"
            b"COPY public.asset (id) FROM stdin;\n\\connect other\n\\.\n"
            b"CREATE TABLE mine (x int);\n-- PostgreSQL database dump complete\n"
            b"DROP DATABASE other;\n\\connect other\nCREATE TABLE theirs (x int);\n"
            b"-- PostgreSQL database cluster dump complete\n")
    path = dump_file(tmp_path, body)
    assert sqlstream.cluster_databases(path) == ["immich", "other"]
    assert sqlstream.choose_database(["immich", "other"], "photos") is None
    assert sqlstream.choose_database(["immich", "postgres"], "photos") == "immich"
    stream = sqlstream.SqlStream(path, cluster_database="immich", target_database="photos")
    sql = b"".join(stream)
    assert stream.committed, stream.problem
    assert b"CREATE TABLE mine" in sql and b"\\connect other\n\\.\n" in sql  # a row
    assert b"t1" not in sql and b"theirs" not in sql and b"CREATE ROLE" not in sql
    assert b"DROP DATABASE" not in sql and b"CREATE DATABASE" not in sql
    assert b'ALTER DATABASE "photos" SET search_path TO public;' in sql


def test_targets_and_owners_are_parsed_or_refused_as_usage_errors() -> None:
    assert targets.parse("immich-api") == targets.API
    docker = targets.parse("docker:immich_postgres")
    assert isinstance(docker, targets.DockerTarget) and docker.container == "immich_postgres"
    plain = targets.parse("postgresql://immich:s3cret@db.example/immich")
    assert isinstance(plain, targets.UrlTarget) and plain.database == "immich"
    assert "s3cret" not in str(plain)
    for bad in ("mysql://x", "docker:", "/srv/db"):
        with pytest.raises(targets.TargetError):
            targets.parse(bad)
    assert parse_owner("0:0") == (0, 0)
    assert parse_owner("nobody:nogroup")[0] == pwd.getpwnam("nobody").pw_uid
    for bad in ("immich", "no-such-user-here:root", ":0"):
        with pytest.raises(ValueError, match="--owner"):
            parse_owner(bad)


# Asked on a terminal; stopped halfway --------------------------------------------------------

@pytest.mark.exfat
def test_on_a_terminal_anything_but_yes_stops_with_nothing_done(
    restorable: tuple[ExfatDisk, Server, str], postgres: Postgres, tmp_path: Path,  # noqa: F811
) -> None:
    import pty

    disk, server, _ = restorable
    target, dest = fresh_db(postgres), tmp_path / "library"
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "immich_usb_backup", "-c", str(server.config_path),
             "restore", str(disk.mount_point), "--upload-location", str(dest),
             "--database", url(postgres, target)],
            stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.close(follower)
        assert proc.stdout is not None
        seen = b""
        while b"Type yes to restore" not in seen:
            chunk = proc.stdout.read1(4096)
            assert chunk, seen.decode()
            seen += chunk
        os.write(leader, b"no\n")
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(leader)
    assert proc.returncode == 1, (seen + out + err).decode()
    assert b"not confirmed: nothing was done" in out
    assert not dest.exists() and has_tables(postgres, target) == []


@pytest.mark.exfat
def test_stopped_while_the_dump_loads_the_database_is_left_as_it_was(
    make_exfat: Callable[..., ExfatDisk], server: Server, postgres: Postgres,  # noqa: F811
    tmp_path: Path,
) -> None:
    give_database(server, postgres)
    (dump,) = (server.upload / "backups").glob("*.sql.gz")
    sql = gzip.decompress(dump.read_bytes())
    end = sql.rindex(b"--\n-- PostgreSQL database dump complete")
    slow = sql[:end] + b"SELECT pg_sleep(60);\n" + sql[end:]  # every table made by then
    dump.write_bytes(gzip.compress(slow))
    disk = make_exfat()
    assert cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    target = fresh_db(postgres)
    proc = subprocess.Popen(
        [sys.executable, "-m", "immich_usb_backup", "-c", str(server.config_path), "restore",
         str(disk.mount_point), "--upload-location", str(tmp_path / "library"), "--database",
         url(postgres, target), "--yes"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    status = server.state / "status.json"
    deadline = time.monotonic() + 120
    while not (status.exists() and '"restore-database"' in status.read_text(errors="replace")
               and postgres.psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                                 "'%pg_sleep(60)%' AND pid <> pg_backend_pid()").strip()
               == "1"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert b"restore interrupted" in err
    assert has_tables(postgres, target) == []  # nothing was committed
    assert not psql_of(target), psql_of(target)  # the restore's psql ended with it
    # the server's side ends its running statement before it sees the client gone
    postgres.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname "  # noqa: S608
                  f"= '{target}'")
    assert has_tables(postgres, target) == []  # rolled back: nothing was kept


def psql_of(database: str) -> list[str]:
    """The command lines of live processes that name ``database`` (the restore's psql)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(f"///{database}?" in a for a in argv):
            found.append(" ".join(argv))
    return found


# A device as SOURCE: mounted read-only through UDisks2 -------------------------------------

@pytest.mark.exfat
def test_a_device_is_mounted_read_only_for_the_restore_and_unmounted_after(
    real_stack: Any, server: Server, postgres: Postgres, tmp_path: Path,  # noqa: F811
) -> None:
    import stack as st

    source = give_database(server, postgres)
    image = st.make_image(tmp_path / "disk.img", "Restore")
    plugged = st.plug(image)
    try:
        st.settle()
        r = cli("run", plugged.device, config=server.config_path)
        assert r.returncode == 0, r.stdout + r.stderr
        digest = image.digest()
        watcher = st.MountWatcher(plugged.device)
        target, dest = fresh_db(postgres), tmp_path / "library"
        r = restore(Path(plugged.device), dest, url(postgres, target), "--yes",
                    config=server.config_path)
        mounts = watcher.stop()
        assert r.returncode == 0, r.stdout + r.stderr
        assert mounts and all(opts.split(",")[0] == "ro" for _, opts in mounts), mounts
        assert not st.is_mounted(plugged.device)
        assert image.digest() == digest  # not a byte written to the disk
        assert tree(dest) == tree(server.upload)
        assert counts(postgres, target) == counts(postgres, source)
    finally:
        plugged.remove()


def test_what_a_disk_or_a_dump_brings_is_printed_escaped() -> None:
    from immich_usb_backup.cliformat import format_restore
    from immich_usb_backup.restore import Outcome

    shown = format_restore(Outcome("failed", problems=[
        'database: the dump did not load (syntax error at or near "\x1b[2J\x07"; '
        "name \udcff)"]))
    assert "\x1b" not in shown and "\x07" not in shown and "\udcff" not in shown
    assert 'near "\\x1b[2J\\x07"; name \\xff)' in shown
