"""Where the database goes: ``--database TARGET``.

- ``postgresql://...`` (or ``postgres://``): a libpq URL given to psql as it is
  (``postgresql:///immich?host=/run/postgresql`` on NixOS). Through a Unix socket, and
  when we are root, psql runs as the system user the URL names, else as ``postgres``,
  as the manual way runs it with ``runuser -u postgres``: peer authentication then lets
  it in as PostgreSQL's superuser.
- ``docker:CONTAINER``: psql inside Immich's database container (``docker exec -i``),
  as the container's ``POSTGRES_USER``, into its ``POSTGRES_DB`` (read with ``docker
  exec CONTAINER printenv``; Immich's compose file sets both from its ``.env``).
- ``immich-api``: Immich restores the dump itself (``restore.api``).

A psql target answers what the plan must know (``state``), saves the database it holds
(``save``: pg_dump, gzip'd by us), loads a ``SqlStream`` (``load``) and gives the rows the
asset check reads back (``copy_out``). Every program runs through ``execute``.
"""

from __future__ import annotations

import abc
import asyncio
import os
import pwd
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from immich_usb_backup import dumps, execute
from immich_usb_backup.drill import TABLES
from immich_usb_backup.drill.postgres import DEBIAN_BINS, version_key
from immich_usb_backup.errors import BackupError, CommandError
from immich_usb_backup.masking import mask_url_passwords, register_secrets, secrets_in
from immich_usb_backup.restore.sqlstream import SqlStream, quote, write_to

API = "immich-api"
DOCKER = "docker:"
SUPERUSER = "postgres"
IMMICH_TABLES = sorted({name for names in TABLES.values() for name in names})
ASSET_TABLES, FILE_TABLES = ("asset", "assets"), ("asset_file", "asset_files")
QUERY_TIMEOUT_S = 120.0
_PASSWORD_PARAM = re.compile(r"(password=)[^&]*", re.I)


class TargetError(BackupError):
    """The target cannot be used (a usage error: exit 2 when given on the command line)."""


@dataclass
class DbState:
    """What the plan knows of the target database before anything is done."""

    reachable: bool = False
    error: str | None = None
    database: str | None = None
    server_version: str | None = None
    immich_tables: list[str] = field(default_factory=list)
    assets: int | None = None  # rows of its asset table, when it has one
    sessions: int = 0  # other connections to it (a running Immich)


@dataclass
class Rows:
    """The tables of the restored database the asset check reads back, and their
    columns (the ones ``assets.DumpReader`` knows)."""

    asset_table: str | None = None
    asset_columns: list[str] = field(default_factory=list)
    file_table: str | None = None
    file_columns: list[str] = field(default_factory=list)


# the queries, made of the constants above only
_IMMICH = ", ".join(f"'{t}'" for t in IMMICH_TABLES)
_READ = ", ".join(f"'{t}'" for t in ASSET_TABLES + FILE_TABLES)
STATE_SQL = ("SELECT current_database(), current_setting('server_version'), "  # noqa: S608
             "(SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables "
             f"WHERE schemaname = 'public' AND tablename IN ({_IMMICH})), "
             "(SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
             "AND pid <> pg_backend_pid())")
COLUMNS_SQL = f"SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public' AND table_name IN ({_READ}) ORDER BY table_name, ordinal_position"  # noqa: E501, S608
READ_BACK = ("id", "originalPath", "checksum", "checksumAlgorithm", "status", "isExternal",
             "libraryId", "deletedAt", "isOffline", "sidecarPath", "encodedVideoPath",
             "assetId", "type", "path")


def shown(target: str) -> str:
    """``target`` without its passwords, to show and log."""
    return _PASSWORD_PARAM.sub(r"\1***", mask_url_passwords(target))


def parse(text: str, bin_dir: Path | None = None) -> PsqlTarget | str:
    """The target ``text`` names: a ``PsqlTarget``, or ``API`` for Immich's own restore.
    Raise TargetError for anything else."""
    if text == API:
        return API
    if text.startswith(DOCKER):
        container = text[len(DOCKER):]
        if not container or container.startswith("-") or "/" in container:
            raise TargetError(f"--database {text}: name Immich's database container, "
                              "docker:CONTAINER (docker:immich_postgres)")
        return DockerTarget(text, container)
    if text.startswith(("postgresql://", "postgres://")):
        register_secrets(secrets_in(text) | set(_PASSWORD_PARAM.findall(text)))
        return UrlTarget(text, bin_dir)
    raise TargetError(f"--database {shown(text)}: give a PostgreSQL URL "
                      "(postgresql:///immich?host=/run/postgresql), docker:CONTAINER or "
                      f"{API}")


class PsqlTarget(abc.ABC):
    """A database psql reaches (see the module doc); a subclass says how psql and
    pg_dump reach it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.run_as: str | None = None  # the system user psql runs as (None: as we are)
        self.database: str | None = None  # the database it restores into, once known

    def __str__(self) -> str:
        return shown(self.text)

    async def prepare(self) -> None:  # noqa: B027 - a hook: a URL needs nothing found
        """Find out what ``psql`` needs (the container's user and database)."""

    @abc.abstractmethod
    def psql(self, *args: str, stdin: bool = False) -> list[str]:
        """The argv of psql with ``args`` against this database (``stdin``: SQL is fed
        on its standard input)."""

    @abc.abstractmethod
    def pg_dump(self, *args: str) -> list[str]:
        """The argv of pg_dump with ``args`` of this database."""

    async def query(self, sql: str) -> list[list[str]]:
        """Rows of one query (tab-separated fields). Raise CommandError when it fails."""
        lines: list[str] = []
        await asyncio.wait_for(execute.run(
            self.psql("-At", "-F", "\t", "-c", sql), on_line=lines.append,
            user=self.run_as), QUERY_TIMEOUT_S)
        return [line.split("\t") for line in lines]

    async def state(self) -> DbState:
        """Whether it answers, and whether its database holds Immich's tables."""
        found = DbState()
        try:
            await self.prepare()
            (row,) = await self.query(STATE_SQL)
            found.database, found.server_version = row[0], row[1].split()[0]
            found.immich_tables = [t for t in row[2].split(",") if t]
            found.sessions = int(row[3])
            table = next((t for t in ASSET_TABLES if t in found.immich_tables), None)
            if table is not None:
                (count,) = await self.query(f"SELECT count(*) FROM public.{quote(table)}")  # noqa: S608
                found.assets = int(count[0])
            found.reachable = True
            self.database = found.database
        except (CommandError, OSError, ValueError, TimeoutError) as exc:
            found.error = first_error(exc)
        return found

    async def save(self, path: Path) -> None:
        """The database as it is now, into ``path`` (gzip'd, 0600, never over a file).
        Raise BackupError when the dump is not whole."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        read_fd, write_fd = os.pipe()
        tail = bytearray()

        def compress() -> None:
            z = zlib.compressobj(6, zlib.DEFLATED, 31)
            with os.fdopen(read_fd, "rb") as src, os.fdopen(fd, "wb") as out:
                while block := src.read(1 << 20):
                    tail[:] = (tail + block)[-dumps.TAIL:]
                    out.write(z.compress(block))
                out.write(z.flush())
                out.flush()
                os.fsync(out.fileno())

        writing = asyncio.ensure_future(asyncio.to_thread(compress))
        try:
            await execute.run(self.pg_dump("--clean", "--if-exists"), stdout=write_fd,
                              user=self.run_as)
        finally:
            os.close(write_fd)
            await writing
        if not dumps.sql_complete(bytes(tail)):
            raise BackupError(f"the dump of the database into {path} is not whole")

    async def load(self, stream: SqlStream) -> execute.Result:
        """Feed ``stream`` to psql; psql's result (its exit status: 0, or 3 when a
        statement failed). Whether the load counts is ``stream.committed``."""
        read_fd, write_fd = os.pipe()
        feeding = asyncio.ensure_future(asyncio.to_thread(write_to, stream, write_fd))
        try:
            result = await execute.run(self.psql("-v", "ON_ERROR_STOP=1", stdin=True),
                                       ok_codes=(0, 1, 2, 3), user=self.run_as,
                                       stdin=read_fd)
        except BaseException:
            stream.stop.set()
            await asyncio.shield(feeding)
            raise
        await feeding
        return result

    async def rows(self) -> Rows:
        """Which of the tables and columns the asset check reads the restored database has."""
        listing = await self.query(COLUMNS_SQL)
        columns: dict[str, list[str]] = {}
        for table, column in listing:
            if column in READ_BACK:
                columns.setdefault(table, []).append(column)
        found = Rows()
        found.asset_table = next((t for t in ASSET_TABLES if t in columns), None)
        found.file_table = next((t for t in FILE_TABLES if t in columns), None)
        if found.asset_table:
            found.asset_columns = columns[found.asset_table]
        if found.file_table:
            found.file_columns = columns[found.file_table]
        return found

    async def copy_out(self, table: str, columns: list[str], path: Path) -> None:
        """The rows of ``table`` (only ``columns``) in COPY's text format into ``path``."""
        names = ", ".join(quote(c) for c in columns)
        sql = f"COPY (SELECT {names} FROM public.{quote(table)}) TO STDOUT"  # noqa: S608
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await execute.run(self.psql("-v", "ON_ERROR_STOP=1", "-c", sql), stdout=fd,
                              user=self.run_as)
        finally:
            os.close(fd)


class UrlTarget(PsqlTarget):
    """A PostgreSQL URL."""

    def __init__(self, text: str, bin_dir: Path | None) -> None:
        super().__init__(text)
        parts = urlsplit(text)
        query = parse_qs(parts.query)
        self.database = unquote(parts.path.lstrip("/")) or query.get("dbname", [None])[0]
        host = parts.hostname or (query.get("host") or [""])[0]
        user = unquote(parts.username or "") or (query.get("user") or [""])[0]
        self.bin_dir = bin_dir
        if os.geteuid() == 0 and (not host or host.startswith("/")):
            self.run_as = _system_user(user) or _system_user(SUPERUSER)

    def _program(self, name: str) -> str:
        found = client_program(name, self.bin_dir)
        if found is None:
            raise TargetError(f"{name} is not installed: it is PostgreSQL's client "
                              "(Debian/Ubuntu: apt install postgresql-client; NixOS: "
                              "services.postgresql puts it on PATH)")
        return found

    def psql(self, *args: str, stdin: bool = False) -> list[str]:
        return [self._program("psql"), "-X", "-q", f"--dbname={self.text}", *args]

    def pg_dump(self, *args: str) -> list[str]:
        return [self._program("pg_dump"), *args, f"--dbname={self.text}"]


class DockerTarget(PsqlTarget):
    """``docker:CONTAINER``."""

    def __init__(self, text: str, container: str) -> None:
        super().__init__(text)
        self.container = container
        self.user = SUPERUSER

    async def prepare(self) -> None:
        if shutil.which("docker") is None:
            raise TargetError("docker is not installed here (docker:CONTAINER runs psql "
                              "through docker exec)")
        self.user = await self._env("POSTGRES_USER") or SUPERUSER
        self.database = await self._env("POSTGRES_DB") or self.user

    async def _env(self, name: str) -> str | None:
        lines: list[str] = []
        result = await asyncio.wait_for(execute.run(
            ["docker", "exec", self.container, "printenv", name], on_line=lines.append,
            ok_codes=(0, 1)), QUERY_TIMEOUT_S)
        return lines[0].strip() if result.returncode == 0 and lines else None

    def psql(self, *args: str, stdin: bool = False) -> list[str]:
        return ["docker", "exec", *(["-i"] if stdin else []), self.container, "psql", "-X",
                "-q", f"--username={self.user}", f"--dbname={self.database}", *args]

    def pg_dump(self, *args: str) -> list[str]:
        return ["docker", "exec", self.container, "pg_dump", f"--username={self.user}",
                *args, str(self.database)]


def client_program(name: str, bin_dir: Path | None) -> str | None:
    """PostgreSQL's ``name`` (psql, pg_dump): in ``database.postgres_bin_dir``, on PATH,
    or the newest in ``/usr/lib/postgresql/*/bin``."""
    if bin_dir is not None and os.access(bin_dir / name, os.X_OK):
        return str(bin_dir / name)
    on_path = shutil.which(name)
    if on_path:
        return on_path
    found = sorted(DEBIAN_BINS.glob(f"*/bin/{name}"), key=lambda p: version_key(p.parent))
    return str(found[-1]) if found else None


def _system_user(name: str) -> str | None:
    if not name:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        return None
    return name


def first_error(exc: BaseException) -> str:
    """What psql said, in one line (its FATAL or ERROR), or the exception."""
    text = exc.stderr_tail if isinstance(exc, CommandError) else str(exc)
    if isinstance(exc, TimeoutError):
        return f"no answer within {QUERY_TIMEOUT_S:g} s"
    for line in text.splitlines():
        if "FATAL:" in line or "ERROR:" in line or "error:" in line:
            return line.split("FATAL:")[-1].split("ERROR:")[-1].strip()
    return " ".join(text.split())[-300:] or str(exc)
