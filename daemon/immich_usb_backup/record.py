"""The record of one run: what ``history.jsonl`` stores, the messages say and the history
page shows. Built in one place (``RunRecord.begin``), filled by the flow, read through its
fields by the CLI, the history, the notifications and the page.

A step's own numbers are a ``StepResult`` subclass in the step's module; a record read
back from the history keeps them as the plain ``StepResult`` with its other keys in
``extra``, so a line written by any version loads and is written back unchanged.
Plain data only: importing this module costs nothing.
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from immich_usb_backup import __version__, clock
from immich_usb_backup.clock import iso

Status = Literal["success", "partial", "failed", "refused", "interrupted"]
STATUSES: tuple[Status, ...] = ("success", "partial", "failed", "refused", "interrupted")
# How a run left the disk, which decides whether the last message says "safe to unplug".
DiskState = Literal["powered-off", "unmounted", "not-mounted", "left-mounted", "gone", "busy"]

__all__ = ["STATUSES", "DiskRef", "DiskState", "RunRecord", "Status", "StepResult", "iso",
           "readable"]


def readable(text: str) -> str:
    """``text`` as a person (and JSON, and a terminal) can take it: the bytes of a file
    name that is not UTF-8, which Python carries as lone surrogates, shown escaped
    (``bad-\\xff\\xfe.jpg``)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name made
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class StepResult:
    """What one step did: the files and bytes it wrote, and (in subclasses) its own
    numbers, which it also puts into words (``finished_lines``) and into the disk's
    ``backup-info.toml`` (``disk_info``). Fields left None are not recorded."""

    files: int = 0
    bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"files": self.files, "bytes": self.bytes}
        for f in dataclasses.fields(self):
            if f.name not in ("files", "bytes", "extra"):
                value = getattr(self, f.name)
                if value is not None:
                    out[f.name] = value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Any) -> StepResult:
        """A step result as the history stored it (the plain class: its own numbers stay
        in ``extra``)."""
        if not isinstance(data, Mapping):
            return StepResult()
        rest = {str(k): v for k, v in data.items() if k not in ("files", "bytes")}
        return StepResult(_int(data.get("files")) or 0, _int(data.get("bytes")) or 0, rest)

    def finished_lines(self) -> list[str]:
        """Lines for the "finished" message and the run summary (none by default)."""
        return []

    def disk_info(self) -> dict[str, Any]:
        """Keys for ``backup-info.toml`` on the disk (none by default)."""
        return {}

    @property
    def verify_failed(self) -> bool:
        """The step's check found copies that differ from the server's files."""
        return False


@dataclass
class DiskRef:
    uuid: str | None = None
    label: str | None = None

    @property
    def name(self) -> str | None:
        return self.label or self.uuid


@dataclass
class RunRecord:
    """One run (or one plug that ended before a run could start).

    Numbers are None only in a record read back from a damaged history line.
    """

    started_at: str
    trigger: str
    mode: str
    target: str = ""
    finished_at: str | None = None
    status: str = "failed"
    disk: DiskRef = field(default_factory=DiskRef)
    files_transferred: int | None = 0
    bytes_transferred: int | None = 0
    duration_s: float | None = 0.0
    problems: list[str] = field(default_factory=list)
    host: str = ""
    version: str = ""
    steps: dict[str, StepResult] = field(default_factory=dict)
    notifications: list[dict[str, Any]] = field(default_factory=list)
    disk_free_bytes: int | None = None  # the disk at the end of the run, when known
    disk_size_bytes: int | None = None
    notes: list[str] = field(default_factory=list)  # warnings that are not problems
    health: dict[str, Any] | None = None  # the disk's SMART reading (health.HealthResult)
    # A random id, also written onto the disk (backup-info.toml) and never shown: proof
    # that a disk holds this server's backup (see trust.py)
    run_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    _t0: float = field(default_factory=time.monotonic, repr=False, compare=False)

    @classmethod
    def begin(cls, trigger: str, mode: str, target: str,
              at: datetime | None = None) -> RunRecord:
        """The record of a run starting now (``at``): "failed" until the flow says
        otherwise."""
        return cls(started_at=iso(at or clock.now()), trigger=trigger, mode=mode,
                   target=readable(target), host=socket.gethostname(), version=__version__,
                   run_id=secrets.token_hex(16))

    @property
    def started(self) -> datetime:
        """When the run started (a record begun by this version: its time parses)."""
        return datetime.fromisoformat(self.started_at)

    def conclude(self, problems: Iterable[str], at: datetime | None = None) -> None:
        """Set the end time (``at``: now), the duration, the totals of the steps and the
        problems. Called again later (after the disk is detached), it brings them up to
        date."""
        self.finished_at = iso(at or clock.now())
        self.duration_s = round(time.monotonic() - self._t0, 1)
        self.files_transferred = sum(r.files for r in self.steps.values())
        self.bytes_transferred = sum(r.bytes for r in self.steps.values())
        self.problems = [readable(p) for p in problems]

    @property
    def verify_failed(self) -> bool:
        return any(r.verify_failed for r in self.steps.values())

    @property
    def finished_lines(self) -> list[str]:
        lines = [line for r in self.steps.values() for line in r.finished_lines()]
        if self.health and self.health.get("line"):
            lines.append(f"Disk {self.health['line']}.")
        return lines

    # the history's JSON --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status": self.status,
            "trigger": self.trigger,
            "mode": self.mode,
            "disk": {"uuid": self.disk.uuid, "label": self.disk.label},
            "target": self.target,
            "files_transferred": self.files_transferred,
            "bytes_transferred": self.bytes_transferred,
            "duration_s": self.duration_s,
            "problems": list(self.problems),
            "host": self.host,
            "version": self.version,
            "steps": {name: r.to_dict() for name, r in self.steps.items()},
        }
        if self.notifications:
            out["notifications"] = list(self.notifications)
        if self.disk_free_bytes is not None:
            out["disk_free_bytes"] = self.disk_free_bytes
            out["disk_size_bytes"] = self.disk_size_bytes
        if self.notes:
            out["notes"] = list(self.notes)
        if self.health is not None:
            out["health"] = self.health
        if self.run_id:
            out["run_id"] = self.run_id
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """A record as the history stored it, by any version. Damaged values are read as
        well as they can be (a number that is not one becomes None; a problem given as
        one string becomes a list); keys this version does not know are kept."""
        disk = data.get("disk")
        disk_ref = (DiskRef(_str(disk.get("uuid")), _str(disk.get("label")))
                    if isinstance(disk, Mapping) else DiskRef())
        problems = data.get("problems")
        steps = data.get("steps")
        sent = data.get("notifications")
        notes = data.get("notes")
        return cls(
            started_at=str(data.get("started_at") or ""),
            trigger=str(data.get("trigger") or ""),
            mode=str(data.get("mode") or ""),
            target=str(data.get("target") or ""),
            finished_at=_str(data.get("finished_at")),
            status=str(data.get("status") or "unknown"),
            disk=disk_ref,
            files_transferred=_int(data.get("files_transferred")),
            bytes_transferred=_int(data.get("bytes_transferred")),
            duration_s=_float(data.get("duration_s")),
            problems=([problems] if isinstance(problems, str) else
                      [str(p) for p in problems] if isinstance(problems, list) else []),
            host=str(data.get("host") or ""),
            version=str(data.get("version") or ""),
            steps=({str(k): StepResult.from_dict(v) for k, v in steps.items()}
                   if isinstance(steps, Mapping) else {}),
            notifications=([n for n in sent if isinstance(n, dict)]
                           if isinstance(sent, list) else []),
            disk_free_bytes=_count(data.get("disk_free_bytes")),
            disk_size_bytes=_count(data.get("disk_size_bytes")),
            notes=[str(n) for n in notes] if isinstance(notes, list) else [],
            health=data["health"] if isinstance(data.get("health"), dict) else None,
            run_id=str(data.get("run_id") or ""),
            extra={k: v for k, v in data.items() if k not in _KNOWN},
        )


_KNOWN = frozenset(f.name for f in dataclasses.fields(RunRecord) if not f.name.startswith("_"))


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int | None:
    if value is None:
        return 0
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _count(value: Any) -> int | None:
    """A count that may be missing (None), never a damaged stand-in."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    if value is None:
        return 0.0
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
