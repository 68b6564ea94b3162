"""``verify TARGET --restore-drill``: load the newest dump into a throwaway PostgreSQL.

A dump that reads to its end can still fail to load. The drill proves it loads: the
newest Immich dump on the disk (by the time in its name) goes into a PostgreSQL cluster
of its own, made with ``initdb`` in a temporary folder, reached only through a Unix
socket in that folder (no TCP port), run as our own child (so it dies with us), and
stopped (an immediate shutdown) and
removed afterwards, whatever happened, cancellation included. As root, PostgreSQL's
programs run as ``nobody``: PostgreSQL refuses to run as root, and a dump is SQL run by a
superuser, which can run programs as the server's user (``COPY ... FROM PROGRAM``).

The dump is streamed, never held whole: gunzip in a thread, into psql through a FIFO,
with Immich's documented fix of the search path (the line
``set_config('search_path', '', false)`` replaced, as its restore guide's ``sed`` does).
psql runs without ``ON_ERROR_STOP``, so one failed statement (an extension this machine
lacks, such as ``vectors`` or ``vchord``) does not stop the rest; the server's log lists
every failed statement. Three more adjustments keep one failure from hiding others:

- every ``COPY ... FROM stdin`` block is fed through a FIFO of its own
  (``COPY ... FROM '<fifo>'``): when the table could not be made, psql would otherwise
  read the rows as SQL, and the errors would swallow the tables after it;
- a database dump (``pg_dump``) loads into a new database ``immich``; the roles its
  ``OWNER TO`` lines name are made first (a real restore has them);
- a cluster dump (``pg_dumpall``) makes its databases itself, with the C locale of the
  throwaway cluster instead of the server's (which this machine may not have).

It passes when Immich's assets and users tables exist and can be counted (their names
differ between Immich versions: ``asset``/``assets``, ``user``/``users``), the data of
neither failed to load, and the dump was complete. Each drill's outcome is kept per
disk in ``<state dir>/drills.toml`` (the last one, and the last one that passed), for
``verify``'s output and the history page.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import logging
import os
import pwd
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from immich_usb_backup import clock, dumps, execute, state
from immich_usb_backup.clock import iso
from immich_usb_backup.errors import BackupError, CommandError
from immich_usb_backup.status import StatusWriter

log = logging.getLogger(__name__)
T = TypeVar("T")

TOOLS = ("initdb", "postgres", "psql")
START_TIMEOUT_S = 120.0
DEBIAN_BINS = Path("/usr/lib/postgresql")
RUN_AS = "nobody"
SUPERUSER = "postgres"  # the throwaway cluster's superuser
PORT = "5432"  # only names the socket file: no TCP
DATABASE = "immich"  # a database dump goes into a new database of this name
STATE_NAME = state.DRILLS
LISTED = 100  # failed statements kept in full; the count is always exact
STATEMENT_CHARS = 400
LONG_LINE = 1 << 20  # a line longer than this is passed on in pieces
# Immich's restore guide: sed "s/OLD/NEW/g" between gunzip and psql
SEARCH_PATH_OLD = b"SELECT pg_catalog.set_config('search_path', '', false);"
SEARCH_PATH_NEW = b"SELECT pg_catalog.set_config('search_path', 'public, pg_catalog', true);"
# Immich's main tables: what the report calls them -> their names, newest first
TABLES = {"assets": ("asset", "assets"), "users": ("user", "users"),
          "albums": ("album", "albums")}
REQUIRED = ("assets", "users")

# the drill's own queries, made of the constants above only
_DATABASES_SQL = ("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
                  "ORDER BY datname <> 'immich', datname")  # DATABASE first
_WANTED = ", ".join(f"'{n}'" for n in sorted({n for ns in TABLES.values() for n in ns}))
_TABLES_SQL = f"SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename IN ({_WANTED})"  # noqa: E501, S608
_COPY = re.compile(rb"^COPY (?P<table>.+?)(?: \(.*\))? FROM stdin;\r?\n$")
_OWNER = re.compile(rb"^ALTER .* OWNER TO (?P<role>\"(?:[^\"]|\"\")+\"|[A-Za-z_][\w$]*);\r?\n$")
_LOCALE = re.compile(rb"\s+(?:LOCALE_PROVIDER|LOCALE|LC_COLLATE|LC_CTYPE|ICU_LOCALE|ICU_RULES|"
                     rb"BUILTIN_LOCALE|COLLATION_VERSION)\s*=\s*(?:'(?:[^']|'')*'|\w+)")
_PSQL_ERROR = re.compile(r"^psql:.*?:\d+: error: (?P<message>.*)$")


class DrillUnavailable(BackupError):
    """This machine cannot run the drill: PostgreSQL's programs (or the user nobody) are missing."""


class _Stopped(Exception):
    """The drill was cancelled: the feeding thread stops."""


# Where PostgreSQL is ---------------------------------------------------------------------

def _has_tools(folder: Path) -> list[str]:
    """The programs of TOOLS that ``folder`` lacks."""
    return [t for t in TOOLS if not os.access(folder / t, os.X_OK)]


def _version_key(folder: Path) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", folder.parent.name)]


def find_postgres(configured: Path | None) -> Path:
    """Given ``database.postgres_bin_dir`` (None when not set), return the folder holding
    PostgreSQL's ``initdb``, ``postgres`` and ``psql``: the configured one;
    else the folder of the ``initdb`` on PATH (links followed); else the newest
    ``/usr/lib/postgresql/*/bin`` (Debian, Ubuntu). Raise DrillUnavailable, naming what
    to install and the config key, when none has them; as root, also when the user
    ``nobody`` is missing."""
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            raise DrillUnavailable(f"the restore drill runs PostgreSQL as the user {RUN_AS}, "
                                   "which this machine does not have") from None
    if configured is not None:
        missing = _has_tools(configured)
        if missing:
            raise DrillUnavailable(
                f"database.postgres_bin_dir: {configured} has no {', '.join(missing)}. Set "
                "it to the folder that holds PostgreSQL's initdb, postgres and psql "
                "(Debian/Ubuntu: /usr/lib/postgresql/<version>/bin, after apt install "
                "postgresql), or remove it to have them looked for")
        return configured
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    candidates += sorted((p.parent for p in DEBIAN_BINS.glob("*/bin/initdb")),
                         key=_version_key, reverse=True)
    for folder in candidates:
        if not _has_tools(folder):
            return folder
    raise DrillUnavailable(
        "the restore drill needs PostgreSQL's server programs (initdb, postgres, "
        "psql): none found on PATH or in /usr/lib/postgresql/*/bin. Install PostgreSQL "
        "(Debian/Ubuntu: apt install postgresql; NixOS: pkgs.postgresql in "
        "environment.systemPackages), or set database.postgres_bin_dir to the folder that "
        "holds them")


# The result ------------------------------------------------------------------------------

@dataclass
class FailedStatement:
    """One statement of the dump that failed, as the server logged it."""

    error: str  # "ERROR:  extension "vectors" is not available"
    statement: str = ""
    database: str = ""
    detail: str = ""
    hint: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class TableCount:
    table: str | None  # the name found in schema public, None when there is none
    rows: int | None = None  # None: not found, or the count failed

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "rows": self.rows}


@dataclass
class DrillResult:
    """What one drill found; ``passed`` says whether the dump loads."""

    dump: str | None = None
    kind: str | None = None  # "cluster dump" (pg_dumpall) or "database dump" (pg_dump)
    postgres_version: str | None = None
    postgres_bin_dir: str | None = None
    started_at: str = field(default_factory=lambda: iso(clock.now()))
    duration_s: float = 0.0
    database: str | None = None  # where Immich's tables were found
    tables: dict[str, TableCount] = field(default_factory=dict)
    failed: list[FailedStatement] = field(default_factory=list)
    failed_count: int = 0
    problems: list[str] = field(default_factory=list)  # why it did not pass

    @property
    def passed(self) -> bool:
        return not self.problems

    def add_failed(self, statement: FailedStatement) -> None:
        self.failed_count += 1
        if len(self.failed) < LISTED:
            self.failed.append(statement)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "dump": self.dump, "kind": self.kind,
            "postgres_version": self.postgres_version,
            "postgres_bin_dir": self.postgres_bin_dir, "started_at": self.started_at,
            "duration_s": self.duration_s, "database": self.database,
            "tables": {k: v.as_dict() for k, v in self.tables.items()},
            "failed_statements": {"count": self.failed_count,
                                  "statements": [f.as_dict() for f in self.failed]},
            "problems": self.problems,
        }


# Kept per disk in the state dir ------------------------------------------------------------

@dataclass(frozen=True)
class DrillOutcome:
    """The last drill of one disk, as the history page and ``verify`` show it."""

    uuid: str
    label: str
    at: str  # ISO 8601
    passed: bool
    dump: str
    postgres_version: str = ""
    failed_statements: int = 0
    problem: str = ""  # the first reason it failed
    last_passed_at: str = ""  # the last drill that passed ("" if none), maybe this one
    last_passed_dump: str = ""

    @property
    def disk_name(self) -> str:
        if self.label and self.uuid:
            return f"{self.label} ({self.uuid})"
        return self.label or self.uuid or "-"


def load_outcomes(state_dir: Path) -> list[DrillOutcome]:
    """Every disk's last drill from ``<state_dir>/drills.toml`` (none if it is missing; a
    damaged one is kept aside and reported, see ``state``), newest first."""
    data = state.read_toml_or_empty(state_dir, STATE_NAME)
    names = {f for f in DrillOutcome.__dataclass_fields__}
    out = []
    for d in state.tables(data, "disk"):
        if not isinstance(d.get("uuid"), str):
            continue
        try:
            out.append(DrillOutcome(**{k: v for k, v in d.items() if k in names}))
        except TypeError:
            continue
    return sorted(out, key=lambda o: o.at, reverse=True)


def outcome_for(state_dir: Path, uuid: str | None) -> DrillOutcome | None:
    """The last drill of the disk ``uuid``, or None."""
    return next((o for o in load_outcomes(state_dir) if uuid and o.uuid == uuid), None)


def record(state_dir: Path, disk: dict[str, Any], result: DrillResult) -> DrillOutcome | None:
    """Keep ``result`` as the last drill of ``disk`` (its uuid, label), written atomically;
    return it as stored (None for a disk without a UUID, which is not kept)."""
    uuid = str(disk.get("uuid") or "")
    if not uuid:
        return None
    before = outcome_for(state_dir, uuid)
    passed_at, passed_dump = ((result.started_at, result.dump or "") if result.passed else
                              (before.last_passed_at, before.last_passed_dump) if before else
                              ("", ""))
    outcome = DrillOutcome(
        uuid=uuid, label=str(disk.get("label") or ""), at=result.started_at,
        passed=result.passed, dump=result.dump or "",
        postgres_version=result.postgres_version or "",
        failed_statements=result.failed_count,
        problem=result.problems[0] if result.problems else "",
        last_passed_at=passed_at, last_passed_dump=passed_dump)
    kept = [o for o in load_outcomes(state_dir) if o.uuid != uuid] + [outcome]
    state.write_toml(state_dir, STATE_NAME, {"disk": [asdict(o) for o in kept]})
    return outcome


# The drill -------------------------------------------------------------------------------

async def restore_drill(bin_dir: Path, database_dir: Path, status: StatusWriter) -> DrillResult:
    """Load the newest dump in ``database_dir`` into a throwaway PostgreSQL made with the
    programs in ``bin_dir`` (see the module doc); return what it found. Failures of the
    dump or of PostgreSQL are in the result's ``problems``; cancellation stops and removes
    the cluster before it propagates."""
    started = time.monotonic()
    result = DrillResult(postgres_bin_dir=str(bin_dir))
    try:
        newest = await asyncio.to_thread(_newest_dump, database_dir)
        if newest is None:
            result.problems.append(f"no Immich database dump in {database_dir} "
                                   "(immich-db-backup-*.sql.gz)")
            return result
        dump, size = newest
        result.dump = dump.name
        status.set_phase("drill", size, f"loading {dump.name} into a throwaway PostgreSQL")
        kind, why = await asyncio.to_thread(dumps.kind, dump)
        result.kind = kind
        if why:
            result.problems.append(f"{dump.name}: {why}")
            return result
        await _drill(bin_dir, dump, result, status)
        return result
    finally:
        result.duration_s = round(time.monotonic() - started, 1)


def _newest_dump(database_dir: Path) -> tuple[Path, int] | None:
    """The newest nightly dump in ``database_dir`` by the time in its name, and its size."""
    names = [p.name for p in database_dir.iterdir()] if database_dir.is_dir() else []
    newest = dumps.newest_dump(names)
    if newest is None:
        return None
    dump = database_dir / newest[0]
    return dump, dump.stat().st_size


@dataclass
class _Cluster:
    """A throwaway PostgreSQL in ``folder``, its programs run as ``user`` (None: as we are)."""

    bin_dir: Path
    folder: Path
    user: str | None
    server: execute.Service | None = None

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def argv(self, tool: str, *args: str) -> list[str]:
        return [str(self.bin_dir / tool), *args]

    def psql(self, database: str, *args: str) -> list[str]:
        return self.argv("psql", "-X", "-q", "-h", str(self.folder), "-p", PORT,
                         "-U", SUPERUSER, "-d", database, *args)

    async def query(self, database: str, sql: str) -> str:
        """Run one query; return its rows, unaligned. Raise CommandError when it fails."""
        lines: list[str] = []
        await execute.run(self.psql(database, "-At", "-v", "ON_ERROR_STOP=1", "-c", sql),
                          on_line=lines.append, env=_ENV, user=self.user)
        return "\n".join(lines)

    async def start(self) -> None:
        """initdb, then the server as our own child (not through ``pg_ctl start``, whose
        server would outlive us if we were killed: safety rule 11); wait until it is
        ready. Raise CommandError when it does not start."""
        await execute.run(self.argv("initdb", "-D", str(self.data), "--auth=trust",
                                    f"--username={SUPERUSER}", "--encoding=UTF8",
                                    "--locale=C", "--no-sync"), env=_ENV, user=self.user)
        folder = str(self.folder)
        options = [
            "-k", folder, "-c", "listen_addresses=", "-p", PORT,
            "-c", "unix_socket_permissions=0700",
            "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off",
            "-c", "logging_collector=on", "-c", "log_destination=csvlog",
            "-c", f"log_directory={folder}", "-c", "log_filename=server",
            "-c", "log_min_error_statement=error", "-c", "lc_messages=C",
        ]
        self.server = await execute.Service.start(
            self.argv("postgres", "-D", str(self.data), *options),
            log_to=str(self.folder / "startup.log"), env=_ENV, user=self.user)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not await asyncio.to_thread(_ready, self.data):
            if self.server.returncode is not None:
                raise CommandError("postgres", self.server.returncode, "")
            if time.monotonic() > deadline:
                raise CommandError("postgres", -1, f"not ready within {START_TIMEOUT_S:g} s")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop the server if it runs (immediate shutdown: nothing in it is worth
        keeping); make sure its postmaster is gone."""
        if self.server is not None:
            await self.server.stop(signal.SIGQUIT)
        await asyncio.to_thread(_kill_leftovers, self.data)


def _ready(data: Path) -> bool:
    """The server accepts connections: the status line of its ``postmaster.pid``."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[7].strip() == "ready"


_ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "LC_ALL": "C"}


def _tail(path: Path, size: int = 1000) -> str:
    """The last ``size`` bytes of a small log, on one line ("" if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return " ".join(f.read().decode(errors="replace").split())
    except OSError:
        return ""


def _kill_leftovers(data: Path) -> None:
    """SIGKILL any process still running with ``data`` in its arguments (a postmaster of
    the drill that its stop did not end), and wait for it to go."""
    target = str(data)
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if target in cmdline.read_bytes().decode(errors="replace").split("\0"):
                pids.append(int(cmdline.parent.name))
    for pid in pids:
        log.warning("ending PostgreSQL process %d of the drill", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def _drill(bin_dir: Path, dump: Path, result: DrillResult, status: StatusWriter) -> None:
    user = RUN_AS if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="immich-usb-backup-drill-"))
    cluster = _Cluster(bin_dir, folder, user)
    feeder: _Feeder | None = None
    feeding: asyncio.Future[None] | None = None
    try:
        if user:
            account = pwd.getpwnam(user)
            os.chown(folder, account.pw_uid, account.pw_gid)
        try:
            await cluster.start()
        except CommandError as exc:
            log_tail = await asyncio.to_thread(_tail, folder / "startup.log")
            result.problems.append(f"PostgreSQL did not start: {exc}"
                                   + (f"; its log ends: {log_tail}" if log_tail else ""))
            return
        version = await cluster.query("postgres", "SHOW server_version")
        result.postgres_version = version.split()[0] if version else None
        database = "postgres"
        if result.kind == "database dump":
            database = DATABASE
            await cluster.query("postgres", f'CREATE DATABASE "{DATABASE}"')
        feeder = _Feeder(dump, folder, result.kind == "cluster dump", user,
                         status.progress)
        await asyncio.to_thread(feeder.make_fifo)
        feeding = asyncio.ensure_future(asyncio.to_thread(feeder.run))
        load = await execute.run(cluster.psql(database, "-f", str(feeder.fifo)),
                                 ok_codes=(0, 1, 2, 3), env=_ENV)
        feeder.reader_gone.set()
        await feeding
        if feeder.problem:
            result.problems.append(f"{dump.name}: {feeder.problem}")
        for message in _psql_errors(load.stderr_tail):
            result.add_failed(FailedStatement(f"psql: {message}"))
        if load.returncode != 0:
            result.problems.append(f"psql stopped before the end of the dump (exit status "
                                   f"{load.returncode}): {load.stderr_tail.strip()[-500:]}")
        status.set_phase("drill", 0, "counting the rows of Immich's tables")
        for statement in await asyncio.to_thread(read_server_log, folder, feeder.copy_prefix):
            result.add_failed(statement)
        await _count(cluster, result, feeder.failed_copies)
    except CommandError as exc:
        result.problems.append(f"PostgreSQL failed: {exc}")
    except OSError as exc:
        result.problems.append(f"the drill could not run PostgreSQL: {exc}")
    finally:
        if feeder is not None:
            feeder.stop.set()
            feeder.reader_gone.set()
        await _to_the_end(_clean_up(cluster, feeding))


async def _clean_up(cluster: _Cluster, feeding: asyncio.Future[None] | None) -> None:
    await cluster.stop()
    if feeding is not None:
        with contextlib.suppress(Exception):
            await feeding
    await asyncio.to_thread(shutil.rmtree, cluster.folder, True)


async def _to_the_end(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even when this task is cancelled meanwhile (a second
    Ctrl-C must not leave a PostgreSQL running); then let the cancellation go on."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            value = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return value


async def _count(cluster: _Cluster, result: DrillResult, failed_copies: list[str]) -> None:
    """Find Immich's tables (in ``immich`` first, then in any database) and count rows."""
    listing = await cluster.query("postgres", _DATABASES_SQL)
    found: dict[str, set[str]] = {}
    for database in listing.splitlines():
        try:
            tables = await cluster.query(database, _TABLES_SQL)
        except CommandError:
            continue
        found[database] = set(tables.splitlines())
    home = next((db for db, tables in found.items()
                     if tables & set(TABLES["assets"])), None)
    if home is None:
        result.tables = {role: TableCount(None) for role in TABLES}
        result.problems.append("no assets table (asset or assets) in schema public of any "
                               "database after the load")
        return
    result.database = home
    for role, candidates in TABLES.items():
        table = next((n for n in candidates if n in found[home]), None)
        count = TableCount(table)
        result.tables[role] = count
        if table is None:
            if role in REQUIRED:
                result.problems.append(f"no {role} table ({' or '.join(candidates)}) in "
                                       f"database {home}")
            continue
        try:
            sql = f'SELECT count(*) FROM public."{table}"'  # noqa: S608
            count.rows = int(await cluster.query(home, sql))
        except (CommandError, ValueError) as exc:
            if role in REQUIRED:
                result.problems.append(f"the {table} table cannot be counted: {exc}")
            continue
        if role in REQUIRED and any(_unquote(c) in (table, f"public.{table}")
                                    for c in failed_copies):
            result.problems.append(f"the rows of the {table} table did not load")


def _unquote(name: str) -> str:
    return name.replace('"', "")


def _psql_errors(stderr: str) -> Iterator[str]:
    """psql's own errors (not the server's) in its stderr tail: "invalid command \\N"."""
    for line in stderr.splitlines():
        m = _PSQL_ERROR.match(line)
        if m:
            yield m.group("message")


def read_server_log(folder: Path, copy_prefix: str) -> list[FailedStatement]:
    """Every failed statement of a client in the server's csvlog (``server.csv``), in order.
    The drill's own ``COPY ... FROM '<fifo>'`` is shown as the dump had it: ``FROM stdin``."""
    path = folder / "server.csv"
    out: list[FailedStatement] = []
    fifo = re.compile(re.escape(f"'{copy_prefix}") + r"\d+\.fifo'")
    old_limit = csv.field_size_limit(1 << 30)
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            for row in csv.reader(f):
                if len(row) < 20:
                    continue
                severity, user = row[11], row[1]
                if severity not in ("ERROR", "FATAL", "PANIC") or (
                        not user and severity != "PANIC"):
                    continue
                statement = fifo.sub("stdin", row[19] or row[18])
                if len(statement) > STATEMENT_CHARS:
                    statement = statement[:STATEMENT_CHARS] + " …"
                out.append(FailedStatement(f"{severity}:  {row[13]}", statement.strip(),
                                           row[2], row[14], row[15]))
    except FileNotFoundError:
        pass
    finally:
        csv.field_size_limit(old_limit)
    return out


# Feeding the dump to psql -------------------------------------------------------------------

class _Feeder:
    """Streams the dump, gunzip'd and adjusted (see the module doc), into psql's FIFO.

    Runs in a thread. A ``COPY ... FROM stdin`` block becomes ``COPY ... FROM '<fifo>'``
    followed by ``COPY (SELECT 1) TO '<marker>'``: the server opens the FIFO when the
    COPY starts (its rows are then written into it), or, when the COPY failed, psql goes
    on and the server writes the marker (its rows are then skipped)."""

    def __init__(self, dump: Path, folder: Path, cluster_dump: bool, user: str | None,
                 on_bytes: Callable[[int], None]) -> None:
        self.dump = dump
        self.folder = folder
        self.fifo = folder / "dump.sql"
        self.copy_prefix = str(folder / "copy-")
        self.cluster_dump = cluster_dump
        self.user = user
        self.on_bytes = on_bytes
        self.stop = threading.Event()
        self.reader_gone = threading.Event()  # psql ended
        self.problem: str | None = None
        self.failed_copies: list[str] = []
        self.roles: set[bytes] = {SUPERUSER.encode()}
        self.copies = 0
        self._out = -1
        self._copy = -1  # the FIFO of the COPY block being fed; -2: its rows are skipped
        self._fifo: Path | None = None  # that FIFO's path

    def make_fifo(self) -> None:
        self._mkfifo(self.fifo)

    def _mkfifo(self, path: Path) -> None:
        os.mkfifo(path, 0o600)
        if self.user:
            account = pwd.getpwnam(self.user)
            os.chown(path, account.pw_uid, account.pw_gid)

    def run(self) -> None:
        try:
            self._out = self._open_writer(self.fifo, None)
            if self._out < 0:
                return
            self._feed()
        except _Stopped:
            pass
        except BrokenPipeError:
            if not self.reader_gone.is_set() and not self.stop.is_set():
                self.problem = "psql stopped reading the dump"
        finally:
            for fd in (self._copy, self._out):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._copy = self._out = -1

    def _open_writer(self, path: Path, marker: Path | None) -> int:
        """Open the FIFO ``path`` for writing once a reader has it open; -1 when psql
        ended first, or (``marker`` given) the server wrote ``marker`` first."""
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
            else:
                os.set_blocking(fd, True)
                return fd
            if self.stop.is_set():
                raise _Stopped
            if self.reader_gone.is_set() or (marker is not None and marker.exists()):
                return -1
            time.sleep(0.01)

    def _feed(self) -> None:
        read = 0

        def on_bytes(n: int) -> None:
            nonlocal read
            read += n
            self.on_bytes(read)

        stream = dumps.Stream(self.dump, on_bytes)
        pending = b""
        line_start = True  # whether ``pending`` starts a line
        for data in stream:
            if self.stop.is_set():
                raise _Stopped
            pending += data
            start = 0
            while (end := pending.find(b"\n", start)) >= 0:
                self._line(pending[start:end + 1], line_start)
                line_start = True
                start = end + 1
            pending = pending[start:]
            if len(pending) > LONG_LINE:
                self._line(pending, line_start, whole=False)
                pending, line_start = b"", False
        if stream.stopped_early:
            self.problem = f"{stream.problem}; the load stopped there"
            return
        if pending:
            self._line(pending, line_start)
        if stream.problem and "cut short" in stream.problem:
            self.problem = f"{stream.problem}: only its beginning could be loaded"
        else:
            self.problem = stream.problem

    def _line(self, line: bytes, line_start: bool, whole: bool = True) -> None:
        if self._copy != -1:  # in the rows of a COPY block
            if line_start and whole and line.rstrip(b"\r\n") == b"\\.":
                self._end_copy()
            elif self._copy >= 0:
                try:
                    _write_all(self._copy, line)
                except BrokenPipeError:  # the COPY failed on a row: skip the rest
                    self._close_copy(-2)
            return
        if line_start and whole:
            line = self._adjust(line)
            if self._copy != -1:
                return
        _write_all(self._out, line)

    def _adjust(self, line: bytes) -> bytes:
        """The line as psql gets it; starts a COPY block (and writes it) itself."""
        if line.startswith(SEARCH_PATH_OLD):
            return line.replace(SEARCH_PATH_OLD, SEARCH_PATH_NEW, 1)
        m = _COPY.match(line)
        if m:
            self._start_copy(line, m.group("table").decode(errors="replace"))
            return b""
        if self.cluster_dump and line.startswith(b"CREATE DATABASE "):
            return _LOCALE.sub(b"", line)
        if not self.cluster_dump:
            m = _OWNER.match(line)
            if m and m.group("role").strip(b'"') not in self.roles:
                role = m.group("role")
                self.roles.add(role.strip(b'"'))
                return (b"DO $drill$BEGIN CREATE ROLE " + role + b"; EXCEPTION WHEN OTHERS "
                        b"THEN NULL; END$drill$; " + line)
        return line

    def _start_copy(self, line: bytes, table: str) -> None:
        self.copies += 1
        fifo = Path(f"{self.copy_prefix}{self.copies}.fifo")
        marker = Path(f"{self.copy_prefix}{self.copies}.done")
        self._mkfifo(fifo)
        statement = line.rstrip(b"\r\n").removesuffix(b"FROM stdin;")
        _write_all(self._out, statement + b"FROM " + _literal(fifo) + b";\n"
                   + b"COPY (SELECT 1) TO " + _literal(marker) + b";\n")
        fd = self._open_writer(fifo, marker)
        if fd < 0:
            self.failed_copies.append(table)
        self._copy = fd if fd >= 0 else -2
        self._fifo = fifo

    def _end_copy(self) -> None:
        self._close_copy(-1)
        if self._fifo is not None:
            with contextlib.suppress(OSError):
                self._fifo.unlink()
            self._fifo = None

    def _close_copy(self, then: int) -> None:
        if self._copy >= 0:
            with contextlib.suppress(OSError):
                os.close(self._copy)
        self._copy = then


def _literal(path: Path) -> bytes:
    return b"'" + str(path).replace("'", "''").encode() + b"'"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# For verify's output and the history page ---------------------------------------------------

def describe(outcome: DrillOutcome | None, when: Callable[[str], str]) -> str:
    """"<time>, passed (<dump>)", with the last pass after a failure; ``when`` formats a
    time."""
    if outcome is None:
        return "none yet (verify --restore-drill)"
    text = f"{when(outcome.at)}, {'passed' if outcome.passed else 'failed'} ({outcome.dump or '-'})"
    if not outcome.passed:
        text += (f"; last passed {when(outcome.last_passed_at)} ({outcome.last_passed_dump})"
                 if outcome.last_passed_at else "; never passed")
    return text


def plain_time(value: str) -> str:
    """``2025-03-01 02:00`` in local time, from an ISO 8601 time."""
    try:
        return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return value or "?"
