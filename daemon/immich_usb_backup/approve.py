"""``approve DEVICE``: a person approves a disk for backups, once.

The disk is looked at read-only first: without the marker folder (and without
``--create-marker``, the person's request to create it) nothing is written. Then it is
mounted to write, the folder created if asked, a new disk key written into it
(``trust``), and the UUID recorded with the key's hash (``approvals``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from immich_usb_backup import approvals, clock, policy, trust
from immich_usb_backup.config import Config
from immich_usb_backup.errors import Refused
from immich_usb_backup.flow import peek_marker
from immich_usb_backup.fsutil import BackupRoot
from immich_usb_backup.target import MARKER, Disk, find_backup_root
from immich_usb_backup.udisks import UDisks, mounted


async def approve_device(config: Config, target: str,
                         create_marker: bool) -> tuple[approvals.Approval, bool]:
    """Approve the exFAT disk ``target`` (``/dev/...`` or ``UUID=...``) for backups.

    Looks for the marker folder read-only first: without it (and without
    ``create_marker``, a person's request to create it) nothing is written. Then mounts
    it to write (if needed; unmounted again), creates the marker folder if asked, writes
    a new disk key into it and records the UUID with the key's hash in the state dir.
    Return the approval and whether the marker was created.
    """
    udisks = await UDisks.connect()
    try:
        device = await udisks.device_for(target)
        info = await udisks.wait_for_filesystem(device)
        if info.fs_type != "exfat":
            raise Refused(f"{device} holds {info.fs_type or 'no'} file system; only exFAT "
                          "disks are backed up to (see docs/first-disk.md)")
        if not info.uuid:
            raise Refused(f"{device} has no file system UUID to approve it by")
        if not create_marker:
            marker, _ = await peek_marker(udisks, device)
            if marker != "marked":
                raise Refused(f"the disk has no {MARKER} folder. Create it yourself, or run "
                              "approve again with --create-marker to have it created")
        async with mounted(udisks, info) as mount:
            created, key = await asyncio.to_thread(_mark_for_approval, mount.mount_point)
        approval = approvals.Approval(policy.normalise_uuid(info.uuid), info.label,
                                      clock.iso(clock.now()), key)
        await asyncio.to_thread(approvals.add, config.state_dir, approval)
        return approval, created
    finally:
        udisks.close()


def _mark_for_approval(mount_point: Path) -> tuple[bool, str]:
    """Create the marker folder if it is missing (a person asked), write a new disk key
    into it; return whether the folder was created and the key's hash."""
    marker = mount_point / MARKER
    created = not marker.is_dir()
    if created:
        marker.mkdir()
    root = BackupRoot(find_backup_root(Disk(mount_point, "", None, None)))
    return created, trust.write_key(root)
