"""``--database immich-api``: Immich (2.5+) restores the dump itself.

The dump is uploaded (Immich keeps it as ``uploaded-<name>`` in its backups folder; the
list it gives back must then hold it, at its size), the restore is asked for, and we
wait until Immich answers again: it goes into maintenance mode (or restarts), makes a
restore point of the database it has, restores, runs its migrations and a health check,
and comes back in normal mode; when the restore fails it rolls back to the restore
point and stays in maintenance mode with an error, which is what we report. The calls
are ``immich``'s; this module only follows them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from immich_usb_backup import immich
from immich_usb_backup.masking import register_secrets
from immich_usb_backup.status import StatusWriter

log = logging.getLogger(__name__)

UPLOADED = "uploaded-"  # Immich's prefix for an uploaded dump
POLL_S = 2.0
TIMEOUT_S = 6 * 3600.0  # a restore of a large database takes its time
START_GRACE_S = 120.0  # Immich must leave normal mode within this long


@dataclass
class ApiResult:
    uploaded: str | None = None  # the name Immich keeps it under
    restored: bool = False
    error: str | None = None
    waited_s: float = 0.0


async def restore_through_api(url: str, key_file: Path, dump: Path, status: StatusWriter,
                              *, poll_s: float = POLL_S,
                              timeout_s: float = TIMEOUT_S) -> ApiResult:
    """Upload ``dump`` to Immich at ``url`` and have it restore it (see the module doc)."""
    result = ApiResult()
    try:
        key = await asyncio.to_thread(immich.read_key, key_file)
        register_secrets({key})
        size = dump.stat().st_size
        status.set_phase("restore-database", size, f"uploading {dump.name} to Immich")
        await asyncio.to_thread(immich.upload_database_backup, url, key, dump,
                                status.counter())
        held = await asyncio.to_thread(immich.database_backups, url, key)
        name = UPLOADED + dump.name
        if name not in held and dump.name in held:
            name = dump.name
        if name not in held:
            result.error = (f"Immich does not list the uploaded dump ({name}) among its "
                            "database backups")
            return result
        if held[name] is not None and held[name] != size:
            result.error = (f"Immich holds {name} with {held[name]} bytes, the disk's dump "
                            f"has {size}: the upload did not arrive whole")
            return result
        result.uploaded = name
        status.set_phase("restore-database", 0, f"Immich restores {name}")
        await asyncio.to_thread(immich.start_database_restore, url, key, name)
        started = time.monotonic()
        result.error = await _wait(url, status, started, poll_s, timeout_s)
        result.waited_s = round(time.monotonic() - started, 1)
        result.restored = result.error is None
    except immich.ImmichError as exc:
        result.error = str(exc)
    return result


async def _wait(url: str, status: StatusWriter, started: float, poll_s: float,
                timeout_s: float) -> str | None:
    """Follow Immich until it answers in normal mode after its restore; the error it
    reports, or None."""
    left_normal = False
    while (waited := time.monotonic() - started) < timeout_s:
        await asyncio.sleep(poll_s)
        try:
            maintenance = await asyncio.to_thread(immich.in_maintenance, url)
        except immich.ImmichError:
            left_normal = True  # restarting: into maintenance mode, or back out of it
            status.progress(0, f"Immich is restarting ({waited:.0f} s)")
            continue
        if not maintenance:
            if left_normal:
                return None
            if waited > START_GRACE_S:
                return (f"Immich did not start the restore within {START_GRACE_S:g} s "
                        "(it stayed in normal mode)")
            continue
        left_normal = True
        try:
            state = await asyncio.to_thread(immich.maintenance_status, url)
        except immich.ImmichError:
            continue
        task, error = state.get("task"), state.get("error")
        if task == "error" or error:
            return (f"Immich reports that the restore failed ({error or 'no reason given'}): "
                    "it rolled back to the database it had (its restore point) and stays "
                    "in maintenance mode; its log says why (docker logs immich_server), "
                    "and Administration > Maintenance ends maintenance mode")
        progress = state.get("progress")
        shown = f" {progress:.0%}" if isinstance(progress, int | float) and progress <= 1 \
            else ""
        status.progress(0, f"Immich restores: {task or 'working'}{shown} ({waited:.0f} s)")
    return f"Immich did not answer in normal mode within {timeout_s:g} s"
