"""Immich-shaped databases in a throwaway PostgreSQL, dumped the ways Immich dumps them.

``Postgres``: a cluster of its own (``initdb`` + ``pg_ctl`` in a temporary folder, reached
through a Unix socket there, no TCP port), its programs run as ``postgres`` (or
``nobody``) when the tests run as root, as PostgreSQL refuses root. ``ImmichDb``: the
tables the asset check reads, in the shape of one Immich era: ``asset`` with
``checksumAlgorithm`` and ``status`` (2.7+), or ``assets`` with ``isExternal``,
``sidecarPath`` and ``encodedVideoPath`` (1.x); ``asset_file`` (``asset_files``); and a
``smart_search`` table of float vectors, which make real dumps large. ``Postgres.dump``
writes them with the real ``pg_dump`` or ``pg_dumpall`` piped through ``gzip
--rsyncable``, as Immich does.

``_gunzip_lines`` and ``_gunzip_chunks`` stand in for the product's streamed gunzip.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import need

PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                 key=lambda p: [int(n) for n in re.findall(r"\d+", p.parts[-3])])
USER_ID = "9f1d6c1a-0000-4000-8000-000000000001"
LIBRARY_ID = "9f1d6c1a-0000-4000-8000-0000000000aa"


def sha1(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()  # noqa: S324  (Immich's checksum)


# COPY's text format, as psql reads it ----------------------------------------------------

def copy_text(value: str | bytes | None) -> bytes:
    """A value for a ``COPY ... FROM stdin`` row: NULL, or text with backslash, tab,
    newline and carriage return escaped (``str`` is encoded with surrogateescape, so a
    name that is not UTF-8 goes in as its bytes)."""
    if value is None:
        return b"\\N"
    raw = value if isinstance(value, bytes) else os.fsencode(value)
    return (raw.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n")
            .replace(b"\r", b"\\r"))


def copy_bytea(value: bytes | None) -> bytes:
    return b"\\N" if value is None else b"\\\\x" + value.hex().encode()


def copy_block(table: str, columns: Sequence[str], rows: Sequence[Sequence[bytes]]) -> bytes:
    names = ", ".join(f'"{c}"' for c in columns)
    body = b"".join(b"\t".join(r) + b"\n" for r in rows)
    return f"COPY {table} ({names}) FROM stdin;\n".encode() + body + b"\\.\n"


# The cluster ------------------------------------------------------------------------------

@dataclass
class Postgres:
    """A started PostgreSQL cluster in ``folder``; ``stop`` ends and removes it."""

    folder: Path
    bin: Path
    user: str | None
    started: bool = False

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PGHOST": str(self.folder), "PGPORT": "5432",
                "PGUSER": "postgres"}

    def argv(self, *argv: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *argv] if self.user else list(argv)

    def run(self, *argv: str, stdin: bytes | None = None, timeout: float = 120) -> bytes:
        r = subprocess.run(self.argv(*argv), env=self.env, cwd=self.folder, input=stdin,
                           capture_output=True, timeout=timeout, check=False)
        assert r.returncode == 0, f"{argv}: {r.stderr.decode(errors='replace')}"
        return r.stdout

    def psql(self, sql: bytes | str, db: str = "postgres") -> str:
        data = sql.encode() if isinstance(sql, str) else sql
        return self.run("psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                        f"--dbname={db}", "-f", "-", stdin=data).decode(errors="replace")

    def start(self) -> None:
        data = self.folder / "data"
        self.run(str(self.bin / "initdb"), "-D", str(data), "--auth=trust",
                 "--username=postgres", "--encoding=UTF8", "--locale=C", "--no-sync")
        options = f"-k {self.folder} -c listen_addresses='' -c fsync=off -p 5432"
        self.run(str(self.bin / "pg_ctl"), "-D", str(data), "-w", "-l",
                 str(self.folder / "log"), "-o", options, "start")
        self.started = True

    def stop(self) -> None:
        if self.started:
            subprocess.run(self.argv(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"),
                                     "-m", "immediate", "-w", "stop"),
                           capture_output=True, cwd=self.folder, timeout=60, check=False)
            self.started = False
        shutil.rmtree(self.folder, ignore_errors=True)

    def dump(self, db: str, path: Path, *, cluster: bool = False, fast: bool = False) -> Path:
        """``db`` dumped to ``path`` as Immich does: ``pg_dumpall --clean --if-exists``
        (a cluster dump: every other database left out) or ``pg_dump --clean
        --if-exists``, through ``gzip --rsyncable`` (``fast``: at level 1, for big
        dumps whose compression does not matter)."""
        if cluster:
            others = [d for d in self.psql(
                "SELECT datname FROM pg_database WHERE NOT datistemplate").split()
                if d not in (db, "postgres")]
            argv = ["pg_dumpall", "--clean", "--if-exists",
                    *(f"--exclude-database={d}" for d in others)]
        else:
            argv = ["pg_dump", "--clean", "--if-exists", db]
        with open(path, "wb") as out:
            dumper = subprocess.Popen(self.argv(*argv), env=self.env, cwd=self.folder,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            gzip = subprocess.run(["gzip", "--rsyncable", "-c", *(["-1"] if fast else [])],
                                  stdin=dumper.stdout,
                                  stdout=out, check=False, timeout=600)
            assert dumper.stdout is not None and dumper.stderr is not None
            dumper.stdout.close()
            err = dumper.stderr.read()
            assert dumper.wait(timeout=600) == 0, err.decode(errors="replace")
            assert gzip.returncode == 0
        return path


def start_postgres() -> Postgres:
    """A started cluster (the caller stops it); skips (fails in CI) without PostgreSQL."""
    need(bool(PG_BINS), "needs PostgreSQL's server programs (Debian package postgresql)")
    need(shutil.which("pg_dump") is not None and shutil.which("psql") is not None,
         "needs psql, pg_dump and pg_dumpall (Debian package postgresql-client)")
    user = None
    if os.geteuid() == 0:
        need(shutil.which("runuser") is not None, "needs runuser (util-linux) as root")
        for name in ("postgres", "nobody"):
            try:
                pwd.getpwnam(name)
            except KeyError:
                continue
            user = name
            break
        need(user is not None, "needs the user postgres or nobody to run PostgreSQL")
    # not under pytest's tmp_path: that is root-only (0700), out of the user's reach
    folder = Path(tempfile.mkdtemp(prefix="immich-assets-pg-"))
    if user is not None:
        shutil.chown(folder, user)
    cluster = Postgres(folder, PG_BINS[-1].parent, user)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


# Immich's tables ------------------------------------------------------------------------

@dataclass
class Asset:
    """One row of the asset table. ``original_path`` is what Immich stored."""

    original_path: str
    checksum: bytes | None
    trashed: bool = False
    external: bool = False
    offline: bool = False
    status: str | None = None  # default: from ``trashed``
    algorithm: str | None = None  # default: sha1, or sha1-path when external
    sidecar_path: str | None = None  # old schema only
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class AssetFile:
    asset_id: str
    type: str
    path: str


NEW_SCHEMA = """
CREATE TYPE asset_status_enum AS ENUM ('active', 'trashed', 'deleted');
CREATE TYPE asset_checksum_algorithm_enum AS ENUM ('sha1', 'sha1-path');
CREATE TABLE "user" (id uuid PRIMARY KEY, email varchar NOT NULL);
CREATE TABLE asset (
  id uuid PRIMARY KEY,
  "deviceAssetId" varchar NOT NULL DEFAULT 'device',
  "ownerId" uuid NOT NULL REFERENCES "user"(id),
  type varchar NOT NULL DEFAULT 'IMAGE',
  "originalPath" text NOT NULL,
  "fileCreatedAt" timestamptz NOT NULL DEFAULT '2024-06-01 10:00+02',
  checksum bytea NOT NULL,
  "checksumAlgorithm" asset_checksum_algorithm_enum NOT NULL DEFAULT 'sha1',
  "livePhotoVideoId" uuid,
  "originalFileName" varchar NOT NULL DEFAULT '',
  "deletedAt" timestamptz,
  "libraryId" uuid,
  "isOffline" boolean NOT NULL DEFAULT false,
  status asset_status_enum NOT NULL DEFAULT 'active'
);
CREATE TABLE asset_file (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  "assetId" uuid NOT NULL REFERENCES asset(id) ON DELETE CASCADE,
  "createdAt" timestamptz NOT NULL DEFAULT now(),
  type varchar NOT NULL,
  path varchar NOT NULL
);
CREATE TABLE smart_search ("assetId" uuid PRIMARY KEY, embedding real[] NOT NULL);
"""

OLD_SCHEMA = """
CREATE TABLE users (id uuid PRIMARY KEY, email varchar NOT NULL);
CREATE TABLE assets (
  id uuid PRIMARY KEY,
  "deviceAssetId" varchar NOT NULL DEFAULT 'device',
  "ownerId" uuid NOT NULL REFERENCES users(id),
  "originalPath" varchar NOT NULL,
  "encodedVideoPath" varchar DEFAULT '',
  checksum bytea NOT NULL,
  "isExternal" boolean NOT NULL DEFAULT false,
  "isOffline" boolean NOT NULL DEFAULT false,
  "libraryId" uuid,
  "deletedAt" timestamptz,
  "sidecarPath" varchar
);
CREATE TABLE asset_files (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  "assetId" uuid NOT NULL REFERENCES assets(id) ON DELETE CASCADE,
  type varchar NOT NULL,
  path varchar NOT NULL
);
CREATE TABLE smart_search ("assetId" uuid PRIMARY KEY, embedding real[] NOT NULL);
"""


def create_database(pg: Postgres, name: str, *, encoding: str = "UTF8") -> None:
    pg.psql(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING '{encoding}' "
            "LC_COLLATE 'C' LC_CTYPE 'C';")


def immich_db(pg: Postgres, name: str, assets: Sequence[Asset],
              files: Sequence[AssetFile] = (), *, old: bool = False,
              encoding: str = "UTF8", embeddings: int = 0) -> None:
    """Database ``name`` with Immich's tables of one era (``old``: 1.x, plural names)
    holding ``assets`` and ``files``, and ``embeddings`` rows of 512 floats in
    ``smart_search`` (one per asset, made up where there are fewer assets)."""
    create_database(pg, name, encoding=encoding)
    user_table = "users" if old else '"user"'
    sql = (OLD_SCHEMA if old else NEW_SCHEMA).encode()
    sql += f"INSERT INTO {user_table} VALUES ('{USER_ID}', 'anna@example.org');\n".encode()  # noqa: S608
    if old:
        columns = ["id", "ownerId", "originalPath", "checksum", "isExternal", "isOffline",
                   "libraryId", "deletedAt", "sidecarPath"]
        rows = [[a.id.encode(), USER_ID.encode(), copy_text(a.original_path),
                 copy_bytea(a.checksum), b"t" if a.external else b"f",
                 b"t" if a.offline else b"f",
                 LIBRARY_ID.encode() if a.external else b"\\N",
                 b"2024-07-01 10:00+00" if a.trashed else b"\\N",
                 copy_text(a.sidecar_path)] for a in assets]
        sql += copy_block("assets", columns, rows)
    else:
        columns = ["id", "ownerId", "originalPath", "checksum", "checksumAlgorithm",
                   "deletedAt", "libraryId", "isOffline", "status"]
        rows = [[a.id.encode(), USER_ID.encode(), copy_text(a.original_path),
                 copy_bytea(a.checksum),
                 (a.algorithm or ("sha1-path" if a.external else "sha1")).encode(),
                 b"2024-07-01 10:00+00" if a.trashed else b"\\N",
                 LIBRARY_ID.encode() if a.external else b"\\N",
                 b"t" if a.offline else b"f",
                 (a.status or ("trashed" if a.trashed else "active")).encode()]
                for a in assets]
        sql += copy_block("asset", columns, rows)
    if files:
        sql += copy_block("asset_files" if old else "asset_file",
                          ["assetId", "type", "path"],
                          [[f.asset_id.encode(), f.type.encode(), copy_text(f.path)]
                           for f in files])
    pg.psql(sql, db=name)
    if embeddings:
        add_embeddings(pg, name, embeddings, old=old)


def add_embeddings(pg: Postgres, name: str, n: int, *, old: bool = False) -> None:
    """A search embedding of 512 random floats for ``n`` of the assets."""
    table = "assets" if old else "asset"
    pg.psql(f"""
INSERT INTO smart_search
  SELECT id, (SELECT array_agg((random() * 2 - 1 + 0 * g * length(id::text))::real)
              FROM generate_series(1, 512) g)
  FROM {table} LIMIT {n};
""", db=name)  # noqa: S608  (test data from constants)


def many_assets(pg: Postgres, name: str, n: int, prefix: str = "/data/") -> None:
    """``n`` more rows in ``asset``: ``<prefix>upload/<user>/xx/yy/<n>.jpg``, a made-up
    20-byte checksum from the number (md5 of it and 8 more hex digits)."""
    pg.psql(f"""
INSERT INTO asset (id, "ownerId", "originalPath", checksum)
  SELECT gen_random_uuid(), '{USER_ID}',
         '{prefix}upload/{USER_ID}/' || substr(md5(n::text), 1, 2) || '/'
           || substr(md5(n::text), 3, 2) || '/' || n || '.jpg',
         decode(md5(n::text) || substr(md5(n::text || 'x'), 1, 8), 'hex')
  FROM generate_series(1, {n}) n;
""", db=name)  # noqa: S608  (test data from constants)


def many_checksum(n: int) -> bytes:
    """The checksum ``many_assets`` gives row ``n``."""
    digest = hashlib.md5(str(n).encode()).hexdigest()  # noqa: S324  (test data)
    return bytes.fromhex(digest + hashlib.md5(f"{n}x".encode()).hexdigest()[:8])  # noqa: S324


# Reading a gzip'd dump (the product's streamed gunzip lives elsewhere) -------------------

def _gunzip_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    """The decompressed bytes of ``path``, ``size`` bytes of input at a time."""
    d = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        while block := f.read(size):
            data = d.decompress(block)
            while d.unused_data:  # members one after another
                rest = d.unused_data
                d = zlib.decompressobj(wbits=31)
                data += d.decompress(rest)
            if data:
                yield data
    assert d.eof, f"{path}: the gzip stream is cut short"


def _gunzip_lines(path: Path) -> Iterator[bytes]:
    """The decompressed lines of ``path`` (a line can be as long as the dump has it)."""
    pending = b""
    for chunk in _gunzip_chunks(path):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line + b"\n"
    if pending:
        yield pending


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """One cluster for a test module; each test makes its own databases."""
    cluster = start_postgres()
    try:
        yield cluster
    finally:
        cluster.stop()
