"""Pure decisions on plain data: no I/O here.

What exFAT can hold, which disks are candidates and approved, whether a run may delete
what it would delete, whether the files fit, which config archives to prune.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from immich_usb_backup.text import human_bytes

EXFAT_FORBIDDEN = frozenset('"*:<>?\\|')
EXFAT_MAX_NAME_UTF16 = 255
# A name of at most this many characters fits in 255 UTF-16 units whatever they are.
_SURELY_SHORT = EXFAT_MAX_NAME_UTF16 // 2
# Anything exfat_name_problem might object to: a forbidden or control character, a byte
# that was not UTF-8 (decoded as a lone surrogate), or a final dot.
_SUSPECT = re.compile('[\x00-\x1f"*:<>?\\\\|\udc80-\udcff]|\\.$')


def exfat_name_problem(name: str) -> str | None:
    """Given a file name (as ``os.fsdecode`` gives it), say why exFAT cannot hold it.

    Return None when it can.
    """
    if len(name) <= _SURELY_SHORT and _SUSPECT.search(name) is None:
        return None  # the common case in one C-speed pass; the checks below say why not
    if any("\udc80" <= c <= "\udcff" for c in name):
        return "name is not valid UTF-8"
    bad = sorted({c for c in name if c in EXFAT_FORBIDDEN or ord(c) < 0x20})
    if bad:
        shown = " ".join(repr(c) if ord(c) < 0x20 else c for c in bad)
        return f"name has characters exFAT cannot store ({shown})"
    if len(name.encode("utf-16-le", "surrogatepass")) // 2 > EXFAT_MAX_NAME_UTF16:
        return f"name is longer than {EXFAT_MAX_NAME_UTF16} characters (exFAT's limit)"
    if name.endswith("."):
        return "name ends with a dot (Linux's exFAT driver and Windows drop it)"
    return None


def exfat_fold(name: str) -> str:
    """The key under which exFAT considers names equal (it ignores case, char by char)."""
    up = name.upper()
    if len(up) == len(name):  # every character mapped to one: the same as char by char
        return up
    out = []
    for c in name:
        up = c.upper()
        out.append(up if len(up) == 1 else c)
    return "".join(out)


# Disks -------------------------------------------------------------------------------

def is_candidate(bus: str | None, fs_type: str | None, devtype: str,
                 usb_driver: str | None = None) -> bool:
    """A USB exFAT partition, or a whole USB disk formatted without a partition table.

    USB is ``ID_BUS=usb``, or ``ID_USB_DRIVER`` set (``usb-storage``, ``uas``): since
    systemd 252, udev reports many USB hard disks and SSDs whose enclosure passes the
    disk's identity through as ``ID_BUS=ata``, and adds the ``ID_USB_*`` properties.
    """
    usb = bus == "usb" or bool(usb_driver)
    return usb and fs_type == "exfat" and devtype in ("partition", "disk")


def normalise_uuid(uuid: str) -> str:
    """exFAT UUIDs are ``XXXX-XXXX`` in hex; compare them without regard to case."""
    return uuid.strip().upper()


def is_approved(
    uuid: str | None, configured: tuple[str, ...], recorded: set[str]
) -> bool:
    """Is this file system UUID approved, in the config or by ``approve``?"""
    if not uuid:
        return False
    u = normalise_uuid(uuid)
    return u in {normalise_uuid(x) for x in configured} or u in recorded


def approve_hint(uuid: str | None, device: str) -> str:
    """The exact command a person runs to approve a disk."""
    target = f"UUID={uuid}" if uuid else device
    return f"sudo immich-usb-backup approve {target}"


def delete_limit(backed_up_files: int, max_delete_percent: float) -> int:
    """How many of ``backed_up_files`` a run may delete under ``max_delete_percent``."""
    # exact arithmetic: 1000 files at 32.3% allow 323, not 322.99999 -> 322
    return math.floor(backed_up_files * Fraction(str(max_delete_percent)) / 100)


def deletion_refusal(deletes: int, backed_up_files: int, max_delete_percent: float) -> str | None:
    """Say why deleting ``deletes`` of ``backed_up_files`` is refused; None if allowed."""
    if deletes == 0:
        return None
    limit = delete_limit(backed_up_files, max_delete_percent)
    if deletes <= limit:
        return None
    share = 100 * deletes / max(backed_up_files, 1)
    return (
        f"this run would delete {deletes} of the {backed_up_files} files in the backup "
        f"({share:.1f}%), more than library.max_delete_percent = {max_delete_percent:g}%. "
        "If these files really were removed from Immich, raise library.max_delete_percent "
        "for one run."
    )


def replacement_refusal(replaced: int, backed_up_files: int,
                        max_delete_percent: float) -> str | None:
    """Say why replacing ``replaced`` of ``backed_up_files`` with new versions is refused.

    Immich never rewrites an original in place, so most of a library changing at once is
    what ransomware encrypting the server looks like; the same share as for deletions.
    """
    if replaced == 0 or replaced <= delete_limit(backed_up_files, max_delete_percent):
        return None
    share = 100 * replaced / max(backed_up_files, 1)
    return (
        f"this run would replace {replaced} of the {backed_up_files} files in the backup "
        f"({share:.1f}%) with changed versions, more than library.max_delete_percent = "
        f"{max_delete_percent:g}%. Immich does not change its files in place, so this "
        "looks like damage on the server (ransomware encrypting the photos?): check a few "
        "of the changed files on the server. If you know why they changed (restored "
        "with new times, for example), raise library.max_delete_percent for one run."
    )


@dataclass(frozen=True)
class Space:
    """What one step will write and free on the disk, in allocated bytes; steps' spaces
    add up to the run's."""

    to_write: int = 0
    freed_before_copy: int = 0  # removed before anything is copied
    freed_by_replacing: int = 0  # old versions rsync removes as it replaces them
    largest_replaced: int = 0  # rsync holds one new and one old version at once
    kept: int = 0  # the keep area (deleted/) with what this run would move into it

    def __add__(self, other: Space) -> Space:
        return Space(
            self.to_write + other.to_write,
            self.freed_before_copy + other.freed_before_copy,
            self.freed_by_replacing + other.freed_by_replacing,
            max(self.largest_replaced, other.largest_replaced),
            self.kept + other.kept,
        )

    def against(self, free: int, keep_days: int) -> SpaceNeed:
        """The run's need against the disk's ``free`` bytes (safety rule 5)."""
        return SpaceNeed(self.to_write, self.freed_before_copy, self.freed_by_replacing,
                         self.largest_replaced, free, self.kept, keep_days)


@dataclass(frozen=True)
class SpaceNeed:
    """What a run will write and what it frees, in allocated bytes on the disk."""

    to_write: int
    freed_before_copy: int
    freed_by_replacing: int
    largest_replaced: int
    free: int
    kept: int = 0  # the keep area (deleted/) with what this run would move into it
    keep_days: int = 0

    @property
    def available(self) -> int:
        return self.free + self.freed_before_copy + self.freed_by_replacing - self.largest_replaced

    @property
    def fits(self) -> bool:
        return self.to_write <= self.available


def capacity_refusal(need: SpaceNeed) -> str | None:
    """Say why the run cannot fit on the disk; None when it fits."""
    if need.fits:
        return None
    return (
        f"not enough space on the disk: this backup needs to write {human_bytes(need.to_write)}, "
        f"the disk has {human_bytes(need.free)} free and the old backup frees "
        f"{human_bytes(need.freed_before_copy + need.freed_by_replacing)}; "
        f"{human_bytes(need.to_write - need.available)} more are needed. "
        + (f"{human_bytes(need.kept)} of the disk is (or would be) the keep area "
           f"(immich-server-backups/deleted/: files removed or changed on the server in "
           f"the last {need.keep_days} days); delete its oldest dated folders by hand or "
           "lower library.keep_deleted_days, if you are sure you do not need them. "
           if need.kept else "")
        + "Free space on the disk or use a bigger one."
    )


_CONFIG_ZIP = re.compile(r"^config-(\d{4}-\d{2}-\d{2}T\d{6})(?:-(\d+))?\.zip$")


def archives_to_prune(names: list[str], keep: int) -> list[str]:
    """Of the config archive names on the disk, those beyond the ``keep`` newest.

    ``config-STAMP-2.zip`` is the second archive of the same second, newer than
    ``config-STAMP.zip``.
    """
    dated = []
    for n in names:
        m = _CONFIG_ZIP.match(n)
        if m:
            dated.append(((m.group(1), int(m.group(2) or 1)), n))
    dated.sort(reverse=True)
    return [n for _, n in dated[keep:]]
