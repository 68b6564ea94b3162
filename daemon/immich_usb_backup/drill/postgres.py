"""The drill's PostgreSQL: where its programs are, and a throwaway cluster of its own.

``Cluster`` makes a cluster with ``initdb`` in a temporary folder, runs its server as our
own child (``execute.Service``: it dies with us, however we die), reached only through a
Unix socket in that folder, and ends it with an immediate shutdown. As root its programs
run as ``nobody``: PostgreSQL refuses to run as root, and a dump is SQL run by a
superuser, which can run programs as the server's user. The server's csvlog
(``read_server_log``) lists every statement that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
import os
import pwd
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from immich_usb_backup import execute
from immich_usb_backup.drill.result import FailedStatement
from immich_usb_backup.errors import BackupError, CommandError

log = logging.getLogger(__name__)

TOOLS = ("initdb", "postgres", "psql")
START_TIMEOUT_S = 120.0
DEBIAN_BINS = Path("/usr/lib/postgresql")
RUN_AS = "nobody"
SUPERUSER = "postgres"  # the throwaway cluster's superuser
PORT = "5432"  # only names the socket file: no TCP
STATEMENT_CHARS = 400
_PSQL_ERROR = re.compile(r"^psql:.*?:\d+: error: (?P<message>.*)$")


class DrillUnavailable(BackupError):
    """This machine cannot run the drill: PostgreSQL's programs (or the user nobody) are
    missing."""


def _has_tools(folder: Path) -> list[str]:
    """The programs of TOOLS that ``folder`` lacks."""
    return [t for t in TOOLS if not os.access(folder / t, os.X_OK)]


def version_key(folder: Path) -> list[int]:
    """The PostgreSQL version of a ``/usr/lib/postgresql/<version>/bin`` folder, to sort."""
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
                         key=version_key, reverse=True)
    for folder in candidates:
        if not _has_tools(folder):
            return folder
    raise DrillUnavailable(
        "the restore drill needs PostgreSQL's server programs (initdb, postgres, "
        "psql): none found on PATH or in /usr/lib/postgresql/*/bin. Install PostgreSQL "
        "(Debian/Ubuntu: apt install postgresql; NixOS: pkgs.postgresql in "
        "environment.systemPackages), or set database.postgres_bin_dir to the folder that "
        "holds them")


@dataclass
class Cluster:
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
                          on_line=lines.append, env=ENV, user=self.user)
        return "\n".join(lines)

    async def start(self) -> None:
        """initdb, then the server as our own child (not through ``pg_ctl start``, whose
        server would outlive us if we were killed: safety rule 11); wait until it is
        ready. Raise CommandError when it does not start."""
        await execute.run(self.argv("initdb", "-D", str(self.data), "--auth=trust",
                                    f"--username={SUPERUSER}", "--encoding=UTF8",
                                    "--locale=C", "--no-sync"), env=ENV, user=self.user)
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
            log_to=str(self.folder / "startup.log"), env=ENV, user=self.user)
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
        await asyncio.to_thread(kill_leftovers, self.data)


def _ready(data: Path) -> bool:
    """The server accepts connections: the status line of its ``postmaster.pid``."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[7].strip() == "ready"


ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "LC_ALL": "C"}


def tail(path: Path, size: int = 1000) -> str:
    """The last ``size`` bytes of a small log, on one line ("" if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return " ".join(f.read().decode(errors="replace").split())
    except OSError:
        return ""


def kill_leftovers(data: Path) -> None:
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


def psql_errors(stderr: str) -> Iterator[str]:
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


