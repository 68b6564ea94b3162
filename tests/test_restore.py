"""docs/restore.md, run: the restore guide's shell blocks against a real backup.

Every block of the guide marked ``<!-- restore-test: NAME -->`` is extracted and run
word for word with ``bash -eu -o pipefail``; only the lines of the form ``NAME=value``
whose names the test sets are replaced (the guide's first block names the paths once,
the test points them at its own folders). Underneath: a real backup (``run``) onto a
real exFAT disk (conftest's loop device), and real PostgreSQL clusters in a temporary
folder, with Immich-like tables dumped the two ways Immich has dumped them: a cluster
dump (``pg_dumpall``, Immich 2.4 and older) and a database dump (``pg_dump``, newer).

What cannot run here is checked as text: docker (the docker blocks must pipe the dump
through the same ``gunzip | sed | psql`` as the NixOS blocks that do run), and
``systemctl`` (a stand-in on PATH records what the guide asks of it).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest

from helpers import REPO, ExfatDisk, Server, need, run_cli, tree

GUIDE = REPO / "docs" / "restore.md"
# Immich's documented fix (IMMICH.md): every psql pipeline in the guide uses exactly this
SED = ("s/SELECT pg_catalog.set_config('search_path', '', false);/"
       "SELECT pg_catalog.set_config('search_path', 'public, pg_catalog', true);/g")
# Debian's PostgreSQL servers, oldest first (/usr/lib/postgresql/15/bin/initdb, ...)
PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                 key=lambda p: [int(n) for n in re.findall(r"\d+", p.parts[-3])])
# the two errors a cluster dump restored onto a running PostgreSQL always gives
CLUSTER_DUMP_ERRORS = {
    "ERROR:  current user cannot be dropped",
    'ERROR:  role "postgres" already exists',
}


# The guide's blocks --------------------------------------------------------------------

_MARKED = re.compile(
    r"<!-- restore-test: (?P<name>[\w-]+) -->\n(?P<indent>[ ]*)```sh\n(?P<body>.*?)\n"
    r"(?P=indent)```\n",
    re.DOTALL,
)
_ASSIGN = re.compile(r"^([A-Z][A-Z0-9_]*)=")
_USE = re.compile(r"\$\{?([A-Z][A-Z0-9_]*)")


def guide_blocks() -> dict[str, str]:
    """Marker name -> the shell block right after it, unindented."""
    blocks: dict[str, str] = {}
    for m in _MARKED.finditer(GUIDE.read_text()):
        indent = m.group("indent")
        lines = [ln.removeprefix(indent) for ln in m.group("body").splitlines()]
        assert m.group("name") not in blocks, f"two blocks marked {m.group('name')}"
        blocks[m.group("name")] = "\n".join(lines) + "\n"
    return blocks


def pipeline(block: str) -> str:
    """The block's ``gunzip ... | sed ... | ... psql ...`` pipeline, on one line."""
    joined = block.replace("\\\n", " ")
    (line,) = [ln for ln in joined.splitlines() if ln.startswith("gunzip ")]
    return re.sub(r"\s+", " ", line).strip()


def sed_expression(pipe: str) -> str:
    m = re.search(r'\| sed "([^"]*)" \|', pipe)
    assert m, pipe
    return m.group(1)


@dataclass
class Guide:
    """Runs the guide's blocks with the test's paths in place of the guide's examples."""

    blocks: dict[str, str]
    env: dict[str, str]
    values: dict[str, str]
    systemctl_log: Path

    def script(self, *names: str, **values: str) -> str:
        settings = {**self.values, **values}
        lines = []
        for name in names:
            for line in self.blocks[name].splitlines():
                m = _ASSIGN.match(line)
                if m and m.group(1) in settings:
                    lines.append(f"{m.group(1)}={shlex.quote(settings[m.group(1)])}")
                else:
                    lines.append(line)
        return "\n".join(lines) + "\n"

    def run(self, *names: str, pipefail: bool = True, check: bool = True,
            **values: str) -> subprocess.CompletedProcess[str]:
        """Run the variables block, then ``names``, in one bash; fail the test on exit != 0."""
        options = ["-eu", "-o", "pipefail"] if pipefail else ["-eu"]
        script = self.script("variables", *names, **values)
        r = subprocess.run(["bash", *options, "-c", script], env=self.env, cwd=self.env["HOME"],
                           capture_output=True, text=True, timeout=120)
        if check:
            assert r.returncode == 0, (
                f"{names} exited {r.returncode}:\n{script}\n{r.stdout}{r.stderr}")
        return r

    def systemctl_calls(self) -> list[str]:
        if not self.systemctl_log.exists():
            return []
        return self.systemctl_log.read_text().splitlines()


@pytest.fixture
def guide(tmp_path: Path, server: Server) -> Guide:
    """The guide, with a HOME, a scratch folder and a recording ``systemctl`` for it."""
    shims = tmp_path / "shims"
    shims.mkdir()
    log = tmp_path / "systemctl.log"
    systemctl = shims / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(log))}\n')
    systemctl.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        # the guide's `immich-usb-backup` is the one of this checkout, configured like
        # the server's
        "PATH": f"{shims}:{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "IMMICH_USB_BACKUP_CONFIG": str(server.config_path),
    }
    values = {"SCRATCH": str(tmp_path / "scratch")}
    return Guide(guide_blocks(), env, values, log)


# PostgreSQL ----------------------------------------------------------------------------

@dataclass
class Cluster:
    """A PostgreSQL cluster of its own, reached through a unix socket in ``folder``."""

    folder: Path
    bin: Path
    started: bool = False

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PGHOST": str(self.folder), "PGPORT": "5432"}

    def as_postgres(self, *argv: str, stdin: str | None = None) -> bytes:
        r = subprocess.run(["runuser", "-u", "postgres", "--", *argv], env=self.env,
                           cwd=self.folder, input=None if stdin is None else stdin.encode(),
                           capture_output=True, timeout=60)
        assert r.returncode == 0, f"{argv}: {r.stderr.decode()}"
        return r.stdout

    def psql(self, sql: str, db: str = "postgres") -> str:
        return self.as_postgres("psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                                f"--dbname={db}", "-f", "-", stdin=sql).decode()

    def version(self) -> str:
        """As Immich puts it in its dump names: ``15.18``."""
        return self.psql("SHOW server_version").split()[0]


@pytest.fixture
def postgres() -> Iterator[Callable[[str], Cluster]]:
    """Factory: ``postgres("source")`` -> a started cluster; all stopped and removed after."""
    need(os.geteuid() == 0, "needs root to run PostgreSQL as the postgres user")
    need(bool(PG_BINS), "needs PostgreSQL (Debian package postgresql)")
    need(shutil.which("psql") is not None and shutil.which("pg_dump") is not None,
         "needs psql and pg_dump (Debian package postgresql-client)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        need(False, "needs the postgres system user (Debian package postgresql)")
    # not under tmp_path: pytest keeps that root-only (0700), out of the postgres user's reach
    base = Path(tempfile.mkdtemp(prefix="immich-restore-pg-"))
    shutil.chown(base, "postgres", "postgres")
    made: list[Cluster] = []

    def start(name: str) -> Cluster:
        folder = base / name
        folder.mkdir()
        shutil.chown(folder, "postgres", "postgres")
        cluster = Cluster(folder, PG_BINS[-1].parent)
        made.append(cluster)
        cluster.as_postgres(str(cluster.bin / "initdb"), "-D", str(folder / "data"),
                            "--auth=trust", "--username=postgres", "--encoding=UTF8",
                            "--locale=C", "--no-sync")
        options = f"-k {folder} -c listen_addresses='' -c fsync=off -p 5432"
        cluster.as_postgres(str(cluster.bin / "pg_ctl"), "-D", str(folder / "data"), "-w",
                            "-l", str(folder / "log"), "-o", options, "start")
        cluster.started = True
        return cluster

    yield start
    for cluster in made:
        if cluster.started:
            subprocess.run(["runuser", "-u", "postgres", "--", str(cluster.bin / "pg_ctl"),
                            "-D", str(cluster.folder / "data"), "-m", "immediate", "stop"],
                           capture_output=True, cwd=base, timeout=60)
    shutil.rmtree(base, ignore_errors=True)


IMMICH_SCHEMA = """
CREATE EXTENSION IF NOT EXISTS "uuid-ossp";
CREATE EXTENSION IF NOT EXISTS cube;
CREATE EXTENSION IF NOT EXISTS earthdistance;
SET ROLE immich;  -- Immich's migrations run as its own database user
CREATE TABLE "user" (
  id uuid PRIMARY KEY DEFAULT uuid_generate_v4(),
  email varchar NOT NULL UNIQUE,
  name varchar NOT NULL
);
CREATE TABLE asset (
  id uuid PRIMARY KEY DEFAULT uuid_generate_v4(),
  "ownerId" uuid NOT NULL REFERENCES "user"(id) ON DELETE CASCADE,
  "originalPath" text NOT NULL UNIQUE,
  "originalFileName" varchar NOT NULL,
  checksum bytea NOT NULL,
  "fileCreatedAt" timestamptz NOT NULL
);
CREATE TABLE album (
  id uuid PRIMARY KEY DEFAULT uuid_generate_v4(),
  "ownerId" uuid NOT NULL REFERENCES "user"(id) ON DELETE CASCADE,
  "albumName" varchar NOT NULL,
  description text NOT NULL DEFAULT ''
);
CREATE TABLE album_asset (
  "albumId" uuid NOT NULL REFERENCES album(id) ON DELETE CASCADE,
  "assetId" uuid NOT NULL REFERENCES asset(id) ON DELETE CASCADE,
  PRIMARY KEY ("albumId", "assetId")
);
CREATE TABLE geodata_places (
  id integer PRIMARY KEY,
  name varchar NOT NULL,
  latitude double precision NOT NULL,
  longitude double precision NOT NULL
);
-- like Immich's: needs earthdistance's functions, which an empty search_path hides
CREATE INDEX "IDX_geodata_gist_earthcoord" ON geodata_places
  USING gist (ll_to_earth(latitude, longitude));
INSERT INTO geodata_places VALUES (1, 'Zürich', 47.37, 8.54), (2, 'Lisboa', 38.72, -9.14);
INSERT INTO "user" (id, email, name)
  VALUES ('9f1d6c1a-0000-4000-8000-000000000001', 'anna@example.org', 'Anna Müller');
"""
USER_ID = "9f1d6c1a-0000-4000-8000-000000000001"
IMMICH_ROWS = """
INSERT INTO album ("ownerId", "albumName", description)
  SELECT id, 'Natur', 'Ausflüge 2024' FROM "user";
INSERT INTO album_asset SELECT album.id, asset.id FROM album, asset
  WHERE asset."originalFileName" IN (SELECT "originalFileName" FROM asset ORDER BY 1 LIMIT 3);
"""


def immich_database(cluster: Cluster, upload: Path) -> list[Path]:
    """Immich's tables on ``cluster``, one asset row per original in ``upload/upload``."""
    cluster.psql("CREATE ROLE immich LOGIN; CREATE DATABASE immich OWNER immich;")
    originals = sorted(p for p in (upload / "upload").rglob("*") if p.is_file()
                       and p.name != ".immich")
    # rows in COPY's text format (tab-separated; the bytea as \\x<hex>), as pg_dump does
    rows = []
    for i, p in enumerate(originals):
        container_path = "/data/" + str(p.relative_to(upload))  # as Immich stores it
        digest = hashlib.sha1(p.read_bytes()).hexdigest()  # noqa: S324  (Immich's checksum)
        rows.append("\t".join((USER_ID, container_path, p.name, f"\\\\x{digest}",
                               f"2024-06-{i + 1:02d} 10:00+02")))
    copy = ('COPY asset ("ownerId", "originalPath", "originalFileName", checksum, '
            '"fileCreatedAt") FROM stdin;\n')
    cluster.psql(IMMICH_SCHEMA + copy + "\n".join(rows) + "\n\\.\n" + IMMICH_ROWS,
                 db="immich")
    return originals


def snapshot(cluster: Cluster) -> str:
    """What a restore must bring back: every row, the owners, indexes and extensions."""
    return cluster.psql("""
SELECT 'database owner ' || pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'immich';
\\c immich
SELECT 'extension ' || extname FROM pg_extension ORDER BY 1;
SELECT 'table ' || tablename || ' owned by ' || tableowner FROM pg_tables
  WHERE schemaname = 'public' ORDER BY 1;
SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1;
SELECT 'user ' || row_to_json(t)::text FROM "user" t ORDER BY 1;
SELECT 'asset ' || row_to_json(t)::text FROM asset t ORDER BY 1;
SELECT 'album ' || row_to_json(t)::text FROM album t ORDER BY 1;
SELECT 'album_asset ' || row_to_json(t)::text FROM album_asset t ORDER BY 1;
SELECT 'geodata_places ' || row_to_json(t)::text FROM geodata_places t ORDER BY 1;
""")


def write_immich_dump(cluster: Cluster, folder: Path, when: datetime, immich: str,
                      cluster_dump: bool) -> Path:
    """A dump the way Immich writes it: pg_dumpall (2.4 and older) or pg_dump, gzip'd."""
    if cluster_dump:
        sql = cluster.as_postgres("pg_dumpall", "--clean", "--if-exists", "--database=immich")
    else:
        sql = cluster.as_postgres("pg_dump", "--clean", "--if-exists", "immich")
    name = f"immich-db-backup-{when:%Y%m%dT%H%M%S}-v{immich}-pg{cluster.version()}.sql.gz"
    path = folder / name
    path.write_bytes(gzip.compress(sql))
    return path


def read_whole_gzip(path: Path) -> str:
    """The dump's text; raises if the gzip stream is cut short or damaged."""
    with gzip.open(path, "rb") as f:
        return f.read().decode()


def file_modes(root: Path) -> set[int]:
    """The permission bits of the files under ``root``."""
    return {Path(d, f).stat().st_mode & 0o7777 for d, _, files in os.walk(root)
            for f in files}


def error_lines(output: str) -> set[str]:
    return {ln.strip() for ln in output.splitlines() if "ERROR" in ln}


# The tests -----------------------------------------------------------------------------

def test_every_name_the_guide_uses_is_set_once_in_its_first_block() -> None:
    blocks = guide_blocks()
    assert {"variables", "check-verify", "check-linux", "check-macos", "photos", "config",
            "config-docker", "nixos-stop", "library", "dump-kind", "docker-cluster-dump",
            "docker-database-dump", "nixos-cluster-dump", "nixos-database-dump",
            "deleted"} <= set(blocks)
    top = [m.group(1) for ln in blocks["variables"].splitlines() if (m := _ASSIGN.match(ln))]
    assert len(top) == len(set(top)), f"a name set twice in the first block: {top}"
    for name, block in blocks.items():
        # a block may set a name of its own (the photos block's DISK, for a laptop), but
        # only before using it
        local: set[str] = set()
        for line in block.splitlines():
            code = line.split("#", 1)[0]
            for used in _USE.findall(code):
                assert used in top or used in local, (
                    f"block {name} uses ${used}, which no earlier line sets")
            m = _ASSIGN.match(line)
            if m:
                local.add(m.group(1))


def test_docker_blocks_pipe_the_dump_like_the_tested_nixos_blocks() -> None:
    blocks = guide_blocks()
    for kind in ("cluster-dump", "database-dump"):
        docker = pipeline(blocks[f"docker-{kind}"])
        nixos = pipeline(blocks[f"nixos-{kind}"])
        assert sed_expression(docker) == sed_expression(nixos) == SED
        # the same command but for who runs psql: the container, or the postgres user
        assert nixos.replace("runuser -u postgres -- psql",
                             'docker exec -i immich_postgres psql') == docker.replace(
            ' --username="$DB_USER"', "")
    assert "--dbname=postgres" in pipeline(blocks["docker-cluster-dump"])
    assert '--dbname="$DB_NAME"' in pipeline(blocks["docker-database-dump"])
    for block in (blocks["docker-cluster-dump"], blocks["docker-database-dump"]):
        steps = [ln.split("#")[0].strip() for ln in block.splitlines()]
        assert steps.index("docker start immich_postgres") < steps.index(
            "docker compose up -d")


def test_the_restrict_filter_of_the_notes_drops_only_those_lines() -> None:
    (grep,) = re.findall(r"`\| (grep -v -E '[^']*')`", GUIDE.read_text())
    dump = "SET x = 1;\n\\restrict abc123\nCOPY t FROM stdin;\n\\unrestrict abc123\nrestrict\n"
    r = subprocess.run(["bash", "-c", grep], input=dump, capture_output=True, text=True)
    assert r.stdout == "SET x = 1;\nCOPY t FROM stdin;\nrestrict\n"


def test_readme_on_the_disk_is_short_and_gives_the_same_sed() -> None:
    from immich_usb_backup import notes
    from immich_usb_backup.steps import STEPS

    text = notes.readme(STEPS, {"finished_at": "2025-03-01T02:00:00+01:00",
                                "status": "success"})
    lines = text.splitlines()
    assert len(lines) <= 70 and max(map(len, lines)) <= 80
    for needed in ("library.sha256", "sha256sum -c", "shasum -a 256 -c", "verify",
                   "deleted/", "docs/restore.md", "chown -R", "--dbname=postgres",
                   "runuser -u postgres -- psql"):
        assert needed in text, needed
    old = re.search(r'^\s*OLD="(.*)"$', text, re.M)
    new = re.search(r'^\s*NEW="(.*)"$', text, re.M)
    assert old and new and 'sed "s/$OLD/$NEW/g"' in text
    sample = ("--\n-- PostgreSQL database dump\n--\n"
              "SELECT pg_catalog.set_config('search_path', '', false);\nSET x = 1;\n")
    by_guide = subprocess.run(["sed", SED], input=sample, capture_output=True, text=True)
    by_readme = subprocess.run(["sed", f"s/{old.group(1)}/{new.group(1)}/g"], input=sample,
                               capture_output=True, text=True)
    assert by_readme.stdout == by_guide.stdout != sample


@pytest.mark.exfat
def test_guide_restores_library_and_both_kinds_of_dump_from_a_real_backup(
    make_exfat: Callable[..., ExfatDisk], server: Server, postgres: Callable[[str], Cluster],
    guide: Guide, tmp_path: Path,
) -> None:
    # The server: Immich 1.130 (cluster dumps), later upgraded to 2.5 (database dumps).
    source = postgres("source")
    originals = immich_database(source, server.upload)
    for fake in (server.upload / "backups").glob("*.sql.gz"):
        fake.unlink()  # the fixture's stand-in: this test has real ones
    now = datetime.now()
    old_dump = write_immich_dump(source, server.upload / "backups", now - timedelta(hours=2),
                                 "1.130.0", cluster_dump=True)
    at_old_dump = snapshot(source)
    disk = make_exfat()
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr

    source.psql('INSERT INTO album ("ownerId", "albumName") SELECT id, \'Später\' FROM "user";',
                db="immich")
    new_dump = write_immich_dump(source, server.upload / "backups", now, "2.5.0",
                                 cluster_dump=False)
    at_new_dump = snapshot(source)
    assert at_new_dump != at_old_dump
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr

    # Both dumps are on the disk, each a whole gzip stream ending as PostgreSQL ends one
    on_disk = disk.marker / "database"
    assert sorted(p.name for p in on_disk.iterdir()) == sorted([old_dump.name, new_dump.name])
    for name, kind in ((old_dump.name, "database cluster dump"),
                       (new_dump.name, "database dump")):
        text = read_whole_gzip(on_disk / name)
        assert (on_disk / name).read_bytes() == (server.upload / "backups" / name).read_bytes()
        # pg_dump 15.14 and newer add a \unrestrict line after the closing comment
        last = [ln for ln in text.splitlines()
                if ln.strip() not in ("", "--") and not ln.startswith("\\unrestrict")][-1]
        assert last == f"-- PostgreSQL {kind} complete"

    guide.values["DISK"] = str(disk.mount_point)
    # 1. The disk checks out, real dumps included (they end in a \unrestrict line)
    guide.run("check-linux", "check-verify")

    # The first block picks the newest dump and configuration archive by itself
    out = guide.run().stdout
    archive = sorted((disk.marker / "config").glob("config-*.zip"))[-1]
    assert f"dump: {on_disk / new_dump.name}" in out
    assert f"configuration: {archive}" in out

    # 2. Just the photos
    guide.run("photos")
    photos = Path(guide.env["HOME"]) / "immich-photos"
    assert tree(photos / "upload") == tree(server.upload / "upload")
    assert tree(photos / "library") == tree(server.upload / "library")
    # exFAT keeps no modes (every file on it looks executable): the copies are plain files
    assert file_modes(photos) == {0o644}

    # 3.2 The configuration: unzip, then docker's files back where they were
    lost = server.etc.with_name("immich.lost")
    server.etc.rename(lost)
    out = guide.run("config", "config-docker", COMPOSE_DIR=str(server.etc)).stdout
    assert "Configuration backup made by immich-usb-backup" in out  # RESTORE.txt shown
    assert tree(server.etc) == tree(lost)

    # 3.3 and 3.4: Immich stopped, the library back into a new UPLOAD_LOCATION, given to
    # the user Immich runs as (here postgres, a user that is not root)
    restored = tmp_path / "new-server" / "immich"
    guide.values.update(UPLOAD_LOCATION=str(restored), IMMICH_OWNER="postgres:postgres",
                        DB_NAME="immich", DB_USER="immich")
    guide.run("nixos-stop", "library")
    assert tree(restored) == tree(server.upload)
    assert (restored / "upload" / ".immich").is_file()
    owner = pwd.getpwnam("postgres")
    for dirpath, dirs, files in os.walk(restored):
        for name in [*dirs, *files]:
            st = Path(dirpath, name).stat()
            assert (st.st_uid, st.st_gid) == (owner.pw_uid, owner.pw_gid), name
            assert st.st_mode & 0o777 == (0o750 if name in dirs else 0o640), name

    # 3.5 The database, NixOS style, onto a new PostgreSQL where Immich already made its
    # (here: stale) database when it started empty
    target = postgres("restored")
    target.psql("CREATE ROLE immich LOGIN; CREATE DATABASE immich OWNER immich;")
    target.psql("CREATE TABLE asset (id int); INSERT INTO asset VALUES (1);", db="immich")
    guide.env.update(PGHOST=str(target.folder), PGPORT="5432")

    old = str(on_disk / old_dump.name)
    new = str(on_disk / new_dump.name)
    # small dumps: head cannot cut gunzip short; the guide's reader has no pipefail anyway
    assert "-- PostgreSQL database cluster dump" in guide.run(
        "dump-kind", DUMP=old, pipefail=False).stdout
    kind = guide.run("dump-kind", DUMP=new, pipefail=False).stdout
    assert "-- PostgreSQL database dump" in kind and "cluster" not in kind

    r = guide.run("nixos-cluster-dump", DUMP=old)
    assert error_lines(r.stderr) <= CLUSTER_DUMP_ERRORS, r.stderr
    assert snapshot(target) == at_old_dump

    r = guide.run("nixos-database-dump", DUMP=new)
    assert error_lines(r.stderr) == set(), r.stderr
    assert snapshot(target) == at_new_dump
    assert guide.systemctl_calls() == ["stop immich-server", "start immich-server",
                                       "start immich-server"]

    # Database and files agree: every asset's path is a restored file with its checksum
    rows = target.psql('SELECT "originalPath", encode(checksum, \'hex\') FROM asset',
                       db="immich").split()
    assert len(rows) == len(originals) > 0
    for row in rows:
        path, digest = row.split("|")
        file = restored / path.removeprefix("/data/")
        assert hashlib.sha1(file.read_bytes()).hexdigest() == digest  # noqa: S324


@pytest.mark.exfat
def test_guide_check_blocks_pass_on_a_backup_and_catch_a_damaged_file(
    make_exfat: Callable[..., ExfatDisk], server: Server, guide: Guide,
) -> None:
    need(shutil.which("shasum") is not None, "needs shasum (Debian package perl)")
    disk = make_exfat()
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    guide.values["DISK"] = str(disk.mount_point)
    backup = str(disk.marker)

    assert (disk.marker / "library.sha256").is_file(), "no manifest on the disk"
    assert "all files are good" in guide.run("check-linux").stdout
    assert "all files are good" in guide.run("check-macos", BACKUP=backup).stdout
    guide.run("check-verify")

    photo = next((disk.marker / "library" / "upload").rglob("*.jpg"))
    data = bytearray(photo.read_bytes())
    data[len(data) // 2] ^= 0xFF
    photo.write_bytes(bytes(data))  # same size, same name: only the content changed

    for r in (guide.run("check-linux", check=False),
              guide.run("check-macos", check=False, BACKUP=backup)):
        assert r.returncode != 0 and "FAILED" in r.stdout, r.stdout + r.stderr
        assert photo.name in r.stdout and "all files are good" not in r.stdout
    r = guide.run("check-verify", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert photo.name in r.stdout + r.stderr


@pytest.mark.exfat
def test_guide_deleted_block_brings_back_a_photo_deleted_on_the_server(
    make_exfat: Callable[..., ExfatDisk], server: Server, guide: Guide,
) -> None:
    disk = make_exfat()
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    photo = sorted((server.upload / "upload").rglob("*.jpg"))[0]
    rel = photo.relative_to(server.upload)
    content = photo.read_bytes()
    photo.unlink()
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    day = date.today().isoformat()  # the backup names its day folders in local time
    guide.values["DISK"] = str(disk.mount_point)

    out = guide.run("deleted", DAY=day).stdout
    assert day in out.split()  # the listing of the day folders
    back = Path(guide.values["SCRATCH"]) / f"deleted-{day}" / rel
    assert back.read_bytes() == content
    assert file_modes(Path(guide.values["SCRATCH"]) / f"deleted-{day}") == {0o644}
