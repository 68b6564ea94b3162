"""The state dir (``[state] dir``): every state file is read and written here.

One error policy for all of them. A file is written whole or not at all (a temporary
file, flushed, renamed). A TOML state file that cannot be read (a half-written line, a
disk error) is never half-used: it is kept aside as ``NAME.damaged-YYYYMMDDTHHMMSS``
and ``StateDamaged`` says what was lost and what to do; the caller records that in the
history and sends a message (``flow.record_state_damage``). The history (JSON Lines,
appended) skips a line it cannot parse, as a power cut can leave the last one half
written. The files, and what each holds, are listed in docs/usage.md ("The state dir").
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import tomli_w

from immich_usb_backup import clock
from immich_usb_backup.errors import BackupError
from immich_usb_backup.fsutil import replace_file

log = logging.getLogger(__name__)

DISKS = "disks.toml"  # approvals, and the hash of each disk's key
DRILLS = "drills.toml"  # each disk's last restore drill
REMINDER = "reminder.toml"  # when the last "no backup for N days" reminder went out
HEALTH = "health.toml"  # each disk's last SMART readings
HISTORY = "history.jsonl"  # one record per run, appended
STATUS = "status.json"  # the running backup's live progress
HASHES = "hashes.sqlite"  # the hash cache (a cache: rebuilt when damaged)
LOCK = "backup.lock"  # safety rule 8
PAGE = "history.html"  # the history page, refreshed after every run (layout.PAGE on the disk)
WORK = "run"  # the running backup's work folder, emptied at every start

# What is lost with a damaged file, and what to do about it.
_ADVICE = {
    DISKS: "the disks approved with `approve` and their keys are forgotten: approve each "
           "backup disk again (sudo immich-usb-backup approve DEVICE); disks listed in "
           "[disks] approved stay approved",
    DRILLS: "the outcomes of earlier restore drills are forgotten: run "
            "`immich-usb-backup verify DISK --restore-drill` to have a new one",
    REMINDER: "a \"no backup for N days\" reminder may be sent again",
    HEALTH: "the disks' earlier SMART readings are forgotten: the next reading starts "
            "the comparison again",
}


class StateDamaged(BackupError):
    """A state file could not be read; it was kept aside (``kept_as``) and a fresh one is
    used from now on."""

    def __init__(self, path: Path, kept_as: Path | None, why: str) -> None:
        self.path, self.kept_as, self.why = path, kept_as, why
        aside = (f"it was kept aside as {kept_as.name}" if kept_as is not None
                 else "it could not even be moved aside")
        advice = _ADVICE.get(path.name, "")
        super().__init__(
            f"the state file {path} was damaged ({why}); {aside}, and a new one is started"
            + (f": {advice}" if advice else ""))


def read_toml(state_dir: Path, name: str, *, at: datetime | None = None) -> dict[str, Any]:
    """The TOML state file ``name``: {} when it does not exist. Raise ``StateDamaged``
    (after keeping the file aside) when it cannot be read or parsed."""
    file = state_dir / name
    try:
        return tomllib.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StateDamaged(file, _keep_aside(file, at or clock.now()), why) from None


def _keep_aside(file: Path, at: datetime) -> Path | None:
    """Rename a damaged ``file`` to ``NAME.damaged-STAMP`` (``-2``, ... when taken)."""
    base = f"{file.name}.damaged-{clock.stamp(at)}"
    for n in range(1, 100):
        aside = file.with_name(base if n == 1 else f"{base}-{n}")
        if aside.exists():
            continue
        try:
            os.rename(file, aside)
        except OSError as exc:
            log.error("could not keep the damaged %s aside: %s", file, exc)
            return None
        log.error("%s was damaged: kept aside as %s", file, aside.name)
        return aside
    return None


_damages: list[StateDamaged] = []  # found by read_toml_or_empty, not reported yet


def read_toml_or_empty(state_dir: Path, name: str, *,
                       at: datetime | None = None) -> dict[str, Any]:
    """``read_toml`` for a file whose loss costs no backup (the drills, the reminder, the
    disks' health): a damaged one is kept aside as ``read_toml`` does and read as empty,
    and the damage waits in ``take_damages`` for the caller's boundary (a run, a command,
    the daemon) to record it and send the message."""
    try:
        return read_toml(state_dir, name, at=at)
    except StateDamaged as exc:
        _damages.append(exc)
        return {}


def take_damages() -> list[StateDamaged]:
    """The damaged state files found since the last call (each told once)."""
    found = list(_damages)
    del _damages[:len(found)]
    return found


def write_toml(state_dir: Path, name: str, data: Mapping[str, Any], mode: int = 0o644) -> None:
    """Write the TOML state file ``name`` whole (temporary file, flush, rename)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    replace_file(state_dir / name, tomli_w.dumps(dict(data)).encode(), mode)


def tables(data: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """The array of tables ``key`` (``[[disk]]``) of a state file, its non-tables left out."""
    value = data.get(key)
    return [t for t in value if isinstance(t, dict)] if isinstance(value, list) else []


# JSON Lines: the history ------------------------------------------------------------------

def append_line(state_dir: Path, name: str, obj: Mapping[str, Any]) -> None:
    """Append ``obj`` as one JSON line to ``name`` and flush it to the disk (an exclusive
    ``flock`` keeps two writers' lines apart)."""
    import fcntl  # noqa: PLC0415 - POSIX only, as the product

    state_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps(obj, ensure_ascii=False) + "\n"
    fd = os.open(state_dir / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def iter_lines(state_dir: Path, name: str) -> Iterator[dict[str, Any]]:
    """Every JSON object of ``name``, in order, streaming; a line that is not one (a power
    cut mid-append) is skipped and logged."""
    try:
        f = open(state_dir / name, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except FileNotFoundError:
        return
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is damaged and was skipped", name, n)
                continue
            if isinstance(rec, dict):
                yield rec
