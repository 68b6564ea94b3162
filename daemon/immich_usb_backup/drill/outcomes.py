"""Each disk's last restore drill, kept in ``<state dir>/drills.toml`` (the last one,
and the last one that passed), for ``verify``'s output and the history page."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from immich_usb_backup import state
from immich_usb_backup.drill.result import DrillResult

STATE_NAME = state.DRILLS


@dataclass(frozen=True)
class DrillOutcome:
    """The last drill of one disk, as the history page and ``verify`` show it."""

    uuid: str
    label: str
    at: str  # ISO 8601
    passed: bool
    dump: str
    postgres_version: str = ""
    failed_statements: int = 0
    problem: str = ""  # the first reason it failed
    last_passed_at: str = ""  # the last drill that passed ("" if none), maybe this one
    last_passed_dump: str = ""

    @property
    def disk_name(self) -> str:
        if self.label and self.uuid:
            return f"{self.label} ({self.uuid})"
        return self.label or self.uuid or "-"


def load_outcomes(state_dir: Path) -> list[DrillOutcome]:
    """Every disk's last drill from ``<state_dir>/drills.toml`` (none if it is missing; a
    damaged one is kept aside and reported, see ``state``), newest first."""
    data = state.read_toml_or_empty(state_dir, STATE_NAME)
    names = {f for f in DrillOutcome.__dataclass_fields__}
    out = []
    for d in state.tables(data, "disk"):
        if not isinstance(d.get("uuid"), str):
            continue
        try:
            out.append(DrillOutcome(**{k: v for k, v in d.items() if k in names}))
        except TypeError:
            continue
    return sorted(out, key=lambda o: o.at, reverse=True)


def outcome_for(state_dir: Path, uuid: str | None) -> DrillOutcome | None:
    """The last drill of the disk ``uuid``, or None."""
    return next((o for o in load_outcomes(state_dir) if uuid and o.uuid == uuid), None)


def record(state_dir: Path, disk: dict[str, Any], result: DrillResult) -> DrillOutcome | None:
    """Keep ``result`` as the last drill of ``disk`` (its uuid, label), written atomically;
    return it as stored (None for a disk without a UUID, which is not kept)."""
    uuid = str(disk.get("uuid") or "")
    if not uuid:
        return None
    before = outcome_for(state_dir, uuid)
    passed_at, passed_dump = ((result.started_at, result.dump or "") if result.passed else
                              (before.last_passed_at, before.last_passed_dump) if before else
                              ("", ""))
    outcome = DrillOutcome(
        uuid=uuid, label=str(disk.get("label") or ""), at=result.started_at,
        passed=result.passed, dump=result.dump or "",
        postgres_version=result.postgres_version or "",
        failed_statements=result.failed_count,
        problem=result.problems[0] if result.problems else "",
        last_passed_at=passed_at, last_passed_dump=passed_dump)
    kept = [o for o in load_outcomes(state_dir) if o.uuid != uuid] + [outcome]
    state.write_toml(state_dir, STATE_NAME, {"disk": [asdict(o) for o in kept]})
    return outcome


def describe(outcome: DrillOutcome | None, when: Callable[[str], str]) -> str:
    """"<time>, passed (<dump>)", with the last pass after a failure; ``when`` formats a
    time."""
    if outcome is None:
        return "none yet (verify --restore-drill)"
    text = f"{when(outcome.at)}, {'passed' if outcome.passed else 'failed'} ({outcome.dump or '-'})"
    if not outcome.passed:
        text += (f"; last passed {when(outcome.last_passed_at)} ({outcome.last_passed_dump})"
                 if outcome.last_passed_at else "; never passed")
    return text


def plain_time(value: str) -> str:
    """``2025-03-01 02:00`` in local time, from an ISO 8601 time."""
    try:
        return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return value or "?"
