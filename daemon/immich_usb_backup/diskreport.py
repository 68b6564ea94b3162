"""What ``verify TARGET`` found on a disk: plain data, filled by each step's
``check_disk`` and by the restore drill, printed by the CLI (``--json`` as it is)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from immich_usb_backup.record import readable

if TYPE_CHECKING:
    from immich_usb_backup.drill import DrillOutcome, DrillResult

LISTED = 100  # paths shown per kind of problem; the counts are always exact


@dataclass
class Found:
    """Paths of one kind of problem: the first ``LISTED``, and how many in all."""

    count: int = 0
    paths: list[str] = field(default_factory=list)

    def add(self, path: str) -> None:
        self.count += 1
        if len(self.paths) < LISTED:
            self.paths.append(readable(path))


@dataclass
class Report:
    disk: dict[str, Any]
    manifest_entries: int = 0
    files_on_disk: int = 0
    checked_files: int = 0
    checked_bytes: int = 0
    sample_percent: float | None = None
    missing: Found = field(default_factory=Found)
    changed: Found = field(default_factory=Found)
    unreadable: Found = field(default_factory=Found)
    unexpected: Found = field(default_factory=Found)
    bad_lines: Found = field(default_factory=Found)
    dumps_checked: int = 0
    archives_checked: int = 0
    damaged: Found = field(default_factory=Found)  # dumps and archives
    assets: dict[str, Any] | None = None  # the asset check: its line and counts
    asset_problems: Found = field(default_factory=Found)
    health: dict[str, Any] | None = None  # the disk's SMART reading (health.HealthResult)
    drill: DrillResult | None = None  # with --restore-drill
    last_drill: DrillOutcome | None = None  # the disk's last drill, kept in the state

    @property
    def ok(self) -> bool:
        if self.drill is not None and not self.drill.passed:
            return False
        return not any(f.count for f in (self.missing, self.changed, self.unreadable,
                                         self.unexpected, self.bad_lines, self.damaged,
                                         self.asset_problems))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok, "disk": self.disk, "manifest_entries": self.manifest_entries,
            "files_on_disk": self.files_on_disk, "checked_files": self.checked_files,
            "checked_bytes": self.checked_bytes, "sample_percent": self.sample_percent,
            "dumps_checked": self.dumps_checked, "archives_checked": self.archives_checked,
        }
        for name in ("missing", "changed", "unreadable", "unexpected", "bad_lines", "damaged",
                     "asset_problems"):
            found: Found = getattr(self, name)
            out[name] = {"count": found.count, "paths": found.paths}
        out["assets"] = self.assets
        out["health"] = self.health
        out["restore_drill"] = self.drill.as_dict() if self.drill else None
        out["last_restore_drill"] = asdict(self.last_drill) if self.last_drill else None
        return out
