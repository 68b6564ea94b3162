"""The product's story, top to bottom.

A plugged disk (``backup_plugged``): eligible (USB, exFAT)? -> mounted read-only ->
marker folder? -> approved? (if not: notify how to approve it) -> its key matches? (if
not: refused, told) -> unmounted, mounted to write -> the backup, which ends by
unmounting and powering off what we mounted.

One backup (``run_backup``): target mounted exFAT? -> marker folder? -> lock -> key ->
the steps (``steps.STEPS``: database, config, library), one phase across all of them at
a time: prepare (may act on the server) -> preflight (reads only: source sane, dump
found, library compared, deletions within limits) -> the space they need fits on the
disk? -> notify "started" -> write -> finish (compare, manifest) -> README.txt,
backup-info.toml and the history page on the disk -> sync -> unmount and power off (a
disk we mounted) -> notify "finished" or "refused" -> history record. It is the boundary
of a run: whatever happens inside ends as exactly one notification and one history
record (success, partial, failed, refused, interrupted), which also records how the
notifications went.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from immich_usb_backup import (
    approvals,
    clock,
    health,
    heartbeat,
    history,
    layout,
    messages,
    notes,
    notify,
    overview,
    page,
    policy,
    state,
    trust,
)
from immich_usb_backup.config import Config
from immich_usb_backup.errors import BackupError, Refused
from immich_usb_backup.fsutil import BackupRoot, atomic_write_bytes, cluster_size, free_bytes
from immich_usb_backup.lock import backup_lock, is_running
from immich_usb_backup.record import DiskRef, DiskState, RunRecord
from immich_usb_backup.scan import Problems
from immich_usb_backup.status import StatusWriter
from immich_usb_backup.steps import STEPS, RunContext, Step
from immich_usb_backup.target import (
    Disk,
    check_no_overlap,
    find_backup_root,
    inspect_mount,
    marker_state,
)
from immich_usb_backup.udisks import BlockInfo, UDisks, UDisksError, mounted

if TYPE_CHECKING:
    from immich_usb_backup.devices import BlockDevice

log = logging.getLogger(__name__)

WORK_DIR = state.WORK
SMALL_FILES_RESERVE = 1024 * 1024  # README, backup-info, folder entries

Detach = Callable[[], Awaitable[DiskState]]


async def run_backup(
    config: Config, target: Path, *, trigger: str = "cli", mode: str | None = None,
    detach: Detach | None = None, key_required: bool = False,
    steps: Sequence[type[Step]] = STEPS,
    inspect: Callable[[Path], Awaitable[Disk]] = inspect_mount,
) -> RunRecord:
    """Back up onto the exFAT file system mounted at ``target``; return the run's record.

    ``detach`` is given for a disk the caller mounted: it is called at the end (after the
    sync) to unmount and power off the disk, before the last notification, so that the
    message can say truthfully whether the disk is safe to unplug. Without it the disk is
    left mounted, as it was found. ``key_required``: a disk with an approved UUID whose
    key does not match is refused (the daemon, a timer); else (a disk a person named)
    only warned about. The record is appended to the history whatever the outcome, with
    the outcome of each notification. Cancellation (Ctrl-C, SIGTERM) stops rsync, is
    recorded as ``interrupted`` and then propagates. ``steps`` and ``inspect`` (what tells
    the mounted disk) are the real ones but in tests that drive the flow without a disk.
    """
    record = RunRecord.begin(trigger, mode or config.library.mode, str(target), clock.now())
    problems = Problems()
    refusal: str | None = None
    notifier = notify.Notifier(config.notify)
    end = messages.DiskEnd("left-mounted", str(target))
    cancelled = False
    try:
        with backup_lock(config.state_dir):
            ctx: RunContext | None = None
            try:
                disk = await inspect(target)
                record.disk = DiskRef(disk.uuid, disk.label)
                root = BackupRoot(await asyncio.to_thread(find_backup_root, disk))
                check_no_overlap(
                    root.root, disk, config.immich.upload_location, config.state_dir
                )
                accept = await asyncio.to_thread(_key, config, disk, root, record,
                                                 key_required)
                ctx = await asyncio.to_thread(_context, config, disk, root, problems,
                                              record.started, record.mode)
                ctx.steps = tuple(cls for cls in steps if cls.enabled(config))
                await _backup(ctx, record, notifier, accept)
                record.status = "partial" if len(problems) else "success"
            except asyncio.CancelledError:
                record.status = "interrupted"
                problems.add("the backup was interrupted; the next run finishes the job")
                cancelled = True
            except Refused as exc:
                record.status, refusal = "refused", str(exc)
            except Exception as exc:
                record.status, message = _failure(exc)
                problems.add(message)
            finally:
                if ctx is not None and not cancelled:
                    record.health = await read_health(config, ctx.disk, notifier)
                if ctx is not None:
                    end = await asyncio.shield(asyncio.to_thread(
                        _leave_disk, ctx, record, _problems(refusal, problems), target))
    except Refused as exc:  # the lock is held by another run
        record.status, refusal = "refused", str(exc)
    finally:
        for damage in state.take_damages():  # a state file read during the run
            problems.add(str(damage))
        if record.status == "success" and len(problems):
            record.status = "partial"
        record.conclude(_problems(refusal, problems))
        log.info("backup %s%s", record.status, "".join(f"; {p}" for p in record.problems[:3]))
        record.disk_free_bytes, record.disk_size_bytes = end.free_bytes, end.size_bytes
        try:
            if detach is not None:
                end = messages.DiskEnd(await detach(), None, end.wrote, end.free_bytes,
                                     end.size_bytes)
            await notifier.send(messages.end_message(record, end))
            if record.status == "success":
                record.notifications += await heartbeat.ping_all(config.notify)
        finally:
            await asyncio.shield(_append_history(config, record, notifier))
    if cancelled:
        raise asyncio.CancelledError
    return record


async def read_health(config: Config, disk: Disk,
                      notifier: notify.Notifier) -> dict[str, Any] | None:
    """The disk's SMART reading (``health``), kept per disk; when something got worse or
    the drive says it is failing, the ``disk_health`` message is on its way. None when
    health is off or the disk has no UUID to keep it by. Never fails the run."""
    if not disk.uuid:
        return None
    try:
        result = await health.check(health.Disk(disk.device, disk.uuid, disk.label or ""),
                                    config.health, config.state_dir, clock.now())
    except Exception:  # a reading must never break a backup
        log.exception("reading the disk's health failed")
        return None
    if result is None:
        return None
    warning = result.warning_text()
    if warning:
        notifier.send_soon(messages.disk_health(disk.label, disk.uuid, warning))
    return result.to_dict()


def _problems(refusal: str | None, problems: Problems) -> list[str]:
    """The run's problems; a refusal first, as it is the reason the run stopped."""
    return [refusal, *problems.as_list()] if refusal else problems.as_list()


def _key(config: Config, disk: Disk, root: BackupRoot, record: RunRecord,
         required: bool) -> Callable[[], None] | None:
    """In a thread: the disk key's verdict for a disk with an approved UUID (``trust``).
    Raise Refused when it does not match and ``required``; else, when it does not match,
    a note of the run. Return what to do once the run writes (give the disk its key, or
    keep the hash of the one it has), or None."""
    if not disk.uuid or not policy.is_approved(
            disk.uuid, config.disks.approved, approvals.approved_uuids(config.state_dir)):
        return None
    uuid = policy.normalise_uuid(disk.uuid)
    facts = trust.read_facts(root.root)
    why = trust.assess(config, uuid, facts)
    if why not in trust.ACCEPTED:
        hint = policy.approve_hint(uuid, disk.device)
        if required:
            raise Refused(trust.refusal(disk.label, uuid, why, hint))
        record.notes.append(trust.warning(disk.label, uuid, why, hint))
        log.warning("%s", record.notes[-1])
        return None
    if why == "match":
        return None
    return lambda: trust.accept(root, config, uuid, why, facts)


def _context(config: Config, disk: Disk, root: BackupRoot, problems: Problems,
             started: datetime, mode: str) -> RunContext:
    """In a thread: a clean work folder in the state dir, the live status."""
    work = config.state_dir / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    status = StatusWriter(
        config.state_dir,
        {"uuid": disk.uuid, "label": disk.label, "mount_point": str(disk.mount_point)},
    )
    return RunContext(config, disk, root, status, problems, work, started, mode)


async def _backup(ctx: RunContext, record: RunRecord, notifier: notify.Notifier,
                  accept: Callable[[], None] | None = None) -> None:
    """The steps, one phase across all of them at a time: prepare, preflight (any
    refusal happens before anything is written), write, finish. ``accept`` (the disk's
    key) runs once the run may write."""
    steps: list[Step] = [cls(ctx) for cls in ctx.steps]
    try:
        for step in steps:
            await step.prepare()
        cluster = cluster_size(ctx.root.root)
        checks = [await step.preflight(cluster) for step in steps]
        space = sum((c.space for c in checks), policy.Space(to_write=SMALL_FILES_RESERVE))
        refusal = policy.capacity_refusal(space.against(
            free_bytes(ctx.root.root), ctx.config.library.keep_deleted_days))
        if refusal:
            raise Refused(refusal)

        ctx.writing = True  # from here on the disk is written to
        if accept is not None:
            await asyncio.to_thread(accept)
        notifier.send_soon(messages.started(
            ctx.disk.label, ctx.disk.uuid, [c.line for c in checks if c.line],
            sum(c.files for c in checks), sum(c.bytes for c in checks)))
        written = []
        for step in steps:
            result = await step.write()
            record.steps[step.name] = ctx.results[step.name] = result
            written.append((step, result))
        for step, result in written:
            await step.finish(result)
    finally:
        for step in steps:
            step.close()


def _failure(exc: Exception) -> tuple[str, str]:
    """The history status and message for an exception that ended a run."""
    if isinstance(exc, BackupError):
        return "failed", str(exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return "failed", f"{exc.strerror or exc}{where}"
    log.error("backup failed unexpectedly", exc_info=exc)  # the one catch-all
    return "failed", f"unexpected error: {exc!r}"


# The end of a run: notes on the disk, sync, history -------------------------------------

def _leave_disk(ctx: RunContext, record: RunRecord, problems: list[str],
                target: Path) -> messages.DiskEnd:
    """In a thread, at every end of a run that got past ``inspect_mount``: once anything
    was written, README.txt, backup-info.toml and the history page on the disk, then a
    sync; the live status cleared, the work folder removed. Return the disk as it is
    left (still mounted at ``target``). A disk that is gone by then is only logged."""
    free: int | None = None
    size: int | None = None
    try:
        if ctx.writing:
            record.conclude(problems)
            _write_notes(ctx, record)
        st = os.statvfs(ctx.root.root)
        free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    except OSError as exc:  # pulled out
        log.warning("could not write the backup notes on the disk: %s", exc)
    finally:
        ctx.status.clear()
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
    return messages.DiskEnd("left-mounted", str(target), ctx.writing, free, size)


def _write_notes(ctx: RunContext, record: RunRecord) -> None:
    """README.txt and backup-info.toml, the history page (so that whoever plugs the disk
    into a laptop sees it; this run as it stands, its notifications are recorded only
    in the state dir), then sync."""
    status = record.status
    if status in ("success", "partial") and len(record.steps) < len(ctx.steps):
        status = "failed"
    info: dict[str, Any] = {
        "run_id": record.run_id,  # proof that this server wrote here (trust.py)
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "status": status,
        "mode": ctx.mode,
        "files_transferred": record.files_transferred,
        "bytes_transferred": record.bytes_transferred,
        "duration_s": record.duration_s,
        "problems": len(ctx.problems),
    }
    for result in record.steps.values():
        info.update(result.disk_info())
    notes.write(ctx.root, ctx.steps, info)
    atomic_write_bytes(ctx.root, ctx.root.path(layout.PAGE),
                       page.render(ctx.config, current=record).encode("utf-8"))
    log.debug("notes written; syncing")
    os.sync()
    log.debug("synced")


async def _append_history(config: Config, record: RunRecord,
                          notifier: notify.Notifier) -> None:
    """Append the run's record, with how its notifications went (no URL, no secret),
    and refresh the history page in the state dir (in a thread)."""
    record.notifications = [*notifier.outcomes, *record.notifications]
    await asyncio.to_thread(_append_and_render, config, record)


def _append_and_render(config: Config, record: RunRecord) -> None:
    history.append(config.state_dir, record)
    page.refresh(config)


# A disk given by device: the daemon's plug, or `run /dev/sdX1` / `run UUID=...` ---------

async def backup_plugged(config: Config, udisks: UDisks, device: str, *, uuid: str | None,
                         label: str | None, trigger: str = "plug") -> str:
    """A USB exFAT file system appeared at ``device``: back up to it if it is ours.

    Return the outcome: "backed-up" (see the history for how it went), "not-marked" (left
    as found), "needs-approval" (marked but not approved: the person is told how),
    "refused" (an approved UUID whose key does not match, or approvals that cannot be
    read: recorded, told). Every disk is first looked at read-only, so an unmarked disk,
    or a stranger's disk with an approved UUID, is never written to, not even the exFAT
    "dirty" flag.
    """
    cfg = config.disks
    try:
        recorded = await asyncio.to_thread(approvals.approved_uuids, config.state_dir)
    except state.StateDamaged as exc:  # never a run on half-read approvals
        await _record_simple(config, "refused", device, uuid, label, trigger, str(exc))
        return "refused"
    approved = policy.is_approved(uuid, cfg.approved, recorded)
    if not approved:
        try:
            marker, left = await peek_marker(udisks, device)
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
        record = await backup_device(config, udisks, device, trigger=trigger,
                                     key_required=approved)
    except UDisksError as exc:  # an approved disk that cannot be used: the person must know
        await _record_simple(config, "failed", device, uuid, label, trigger,
                             f"the disk {label or device} could not be used: {exc}")
        return "failed"
    return "refused" if record.status == "refused" else "backed-up"


async def backup_device(config: Config, udisks: UDisks, device: str, *,
                        trigger: str, mode: str | None = None,
                        key_required: bool = False) -> RunRecord:
    """Mount ``device`` if needed and run the backup, which ends by unmounting and powering
    off what we mounted, before its last notification (a disk someone else mounted is left
    mounted). Return the run's record. ``key_required``: the disk is looked at read-only
    first, and a disk whose key does not match its approval is refused there (recorded,
    told), never mounted to write."""
    info = await udisks.wait_for_filesystem(device)
    if key_required:
        refused = await _look_at_key(config, udisks, device, info, trigger, mode)
        if refused is not None:
            return refused
    async with mounted(udisks, info) as mount:
        if not mount.ours:
            log.info("%s is already mounted at %s: using it, leaving it mounted",
                     device, mount.mount_point)
            return await run_backup(config, mount.mount_point, trigger=trigger, mode=mode,
                                    key_required=key_required)
        return await run_backup(
            config, mount.mount_point, trigger=trigger, mode=mode, key_required=key_required,
            detach=lambda: mount.release(power_off=config.disks.power_off))


async def _look_at_key(config: Config, udisks: UDisks, device: str, info: BlockInfo,
                       trigger: str, mode: str | None) -> RunRecord | None:
    """Mount the disk read-only (if it is not mounted) and check its backup folder and its
    key. None when it may be written to; else the refusal's record (recorded, told)."""
    uuid = policy.normalise_uuid(info.uuid) if info.uuid else None
    async with mounted(udisks, info, read_only=True) as mount:
        disk = Disk(mount.mount_point, device, uuid, info.label)
        why = await asyncio.to_thread(_key_refusal, config, disk)
    if why is None:
        return None
    left = messages.DiskEnd(mount.state, None if mount.ours else str(mount.mount_point))
    return await _record_simple(config, "refused", device, uuid, info.label, trigger, why,
                                left=left, mode=mode)


def _key_refusal(config: Config, disk: Disk) -> str | None:
    """Why the disk mounted read-only at ``disk`` must not be written to (no backup
    folder, a key that does not match), or None."""
    try:
        root = find_backup_root(disk)
        facts = trust.read_facts(root)
        why = trust.assess(config, disk.uuid or "", facts)
    except Refused as exc:
        return str(exc)
    if why in trust.ACCEPTED:
        return None
    return trust.refusal(disk.label, disk.uuid or "?", why,
                         policy.approve_hint(disk.uuid, disk.device))


async def peek_marker(udisks: UDisks, device: str) -> tuple[str | None, messages.DiskEnd]:
    """Look for the marker folder; mount read-only (and unmount again) if needed.

    Return the marker state and how the disk is left.
    """
    info = await udisks.wait_for_filesystem(device)
    async with mounted(udisks, info, read_only=True) as mount:
        marker = await asyncio.to_thread(marker_state, mount.mount_point)
    return marker, messages.DiskEnd(mount.state, None if mount.ours else str(mount.mount_point))


async def _record_needs_approval(config: Config, device: str, uuid: str | None,
                                 label: str | None, trigger: str,
                                 left: messages.DiskEnd) -> None:
    hint = policy.approve_hint(uuid, device)
    message = (f"the disk {label or device} (UUID {uuid or '?'}) has the "
               f"immich-server-backups folder but is not approved; to back up to it, run: "
               f"{hint}")
    await _record_simple(config, "refused", device, uuid, label, trigger, message,
                         messages.needs_approval(label, uuid, device, hint, left))


async def record_unusable(config: Config, target: str, trigger: str, mode: str,
                          why: str) -> RunRecord:
    """``run /dev/...`` or ``run UUID=...`` whose disk could not be found or mounted (no
    such disk, no D-Bus or UDisks2): a failed run in the history, and its message."""
    return await _record_simple(config, "failed", target, None, None, trigger,
                                f"the disk {target} could not be used: {why}", mode=mode,
                                logged=False)


async def _record_simple(config: Config, status: str, device: str, uuid: str | None,
                         label: str | None, trigger: str, message: str,
                         note: messages.Message | None = None, *,
                         left: messages.DiskEnd | None = None,
                         mode: str | None = None, logged: bool = True) -> RunRecord:
    """A history record, and a notification, for a plug that ended before a backup could
    start (or a problem found outside a run). ``note`` is the message to send; by default
    the record's own last message, saying the disk is as ``left``. ``logged``: the
    message is logged too."""
    if logged:
        log.warning("%s", message)
    record = RunRecord.begin(trigger, mode or config.library.mode, device, clock.now())
    record.status, record.disk = status, DiskRef(uuid, label)
    record.conclude([message])
    record.duration_s = 0.0
    notifier = notify.Notifier(config.notify)
    try:
        await notifier.send(note or messages.end_message(
            record, left or messages.DiskEnd("not-mounted")))
    finally:
        await asyncio.shield(_append_history(config, record, notifier))
    return record


async def record_problem(config: Config, trigger: str, text: str) -> None:
    """A history record (``failed``) and a message for a problem found outside a run: a
    damaged state file."""
    await _record_simple(config, "failed", "", None, None, trigger, text,
                         messages.state_damaged(text), logged=False)


async def record_state_damage(config: Config, trigger: str) -> list[str]:
    """Record and tell the state files found damaged outside a run (by a command, the
    reminder, a page); return what was said. A run tells its own (``run_backup``)."""
    told = [str(damage) for damage in state.take_damages()]
    for text in told:
        await record_problem(config, trigger, text)
    return told


def _block_devices() -> list[BlockDevice]:
    """In a thread: udev's block devices (pyudev is imported here, not on the loop: its
    import alone takes about 0.1 s)."""
    from immich_usb_backup.devices import list_block_devices  # noqa: PLC0415 - pyudev

    return list_block_devices()


async def backup_approved(config: Config, *, trigger: str,
                          mode: str | None = None) -> list[RunRecord]:
    """Back up onto every approved USB exFAT disk connected now, one after another (a
    timer's job, for a disk left plugged in). Return their history records: none when no
    approved disk is connected. Only disks approved by UUID count here; `allow_any_marked`
    does not make a timer look inside every disk."""
    try:
        recorded = await asyncio.to_thread(approvals.approved_uuids, config.state_dir)
    except state.StateDamaged as exc:  # never a run on half-read approvals
        return [await _record_simple(config, "refused", "", None, None, trigger, str(exc))]
    disks = [d for d in await asyncio.to_thread(_block_devices)
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
                                               mode=mode, key_required=True))
    finally:
        udisks.close()
    return records


# A disk in the drawer ------------------------------------------------------------------

async def remind(config: Config, at: datetime) -> str | None:
    """Send the "no backup for N days" reminder if it is due at ``at`` (see
    ``overview``); none while a backup runs. Return its text when it was sent."""
    if await asyncio.to_thread(is_running, config.state_dir):
        log.info("reminder: a backup is running; not now")
        return None
    try:
        reminder = await asyncio.to_thread(overview.due, config, at)
    except state.StateDamaged as exc:  # the approvals: recorded and told, once
        await record_problem(config, "schedule", str(exc))
        return None
    finally:
        await record_state_damage(config, "schedule")
    if reminder is None:
        return None
    text = overview.text(reminder, at)
    log.info("%s", text)
    # marked first: at most one in 24 hours, even when the daemon stops while it is sent
    await asyncio.to_thread(overview.mark_sent, config.state_dir, at)
    notifier = notify.Notifier(config.notify)
    await notifier.send(messages.reminder(text, reminder.days))
    return text
