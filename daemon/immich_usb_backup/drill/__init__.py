"""``verify TARGET --restore-drill``: load the newest dump into a throwaway PostgreSQL.

A dump that reads to its end can still fail to load. The drill proves it loads: the
newest Immich dump on the disk (by the time in its name) is streamed (``feeder``) into a
PostgreSQL cluster of its own (``postgres``), removed afterwards whatever happened. It
passes when Immich's assets and users tables exist and can be counted (``asset`` or
``assets``, ``user`` or ``users``), the data of neither failed to load, and the dump
was complete. The outcome is kept per disk (``outcomes``). docs/usage.md says what a
user sees; docs/design.md why it is built so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from immich_usb_backup import dumps, execute
from immich_usb_backup.drill.feeder import Feeder
from immich_usb_backup.drill.outcomes import (
    STATE_NAME,
    DrillOutcome,
    describe,
    load_outcomes,
    outcome_for,
    plain_time,
    record,
)
from immich_usb_backup.drill.postgres import (
    ENV,
    RUN_AS,
    TOOLS,
    Cluster,
    DrillUnavailable,
    find_postgres,
    psql_errors,
    read_server_log,
    tail,
)
from immich_usb_backup.drill.result import DrillResult, FailedStatement, TableCount
from immich_usb_backup.errors import CommandError
from immich_usb_backup.status import StatusWriter

__all__ = ["STATE_NAME", "TOOLS", "DrillOutcome", "DrillResult", "DrillUnavailable",
           "FailedStatement", "TableCount", "describe", "find_postgres", "load_outcomes",
           "outcome_for", "plain_time", "record", "restore_drill"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DATABASE = "immich"  # a database dump goes into a new database of this name
# Immich's main tables: what the report calls them -> their names, newest first
TABLES = {"assets": ("asset", "assets"), "users": ("user", "users"),
          "albums": ("album", "albums")}
REQUIRED = ("assets", "users")

# the drill's own queries, made of the constants above only
_DATABASES_SQL = ("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
                  "ORDER BY datname <> 'immich', datname")  # DATABASE first
_WANTED = ", ".join(f"'{n}'" for n in sorted({n for ns in TABLES.values() for n in ns}))
_TABLES_SQL = f"SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename IN ({_WANTED})"  # noqa: E501, S608


async def restore_drill(bin_dir: Path, database_dir: Path, status: StatusWriter) -> DrillResult:
    """Load the newest dump in ``database_dir`` into a throwaway PostgreSQL made with the
    programs in ``bin_dir`` (see the module doc); return what it found. Failures of the
    dump or of PostgreSQL are in the result's ``problems``; cancellation stops and removes
    the cluster before it propagates."""
    started = time.monotonic()
    result = DrillResult(postgres_bin_dir=str(bin_dir))
    try:
        newest = await asyncio.to_thread(dumps.newest_in, database_dir)
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


async def _drill(bin_dir: Path, dump: Path, result: DrillResult, status: StatusWriter) -> None:
    user = RUN_AS if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="immich-usb-backup-drill-"))
    cluster = Cluster(bin_dir, folder, user)
    feeder: Feeder | None = None
    feeding: asyncio.Future[None] | None = None
    try:
        if user:
            account = pwd.getpwnam(user)
            os.chown(folder, account.pw_uid, account.pw_gid)
        try:
            await cluster.start()
        except CommandError as exc:
            log_tail = await asyncio.to_thread(tail, folder / "startup.log")
            result.problems.append(f"PostgreSQL did not start: {exc}"
                                   + (f"; its log ends: {log_tail}" if log_tail else ""))
            return
        version = await cluster.query("postgres", "SHOW server_version")
        result.postgres_version = version.split()[0] if version else None
        database = "postgres"
        if result.kind == "database dump":
            database = DATABASE
            await cluster.query("postgres", f'CREATE DATABASE "{DATABASE}"')
        feeder = Feeder(dump, folder, result.kind == "cluster dump", user,
                         status.counter())
        await asyncio.to_thread(feeder.make_fifo)
        feeding = asyncio.ensure_future(asyncio.to_thread(feeder.run))
        load = await execute.run(cluster.psql(database, "-f", str(feeder.fifo)),
                                 ok_codes=(0, 1, 2, 3), env=ENV, user=cluster.user)
        feeder.reader_gone.set()
        await feeding
        if feeder.problem:
            result.problems.append(f"{dump.name}: {feeder.problem}")
        for message in psql_errors(load.stderr_tail):
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


async def _clean_up(cluster: Cluster, feeding: asyncio.Future[None] | None) -> None:
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


async def _count(cluster: Cluster, result: DrillResult, failed_copies: list[str]) -> None:
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
