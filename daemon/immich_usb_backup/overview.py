"""Every approved disk at a glance, and the reminder when none was backed up for a while.

A USB backup is only as good as its last plug-in. ``disks`` reads the history once
(streaming) and sums up each disk ever approved (in the config or with ``approve``):
its last backup that finished (``success`` or ``partial``: everything that could be
copied was), the free space and file count then, its last content comparison
(``verify`` or ``full`` mode) and whether it passed. ``due`` says whether a reminder is
due: the newest backup onto any approved disk is older than
``notify.remind_after_days`` (a disk never backed up counts from its approval), and none
was sent in the last 24 hours (``<state dir>/reminder.toml``, so a restarted daemon does
not send a second one). Plain data in, plain data out; the time is always an argument.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from immich_usb_backup import approvals, clock, health, history, policy, state
from immich_usb_backup.config import Config
from immich_usb_backup.policy import normalise_uuid
from immich_usb_backup.record import RunRecord
from immich_usb_backup.text import plural

log = logging.getLogger(__name__)

STATE_NAME = state.REMINDER
BACKED_UP = ("success", "partial")
CHECK_AT_LEAST_EVERY_S = 6 * 3600.0  # the daemon's timer, for clock changes and new runs
REMIND_EVERY = timedelta(hours=24)  # at most one reminder in this time


@dataclass
class DiskSummary:
    uuid: str
    label: str | None
    approved_at: str | None
    last_backup_at: str | None = None
    last_backup_status: str | None = None
    free_bytes: int | None = None
    size_bytes: int | None = None
    files: int | None = None
    last_verify_at: str | None = None
    last_verify_passed: bool | None = None
    health: dict[str, Any] | None = None  # its last SMART reading (health.Stored.to_dict)

    def since(self) -> datetime | None:
        """The time its backup age counts from: the last backup, else the approval."""
        return _parse(self.last_backup_at) or _parse(self.approved_at)

    def age_days(self, at: datetime) -> int | None:
        since = self.since()
        return None if since is None else max(0, (at - since).days)

    def as_dict(self, at: datetime, remind_after_days: int) -> dict[str, object]:
        age = self.age_days(at)
        return {
            "uuid": self.uuid, "label": self.label, "approved_at": self.approved_at,
            "last_backup_at": self.last_backup_at,
            "last_backup_status": self.last_backup_status,
            "age_days": age, "overdue": overdue(age, remind_after_days),
            "free_bytes": self.free_bytes, "size_bytes": self.size_bytes, "files": self.files,
            "last_verify_at": self.last_verify_at,
            "last_verify_passed": self.last_verify_passed,
            "health": self.health,
        }


def overdue(age_days: int | None, remind_after_days: int) -> bool:
    return bool(remind_after_days) and age_days is not None and age_days >= remind_after_days


def _parse(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo else when.astimezone()


def approved(config: Config) -> dict[str, DiskSummary]:
    """An empty summary for every approved disk (approved by ``approve`` or in the
    config), by UUID."""
    found: dict[str, DiskSummary] = {}
    for a in approvals.load(config.state_dir):
        found[a.uuid] = DiskSummary(a.uuid, a.label or None, a.approved_at or None)
    for uuid in config.disks.approved:
        u = normalise_uuid(uuid)
        found.setdefault(u, DiskSummary(u, None, None))
    return found


def disks(config: Config) -> list[DiskSummary]:
    """Every approved disk, newest backup first (never backed up last); without their
    health (``with_health``)."""
    found = approved(config)
    for raw in history.iter_records(config.state_dir):
        run = RunRecord.from_dict(raw)
        if not run.disk.uuid:
            continue
        summary = found.get(normalise_uuid(run.disk.uuid))
        if summary is not None:
            take(summary, run)
    return sorted(found.values(), key=newest_first)


def with_health(summaries: list[DiskSummary], state_dir: Path,
                at: datetime) -> list[DiskSummary]:
    """``summaries``, each with its disk's last health reading (``health.read_stored``:
    file work, and a damaged file is kept aside and told as of ``at``)."""
    kept = health.read_stored(state_dir, at)
    for d in summaries:
        reading = kept.get(normalise_uuid(d.uuid))
        d.health = reading.to_dict() if reading is not None else None
    return summaries


def newest_first(d: DiskSummary) -> tuple[bool, float]:
    since = d.since()
    return since is None, -since.timestamp() if since else 0.0


def take(summary: DiskSummary, run: RunRecord) -> None:
    """Fold one run (oldest first) into the disk's summary."""
    if run.disk.label:
        summary.label = run.disk.label
    if run.status in BACKED_UP:
        summary.last_backup_at = run.finished_at or run.started_at
        summary.last_backup_status = run.status
        summary.free_bytes, summary.size_bytes = run.disk_free_bytes, run.disk_size_bytes
        library = run.steps.get("library")
        summary.files = _int(library.extra.get("source_files")) if library else None
    if run.mode in ("verify", "full") and run.status in (*BACKED_UP, "failed"):
        library = run.steps.get("library")
        if library is not None and "compared" in library.extra:
            summary.last_verify_at = run.finished_at or run.started_at
            summary.last_verify_passed = ("mismatches" not in library.extra
                                          and run.status in BACKED_UP)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# The reminder ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Reminder:
    days: int  # since the newest backup onto any approved disk
    disks: list[DiskSummary]  # to plug in, newest backup first


def due(config: Config, at: datetime) -> Reminder | None:
    """The reminder to send at ``at``, or None (off, nothing approved, a recent backup,
    or one was sent in the last 24 hours)."""
    days = config.notify.remind_after_days
    if not days:
        return None
    summaries = [d for d in disks(config) if d.since() is not None]
    if not summaries:
        return None
    newest = summaries[0].age_days(at)
    if newest is None or newest < days:
        return None
    sent = last_sent(config.state_dir)
    if sent is not None and timedelta(0) <= at - sent < REMIND_EVERY:
        return None
    return Reminder(newest, summaries)


def next_check_in(config: Config, at: datetime) -> float:
    """Seconds from ``at`` until a reminder could next become due (the daemon's timer)."""
    days = config.notify.remind_after_days
    if not days:
        return CHECK_AT_LEAST_EVERY_S
    summaries = [d for d in disks(config) if d.since() is not None]
    if not summaries:
        return CHECK_AT_LEAST_EVERY_S
    since = summaries[0].since()
    assert since is not None
    due_at = since + timedelta(days=days)  # the newest backup turns that old
    sent = last_sent(config.state_dir)
    if sent is not None:
        due_at = max(due_at, sent + REMIND_EVERY)
    return max(1.0, min(CHECK_AT_LEAST_EVERY_S, (due_at - at).total_seconds()))


def text(reminder: Reminder, at: datetime) -> str:
    """``No backup for 9 days: plug in Backup (last backed up 9 days ago) or Offsite (23
    days ago)``."""
    parts = []
    for i, d in enumerate(reminder.disks):
        age = d.age_days(at)
        name = d.label or d.uuid
        when = ("never backed up" if d.last_backup_at is None else
                f"{plural(age, 'day')} ago")
        if i == 0 and d.last_backup_at is not None:
            when = f"last backed up {when}"
        parts.append(f"{name} ({when})")
    return f"No backup for {plural(reminder.days, 'day')}: plug in " + " or ".join(parts)


def last_sent(state_dir: Path) -> datetime | None:
    """When the last reminder went out (a damaged file reads as none: see state)."""
    value = state.read_toml_or_empty(state_dir, STATE_NAME).get("last_sent")
    when = value if isinstance(value, datetime) else _parse(str(value)) if value else None
    return when if when is None or when.tzinfo else when.astimezone()


def mark_sent(state_dir: Path, at: datetime) -> None:
    state.write_toml(state_dir, STATE_NAME, {"last_sent": at})


# The disks plugged in now -------------------------------------------------------------

def plugged(config: Config, at: datetime) -> list[dict[str, Any]]:
    """Every USB exFAT disk connected now, as ``disks --json`` and the web UI list them
    (``approved``: by its UUID; ``any_marked``: ``[disks] allow_any_marked``), with the free
    space of a mounted one (``free_bytes``, ``free_bytes_at``; None for one that is not
    mounted: the web UI fills in what its last backup left), read ``at``. Blocking (udev's database,
    ``statvfs``): call it in a thread."""
    from immich_usb_backup.devices import list_block_devices  # noqa: PLC0415 - pyudev
    from immich_usb_backup.target import marker_state, mount_point_of  # noqa: PLC0415

    recorded = approvals.approved_uuids(config.state_dir)
    rows: list[dict[str, Any]] = []
    for d in list_block_devices():
        if not policy.is_candidate(d.bus, d.fs_type, d.devtype, d.usb_driver):
            continue
        mp = mount_point_of(d.device)
        free: int | None = None
        free_at: str | None = None
        if mp is not None:
            with contextlib.suppress(OSError):
                st = os.statvfs(mp)
                free, free_at = st.f_bavail * st.f_frsize, clock.iso(at)
        rows.append({
            "device": d.device, "label": d.label, "uuid": d.uuid, "size": d.size,
            "model": d.model, "mount_point": str(mp) if mp else None,
            "marker": marker_state(mp) if mp else None,
            "approved": policy.is_approved(d.uuid, config.disks.approved, recorded),
            "any_marked": config.disks.allow_any_marked,
            "free_bytes": free, "free_bytes_at": free_at,
        })
    return rows
