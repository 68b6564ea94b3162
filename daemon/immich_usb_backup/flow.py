"""The product's story, top to bottom.

A plugged disk (``backup_plugged``): eligible (USB, exFAT)? -> mounted (read-only
first unless its UUID is approved) -> marker folder? -> approved? (if not: notify how to
approve it) -> the backup, which ends by unmounting and powering off what we mounted.

One backup (``run_backup``): target mounted exFAT? -> marker folder? -> lock ->
preflight (source sane, dump found, library compared, deletions within limits, fits on
the disk) -> notify "started" -> database -> config -> library -> README.txt +
backup-info.toml -> sync -> unmount and power off (a disk we mounted) -> notify
"finished" or "refused" -> history record. It is the boundary of a run: whatever happens
inside ends as exactly one notification and one history record (success, partial,
failed, refused, interrupted), which also records how the notifications went.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from immich_usb_backup import __version__, approvals, history, keep, notify, policy, report
from immich_usb_backup.config import Config
from immich_usb_backup.errors import BackupError, Refused
from immich_usb_backup.fsutil import (
    BackupRoot,
    allocated,
    atomic_write_bytes,
    cluster_size,
    free_bytes,
)
from immich_usb_backup.hashcache import HashCache
from immich_usb_backup.lock import backup_lock
from immich_usb_backup.policy import human_bytes
from immich_usb_backup.scan import Plan, Problems
from immich_usb_backup.status import StatusWriter
from immich_usb_backup.steps import (
    RunContext,
    StepResult,
    config_archive,
    database,
    disk_notes,
    in_thread,
    integrity,
    library,
)
from immich_usb_backup.target import (
    MARKER,
    Disk,
    check_no_overlap,
    find_backup_root,
    inspect_mount,
    marker_state,
)
from immich_usb_backup.udisks import BlockInfo, UDisks, UDisksError

log = logging.getLogger(__name__)

WORK_DIR = "run"
REPORT_NAME = "history.html"  # in the state dir and in the backup folder on the disk
REPORT_RUNS = 100  # runs on the page (the strip shows the last 30)
SMALL_FILES_RESERVE = 1024 * 1024  # README, backup-info, folder entries

Detach = Callable[[], Awaitable[notify.DiskState]]


def _now() -> datetime:
    return datetime.now().astimezone()


async def run_backup(
    config: Config, target: Path, *, trigger: str = "cli", mode: str | None = None,
    detach: Detach | None = None,
) -> dict[str, Any]:
    """Back up onto the exFAT file system mounted at ``target``; return the history record.

    ``detach`` is given for a disk the caller mounted: it is called at the end (after the
    sync) to unmount and power off the disk, before the last notification, so that the
    message can say truthfully whether the disk is safe to unplug. Without it the disk is
    left mounted, as it was found. The record is appended to the history whatever the
    outcome, with the outcome of each notification. Cancellation (Ctrl-C, SIGTERM) stops
    rsync, is recorded as ``interrupted`` and then propagates.
    """
    started = _now()
    t0 = time.monotonic()
    mode = mode or config.library.mode
    problems = Problems()
    record = _new_record(started, trigger, mode, target)
    results: list[StepResult] = []
    notifier = notify.Notifier(config.notify)
    ctx: RunContext | None = None
    end = notify.DiskEnd("left-mounted", str(target))
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
                await _backup(ctx, results, notifier)
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
                    end = _disk_end(ctx, target)
                    ctx.status.clear()
                    shutil.rmtree(ctx.work_dir, ignore_errors=True)
    except Refused as exc:  # the lock is held by another run
        record["status"] = "refused"
        problems.add(str(exc))
    finally:
        _fill_record(record, results, problems, t0)
        log.info("backup %s%s", record["status"],
                 "".join(f"; {p}" for p in record["problems"][:3]))
        try:
            if detach is not None:
                end = dataclasses.replace(end, state=await detach(), mount_point=None)
            await notifier.send(notify.end_message(record, end))
        finally:
            _append_history(config, record, notifier)
    if cancelled:
        raise asyncio.CancelledError
    return record


def _new_record(started: datetime, trigger: str, mode: str, target: Path) -> dict[str, Any]:
    return {
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


def _disk_end(ctx: RunContext, target: Path) -> notify.DiskEnd:
    """The disk at the end of the run, before any unmount: still mounted at ``target``."""
    free: int | None = None
    size: int | None = None
    try:
        st = os.statvfs(ctx.root.root)
        free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    except OSError:  # pulled out
        pass
    return notify.DiskEnd("left-mounted", str(target), ctx.writing, free, size)


def _append_history(config: Config, record: dict[str, Any],
                    notifier: notify.Notifier) -> None:
    """Append the run's record, with how its notifications went (no URL, no secret),
    and refresh the history page in the state dir."""
    if notifier.outcomes:
        record["notifications"] = notifier.outcomes
    history.append(config.state_dir, record)
    try:
        report.write_html(config.state_dir / REPORT_NAME,
                          history.last_records(config.state_dir, REPORT_RUNS))
    except OSError as exc:
        log.warning("could not refresh %s: %s", REPORT_NAME, exc)


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


async def _backup(ctx: RunContext, results: list[StepResult],
                  notifier: notify.Notifier) -> None:
    """Preflight everything, then the steps in Immich's advised order: database first."""
    cfg = ctx.config
    cluster = cluster_size(ctx.root.root)

    # Preflight: reads only. Any refusal here happens before anything is written.
    if cfg.library.enabled:
        library.check_source(cfg.immich.upload_location, cfg.immich.require_markers)
    dump = database.plan(ctx, cluster) if cfg.database.enabled else None
    plan: Plan | None = None
    kept: keep.KeepSurvey | None = None
    if cfg.library.enabled:
        plan = await library.plan(ctx, cluster)
        refusal = policy.deletion_refusal(
            plan.delete_files, plan.mirror_files, cfg.library.max_delete_percent
        ) or policy.replacement_refusal(
            plan.replaced_files, plan.mirror_files, cfg.library.max_delete_percent
        )
        if refusal:
            raise Refused(refusal)
        kept = await in_thread(ctx, lambda: library.survey_keep(ctx, cluster))
    config_bytes = config_archive.estimate(ctx)
    refusal = policy.capacity_refusal(_space_need(ctx, cluster, plan, kept, dump, config_bytes))
    if refusal:
        raise Refused(refusal)

    log.debug("preflight done: %d files to copy, %d to delete", plan.copy_files if plan else 0,
              plan.delete_files if plan else 0)

    # The steps. From here on the disk is written to.
    ctx.writing = True
    notifier.send_soon(notify.started(ctx.disk.label, ctx.disk.uuid,
                                      *_what_to_copy(cfg, dump, plan, config_bytes)))
    if dump is not None:
        results.append(await database.run(ctx, dump))
    if cfg.config_backup.enabled:
        results.append(await config_archive.run(ctx))
    if plan is not None:
        cache = HashCache(cfg.state_dir) if plan.files_list is not None else None
        try:
            lib = await library.run(ctx, plan, kept, cache)
            results.append(lib)
            mismatches: list[str] = []
            if cache is not None and ctx.mode != "quick":
                lib.info["compared"], mismatches = await integrity.compare(ctx, plan, cache)
            if cache is not None and cfg.library.manifest:
                lib.info["manifest"] = await integrity.write_manifest(ctx, plan, cache)
            else:
                await in_thread(ctx, lambda: integrity.remove_manifest(ctx))
        finally:
            if cache is not None:
                cache.close()
        if mismatches:
            lib.info["mismatches"] = len(mismatches)
            for problem in mismatches:
                ctx.problems.add(problem)
            raise BackupError(
                f"verify: {len(mismatches)} file(s) on the disk differed from the server "
                "(listed above); something changed data it should not have: check the "
                "disk and the server's storage")


MANIFEST_LINE_BYTES = 200  # a generous average: digest, two spaces, a long Immich path


def _space_need(ctx: RunContext, cluster: int, plan: Plan | None,
                kept: keep.KeepSurvey | None, dump: database.DumpPlan | None,
                config_bytes: int) -> policy.SpaceNeed:
    """What the run writes and frees, in allocated bytes (safety rule 5).

    With the keep area on, nothing the run removes from the mirror frees space (it is
    moved to deleted/); only the dated folders it prunes do.
    """
    keeping = ctx.config.library.keep_deleted_days > 0
    to_write = (dump.alloc if dump else 0) + config_bytes + SMALL_FILES_RESERVE
    freed = kept.prune_alloc if kept else 0
    in_keep = (kept.alloc - kept.prune_alloc) if kept else 0
    replaced = largest = 0
    if plan is not None:
        to_write += plan.copy_alloc
        if plan.files_list is not None and ctx.config.library.manifest:
            to_write += allocated(plan.source_files * MANIFEST_LINE_BYTES, cluster)
        if keeping:
            in_keep += plan.delete_alloc + plan.replaced_alloc
        else:
            freed += plan.delete_alloc
            replaced, largest = plan.replaced_alloc, plan.largest_replaced_alloc
    return policy.SpaceNeed(
        to_write=to_write,
        freed_before_copy=freed,
        freed_by_replacing=replaced,
        largest_replaced=largest,
        free=free_bytes(ctx.root.root),
        kept=in_keep,
        keep_days=ctx.config.library.keep_deleted_days,
    )


def _what_to_copy(cfg: Config, dump: database.DumpPlan | None, plan: Plan | None,
                  config_bytes: int) -> tuple[list[str], int, int]:
    """For the "started" message: a line per step, and the files and bytes to copy."""
    lines: list[str] = []
    files = nbytes = 0
    if dump is not None:
        if dump.source is None:
            lines.append("database: no dump found (see the problems when it finishes)")
        elif dump.needs_copy:
            size = dump.source.stat().st_size
            lines.append(f"database: {dump.source.name} ({human_bytes(size)})")
            files, nbytes = files + 1, nbytes + size
        else:
            lines.append(f"database: {dump.source.name} is already on the disk")
    if cfg.config_backup.enabled:
        lines.append(f"config: an archive of {len(cfg.config_backup.paths)} configured "
                     "path(s)")
        files, nbytes = files + 1, nbytes + config_bytes
    if plan is not None:
        lines.append(f"library: {plan.copy_files} of {plan.source_files} files to copy "
                     f"({human_bytes(plan.copy_bytes)}), {plan.delete_files} to delete")
        files, nbytes = files + plan.copy_files, nbytes + plan.copy_bytes
    return lines, files, nbytes


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
        _write_disk_report(ctx, record, info)
        log.debug("notes written; syncing")
        os.sync()
        log.debug("synced")
    except OSError as exc:
        log.warning("could not write the backup notes on the disk: %s", exc)


def _write_disk_report(ctx: RunContext, record: dict[str, Any], info: dict[str, Any]) -> None:
    """The history page on the disk, so that whoever plugs it into a laptop sees it.

    Written before the unmount: this run appears as it stands (its notifications are
    recorded only in the state dir's history).
    """
    now = {**record, "finished_at": info["finished_at"], "duration_s": info["duration_s"],
           "files_transferred": info["files_transferred"],
           "bytes_transferred": info["bytes_transferred"],
           "problems": ctx.problems.as_list()}
    records = [*history.last_records(ctx.config.state_dir, REPORT_RUNS - 1), now]
    page = report.render_html(records).encode("utf-8")
    atomic_write_bytes(ctx.root, ctx.root.path(REPORT_NAME), page)


def _expected_steps(cfg: Config) -> int:
    return sum((cfg.database.enabled, cfg.config_backup.enabled, cfg.library.enabled))


# A disk given by device: the daemon's plug, or `run /dev/sdX1` / `run UUID=...` ---------

async def backup_plugged(config: Config, udisks: UDisks, device: str, *, uuid: str | None,
                         label: str | None, trigger: str = "plug") -> str:
    """A USB exFAT file system appeared at ``device``: back up to it if it is ours.

    Return the outcome: "backed-up" (see the history for how it went), "not-marked" (left
    as found), "needs-approval" (marked but not approved: the person is told how).
    A disk whose UUID is not approved is first mounted read-only to look for the marker,
    so an unmarked disk is never written to, not even the exFAT "dirty" flag.
    """
    cfg = config.disks
    approved = policy.is_approved(uuid, cfg.approved, approvals.approved_uuids(config.state_dir))
    if not approved:
        try:
            marker, left = await _peek_marker(udisks, device)
        except UDisksError as exc:  # not ours as far as we know: no record, only the log
            log.warning("could not look at %s (%s) for the marker folder: %s",
                        device, label, exc)
            return "unreadable"
        if marker is None:
            log.info("%s (%s) has no marker folder: left alone", device, label)
            return "not-marked"
        if not cfg.allow_any_marked:
            await _record_needs_approval(config, device, uuid, label, trigger, left)
            return "needs-approval"
    try:
        await backup_device(config, udisks, device, trigger=trigger)
    except UDisksError as exc:  # an approved disk that cannot be used: the person must know
        await _record_simple(config, "failed", device, uuid, label, trigger,
                             f"the disk {label or device} could not be used: {exc}")
        return "failed"
    return "backed-up"


async def backup_device(config: Config, udisks: UDisks, device: str, *,
                        trigger: str, mode: str | None = None) -> dict[str, Any]:
    """Mount ``device`` if needed and run the backup, which ends by unmounting and powering
    off what we mounted, before its last notification (a disk someone else mounted is left
    mounted). Return the history record."""
    info = await udisks.wait_for_filesystem(device)
    if info.mount_points:
        log.info("%s is already mounted at %s: using it, leaving it mounted",
                 device, info.mount_points[0])
        return await run_backup(config, Path(info.mount_points[0]), trigger=trigger,
                                mode=mode)
    mount_point = await udisks.mount(info.object_path)
    log.info("mounted %s at %s", device, mount_point)
    return await run_backup(config, Path(mount_point), trigger=trigger, mode=mode,
                            detach=lambda: _detach(config, udisks, info))


async def _peek_marker(udisks: UDisks, device: str) -> tuple[str | None, notify.DiskEnd]:
    """Look for the marker folder; mount read-only (and unmount again) if needed.

    Return the marker state and how the disk is left.
    """
    info = await udisks.wait_for_filesystem(device)
    if info.mount_points:
        return (marker_state(Path(info.mount_points[0])),
                notify.DiskEnd("left-mounted", info.mount_points[0]))
    mount_point = await udisks.mount(info.object_path, read_only=True)
    try:
        return (await asyncio.to_thread(marker_state, Path(mount_point)),
                notify.DiskEnd("unmounted"))
    finally:
        await udisks.unmount(info.object_path)


async def _detach(config: Config, udisks: UDisks, info: BlockInfo) -> notify.DiskState:
    """Sync, unmount, power off; return how the disk was left. A disk already gone is
    only logged."""
    state: notify.DiskState = "busy"
    try:
        await asyncio.shield(asyncio.to_thread(os.sync))
        await asyncio.shield(udisks.unmount(info.object_path))
        log.info("unmounted %s", info.device)
        state = "unmounted"
        if config.disks.power_off and info.drive and await udisks.power_off(info.drive):
            log.info("powered off %s: safe to unplug", info.device)
            state = "powered-off"
    except UDisksError as exc:
        if exc.name in ("org.freedesktop.DBus.Error.UnknownMethod",
                        "org.freedesktop.DBus.Error.UnknownObject"):
            log.info("%s is gone (pulled out?); UDisks2 cleans up its mount point", info.device)
            return "gone" if state == "busy" else state
        log.warning("could not detach %s: %s", info.device, exc)
    return state


async def _record_needs_approval(config: Config, device: str, uuid: str | None,
                                 label: str | None, trigger: str,
                                 left: notify.DiskEnd) -> None:
    hint = policy.approve_hint(uuid, device)
    message = (f"the disk {label or device} (UUID {uuid or '?'}) has the "
               f"immich-server-backups folder but is not approved; to back up to it, run: "
               f"{hint}")
    await _record_simple(config, "refused", device, uuid, label, trigger, message,
                         notify.needs_approval(label, uuid, device, hint, left))


async def _record_simple(config: Config, status: str, device: str, uuid: str | None,
                         label: str | None, trigger: str, message: str,
                         note: notify.Message | None = None) -> None:
    """A history record, and a notification, for a plug that ended before a backup could
    start. ``note`` is the message to send; by default the record's own "finished"."""
    log.warning("%s", message)
    record = _new_record(_now(), trigger, config.library.mode, Path(device))
    record.update(status=status, finished_at=_now().isoformat(timespec="seconds"),
                  disk={"uuid": uuid, "label": label}, problems=[message])
    notifier = notify.Notifier(config.notify)
    try:
        await notifier.send(note or notify.end_message(record, notify.DiskEnd("not-mounted")))
    finally:
        _append_history(config, record, notifier)


async def backup_approved(config: Config, *, trigger: str,
                          mode: str | None = None) -> list[dict[str, Any]]:
    """Back up onto every approved USB exFAT disk connected now, one after another (a
    timer's job, for a disk left plugged in). Return their history records: none when no
    approved disk is connected. Only disks approved by UUID count here; `allow_any_marked`
    does not make a timer look inside every disk."""
    from immich_usb_backup.devices import list_block_devices  # noqa: PLC0415 - pyudev

    recorded = approvals.approved_uuids(config.state_dir)
    disks = [d for d in await asyncio.to_thread(list_block_devices)
             if policy.is_candidate(d.bus, d.fs_type, d.devtype, d.usb_driver)
             and policy.is_approved(d.uuid, config.disks.approved, recorded)]
    if not disks:
        log.info("no approved disk is connected")
        return []
    records = []
    udisks = await UDisks.connect()
    try:
        for d in disks:
            records.append(await backup_device(config, udisks, d.device, trigger=trigger,
                                               mode=mode))
    finally:
        udisks.close()
    return records


async def approve_device(config: Config, target: str,
                         create_marker: bool) -> tuple[approvals.Approval, bool]:
    """Approve the exFAT disk ``target`` (``/dev/...`` or ``UUID=...``) for backups.

    Mounts it if needed (and unmounts it again), creates the marker folder only when
    ``create_marker`` (a person asked), and records the UUID in the state dir. Return the
    approval and whether the marker was created.
    """
    udisks = await UDisks.connect()
    try:
        device = await udisks.device_for(target)
        info = await udisks.wait_for_filesystem(device)
        if info.fs_type != "exfat":
            raise Refused(f"{device} holds {info.fs_type or 'no'} file system; only exFAT "
                          "disks are backed up to (see docs/first-disk.md)")
        if not info.uuid:
            raise Refused(f"{device} has no file system UUID to approve it by")
        mounted_here = not info.mount_points
        mount_point = Path(info.mount_points[0] if info.mount_points
                           else await udisks.mount(info.object_path,
                                                   read_only=not create_marker))
        try:
            created = False
            marker = mount_point / MARKER
            if not marker.is_dir():
                if not create_marker:
                    raise Refused(
                        f"the disk has no {MARKER} folder. Create it yourself, or run "
                        f"approve again with --create-marker to have it created")
                marker.mkdir()
                created = True
        finally:
            if mounted_here:
                await asyncio.to_thread(os.sync)
                await udisks.unmount(info.object_path)
        approval = approvals.Approval(policy.normalise_uuid(info.uuid), info.label,
                                      _now().isoformat(timespec="seconds"))
        approvals.add(config.state_dir, approval)
        return approval, created
    finally:
        udisks.close()
