"""``restore SOURCE --upload-location DIR --database TARGET``: a server back from the disk,
then proven.

In order, under the backup lock (no backup runs meanwhile), with the disk only read (a
device is mounted read-only, as for ``verify``):

1. the plan (``plan``, phase ``restore-plan``): what would be done and what a safety
   rule refuses; shown, and confirmed (``confirm``: the person on a terminal, or
   ``--yes``); a plan with a refusal, a dry run or no confirmation does nothing;
2. the files (``files``): ``library/`` into DIR, each file checked against the
   manifest in the same read, phase ``restore-files``;
3. the database (``targets``, ``sqlstream``, ``api``): with ``--replace-database`` the
   database it holds saved first (``restore-save``); the dump loaded in one transaction
   with Immich's search path fix (``restore-database``), or uploaded to Immich, which
   restores it;
4. the configuration (``configs``): the newest archive into a folder of its own beside
   DIR (``restore-config``);
5. the asset check against the restored server (``check``, ``restore-check``).

``Outcome`` says what happened, in numbers; ``passed`` only when the files, the database
and the check all did. docs/restore.md is the person's side, docs/design.md ("Restore")
the reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from immich_usb_backup import clock, layout, manifest
from immich_usb_backup.assetcheck import AssetCheck
from immich_usb_backup.config import Config
from immich_usb_backup.errors import BackupError, CommandError, Refused
from immich_usb_backup.hashing import Stopped
from immich_usb_backup.lock import backup_lock
from immich_usb_backup.restore import check, configs, files, targets
from immich_usb_backup.restore.api import ApiResult, restore_through_api
from immich_usb_backup.restore.configs import ConfigResult
from immich_usb_backup.restore.files import FilesResult, LibraryCopy, WriteFailed
from immich_usb_backup.restore.plan import (
    DumpInfo,
    Options,
    Plan,
    list_dumps,
    make_plan,
    parse_owner,
)
from immich_usb_backup.restore.sqlstream import SqlStream
from immich_usb_backup.restore.targets import API, PsqlTarget, TargetError
from immich_usb_backup.status import StatusWriter
from immich_usb_backup.target import Disk, find_backup_root, inspect_mount

__all__ = ["DumpInfo", "Options", "Outcome", "Plan", "TargetError", "list_device",
           "list_path", "parse_owner", "restore_device", "restore_path"]

log = logging.getLogger(__name__)
T = TypeVar("T")
Confirm = Callable[[Plan], Awaitable[bool]]


@dataclass
class DatabaseResult:
    dump: str
    into: str
    kind: str | None = None
    saved_to: Path | None = None
    loaded: bool = False
    counts: dict[str, int] = field(default_factory=dict)  # rows of Immich's tables
    error: str | None = None
    api: ApiResult | None = None


@dataclass
class Outcome:
    """What a restore did. ``status``: ``success``, ``failed``, ``refused`` (the plan has
    refusals), ``planned`` (a dry run), ``declined`` (not confirmed)."""

    status: str
    plan: Plan | None = None
    files: FilesResult | None = None
    database: DatabaseResult | None = None
    config: ConfigResult | None = None
    check: AssetCheck | None = None
    check_line: str | None = None
    problems: list[str] = field(default_factory=list)
    duration_s: float = 0.0


async def list_path(source: Path) -> list[DumpInfo]:
    """The dumps on the backup disk mounted at ``source``, newest first."""
    disk = await inspect_mount(source)
    root = await asyncio.to_thread(find_backup_root, disk)
    return await asyncio.to_thread(list_dumps, root)


@contextlib.asynccontextmanager
async def _read_only(device: str) -> AsyncIterator[Path]:
    """``device`` (``/dev/...``, ``UUID=...``) mounted read-only meanwhile, if it is not
    mounted already; its mount point. Refused for a file system that is not exFAT."""
    from immich_usb_backup.udisks import UDisks, mounted  # noqa: PLC0415 - dbus when needed

    udisks = await UDisks.connect()
    try:
        info = await udisks.wait_for_filesystem(await udisks.device_for(device))
        if info.fs_type != "exfat":
            raise Refused(f"{device} holds {info.fs_type or 'no'} file system, not exFAT")
        async with mounted(udisks, info, read_only=True) as mount:
            yield mount.mount_point
    finally:
        udisks.close()


async def list_device(device: str) -> list[DumpInfo]:
    """``list_path`` for a device, mounted read-only meanwhile."""
    async with _read_only(device) as mount_point:
        return await list_path(mount_point)


async def restore_device(config: Config, device: str, options: Options,
                         confirm: Confirm) -> Outcome:
    """``restore_path`` for a device (``/dev/...``, ``UUID=...``), mounted read-only for
    the restore, if it is not mounted already, and unmounted again."""
    target = targets.parse(options.database, config.database.postgres_bin_dir)
    async with _read_only(device) as mount_point:
        return await _restore(config, mount_point, options, confirm, target)


async def restore_path(config: Config, source: Path, options: Options,
                       confirm: Confirm) -> Outcome:
    """Restore from the backup disk mounted at ``source`` (see the module doc). Raise
    TargetError for a TARGET that is none, Refused when another run holds the lock or
    ``source`` is not a backup disk."""
    target = targets.parse(options.database, config.database.postgres_bin_dir)
    return await _restore(config, source, options, confirm, target)


async def _restore(config: Config, source: Path, options: Options, confirm: Confirm,
                   target: PsqlTarget | str) -> Outcome:
    started = time.monotonic()
    with backup_lock(config.state_dir):
        disk = await inspect_mount(source)
        root = await asyncio.to_thread(find_backup_root, disk)
        status = StatusWriter(config.state_dir, {"uuid": disk.uuid, "label": disk.label,
                                                 "mount_point": str(disk.mount_point)})
        try:
            status.set_phase("restore-plan", 0, "looking at the disk, the upload location "
                             "and the database")
            plan = await make_plan(config, disk, root, options, target, clock.now())
            if plan.refusals:
                outcome = Outcome("refused", plan)
            elif options.dry_run:
                outcome = Outcome("planned", plan)
            elif not await confirm(plan):
                outcome = Outcome("declined", plan)
            else:
                outcome = await _carry_out(config, disk, plan, options, target, status)
        finally:
            status.clear()
    outcome.duration_s = round(time.monotonic() - started, 1)
    return outcome


async def _in_thread(stop: threading.Event, func: Callable[[], T]) -> T:
    """``func`` in a thread; on cancellation it is told to stop and waited for."""
    task = asyncio.ensure_future(asyncio.to_thread(func))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                continue
            except Exception:  # it stopped; the cancellation is what counts
                break
        raise


async def _carry_out(config: Config, disk: Disk, plan: Plan, options: Options,
                     target: PsqlTarget | str, status: StatusWriter) -> Outcome:
    outcome = Outcome("failed", plan)
    stop = threading.Event()
    work = Path(tempfile.mkdtemp(prefix="restore-", dir=config.state_dir))
    try:
        db_path = work / files.DB_NAME
        outcome.files = await _files(plan, options, work, stop, status)
        outcome.problems += outcome.files.problems()
        if plan.dump is not None:
            outcome.database = await _database(config, plan, target, work, status, stop)
            if outcome.database.error:
                outcome.problems.append(f"database: {outcome.database.error}")
        if plan.config_archive is not None and plan.config_to is not None:
            status.set_phase("restore-config", 0, f"extracting {plan.config_archive.name}")
            try:
                outcome.config = await asyncio.to_thread(
                    configs.extract, plan.config_archive, plan.config_to)
                outcome.problems += outcome.config.problems()
            except (OSError, ValueError, zipfile.BadZipFile) as exc:  # the rest goes on
                outcome.problems.append(f"config: {plan.config_archive.name} could not be "
                                        f"extracted into {plan.config_to}: {exc}")
        if outcome.database is not None and outcome.database.loaded:
            outcome.check = await _check(config, plan, target, work, db_path, stop, status)
            outcome.check_line = check.describe(outcome.check, plan.dest)
            outcome.problems += outcome.check.problems()
            if not check.passed(outcome.check) and not outcome.check.problems():
                outcome.problems.append(f"assets: the check did not pass: {outcome.check_line}")
        passed = (outcome.files.ok and outcome.database is not None
                  and outcome.database.loaded and outcome.check is not None
                  and check.passed(outcome.check))
        outcome.status = "success" if passed and not outcome.problems else "failed"
    except WriteFailed as exc:
        outcome.problems.append(f"files: {exc}; the restore stopped there (the files "
                                f"copied so far are in {plan.dest}; run it again with "
                                "--merge once the cause is fixed)")
    except (BackupError, OSError) as exc:
        outcome.problems.append(str(exc))
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    return outcome


async def _files(plan: Plan, options: Options, work: Path, stop: threading.Event,
                 status: StatusWriter) -> FilesResult:
    status.set_phase("restore-files", plan.library_bytes or 0,
                     f"copying {layout.LIBRARY}/ into {plan.dest}")
    on_bytes = status.counter()

    def copy() -> FilesResult:
        db = files.open_db(work)
        try:
            copier = LibraryCopy(plan.root / layout.LIBRARY, plan.dest, db, owner=plan.owner,
                                 merge=options.merge, stop=stop, on_bytes=on_bytes)
            files.load_manifest(db, plan.root / manifest.NAME, copier.result)
            result = copier.run()
        finally:
            db.close()
        os.sync()  # the photos are on the server's disk before the database says so
        return result

    try:
        return await _in_thread(stop, copy)
    except Stopped:
        raise asyncio.CancelledError from None


async def _database(config: Config, plan: Plan, target: PsqlTarget | str, work: Path,
                    status: StatusWriter, stop: threading.Event) -> DatabaseResult:
    assert plan.dump is not None
    dump = plan.root / layout.DATABASE / plan.dump.name
    result = DatabaseResult(plan.dump.name, plan.target, plan.dump.kind)
    if not isinstance(target, PsqlTarget):
        assert target == API and config.immich.url and config.immich.api_key_file
        result.api = await restore_through_api(config.immich.url, config.immich.api_key_file,
                                               dump, status)
        result.loaded, result.error = result.api.restored, result.api.error
        return result
    if plan.save_to is not None:
        status.set_phase("restore-save", 0, f"saving the database as it is into "
                         f"{plan.save_to}")
        try:
            await target.save(plan.save_to)
        except (BackupError, OSError) as exc:
            result.error = (f"the database as it was could not be saved ({exc}): it was "
                            "left as it is, nothing was loaded")
            return result
        result.saved_to = plan.save_to
    status.set_phase("restore-database", plan.dump.size, f"loading {dump.name}")
    stream = SqlStream(dump, cluster_database=plan.cluster_database,
                       target_database=target.database, replace=plan.save_to is not None,
                       on_bytes=status.counter(), stop=stop)
    try:
        loaded = await target.load(stream)
    except (CommandError, OSError) as exc:
        result.error = f"psql could not run: {exc}"
        return result
    if loaded.returncode != 0 or not stream.committed:
        why = (targets.first_error(CommandError("psql", loaded.returncode,
                                                 loaded.stderr_tail))
               if loaded.returncode != 0 else stream.problem)
        result.error = (f"the dump did not load ({why}); the database was left as it "
                        "was" + (f" (saved in {plan.save_to})" if plan.save_to else ""))
        return result
    result.loaded = True
    state = await target.state()
    if state.assets is not None:
        result.counts["assets"] = state.assets
    return result


async def _check(config: Config, plan: Plan, target: PsqlTarget | str, work: Path,
                 db_path: Path, stop: threading.Event, status: StatusWriter) -> AssetCheck:
    status.set_phase("restore-check", 0, "checking the restored database against the files")
    if isinstance(target, PsqlTarget):
        rows = await target.rows()
        asset_rows = work / "asset.rows"
        file_rows = work / "asset_file.rows" if rows.file_table else None
        if rows.asset_table:
            await target.copy_out(rows.asset_table, rows.asset_columns, asset_rows)
        if rows.file_table and file_rows is not None:
            await target.copy_out(rows.file_table, rows.file_columns, file_rows)
        chunks = check.chunks_read_back(rows, asset_rows, file_rows) if rows.asset_table \
            else check.chunks_read_back(rows, asset_rows, None)
    else:
        assert plan.dump is not None
        chunks = check.chunks_of_dump(plan.root / layout.DATABASE / plan.dump.name)
    lookup, close = check.restored_lookup(db_path, plan.dest)
    try:
        return await _in_thread(stop, lambda: check.run_check(
            chunks, lookup, config.immich.media_location, stop))
    finally:
        close()
