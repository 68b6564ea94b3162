"""A backup disk's health: each reading held against the last one, in words, kept per disk.

``compare`` says what got worse since the previous reading of the same drive and what
the drive says is failing now; ``HealthResult`` puts a check into the words of the run
summary, the messages and the history: plain functions of plain data. ``health.toml``
in the state dir keeps each disk's last reading and the smartctl device type that
answered (``stored``, ``updated``). ``check`` is the thin async layer: read the disk with
``smartctl.read``, compare, keep. What "worse" means and why: docs/health.md.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from immich_usb_backup import clock, state
from immich_usb_backup.config import HealthConfig
from immich_usb_backup.smartctl import SYS_BLOCK, HealthReading, NotReported, Why, read, whole_disk
from immich_usb_backup.text import plural

log = logging.getLogger(__name__)

__all__ = ["Disk", "HealthReading", "HealthResult", "NotReported", "Stored", "Verdict", "Why",
           "check", "compare", "read_stored", "stored", "updated"]

WEAR_STEPS = (80, 90, 100)  # NVMe "percentage used": a warning when a reading crosses one

# NVMe critical warning bits (NVMe base specification, SMART / Health Information log)
_CRITICAL_BITS = {
    0x01: "spare space below its threshold",
    0x02: "temperature beyond its limits",
    0x04: "reliability degraded by media or internal errors",
    0x08: "media made read-only",
    0x10: "volatile memory backup failed",
    0x20: "persistent memory read-only",
}


@dataclass(frozen=True)
class Disk:
    """The disk to read: the device of its file system (``/dev/sdb1``, a whole-disk
    ``/dev/sdb``), and the file system's UUID and label (how the disk is known)."""

    device: str
    uuid: str
    label: str = ""


# What got worse (plain data) ---------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """A reading held against the previous one of the same disk."""

    worse: tuple[str, ...] = ()  # what grew since the previous reading, in words
    failing: tuple[str, ...] = ()  # what the drive says now, in words
    advice: str = ""  # what to do, for the warning


# How bad a finding is; the worst one's advice ends the warning.
FAILING, MEDIUM, WEAR, HEAT, CABLE = 5, 4, 3, 2, 1
_ADVICE = {
    FAILING: "copy this backup to a new disk soon",
    MEDIUM: "copy this backup to a new disk soon",
    WEAR: "plan to copy this backup to a new disk: this one is wearing out",
    HEAT: "let it cool: keep it away from heat",
    CABLE: "try another USB cable, port or enclosure",
}
# (field, noun for plural(), what it is, how bad)
_COUNTERS = (
    ("reallocated", "sector", "reallocated", MEDIUM),
    ("pending", "unreadable sector", "waiting to be reallocated", MEDIUM),
    ("uncorrectable", "uncorrectable sector", "", MEDIUM),
    ("media_errors", "media error", "", MEDIUM),
    ("crc_errors", "transfer error", "on the cable (UDMA CRC)", CABLE),
)


def compare(previous: HealthReading | None, current: HealthReading) -> Verdict:
    """What got worse from ``previous`` to ``current`` (nothing without a previous reading
    of the same drive), and what the drive says is failing now (whatever came before).

    Worse: a sector, CRC or media-error counter grew, or the NVMe wear crossed one of
    ``WEAR_STEPS``. Failing: the overall assessment is FAILED, an attribute is at its
    threshold now, or an NVMe critical warning bit is set."""
    worse: list[str] = []
    severity = 0
    same = previous is not None and not (previous.serial and current.serial
                                         and previous.serial != current.serial)
    if previous is not None and same:
        since = previous.at.date().isoformat()
        for name, noun, what, weight in _COUNTERS:
            before, now = getattr(previous, name), getattr(current, name)
            if before is not None and now is not None and now > before:
                words = " ".join(filter(None, (plural(now, noun), what)))
                worse.append(f"{words} since {since} ({before} before)")
                severity = max(severity, weight)
        before, now = previous.percentage_used, current.percentage_used
        if before is not None and now is not None and any(
                before < step <= now for step in WEAR_STEPS):
            worse.append(f"{now} % of its rated life used (was {before} % on {since})")
            severity = max(severity, MEDIUM if now >= WEAR_STEPS[-1] else WEAR)
    failing: list[str] = []
    if current.passed is False or current.failing_attributes:
        names = ", ".join(current.failing_attributes)
        failing.append("the drive says it is failing"
                       + (f" ({names} at its threshold)" if names else ""))
        severity = FAILING
    if warning := current.critical_warning:
        bits = [text for bit, text in _CRITICAL_BITS.items() if warning & bit]
        failing.append("the drive warns: " + (", ".join(bits) or f"critical warning {warning}"))
        severity = max(severity, FAILING if warning & ~0x02 else HEAT)
    return Verdict(tuple(worse), tuple(failing), _ADVICE.get(severity, ""))


@dataclass(frozen=True)
class HealthResult:
    """One disk's check: the reading (or why none), the previous reading, the verdict.
    A damaged ``health.toml`` met on the way is kept aside and waits in
    ``state.take_damages`` to be told, as every state file's."""

    disk: Disk
    outcome: HealthReading | NotReported
    previous: HealthReading | None = None
    verdict: Verdict = Verdict()

    @property
    def warning(self) -> bool:
        """Whether this is worth a ``disk_health`` message."""
        return bool(self.verdict.worse or self.verdict.failing)

    def line(self) -> str:
        """For the run summary and the message: ``health: OK (3,412 h, 34 °C)``."""
        outcome = self.outcome
        if isinstance(outcome, NotReported):
            return f"health: not reported ({outcome.text})"
        if self.warning:
            return "health: WARNING: " + "; ".join(self.verdict.failing + self.verdict.worse)
        return "health: OK" + (f" ({details})" if (details := _details(outcome)) else "")

    def warning_text(self) -> str | None:
        """The ``disk_health`` message: ``Backup: 8 sectors reallocated since 2026-11-30 (0
        before): copy this backup to a new disk soon``; None when nothing is wrong."""
        if not self.warning:
            return None
        name = self.disk.label or self.disk.uuid
        what = "; ".join(self.verdict.failing + self.verdict.worse)
        return f"{name}: {what}: {self.verdict.advice}" if self.verdict.advice else \
            f"{name}: {what}"

    def to_dict(self) -> dict[str, Any]:
        """For the history record and JSON output (times as ISO 8601)."""
        out: dict[str, Any] = {"line": self.line(), "warning": self.warning}
        if isinstance(self.outcome, NotReported):
            out.update(not_reported=self.outcome.why.value, why=self.outcome.text,
                       at=clock.iso(self.outcome.at))
        else:
            out["reading"] = _jsonable(self.outcome.to_dict())
        if self.warning:
            out["warning_text"] = self.warning_text()
        if self.previous is not None:
            out["previous_at"] = clock.iso(self.previous.at)
        return out


def _details(r: HealthReading) -> str:
    """``3,412 h, 34 °C``, with any counter that is not zero."""
    parts = []
    if r.power_on_hours is not None:
        parts.append(f"{r.power_on_hours:,} h")
    if r.temperature_c is not None:
        parts.append(f"{r.temperature_c} °C")
    if r.percentage_used is not None:
        parts.append(f"{r.percentage_used} % used")
    for name, noun, what, _ in _COUNTERS:
        if n := getattr(r, name):
            parts.append(" ".join(filter(None, (plural(n, noun), what))))
    return ", ".join(parts)


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: clock.iso(v) if isinstance(v, datetime) else v for k, v in data.items()}


# The state file: each disk's last reading ------------------------------------------------

@dataclass(frozen=True)
class Stored:
    """What ``health.toml`` keeps of one disk, for ``disks --all`` and the history page."""

    uuid: str
    label: str = ""
    device_type: str = ""  # the smartctl -d type that answered last
    reading: HealthReading | None = None  # the last reading with data
    checked_at: datetime | None = None  # the last check, reading or not
    not_reported: str = ""  # why the last check read nothing ("" when it read)

    def line(self) -> str:
        """``OK (3,412 h, 34 °C) on 2026-11-30``, or why nothing was read."""
        if self.reading is None:
            return f"not reported ({self.not_reported})" if self.not_reported else "-"
        details = _details(self.reading)
        state_ = "FAILING" if compare(None, self.reading).failing else "OK"
        text = f"{state_}{f' ({details})' if details else ''} on " \
               f"{self.reading.at.date().isoformat()}"
        if self.not_reported and self.checked_at and self.checked_at > self.reading.at:
            text += f"; not reported since ({self.not_reported})"
        return text

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uuid": self.uuid, "line": self.line()}
        if self.reading is not None:
            out["reading"] = _jsonable(self.reading.to_dict())
        if self.checked_at is not None:
            out["checked_at"] = clock.iso(self.checked_at)
        if self.not_reported:
            out["not_reported"] = self.not_reported
        return out


def stored(data: Mapping[str, Any]) -> dict[str, Stored]:
    """Every disk in ``health.toml`` (as read by ``state.read_toml``), by UUID."""
    out: dict[str, Stored] = {}
    for entry in state.tables(data, "disk"):
        uuid = entry.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            continue
        reading = entry.get("reading")
        checked = entry.get("checked_at")
        out[uuid.upper()] = Stored(
            uuid=uuid, label=_str(entry.get("label")), device_type=_str(entry.get("device_type")),
            reading=HealthReading.from_dict(reading) if isinstance(reading, dict) else None,
            checked_at=checked if isinstance(checked, datetime) else None,
            not_reported=_str(entry.get("not_reported")))
    return out


def updated(data: Mapping[str, Any], disk: Disk, outcome: HealthReading | NotReported,
            ) -> dict[str, Any]:
    """``health.toml``'s data with ``disk``'s entry replaced by this check's outcome (a
    reading replaces the last one; a check without one keeps it and says why)."""
    disks = state.tables(data, "disk")
    key = disk.uuid.upper()
    old = next((d for d in disks if str(d.get("uuid", "")).upper() == key), {})
    entry: dict[str, Any] = {"uuid": disk.uuid}
    if disk.label or old.get("label"):
        entry["label"] = disk.label or old["label"]
    if isinstance(outcome, HealthReading):
        entry.update(device_type=outcome.device_type, checked_at=outcome.at,
                     reading=outcome.to_dict())
    else:
        for k in ("device_type", "reading"):
            if k in old:
                entry[k] = old[k]
        entry.update(checked_at=outcome.at, not_reported=outcome.text)
    rest = [d for d in disks if str(d.get("uuid", "")).upper() != key]
    return {**data, "disk": [*rest, entry]}


def read_stored(state_dir: Path, at: datetime) -> dict[str, Stored]:
    """Every disk's last health reading, for ``disks --all`` and the history page (file
    work: call it in a thread). A damaged file is kept aside and told (``state``)."""
    return stored(_load(state_dir, at))


async def check(disk: Disk, config: HealthConfig, state_dir: Path, at: datetime, *,
                awake: bool = True, store: bool = True, sys_block: Path = SYS_BLOCK,
                ) -> HealthResult | None:
    """Read ``disk``'s health now (``at``), hold it against its last reading, and (with
    ``store``) keep it in ``health.toml``. None when health is off. Never raises for the
    disk or smartctl: each becomes the result's outcome (a damaged state file: ``state``).

    ``awake``: the disk is being backed up or verified (see ``smartctl_argv``); ``store``
    False for a look that must not use up the comparison (``disks``, which sends no
    message: the next backup still warns)."""
    if config.enabled is False:
        return None
    found = await asyncio.to_thread(shutil.which, config.smartctl)
    if found is None and config.enabled is None:  # "auto": on only when installed
        return None
    data = await asyncio.to_thread(_load, state_dir, at)
    known = stored(data).get(disk.uuid.upper())
    previous = known.reading if known else None
    if found is None:
        outcome: HealthReading | NotReported = NotReported(
            at, Why.NO_SMARTCTL, f"{config.smartctl} is not installed (smartmontools)")
    else:
        device, is_loop = await asyncio.to_thread(whole_disk, disk.device, sys_block)
        outcome = await read(found, device, at, remembered=known.device_type if known else "",
                             awake=awake, is_loop=is_loop)
    verdict = compare(previous, outcome) if isinstance(outcome, HealthReading) else Verdict()
    if store:
        await asyncio.to_thread(_save, state_dir, updated(data, disk, outcome))
    return HealthResult(disk, outcome, previous, verdict)


async def read_plugged(rows: list[dict[str, Any]], config: HealthConfig, state_dir: Path,
                       at: datetime) -> None:
    """``disks``: each plugged disk's health (``rows`` as ``overview.plugged`` gives them,
    each given its ``health``), read now without waking a sleeping disk and without
    keeping it (the next backup compares and warns)."""
    for row in rows:
        if row["uuid"]:
            result = await check(Disk(row["device"], row["uuid"], row["label"] or ""),
                                 config, state_dir, at, awake=False, store=False)
            row["health"] = None if result is None else result.to_dict()


def _load(state_dir: Path, at: datetime) -> dict[str, Any]:
    return state.read_toml_or_empty(state_dir, state.HEALTH, at=at)


def _save(state_dir: Path, data: Mapping[str, Any]) -> None:
    try:
        state.write_toml(state_dir, state.HEALTH, data)
    except OSError as exc:  # the reading is still told; only the comparison is lost
        log.error("could not write %s: %s", state_dir / state.HEALTH, exc)


def _str(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""
