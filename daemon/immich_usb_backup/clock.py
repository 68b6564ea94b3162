"""The one place the product reads the wall clock.

Everything that needs "now" calls ``now()`` once and passes the time on as an argument,
so that tests give a fixed time and nothing depends on the hour or the time zone a test
runs in. Elapsed time (timeouts, rates, a run's duration) is measured with
``time.monotonic``, which is not a reading of the time of day.
"""

from __future__ import annotations

from datetime import datetime


def now() -> datetime:
    """The time now, in this machine's local time zone (an aware datetime)."""
    return datetime.now().astimezone()


def iso(when: datetime) -> str:
    """``when`` as ISO 8601 with its offset, to the second (the history's format)."""
    return when.isoformat(timespec="seconds")


def stamp(when: datetime) -> str:
    """``when`` as ``YYYYMMDDTHHMMSS``: for names of files (``disks.toml.damaged-...``)."""
    return when.strftime("%Y%m%dT%H%M%S")
