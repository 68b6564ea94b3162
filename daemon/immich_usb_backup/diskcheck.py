"""``verify TARGET``: check a backup disk from the disk alone, without the server.

For a disk that sat in a drawer, or before a restore: each step checks its own folder
(``Step.check_disk``: the library against its manifest, the dumps read to their end,
the config archives tested), read-only: a device is mounted read-only for the check.
With ``--restore-drill`` the newest dump is also loaded into a throwaway PostgreSQL
(``drill``), under the same lock and live status; its outcome is kept in the state dir.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from immich_usb_backup import drill, flow, layout, notify, page
from immich_usb_backup.config import Config
from immich_usb_backup.diskreport import Report
from immich_usb_backup.drill import DrillResult
from immich_usb_backup.errors import Refused
from immich_usb_backup.lock import backup_lock
from immich_usb_backup.status import StatusWriter
from immich_usb_backup.steps import STEPS, DiskCheck
from immich_usb_backup.target import Disk, find_backup_root, inspect_mount

log = logging.getLogger(__name__)


def check(config: Config, disk: Disk, sample: float | None, status: StatusWriter,
          stop: threading.Event) -> Report:
    """Check the backup folder on ``disk``: each step's folder, in the steps' order.
    Reads only."""
    root = find_backup_root(disk)
    report = Report({"uuid": disk.uuid, "label": disk.label,
                     "mount_point": str(disk.mount_point)}, sample_percent=sample)
    work = Path(tempfile.mkdtemp(prefix="verify-", dir=config.state_dir))
    try:
        dc = DiskCheck(config, root, report, status, stop, sample, disk.device, work)
        for step in STEPS:
            step.check_disk(dc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _postgres(config: Config, restore_drill: bool) -> Path | None:
    """Where the drill's PostgreSQL programs are (None without the drill); raises
    drill.DrillUnavailable before anything is mounted or read."""
    return drill.find_postgres(config.database.postgres_bin_dir) if restore_drill else None


async def verify_path(config: Config, target: Path, sample: float | None,
                      restore_drill: bool = False) -> Report:
    """Check the backup disk mounted at ``target`` (left mounted, as it was found); with
    ``restore_drill``, then load its newest dump into a throwaway PostgreSQL and keep the
    outcome in the state dir."""
    bin_dir = _postgres(config, restore_drill)
    stop = threading.Event()
    with backup_lock(config.state_dir):
        disk = await inspect_mount(target)
        identity = {"uuid": disk.uuid, "label": disk.label,
                    "mount_point": str(disk.mount_point)}
        status = StatusWriter(config.state_dir, identity)
        try:
            report = await asyncio.to_thread(check, config, disk, sample, status, stop)
            notifier = notify.Notifier(config.notify)
            report.health = await flow.read_health(config, disk, notifier)
            await notifier.drain()
            if bin_dir is not None:
                root = await asyncio.to_thread(find_backup_root, disk)
                report.drill = await drill.restore_drill(bin_dir, root / layout.DATABASE,
                                                         status)
                await asyncio.to_thread(_keep_drill, config, identity, report.drill)
            report.last_drill = await asyncio.to_thread(drill.outcome_for, config.state_dir,
                                                        disk.uuid)
            return report
        except asyncio.CancelledError:
            stop.set()
            raise
        finally:
            status.clear()


def _keep_drill(config: Config, disk: dict[str, Any], result: DrillResult) -> None:
    """The drill's outcome into the state dir (a check itself is not recorded), and the
    state dir's history page refreshed with it (when there is one)."""
    try:
        drill.record(config.state_dir, disk, result)
    except OSError as exc:
        log.warning("could not keep the restore drill's outcome in %s: %s",
                    config.state_dir, exc)
        return
    if (config.state_dir / page.NAME).exists():
        page.refresh(config)


async def verify_device(config: Config, target: str, sample: float | None,
                        restore_drill: bool = False) -> Report:
    """Check the disk ``target`` (``/dev/...`` or ``UUID=...``): mounted read-only for the
    check, if it is not mounted already, and unmounted again."""
    from immich_usb_backup.udisks import UDisks, mounted  # noqa: PLC0415 - dbus when needed

    _postgres(config, restore_drill)  # missing PostgreSQL: said before mounting anything

    udisks = await UDisks.connect()
    try:
        device = await udisks.device_for(target)
        info = await udisks.wait_for_filesystem(device)
        if info.fs_type != "exfat":
            raise Refused(f"{device} holds {info.fs_type or 'no'} file system, not exFAT")
        async with mounted(udisks, info, read_only=True) as mount:
            return await verify_path(config, mount.mount_point, sample, restore_drill)
    finally:
        udisks.close()
