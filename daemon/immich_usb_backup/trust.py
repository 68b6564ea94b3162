"""The disk key: what tells the approved disk from a stranger's disk given its UUID.

An exFAT volume serial (the UUID an approval names) is 32 bits, shown in every message,
and any disk can be given any serial (``tune.exfat -I``). So ``approve`` also writes a
random key of 256 bits into the marker folder (``layout.KEY``) and keeps only its hash
(``approvals``); the daemon writes only to a disk whose key matches. A disk with an
approved UUID and a missing or wrong key is looked at read-only and refused.

Disks approved before keys existed, and disks approved in the config, get their key on
the first plug that finds the disk proven to hold this server's backup (``proven``:
the ``run_id`` in its ``backup-info.toml`` is one of this server's runs onto that UUID,
or its manifest has the size and time this server last wrote there: facts no message or
page shows), or, for a disk never backed up, on its first plug. docs/first-disk.md says
what the key protects against and what it does not.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from immich_usb_backup import approvals, clock, history, layout, state
from immich_usb_backup.config import Config
from immich_usb_backup.fsutil import BackupRoot, atomic_write_bytes
from immich_usb_backup.hashcache import HashCache
from immich_usb_backup.policy import normalise_uuid

log = logging.getLogger(__name__)

KEY_BYTES = 32
_HEADER = "immich-usb-backup disk key"
_NOTE = ("This file tells the Immich server that this disk is the backup disk it approved.\n"
         "Keep it here. Without it this disk is not backed up to until it is approved\n"
         "again (immich-usb-backup approve).\n")

Verdict = Literal["match", "adopt", "establish", "missing", "wrong", "unproven"]
ACCEPTED: tuple[Verdict, ...] = ("match", "adopt", "establish")
_WHY: dict[Verdict, str] = {
    "missing": "its key is missing",
    "wrong": "its key does not match",
    "unproven": "it has no key this server knows, and nothing on it proves that it holds "
                "this server's backup",
}


@dataclass(frozen=True)
class DiskFacts:
    """What the backup folder on a disk says about itself (read only)."""

    key_sha256: str | None  # the hash of its key, None when it has none (or a damaged one)
    run_id: str | None  # the last run written there (backup-info.toml)
    manifest: tuple[int, int] | None  # library.sha256's size and time


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def read_facts(root: Path) -> DiskFacts:
    """Read the key, the last run's id and the manifest's size and time from the backup
    folder ``root``; nothing is written."""
    return DiskFacts(_read_key(root / layout.KEY), _read_run_id(root / layout.INFO),
                     _stat(root / layout.MANIFEST))


def _read_key(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("ascii", "replace").splitlines()
    except OSError:
        return None
    if len(head) < 2 or head[0].strip() != _HEADER:
        return None
    key = head[1].strip()
    if len(key) != 2 * KEY_BYTES or any(c not in "0123456789abcdef" for c in key):
        return None
    return key_sha256(key)


def _read_run_id(path: Path) -> str | None:
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    backup = data.get("backup")
    run_id = backup.get("run_id") if isinstance(backup, dict) else None
    return run_id if isinstance(run_id, str) and len(run_id) >= 32 else None


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def verdict(known: str | None, facts: DiskFacts, proven: bool, backed_up: bool) -> Verdict:
    """Decide, from plain data, whether a disk with an approved UUID is the approved disk.

    ``known``: the hash of its key this server keeps (None: none yet); ``proven``: the
    disk holds what only this server's runs wrote there; ``backed_up``: this server has
    backed up onto that UUID before."""
    if known is not None:
        if facts.key_sha256 is None:
            return "missing"
        return "match" if secrets.compare_digest(known, facts.key_sha256) else "wrong"
    if proven or not backed_up:
        return "adopt" if facts.key_sha256 is not None else "establish"
    return "unproven" if facts.key_sha256 is not None else "missing"


def assess(config: Config, uuid: str, facts: DiskFacts) -> Verdict:
    """The verdict for the disk ``uuid`` whose backup folder says ``facts``. Reads the
    state dir (raises ``state.StateDamaged`` for damaged approvals)."""
    known = approvals.known_key(config.state_dir, uuid)
    if known is not None:
        return verdict(known, facts, False, True)
    proven, backed_up = _history_says(config, uuid, facts)
    proven = proven or _manifest_is_ours(config, uuid, facts)
    return verdict(None, facts, proven, backed_up)


def _history_says(config: Config, uuid: str, facts: DiskFacts) -> tuple[bool, bool]:
    """(the disk's last run id is one of this server's runs onto it, this server has
    backed up onto the UUID before), from the history."""
    u = normalise_uuid(uuid)
    proven = backed_up = False
    for rec in history.iter_records(config.state_dir):
        disk = rec.get("disk")
        if not isinstance(disk, dict) or normalise_uuid(str(disk.get("uuid") or "")) != u:
            continue
        backed_up = backed_up or rec.get("status") in ("success", "partial")
        proven = proven or (facts.run_id is not None and rec.get("run_id") == facts.run_id)
    return proven, backed_up


def _manifest_is_ours(config: Config, uuid: str, facts: DiskFacts) -> bool:
    if facts.manifest is None or not (config.state_dir / state.HASHES).exists():
        return False
    cache = HashCache(config.state_dir)
    try:
        known = cache.manifest_state(normalise_uuid(uuid))
    finally:
        cache.close()
    return known is not None and known[:2] == facts.manifest


def refusal(label: str | None, uuid: str, why: Verdict, hint: str) -> str:
    """Why a disk with an approved UUID was refused, and what to do."""
    name = f"{label} (UUID {uuid})" if label else f"UUID {uuid}"
    return (f"a disk claiming to be {name} was refused: {_WHY[why]}. Nothing was written "
            f"to it. If it is your backup disk (its {layout.KEY} was deleted, or it was "
            f"formatted again), approve it again: {hint}")


def warning(label: str | None, uuid: str, why: Verdict, hint: str) -> str:
    """The note of a run by hand onto a disk whose key does not match: the person named
    the disk, so it is backed up to, and told."""
    name = f"{label} (UUID {uuid})" if label else f"UUID {uuid}"
    return (f"warning: the disk {name} is not proven to be the approved disk ({_WHY[why]}); "
            f"it was backed up to because you named it. To give it a key, approve it "
            f"again: {hint}")


def accept(root: BackupRoot, config: Config, uuid: str, why: Verdict, facts: DiskFacts,
           at: datetime | None = None) -> None:
    """For a disk accepted without a known key: write a new key onto it ("establish"),
    or take the one it has ("adopt"), and keep its hash in the state dir."""
    when = clock.iso(at or clock.now())
    if why == "adopt" and facts.key_sha256 is not None:
        approvals.set_key(config.state_dir, uuid, facts.key_sha256, when)
        log.info("the disk %s keeps its key", uuid)
    elif why == "establish":
        approvals.set_key(config.state_dir, uuid, write_key(root), when)
        log.info("the disk %s got its key", uuid)


def write_key(root: BackupRoot) -> str:
    """Write a new random key into the backup folder (temporary name, flush, rename);
    return its hash."""
    key = secrets.token_hex(KEY_BYTES)
    atomic_write_bytes(root, root.path(layout.KEY), f"{_HEADER}\n{key}\n\n{_NOTE}".encode())
    return key_sha256(key)
