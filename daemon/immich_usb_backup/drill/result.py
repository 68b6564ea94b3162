"""What a restore drill found (plain data): the dump, PostgreSQL's version, the rows of
Immich's main tables, every statement that failed, and why it did not pass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from immich_usb_backup import clock
from immich_usb_backup.clock import iso

LISTED = 100  # failed statements kept in full; the count is always exact


@dataclass
class FailedStatement:
    """One statement of the dump that failed, as the server logged it."""

    error: str  # "ERROR:  extension "vectors" is not available"
    statement: str = ""
    database: str = ""
    detail: str = ""
    hint: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class TableCount:
    table: str | None  # the name found in schema public, None when there is none
    rows: int | None = None  # None: not found, or the count failed

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "rows": self.rows}


@dataclass
class DrillResult:
    """What one drill found; ``passed`` says whether the dump loads."""

    dump: str | None = None
    kind: str | None = None  # "cluster dump" (pg_dumpall) or "database dump" (pg_dump)
    postgres_version: str | None = None
    postgres_bin_dir: str | None = None
    started_at: str = field(default_factory=lambda: iso(clock.now()))
    duration_s: float = 0.0
    database: str | None = None  # where Immich's tables were found
    tables: dict[str, TableCount] = field(default_factory=dict)
    failed: list[FailedStatement] = field(default_factory=list)
    failed_count: int = 0
    problems: list[str] = field(default_factory=list)  # why it did not pass

    @property
    def passed(self) -> bool:
        return not self.problems

    def add_failed(self, statement: FailedStatement) -> None:
        self.failed_count += 1
        if len(self.failed) < LISTED:
            self.failed.append(statement)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "dump": self.dump, "kind": self.kind,
            "postgres_version": self.postgres_version,
            "postgres_bin_dir": self.postgres_bin_dir, "started_at": self.started_at,
            "duration_s": self.duration_s, "database": self.database,
            "tables": {k: v.as_dict() for k, v in self.tables.items()},
            "failed_statements": {"count": self.failed_count,
                                  "statements": [f.as_dict() for f in self.failed]},
            "problems": self.problems,
        }
