"""The project's small exception hierarchy.

Every failure that ends a backup run is one of these; ``flow.run_backup`` is the one
place that catches everything else and turns it into a history record.
"""

from __future__ import annotations


class BackupError(Exception):
    """A backup could not be completed (history status ``failed``)."""


class Refused(BackupError):
    """A safety rule stopped the run before anything was written (status ``refused``)."""


class ConfigError(Exception):
    """The configuration file is invalid. ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class CommandError(BackupError):
    """A subprocess exited with a status that its caller does not accept."""

    def __init__(self, argv0: str, returncode: int, stderr_tail: str) -> None:
        detail = f": {stderr_tail.strip()}" if stderr_tail.strip() else ""
        super().__init__(f"{argv0} exited with status {returncode}{detail}")
        self.argv0 = argv0
        self.returncode = returncode
        self.stderr_tail = stderr_tail
