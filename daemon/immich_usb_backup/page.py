"""The history page as this program writes it: the runs, every approved disk at a
glance, and each disk's last restore drill, gathered from the state dir in one place
for every page it writes (the state dir's, the disk's, ``history --html``).

Blocking file work: call it in a thread from the event loop.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from immich_usb_backup import clock, drill, history, layout, overview, report
from immich_usb_backup.config import Config
from immich_usb_backup.record import RunRecord

log = logging.getLogger(__name__)

NAME = layout.PAGE  # in the state dir and in the backup folder on the disk
RUNS = 100  # runs on the page (the strip shows the last 30)


def _gather(config: Config, runs: int | None, current: RunRecord | None,
            disk: str | None) -> tuple[list[RunRecord], dict[str, Any]]:
    """The records (the last ``runs``, with ``current``, a run not yet in the history, as
    the newest; ``disk``: only the runs onto that disk) and what else the page shows."""
    records = history.load_runs(config.state_dir, runs if current is None or runs is None
                                else runs - 1, disk)
    if current is not None:
        records.append(current)
    return records, {"drills": drill.load_outcomes(config.state_dir),
                     "disks": overview.with_health(overview.disks(config),
                                                   config.state_dir, clock.now()),
                     "remind_after_days": config.notify.remind_after_days}


def render(config: Config, runs: int | None = RUNS, *, current: RunRecord | None = None,
           disk: str | None = None) -> str:
    """The page: the runs, every approved disk and the drills."""
    records, extras = _gather(config, runs, current, disk)
    return report.render_html(records, **extras)


def refresh(config: Config) -> None:
    """Rewrite the state dir's page; a failure is only logged."""
    try:
        write(config.state_dir / NAME, config)
    except OSError as exc:
        log.warning("could not refresh %s: %s", NAME, exc)


def write(path: Path, config: Config, runs: int | None = RUNS,
          disk: str | None = None) -> None:
    """Write the page to ``path`` atomically (``report.write_html``)."""
    records, extras = _gather(config, runs, None, disk)
    report.write_html(path, records, **extras)
