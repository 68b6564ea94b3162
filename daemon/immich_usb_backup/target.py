"""The backup target: an already-mounted exFAT file system and its marker folder.

Given the path a user passed to ``run``, ``inspect_mount`` finds the mount (from
``/proc/self/mountinfo``), checks that it is exFAT (by the kernel's file system type, or
for FUSE mounts by probing the device with ``blkid``) and reads its UUID and label.
``find_backup_root`` then finds the marker folder; it never creates it (safety rule 3).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from immich_usb_backup import execute, layout
from immich_usb_backup.errors import CommandError, Refused

log = logging.getLogger(__name__)

MARKER = layout.MARKER
LEGACY_MARKER = layout.LEGACY_MARKER
MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class Mount:
    mount_point: Path
    device: str
    fstype: str


@dataclass(frozen=True)
class Disk:
    """A mounted exFAT file system that may receive a backup."""

    mount_point: Path
    device: str
    uuid: str | None
    label: str | None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    out, i = bytearray(), 0
    raw = os.fsencode(field)
    while i < len(raw):
        if raw[i : i + 1] == b"\\" and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def read_mounts(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """Every mount of this process's namespace, in mount order."""
    mounts = []
    for line in mountinfo.read_text(errors="surrogateescape").splitlines():
        left, _, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or len(rf) < 2:
            continue
        mounts.append(Mount(Path(_unescape(lf[4])), _unescape(rf[1]), rf[0]))
    return mounts


def mount_at(path: Path, mountinfo: Path = MOUNTINFO) -> Mount | None:
    """The mount whose mount point is exactly ``path`` (links resolved), or None."""
    real = Path(os.path.realpath(path))
    found = None
    for m in read_mounts(mountinfo):
        if m.mount_point == real:
            found = m  # the last one mounted over this point is the one in use
    return found


_HEX_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def decode_udev(value: str | None) -> str | None:
    """udev's ``*_ENC`` values escape bytes as ``\\xNN`` (``B\\xc3\\xa4ckup\\x20Disk``)."""
    if value is None:
        return None
    raw = _HEX_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), value.encode())
    return raw.decode("utf-8", "replace")


async def blkid(device: str) -> dict[str, str]:
    """Probe ``device`` directly (not blkid's cache): TYPE, UUID and LABEL (decoded).

    Return {} when it cannot (no permission to read the device, say).
    """
    try:
        _, out = await execute.capture(["blkid", "-p", "-o", "udev", device])
    except (CommandError, OSError) as exc:
        log.debug("blkid %s failed: %s", device, exc)
        return {}
    raw = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            raw[key] = value
    tags = {}
    wanted = (("TYPE", "ID_FS_TYPE"), ("UUID", "ID_FS_UUID_ENC"), ("LABEL", "ID_FS_LABEL_ENC"))
    for tag, key in wanted:
        decoded = decode_udev(raw.get(key))
        if decoded:
            tags[tag] = decoded
    return tags


async def inspect_mount(path: Path) -> Disk:
    """Return the Disk mounted at ``path``; raise Refused if it is not a mounted exFAT."""
    if not path.is_dir():
        raise Refused(f"{path} is not a folder: give the mount point of the backup disk")
    m = mount_at(path)
    if m is None:
        raise Refused(
            f"{path} is not the mount point of a disk: give the folder where the exFAT "
            "backup disk is mounted (for example /media/backup), not a folder inside it"
        )
    tags = await blkid(m.device) if m.device.startswith("/dev/") else {}
    fstype = m.fstype
    if fstype in ("fuseblk", "fuse", "fuse.exfat", "fuse.exfat-fuse"):
        fstype = tags.get("TYPE", fstype)
    if fstype != "exfat":
        raise Refused(
            f"{path} holds a {fstype} file system; backups are written only to exFAT disks "
            "(so any computer can read them). See docs/first-disk.md to prepare one."
        )
    return Disk(m.mount_point, m.device, tags.get("UUID"), tags.get("LABEL"))


def marker_state(mount_point: Path) -> str | None:
    """"marked", "legacy" (only the old web UI's folder) or None (not a backup disk)."""
    if (mount_point / MARKER).is_dir():
        return "marked"
    if (mount_point / LEGACY_MARKER).is_dir():
        return "legacy"
    return None


def mount_point_of(device: str) -> Path | None:
    """Where ``device`` is mounted now (the first mount), or None."""
    real = os.path.realpath(device)
    for m in read_mounts():
        if m.device in (device, real):
            return m.mount_point
    return None


def find_backup_root(disk: Disk) -> Path:
    """The marker folder on ``disk``. Raise Refused when it is missing or not a folder."""
    marker = disk.mount_point / MARKER
    if marker.is_symlink() or (marker.exists() and not marker.is_dir()):
        raise Refused(f"{marker} is not a plain folder; refusing to write to this disk")
    if marker.is_dir():
        return marker
    legacy = disk.mount_point / LEGACY_MARKER
    if legacy.is_dir() and not legacy.is_symlink():
        raise Refused(
            f"this disk has the folder `{LEGACY_MARKER}` made by the old web UI. To back up "
            f"to this disk, rename it: mv '{legacy}' '{marker}'"
        )
    raise Refused(
        f"this disk has no `{MARKER}` folder at its root, so it is not a backup disk. "
        f"To use it, create the folder: mkdir '{marker}'"
    )


def check_no_overlap(backup_root: Path, disk: Disk, upload: Path, state_dir: Path) -> None:
    """Refuse a configuration that would read from or write to the wrong side.

    The source must not lie inside the backup disk or contain the backup folder (a mirror
    of itself), and the state dir must not be on the backup disk (a write outside the
    marker folder).
    """
    root = Path(os.path.realpath(backup_root))
    mount = Path(os.path.realpath(disk.mount_point))
    src = Path(os.path.realpath(upload))
    state = Path(os.path.realpath(state_dir))
    if src == mount or mount in src.parents or src in root.parents:
        raise Refused(
            f"immich.upload_location ({upload}) overlaps the backup disk ({disk.mount_point}); "
            "the source must be Immich's folder on the server, not on the backup disk"
        )
    if state == mount or mount in state.parents:
        raise Refused(
            f"state.dir ({state_dir}) is on the backup disk ({disk.mount_point}); it must be "
            "on the server, as nothing outside the backup folder may be written"
        )
