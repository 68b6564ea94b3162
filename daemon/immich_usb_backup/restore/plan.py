"""What a restore would do, found before anything is done: the plan.

Everything the person confirms is found here, reading only: the disk's backup (its last
run, the library's size, the manifest), the upload location (absent, empty, or not),
its free space and owner, the dump (the newest by the time in its name, or
``--dump NAME``), the target database (does it answer, does it hold Immich's tables,
is something connected to it), the config archive and where it goes. Whatever a safety
rule forbids is a line of ``refusals``: a plan with any is not carried out (safety rule
12: restore never overwrites).
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import tomllib
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from immich_usb_backup import dumps, immich, layout, manifest
from immich_usb_backup.assets import CLUSTER_DUMP
from immich_usb_backup.config import Config
from immich_usb_backup.fsutil import free_bytes
from immich_usb_backup.restore import configs, sqlstream
from immich_usb_backup.restore.targets import API, DbState, PsqlTarget
from immich_usb_backup.target import Disk
from immich_usb_backup.text import human_bytes, plural

IMMICH_FOLDERS = ("upload", "library", "profile", "thumbs", "encoded-video", "backups")
SHOWN = 5  # entries of a non-empty upload location named
API_SINCE = (2, 5, 0)  # Immich restores a dump through its API from this version on


@dataclass(frozen=True)
class Options:
    """The command line's choices (see docs/usage.md, ``restore``)."""

    upload_location: Path
    database: str
    dry_run: bool = False
    merge: bool = False
    owner: tuple[int, int] | None = None
    dump: str | None = None
    replace_database: bool = False


@dataclass
class DumpInfo:
    """One dump on the disk, as ``--list`` shows it."""

    name: str
    size: int
    taken: datetime | None
    immich: str | None
    postgres: str | None
    kind: str | None = None
    problem: str | None = None


@dataclass
class Plan:
    disk: dict[str, Any]
    root: Path
    dest: Path
    target: str  # shown (no passwords)
    backup: dict[str, Any] = field(default_factory=dict)  # backup-info.toml's [backup]
    library_files: int | None = None
    library_bytes: int | None = None
    manifest: bool = False
    dest_state: str = "absent"  # absent | empty | not empty
    free_bytes: int | None = None
    owner: tuple[int, int] = (0, 0)
    dump: DumpInfo | None = None
    db: DbState | None = None
    cluster_database: str | None = None  # a cluster dump: the database loaded from it
    save_to: Path | None = None  # --replace-database: where the old database goes first
    immich_version: str | None = None  # immich-api: the server's
    config_archive: Path | None = None
    config_files: int = 0
    config_to: Path | None = None
    refusals: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def owner_text(self) -> str:
        return f"{_name(pwd.getpwuid, self.owner[0])}:{_name(grp.getgrgid, self.owner[1])}"


def _name(lookup: Any, number: int) -> str:
    try:
        return str(lookup(number)[0])
    except KeyError:
        return str(number)


def list_dumps(root: Path) -> list[DumpInfo]:
    """The dumps in the backup folder ``root``, newest first (by the time in the name)."""
    folder = root / layout.DATABASE
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name) if folder.is_dir() else []:
        taken = dumps.dump_time(entry.name)
        if taken is None or not entry.is_file(follow_symlinks=False):
            continue
        postgres = entry.name.rpartition("-pg")[2].removesuffix(".sql.gz") if "-pg" in \
            entry.name else None
        kind, problem = dumps.kind(Path(entry.path))
        out.append(DumpInfo(entry.name, entry.stat().st_size, taken,
                            dumps.immich_version(entry.name), postgres, kind, problem))
    return sorted(out, key=lambda d: d.taken or datetime.min, reverse=True)


def owner_of(path: Path) -> tuple[int, int]:
    """The owner of ``path``, or of its nearest existing parent."""
    for candidate in (path, *path.parents):
        try:
            st = candidate.stat()
        except OSError:
            continue
        return st.st_uid, st.st_gid
    return os.geteuid(), os.getegid()


def _files_side(plan: Plan, disk: Disk, options: Options) -> None:
    """The library on the disk and the upload location it goes to (in a thread)."""
    info = plan.root / layout.INFO
    try:
        plan.backup = tomllib.loads(info.read_text(encoding="utf-8")).get("backup", {})
    except (OSError, ValueError):
        plan.notes.append(f"the disk has no readable {layout.INFO}: its last backup is "
                          "not known")
    plan.library_files = _int(plan.backup.get("library_files"))
    plan.library_bytes = _int(plan.backup.get("library_bytes"))
    plan.manifest = (plan.root / manifest.NAME).is_file()
    if not (plan.root / layout.LIBRARY).is_dir():
        plan.refusals.append(f"the disk has no {layout.LIBRARY}/ folder: there are no "
                             "photos to restore")
    if not plan.manifest:
        plan.notes.append(f"the disk has no {manifest.NAME}: the files cannot be checked "
                          "as they are copied (the restore will not pass)")
    dest = plan.dest
    mount = Path(os.path.realpath(disk.mount_point))
    if dest == mount or mount in dest.parents or dest in mount.parents:
        plan.refusals.append(f"{dest} is on the backup disk (or holds it): the disk is "
                             "only read; give the server's upload location")
    if dest.exists() and not dest.is_dir():
        plan.refusals.append(f"{dest} exists and is not a folder")
    elif dest.is_dir():
        with os.scandir(dest) as it:
            names = sorted(e.name for e in it)
        plan.dest_state = "not empty" if names else "empty"
        if names and not options.merge:
            plan.refusals.append(_not_empty(dest, names))
    plan.owner = options.owner or owner_of(dest)
    probe = next(p for p in (dest, *dest.parents) if p.exists())
    plan.free_bytes = _free(probe)
    needed = plan.library_bytes
    if needed and plan.free_bytes is not None and needed > plan.free_bytes:
        if options.merge:
            plan.notes.append(f"up to {human_bytes(needed)} to copy, "
                              f"{human_bytes(plan.free_bytes)} free at {probe}")
        else:
            plan.refusals.append(f"the library needs {human_bytes(needed)}, {probe} has "
                                 f"{human_bytes(plan.free_bytes)} free")
    archive = configs.newest_archive(plan.root)
    if archive is not None:
        plan.config_archive = archive
        plan.config_to = configs.destination(dest, archive)
        try:
            plan.config_files = configs.count_files(archive)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            plan.notes.append(f"config: {archive.name} cannot be read ({exc}): it is "
                              "left out")
            plan.config_archive = None


def _not_empty(dest: Path, names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more"
                                       if len(names) > SHOWN else "")
    text = (f"{dest} is not empty ({shown}): restore never writes over files; give an "
            "empty or new folder, or --merge to copy only what it lacks")
    if set(names) <= {*IMMICH_FOLDERS, ".immich"}:
        text += (" (it holds only Immich's own folders, as Immich makes them when it "
                 "starts: --merge adds the backup's files beside them)")
    return text


def _free(path: Path) -> int | None:
    try:
        return free_bytes(path)
    except OSError:
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _choose_dump(plan: Plan, options: Options) -> None:
    found = list_dumps(plan.root)
    if options.dump is not None:
        chosen = next((d for d in found if d.name == options.dump), None)
        if chosen is None:
            names = ", ".join(d.name for d in found[:3]) or "none"
            plan.refusals.append(f"--dump {options.dump}: no such dump in {layout.DATABASE}/ "
                                 f"on the disk (the newest: {names}; --list shows them all)")
            return
    elif found:
        chosen = found[0]
    else:
        plan.refusals.append(f"the disk has no database dump in {layout.DATABASE}/: the "
                             "database cannot be restored")
        return
    plan.dump = chosen
    if chosen.problem:
        plan.refusals.append(f"{chosen.name}: {chosen.problem}")


async def make_plan(config: Config, disk: Disk, root: Path, options: Options,
                    target: PsqlTarget | str, now: datetime) -> Plan:
    """The plan for restoring the backup in ``root`` (on ``disk``) with ``options``;
    ``now`` names the saved database."""
    dest = Path(os.path.realpath(options.upload_location))
    plan = Plan({"uuid": disk.uuid, "label": disk.label,
                 "mount_point": str(disk.mount_point)}, root, dest, str(target))
    await asyncio.to_thread(_files_side, plan, disk, options)
    await asyncio.to_thread(_choose_dump, plan, options)
    if target == API:
        await _api_side(plan, config, options)
    elif isinstance(target, PsqlTarget):
        await _psql_side(plan, target, options, now)
    return plan


async def _psql_side(plan: Plan, target: PsqlTarget, options: Options,
                     now: datetime) -> None:
    db = plan.db = await target.state()
    if not db.reachable:
        plan.refusals.append(f"the database {target} does not answer: {db.error}")
        return
    if db.immich_tables and not options.replace_database:
        assets = "" if db.assets is None else f", {plural(db.assets, 'asset')}"
        plan.refusals.append(
            f"the database {db.database} already holds Immich's tables "
            f"({', '.join(db.immich_tables)}{assets}): restore never overwrites; "
            "--replace-database saves it next to the upload location first, then "
            "replaces it")
    if db.sessions:
        plan.refusals.append(
            f"{plural(db.sessions, 'other connection')} to the database {db.database} "
            f"{'is' if db.sessions == 1 else 'are'} open: stop Immich first (docker "
            "compose stop immich-server; NixOS: systemctl stop immich-server)")
    if db.immich_tables and options.replace_database:
        plan.save_to = _free_name(plan.dest.parent / f"immich-db-before-restore-"
                                  f"{now:%Y%m%dT%H%M%S}.sql.gz")
    dump = plan.dump
    if dump is None or dump.kind != CLUSTER_DUMP:
        return
    names = await asyncio.to_thread(sqlstream.cluster_databases, plan.root /
                                    layout.DATABASE / dump.name)
    chosen = sqlstream.choose_database(names, db.database) if names else db.database
    if chosen is None:
        plan.refusals.append(f"the cluster dump {dump.name} holds the databases "
                             f"{', '.join(names)}: which is Immich's cannot be told; "
                             "restore into a database named like Immich's")
    plan.cluster_database = chosen
    if dump.postgres and db.server_version and _major(dump.postgres) > _major(
            db.server_version):
        plan.notes.append(f"the dump comes from PostgreSQL {dump.postgres}, the target "
                          f"runs {db.server_version}: an older server may not load it")


async def _api_side(plan: Plan, config: Config, options: Options) -> None:
    url, key_file = config.immich.url, config.immich.api_key_file
    if not url or not key_file:
        plan.refusals.append("--database immich-api needs [immich] url and api_key_file "
                             "in the configuration")
        return
    try:
        key = await asyncio.to_thread(immich.read_key, key_file)
        version = await asyncio.to_thread(immich.server_version, url)
        plan.immich_version = ".".join(map(str, version))
        if version < API_SINCE:
            plan.refusals.append(f"Immich {plan.immich_version} at {url} cannot restore a "
                                 "dump through its API (2.5 or newer can): give a psql "
                                 "target (a PostgreSQL URL or docker:CONTAINER)")
            return
        if await asyncio.to_thread(immich.in_maintenance, url):
            plan.refusals.append(f"Immich at {url} is in maintenance mode: end it (or let "
                                 "its restore finish) first")
        await asyncio.to_thread(immich.database_backups, url, key)
    except immich.ImmichError as exc:
        plan.refusals.append(str(exc))
        return
    if not options.replace_database:
        plan.refusals.append("Immich's database holds its tables while Immich runs: its "
                             "restore replaces them; say --replace-database (Immich saves "
                             "the database it has as a restore point first)")


def _free_name(path: Path) -> Path:
    candidate, n = path, 2
    while os.path.lexists(candidate):
        candidate = path.with_name(path.name.replace(".sql.gz", f"-{n}.sql.gz"))
        n += 1
    return candidate


def _major(version: str) -> int:
    head = version.split(".", maxsplit=1)[0]
    return int(head) if head.isdigit() else 0


def parse_owner(text: str) -> tuple[int, int]:
    """``UID:GID`` or ``USER:GROUP`` (names of this machine). Raise ValueError."""
    user, sep, group = text.partition(":")
    if not sep or not user or not group:
        raise ValueError(f"--owner {text}: give UID:GID or USER:GROUP (immich:immich)")

    def number(value: str, lookup: Any, what: str) -> int:
        if value.isdigit():
            return int(value)
        try:
            return int(lookup(value)[2])
        except KeyError:
            raise ValueError(f"--owner {text}: no {what} {value} on this machine") from None

    return number(user, pwd.getpwnam, "user"), number(group, grp.getgrnam, "group")
