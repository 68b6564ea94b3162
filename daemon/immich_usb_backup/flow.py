"""One backup run, top to bottom.

target mounted exFAT? -> marker folder? -> lock -> preflight (source sane, dump found,
library compared, deletions within limits, fits on the disk) -> database -> config ->
library -> README.txt + backup-info.toml -> sync -> history record.

``run_backup`` is the boundary of a run: whatever happens inside ends as exactly one
history record (success, partial, failed, refused, interrupted).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from immich_usb_backup import __version__, history, policy
from immich_usb_backup.config import Config
from immich_usb_backup.errors import BackupError, Refused
from immich_usb_backup.fsutil import BackupRoot, cluster_size, free_bytes
from immich_usb_backup.lock import backup_lock
from immich_usb_backup.scan import Plan, Problems
from immich_usb_backup.status import StatusWriter
from immich_usb_backup.steps import (
    RunContext,
    StepResult,
    config_archive,
    database,
    disk_notes,
    library,
)
from immich_usb_backup.target import (
    Disk,
    check_no_overlap,
    find_backup_root,
    inspect_mount,
)

log = logging.getLogger(__name__)

WORK_DIR = "run"
SMALL_FILES_RESERVE = 1024 * 1024  # README, backup-info, folder entries


def _now() -> datetime:
    return datetime.now().astimezone()


async def run_backup(
    config: Config, target: Path, *, trigger: str = "cli", mode: str | None = None
) -> dict[str, Any]:
    """Back up onto the exFAT file system mounted at ``target``; return the history record.

    The record is appended to the history whatever the outcome. Cancellation (Ctrl-C,
    SIGTERM) stops rsync, is recorded as ``interrupted`` and then propagates.
    """
    started = _now()
    t0 = time.monotonic()
    mode = mode or config.library.mode
    problems = Problems()
    record: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": None,
        "status": "failed",
        "trigger": trigger,
        "mode": mode,
        "disk": {"uuid": None, "label": None},
        "target": str(target),
        "files_transferred": 0,
        "bytes_transferred": 0,
        "duration_s": 0.0,
        "problems": [],
        "host": socket.gethostname(),
        "version": __version__,
    }
    results: list[StepResult] = []
    ctx: RunContext | None = None
    cancelled = False
    try:
        with backup_lock(config.state_dir):
            try:
                disk = await inspect_mount(target)
                record["disk"] = {"uuid": disk.uuid, "label": disk.label}
                root = BackupRoot(find_backup_root(disk))
                check_no_overlap(
                    root.root, disk, config.immich.upload_location, config.state_dir
                )
                ctx = _context(config, disk, root, problems, started, mode)
                await _backup(ctx, results)
                record["status"] = "partial" if len(problems) else "success"
            except asyncio.CancelledError:
                record["status"] = "interrupted"
                problems.add("the backup was interrupted; the next run finishes the job")
                cancelled = True
            except Exception as exc:
                record["status"], message = _failure(exc)
                problems.add(message)
            finally:
                if ctx is not None:
                    if ctx.writing:
                        _finish_on_disk(ctx, record, results, t0)
                    ctx.status.clear()
                    shutil.rmtree(ctx.work_dir, ignore_errors=True)
    except Refused as exc:  # the lock is held by another run
        record["status"] = "refused"
        problems.add(str(exc))
    finally:
        _fill_record(record, results, problems, t0)
        history.append(config.state_dir, record)
        log.info("backup %s: %s", record["status"], "; ".join(record["problems"][:3]))
    if cancelled:
        raise asyncio.CancelledError
    return record


def _failure(exc: Exception) -> tuple[str, str]:
    """The history status and message for an exception that ended a run."""
    if isinstance(exc, Refused):
        return "refused", str(exc)
    if isinstance(exc, BackupError):
        return "failed", str(exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return "failed", f"{exc.strerror or exc}{where}"
    log.error("backup failed unexpectedly", exc_info=exc)  # the one catch-all
    return "failed", f"unexpected error: {exc!r}"


def _context(
    config: Config, disk: Disk, root: BackupRoot, problems: Problems, started: datetime,
    mode: str,
) -> RunContext:
    work = config.state_dir / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    status = StatusWriter(
        config.state_dir,
        {"uuid": disk.uuid, "label": disk.label, "mount_point": str(disk.mount_point)},
    )
    return RunContext(config, disk, root, status, problems, work, started, mode)


async def _backup(ctx: RunContext, results: list[StepResult]) -> None:
    """Preflight everything, then the steps in Immich's advised order: database first."""
    cfg = ctx.config
    cluster = cluster_size(ctx.root.root)

    # Preflight: reads only. Any refusal here happens before anything is written.
    if cfg.library.enabled:
        library.check_source(cfg.immich.upload_location, cfg.immich.require_markers)
    dump = database.plan(ctx, cluster) if cfg.database.enabled else None
    plan: Plan | None = None
    if cfg.library.enabled:
        plan = await library.plan(ctx, cluster, copy_all=ctx.mode == "full")
        refusal = policy.deletion_refusal(
            plan.delete_files, plan.mirror_files, cfg.library.max_delete_percent
        )
        if refusal:
            raise Refused(refusal)
    config_bytes = config_archive.estimate(ctx)
    need = policy.SpaceNeed(
        to_write=(plan.copy_alloc if plan else 0)
        + (dump.alloc if dump else 0)
        + config_bytes
        + SMALL_FILES_RESERVE,
        freed_before_copy=plan.delete_alloc if plan else 0,
        freed_by_replacing=plan.replaced_alloc if plan else 0,
        largest_replaced=plan.largest_replaced_alloc if plan else 0,
        free=free_bytes(ctx.root.root),
    )
    refusal = policy.capacity_refusal(need)
    if refusal:
        raise Refused(refusal)

    # The steps. From here on the disk is written to.
    ctx.writing = True
    if dump is not None:
        results.append(await database.run(ctx, dump))
    if cfg.config_backup.enabled:
        results.append(await config_archive.run(ctx))
    if plan is not None:
        results.append(await library.run(ctx, plan))


def _fill_record(
    record: dict[str, Any], results: list[StepResult], problems: Problems, t0: float
) -> None:
    record["finished_at"] = _now().isoformat(timespec="seconds")
    record["duration_s"] = round(time.monotonic() - t0, 1)
    record["files_transferred"] = sum(r.files for r in results)
    record["bytes_transferred"] = sum(r.bytes for r in results)
    record["problems"] = problems.as_list()
    record["steps"] = {r.name: {"files": r.files, "bytes": r.bytes, **r.info} for r in results}


def _finish_on_disk(
    ctx: RunContext, record: dict[str, Any], results: list[StepResult], t0: float
) -> None:
    """Write README.txt and backup-info.toml once anything was written, then sync.

    Runs for every end of a run that got past the preflight (a run refused in the
    preflight writes nothing); a disk that is gone by then is only logged.
    """
    status = record["status"]
    if status in ("success", "partial") and len(results) < _expected_steps(ctx.config):
        status = "failed"
    lib = next((r for r in results if r.name == "library"), None)
    info: dict[str, Any] = {
        "started_at": record["started_at"],
        "finished_at": _now().isoformat(timespec="seconds"),
        "status": status,
        "mode": ctx.mode,
        "files_transferred": sum(r.files for r in results),
        "bytes_transferred": sum(r.bytes for r in results),
        "duration_s": round(time.monotonic() - t0, 1),
        "problems": len(ctx.problems),
    }
    if lib is not None:
        info["library_files"] = lib.info.get("source_files", 0)
        info["library_bytes"] = lib.info.get("source_bytes", 0)
    for r in results:
        for key in ("dump", "archive"):
            if key in r.info:
                info[f"latest_{key}"] = r.info[key]
    try:
        disk_notes.write(ctx.root, info)
        os.sync()
    except OSError as exc:
        log.warning("could not write the backup notes on the disk: %s", exc)


def _expected_steps(cfg: Config) -> int:
    return sum((cfg.database.enabled, cfg.config_backup.enabled, cfg.library.enabled))
