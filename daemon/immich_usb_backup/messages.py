"""The messages: what each event says, as plain functions of plain data.

Six events, each a plain-text title and body: ``started``, ``finished`` (success,
partial, failed, interrupted), ``refused``, ``needs_approval``, ``reminder``, and
``state_damaged``; docs/notifications.md shows what they look like. Every message says
whether the disk is safe to unplug only when it is true (``DiskEnd``). ``notify`` sends
them.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from immich_usb_backup.config import Event
from immich_usb_backup.record import DiskState, RunRecord
from immich_usb_backup.text import duration, human_bytes, plural

TITLE = "Immich backup"
PROBLEMS_SHOWN = 5

Kind = Literal["info", "success", "warning", "failure"]


@dataclass(frozen=True)
class Message:
    event: Event
    title: str
    body: str
    kind: Kind = "info"


@dataclass(frozen=True)
class DiskEnd:
    """How a run left the disk, for its last message."""

    state: DiskState
    mount_point: str | None = None  # where it is still mounted ("left-mounted")
    wrote: bool = False  # the run wrote to the disk (its notes are written and synced)
    free_bytes: int | None = None
    size_bytes: int | None = None


def started(label: str | None, uuid: str | None, what: Sequence[str], files: int,
            nbytes: int) -> Message:
    """The backup passed its checks and starts writing: what it is about to copy."""
    disk = _disk_name(label, uuid)
    lines = [
        f"Backing up the Immich server {socket.gethostname()} to the disk "
        f"{_disk_full(label, uuid)}.",
        "",
        "What will be copied:",
        *(f"- {w}" for w in what),
        f"In all: about {plural(files, 'file')}, {human_bytes(nbytes)}.",
        "",
        "Do not unplug the disk until the message that the backup finished arrives.",
    ]
    return Message(Event.STARTED, f"{TITLE}: started on {disk}", "\n".join(lines), "info")


_STATUS_LINE = {
    "success": "",
    "partial": "Not everything could be copied: see the problems below. Everything else "
               "is backed up.",
    "failed": "The backup did not complete: see the problems below. What the disk held "
              "before is still readable.",
    "interrupted": "The backup was stopped before it finished (the disk was removed, or "
                   "the backup was stopped on the server).",
}
_KIND: dict[str, Kind] = {"success": "success", "partial": "warning", "failed": "failure",
                          "interrupted": "warning", "refused": "warning"}


def finished(record: RunRecord, end: DiskEnd) -> Message:
    """The run ended (success, partial, failed, interrupted): counts, space, problems,
    and whether the disk is safe to unplug."""
    status = record.status
    disk = _disk_full(record.disk.label, record.disk.uuid, record.target)
    lines = [
        f"The backup of {record.host or socket.gethostname()} to the disk {disk} ended: "
        f"{status}.",
    ]
    if record.verify_failed:
        lines.append("Everything was copied, but the check found copies on the disk that "
                     "differed from the server's files: see the problems below.")
    elif _STATUS_LINE.get(status):
        lines.append(_STATUS_LINE[status])
    lines += [
        "",
        f"Copied: {plural(record.files_transferred or 0, 'file')}, "
        f"{human_bytes(record.bytes_transferred or 0)}, in "
        f"{duration(record.duration_s or 0.0)}.",
        *record.finished_lines,
        *record.notes,
    ]
    if end.free_bytes is not None and end.size_bytes:
        lines.append(f"Free space left on the disk: {human_bytes(end.free_bytes)} of "
                     f"{human_bytes(end.size_bytes)}.")
    lines += _problem_lines(record.problems)
    lines += ["", _unplug_line(end)]
    name = _disk_name(record.disk.label, record.disk.uuid, record.target)
    return Message(Event.FINISHED, f"{TITLE}: {status} on {name}", "\n".join(lines),
                   _KIND.get(status, "failure"))


def refused(record: RunRecord, end: DiskEnd) -> Message:
    """A safety rule stopped the run: why, and what to do."""
    label, uuid, problems = record.disk.label, record.disk.uuid, record.problems
    lines = [
        f"The backup of {record.host or socket.gethostname()} to the disk "
        f"{_disk_full(label, uuid, record.target)} was refused"
        + ("." if end.wrote else ": nothing was copied or deleted."),
        "",
        f"Why: {problems[0] if problems else 'a safety rule stopped it'}",
        *(f"Also: {p}" for p in problems[1:PROBLEMS_SHOWN]),
        "",
        "What to do: follow the advice above, then plug the disk in again (or run "
        "`immich-usb-backup run` on the server).",
        "",
        _unplug_line(end),
    ]
    name = _disk_name(label, uuid, record.target)
    return Message(Event.REFUSED, f"{TITLE}: refused on {name}", "\n".join(lines), "warning")


def end_message(record: RunRecord, end: DiskEnd) -> Message:
    """The last message of a run: ``refused`` or ``finished``, by the record's status."""
    return refused(record, end) if record.status == "refused" else finished(record, end)


def needs_approval(label: str | None, uuid: str | None, device: str, command: str,
                   end: DiskEnd) -> Message:
    """A marked disk was plugged in that is not approved: the exact command to approve it."""
    lines = [
        f"The disk {_disk_full(label, uuid)} was plugged into {socket.gethostname()} "
        f"({device}). It has the immich-server-backups folder but is not approved, so "
        "nothing was written to it.",
        "",
        "To back up to this disk from now on, run on the server:",
        "",
        f"    {command}",
        "",
        "then unplug the disk and plug it in again.",
        "",
        _unplug_line(end),
    ]
    return Message(Event.NEEDS_APPROVAL, f"{TITLE}: disk {_disk_name(label, uuid, device)} "
                   "needs approval", "\n".join(lines), "warning")


def reminder(text: str, days: int) -> Message:
    """No backup for a while: which disk to plug in (``text`` from ``overview.text``)."""
    lines = [
        f"{text}.",
        "",
        f"The Immich server {socket.gethostname()} has not been backed up to a USB disk for "
        f"{plural(days, 'day')}. Plug in one of the disks above: the backup starts by "
        "itself, and a message says when it is done and the disk is safe to unplug.",
    ]
    return Message(Event.REMINDER, f"{TITLE}: no backup for {plural(days, 'day')}",
                   "\n".join(lines), "warning")


def disk_health(label: str | None, uuid: str | None, warning: str) -> Message:
    """A backup disk's SMART readings got worse, or it says it is failing (``warning``
    from ``health.HealthResult.warning_text``)."""
    lines = [
        f"{warning}.",
        "",
        f"The disk {_disk_full(label, uuid)} reported this when it was read on "
        f"{socket.gethostname()}. The backup on it is still readable; see docs/health.md "
        "for what the readings mean.",
    ]
    return Message(Event.DISK_HEALTH, f"{TITLE}: check the disk {_disk_name(label, uuid)}",
                   "\n".join(lines), "warning")


def state_damaged(text: str) -> Message:
    """A file of the state dir could not be read (``state.StateDamaged``): what was
    lost and what to do. Sent as a ``finished`` event: a run may depend on it."""
    lines = [
        f"On the Immich server {socket.gethostname()}, immich-usb-backup found {text}.",
        "",
        "Backups go on; the damaged file is kept for you to look at.",
    ]
    return Message(Event.FINISHED, f"{TITLE}: a state file was damaged", "\n".join(lines),
                   "failure")


def _unplug_line(end: DiskEnd) -> str:
    """Say "safe to unplug" only when it is true: the disk is unmounted (or was never
    mounted), or, on a disk someone else mounted, once they have ejected it."""
    if end.state == "powered-off":
        return "The disk was unmounted and powered off: it is safe to unplug."
    if end.state == "unmounted":
        return "The disk was unmounted: it is safe to unplug."
    if end.state == "not-mounted":
        return "The disk is not mounted: it is safe to unplug."
    if end.state == "gone":
        return "The disk was removed before the backup ended."
    if end.state == "busy":
        return ("The disk could not be unmounted (see the server's log): do not unplug "
                "it yet.")
    synced = "synced, and is " if end.wrote else ""
    return (f"The disk is {synced}still mounted at {end.mount_point}, as it was found: "
            "eject it there, then it is safe to unplug.")


def _problem_lines(problems: Sequence[Any]) -> list[str]:
    if not problems:
        return []
    lines = ["", f"Problems ({len(problems)}):"]
    lines += [f"- {p}" for p in problems[:PROBLEMS_SHOWN]]
    if len(problems) > PROBLEMS_SHOWN:
        lines.append(f"- ... and {len(problems) - PROBLEMS_SHOWN} more: run "
                     "`immich-usb-backup history` on the server")
    return lines


def _disk_name(label: Any, uuid: Any, fallback: Any = None) -> str:
    return str(label or uuid or fallback or "the disk")


def _disk_full(label: Any, uuid: Any, fallback: Any = None) -> str:
    name = _disk_name(label, uuid, fallback)
    return f"{name} (UUID {uuid})" if uuid and label else name
