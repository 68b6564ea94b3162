"""smartctl: the one way a drive's SMART data is read, and what its answers mean.

``smartctl_argv`` builds the only arguments ever given (JSON; identity, overall
assessment, attributes; ``-n standby`` so a sleeping disk is not spun up; never a write
or a self-test). ``interpret`` and ``parse`` turn one answer (exit status, JSON) into a
``HealthReading`` or say why it holds none: plain functions of plain data. ``read`` runs
smartctl through ``execute`` (10 s a try), the device types in order, and
``whole_disk`` finds the disk of a partition in sysfs. Why this order, and which
enclosures answer nothing: docs/health.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from immich_usb_backup import execute
from immich_usb_backup.errors import CommandError
from immich_usb_backup.text import duration

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # each smartctl run; a bridge that hangs is not asked again in this check
# auto first: smartctl knows most USB bridges by their USB id (its drive database); then
# SAT, which most USB-SATA bridges speak; then the USB-NVMe bridges' own pass-through.
DEVICE_TYPES = ("auto", "sat", "sntjmicron", "sntasmedia", "sntrealtek")
STANDBY_EXIT = 3  # `-n standby,3`: smartctl exits 3 only when the disk is in a low-power mode
POWER_UNKNOWN_EXIT = 5  # `-n standby,3,5` (smartctl 7.3+): the bridge cannot tell the mode
SYS_BLOCK = Path("/sys/class/block")

# ATA attribute ids
REALLOCATED, PENDING, UNCORRECTABLE, CRC_ERRORS = 5, 197, 198, 199
POWER_ON_HOURS, TEMPERATURE, AIRFLOW_TEMPERATURE = 9, 194, 190

_LEADING_INT = re.compile(r"\s*(\d+)")
_MODE = re.compile(r"Device is in (.+?) mode")


@dataclass(frozen=True)
class HealthReading:
    """What one smartctl run read from a drive. None: not reported by this drive."""

    at: datetime
    device_type: str  # the smartctl -d type that answered ("auto": smartctl chose)
    protocol: str = ""  # "ATA", "NVMe" or "SCSI", as smartctl says
    model: str = ""
    serial: str = ""
    passed: bool | None = None  # the drive's overall assessment (smart_status)
    reallocated: int | None = None
    pending: int | None = None
    uncorrectable: int | None = None
    crc_errors: int | None = None
    power_on_hours: int | None = None
    temperature_c: int | None = None
    critical_warning: int | None = None  # NVMe
    percentage_used: int | None = None  # NVMe
    media_errors: int | None = None  # NVMe
    failing_attributes: tuple[str, ...] = ()  # ATA attributes at or below their threshold

    def to_dict(self) -> dict[str, Any]:
        """For the state file (TOML): None left out, the time a datetime."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or value in ("", ()):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HealthReading | None:
        """Back from the state file; None when it holds no time (a hand-edited file).
        A value of the wrong type is read as not reported."""
        at = data.get("at")
        if not isinstance(at, datetime):
            return None
        values: dict[str, Any] = {"at": at, "device_type": _str(data.get("device_type"))
                                  or "auto"}
        for name in ("protocol", "model", "serial"):
            values[name] = _str(data.get(name))
        if isinstance(passed := data.get("passed"), bool):
            values["passed"] = passed
        for name in _COUNTS:
            values[name] = _int(data.get(name))
        failing = data.get("failing_attributes")
        if isinstance(failing, list):
            values["failing_attributes"] = tuple(str(v) for v in failing)
        return cls(**values)


_COUNTS = ("reallocated", "pending", "uncorrectable", "crc_errors", "power_on_hours",
           "temperature_c", "critical_warning", "percentage_used", "media_errors")


class Why(enum.StrEnum):
    """Why a check read no health data."""

    NO_SMARTCTL = "no_smartctl"
    STANDBY = "standby"
    POWER_UNKNOWN = "power_unknown"
    TIMEOUT = "timeout"
    NO_PASSTHROUGH = "no_passthrough"
    NO_SMART = "no_smart"
    FAILED = "failed"


@dataclass(frozen=True)
class NotReported:
    """A check that read no health data, and why (words that follow "not reported")."""

    at: datetime
    why: Why
    text: str


class Answer(enum.Enum):
    """What one smartctl answer without health data means for the next try."""

    TRY_NEXT = "try the next device type"
    SLEEP = "the mode check failed: asleep, or no pass-through with this type"
    STANDBY = "asleep"
    POWER_UNKNOWN = "cannot tell whether it sleeps"
    UNSUPPORTED = "an enclosure smartctl knows to pass nothing through"
    NO_SMART = "the drive answered, without SMART"
    SMART_OFF = "the drive has SMART, turned off"
    TOO_OLD = "smartctl does not understand the options"


@dataclass(frozen=True)
class Attempt:
    device_type: str
    answer: Answer
    message: str  # smartctl's own words, for the log


# One answer (plain data) ----------------------------------------------------------------

def smartctl_argv(program: str, device_type: str, device: str, *, awake: bool) -> list[str]:
    """smartctl's arguments: JSON; identity, overall assessment and attributes only (no
    write, no self-test, no log that a read could not do without); a disk in standby is
    not woken. ``awake``: the caller knows the disk is spinning (a backup or verify is
    using it), so a bridge that cannot report the power mode is read anyway; otherwise
    (smartctl 7.3+) such a bridge is not read at all."""
    argv = [program, "-j", "-n", f"standby,{STANDBY_EXIT}" if awake
            else f"standby,{STANDBY_EXIT},{POWER_UNKNOWN_EXIT}", "-i", "-H", "-A"]
    if device_type != "auto":
        argv += ["-d", device_type]
    return [*argv, device]


def interpret(device_type: str, status: int, output: str, at: datetime,
              ) -> HealthReading | Attempt:
    """Given one smartctl run (its -d type, exit status and standard output), return the
    reading, or what the answer without one means."""
    try:
        doc = json.loads(output)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return Attempt(device_type, Answer.TRY_NEXT, f"no JSON (exit status {status})")
    messages = [m["string"] for m in _dicts(_dict(doc.get("smartctl")).get("messages"))
                if isinstance(m.get("string"), str)]
    said = "; ".join(messages) or f"exit status {status}"
    mode = next((m.group(1) for s in messages if (m := _MODE.search(s))), None)
    if status == STANDBY_EXIT and mode is not None:
        # "SLEEP" is what smartctl says when the power mode check itself failed, which
        # a bridge without ATA pass-through does too: only a named standby is sure
        return Attempt(device_type, Answer.SLEEP if mode == "SLEEP" else Answer.STANDBY, said)
    if status == POWER_UNKNOWN_EXIT and any("CHECK POWER MODE" in s for s in messages):
        return Attempt(device_type, Answer.POWER_UNKNOWN, said)
    if any("INVALID ARGUMENT TO -n" in s for s in messages):
        return Attempt(device_type, Answer.TOO_OLD, said)
    if any(s.startswith("Unsupported USB bridge") or ": Unsupported USB bridge" in s
           for s in messages):
        return Attempt(device_type, Answer.UNSUPPORTED, said)
    if _has_health(doc):
        return parse(doc, device_type, at)
    support = _dict(doc.get("smart_support"))
    if support.get("available") is False:
        return Attempt(device_type, Answer.NO_SMART, said)
    if support.get("enabled") is False:  # turning it on would be a write: left to a person
        return Attempt(device_type, Answer.SMART_OFF, said)
    return Attempt(device_type, Answer.TRY_NEXT, said)


def parse(doc: Mapping[str, Any], device_type: str, at: datetime) -> HealthReading:
    """The reading in smartctl's JSON (``-j``) output, read at ``at``."""
    device = _dict(doc.get("device"))
    attrs = {a.get("id"): a for a in _dicts(_dict(doc.get("ata_smart_attributes")).get("table"))}
    nvme = _dict(doc.get("nvme_smart_health_information_log"))
    status = doc.get("smart_status")
    passed = _dict(status).get("passed")
    hours = _int(_dict(doc.get("power_on_time")).get("hours"))
    temperature = _int(_dict(doc.get("temperature")).get("current"))
    return HealthReading(
        at=at,
        device_type=device_type,
        protocol=_str(device.get("protocol")),
        model=_str(doc.get("model_name")) or _str(doc.get("scsi_model_name")),
        serial=_str(doc.get("serial_number")),
        passed=passed if isinstance(passed, bool) else None,
        reallocated=_raw(attrs.get(REALLOCATED)) if attrs else
        _int(doc.get("scsi_grown_defect_list")),  # SCSI: the grown defects
        pending=_raw(attrs.get(PENDING)),
        uncorrectable=_raw(attrs.get(UNCORRECTABLE)),
        crc_errors=_raw(attrs.get(CRC_ERRORS)),
        power_on_hours=hours if hours is not None else
        _raw(attrs.get(POWER_ON_HOURS)) if POWER_ON_HOURS in attrs else
        _int(nvme.get("power_on_hours")),
        temperature_c=temperature if temperature is not None else
        _raw(attrs.get(TEMPERATURE) or attrs.get(AIRFLOW_TEMPERATURE)),
        critical_warning=_int(nvme.get("critical_warning")),
        percentage_used=_int(nvme.get("percentage_used")),
        media_errors=_int(nvme.get("media_errors")),
        failing_attributes=tuple(
            _str(a.get("name")) or f"attribute {a.get('id')}" for a in attrs.values()
            if a.get("when_failed") == "now"),
    )


def _has_health(doc: Mapping[str, Any]) -> bool:
    return (isinstance(_dict(doc.get("smart_status")).get("passed"), bool)
            or bool(_dicts(_dict(doc.get("ata_smart_attributes")).get("table")))
            or bool(_dict(doc.get("nvme_smart_health_information_log"))))


def _raw(attr: Mapping[str, Any] | None) -> int | None:
    """An ATA attribute's raw value as smartctl shows it: the first number of its raw
    string (a temperature's "34 (Min/Max 20/45)", hours packed with minutes), else the
    raw number."""
    if not attr:
        return None
    raw = _dict(attr.get("raw"))
    m = _LEADING_INT.match(_str(raw.get("string")))
    return int(m.group(1)) if m else _int(raw.get("value"))


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any) -> int | None:
    return value if _is_int(value) else None


def _str(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


# The answers that end the search, and how a check that read nothing says why
_FINAL = {
    Answer.STANDBY: (Why.STANDBY, "the disk is asleep: not woken to read it"),
    Answer.POWER_UNKNOWN: (Why.POWER_UNKNOWN, "the enclosure cannot tell whether the disk "
                           "sleeps: not read, so as not to wake it"),
    Answer.UNSUPPORTED: (Why.NO_PASSTHROUGH, "the USB enclosure passes no SMART data "
                         "through (smartctl: {said})"),
    Answer.NO_SMART: (Why.NO_SMART, "the drive has no SMART"),
    Answer.SMART_OFF: (Why.NO_SMART, "SMART is turned off in the drive (`smartctl -s on "
                       "{device}` turns it on)"),
    Answer.TOO_OLD: (Why.FAILED, "smartctl is too old to promise not to wake a sleeping "
                     "disk (7.3 or newer can)"),
}


# Running it -----------------------------------------------------------------------------

def whole_disk(device: str, sys_block: Path = SYS_BLOCK) -> tuple[str, bool]:
    """The whole disk of ``device`` (``/dev/sdb1`` -> ``/dev/sdb``; a whole-disk file
    system is its own disk) and whether it is a loop device. Reads sysfs: blocking."""
    name = Path(os.path.realpath(device)).name
    node = sys_block / name
    if (node / "partition").exists():
        name = Path(os.path.realpath(node)).parent.name
    return f"/dev/{name}", (sys_block / name / "loop").is_dir()


async def read(program: str, device: str, at: datetime, *, remembered: str = "",
               awake: bool = True, is_loop: bool = False) -> HealthReading | NotReported:
    """Read ``device`` (a whole disk) with smartctl ``program``: the ``remembered`` device
    type first, then ``DEVICE_TYPES`` in order, until one answers with health data or
    says why none will come."""
    types = [remembered] if remembered else []
    types += [t for t in DEVICE_TYPES if t != remembered]
    tried: list[Attempt] = []
    for device_type in types:
        argv = smartctl_argv(program, device_type, device, awake=awake)
        try:
            async with asyncio.timeout(TIMEOUT_S):
                status, output = await execute.capture(argv, ok_codes=range(256))
        except TimeoutError:
            log.warning("smartctl -d %s %s did not answer within %s", device_type, device,
                        duration(TIMEOUT_S))
            return NotReported(at, Why.TIMEOUT,
                               f"smartctl did not answer within {duration(TIMEOUT_S)}")
        except OSError as exc:
            return NotReported(at, Why.NO_SMARTCTL,
                               f"smartctl could not be run: {exc.strerror or exc}")
        except CommandError as exc:  # ended by a signal
            return NotReported(at, Why.FAILED, f"smartctl failed: {exc}")
        answer = interpret(device_type, status, output, at)
        if isinstance(answer, HealthReading):
            return answer
        log.info("smartctl -d %s %s: %s (%s)", device_type, device, answer.message,
                 answer.answer.value)
        tried.append(answer)
        if answer.answer is Answer.SLEEP and device_type == remembered:
            return NotReported(at, Why.STANDBY, _FINAL[Answer.STANDBY][1])
        if answer.answer in _FINAL:
            why, text = _FINAL[answer.answer]
            return NotReported(at, why, text.format(device=device, said=answer.message))
    if is_loop:
        return NotReported(at, Why.NO_SMART, "a loop device has no SMART")
    return NotReported(at, Why.NO_PASSTHROUGH, "the USB enclosure passes no SMART data "
                       f"through (tried {', '.join(a.device_type for a in tried)})")
