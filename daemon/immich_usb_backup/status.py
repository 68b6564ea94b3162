"""Live status of the running backup, for ``status`` and ``status --json``.

The running backup writes ``<state dir>/status.json`` (atomically, at most twice a
second); a reader reports ``running`` only while the backup lock is held, so a crashed
run never shows as running.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from immich_usb_backup import state
from immich_usb_backup.lock import is_running

STATUS_NAME = state.STATUS
WRITE_INTERVAL_S = 0.5
RATE_SMOOTHING = 0.3


class StatusWriter:
    """Keeps the live status file of one run up to date."""

    def __init__(self, state_dir: Path, disk: dict[str, Any]) -> None:
        self.path = state_dir / STATUS_NAME
        self.disk = disk
        self.phase = "preflight"
        self.bytes_done = 0
        self.bytes_total = 0
        self.detail = ""
        self.started = time.time()
        self._last_write = 0.0
        self._rate = 0.0
        self._rate_at = (time.monotonic(), 0)

    def set_phase(self, phase: str, bytes_total: int = 0, detail: str = "") -> None:
        self.phase = phase
        self.bytes_total = bytes_total
        self.bytes_done = 0
        self.detail = detail
        self._rate = 0.0
        self._rate_at = (time.monotonic(), 0)
        self.write(force=True)

    def counter(self, check: Callable[[], None] | None = None) -> Callable[[int], None]:
        """A function to give the bytes of each block as work goes: they add up to the
        phase's progress. ``check`` is called first each time (a run's ``check_cancel``)."""
        done = 0

        def add(n: int) -> None:
            nonlocal done
            if check is not None:
                check()
            done += n
            self.progress(done)
        return add

    def progress(self, bytes_done: int, detail: str | None = None) -> None:
        now = time.monotonic()
        then, done_then = self._rate_at
        if now - then >= 1.0:
            sample = (bytes_done - done_then) / (now - then)
            self._rate = sample if not self._rate else (
                RATE_SMOOTHING * sample + (1 - RATE_SMOOTHING) * self._rate
            )
            self._rate_at = (now, bytes_done)
        self.bytes_done = bytes_done
        if detail is not None:
            self.detail = detail
        self.write()

    def snapshot(self) -> dict[str, Any]:
        total = self.bytes_total
        percent = min(100.0, 100.0 * self.bytes_done / total) if total else 0.0
        remaining = max(0, total - self.bytes_done)
        eta = round(remaining / self._rate) if self._rate > 0 and total else None
        return {
            "state": "running",
            "pid": os.getpid(),
            "phase": self.phase,
            "detail": self.detail,
            "percent": round(percent, 1),
            "bytes_done": self.bytes_done,
            "bytes_total": total,
            "rate_bps": round(self._rate),
            "eta_s": eta,
            "disk": self.disk,
            "started_at_epoch": round(self.started, 3),
        }

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < WRITE_INTERVAL_S:
            return
        self._last_write = now
        tmp = self.path.with_name(f".{STATUS_NAME}.{os.getpid()}")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, self.path)

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def read_status(state_dir: Path) -> dict[str, Any]:
    """The live status: ``{"state": "idle"}`` or the running backup's snapshot."""
    if not is_running(state_dir):
        return {"state": "idle"}
    try:
        data: dict[str, Any] = json.loads((state_dir / STATUS_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"state": "running", "phase": "starting", "percent": 0.0, "bytes_done": 0,
                "bytes_total": 0, "rate_bps": 0, "eta_s": None, "disk": None}
    return data
