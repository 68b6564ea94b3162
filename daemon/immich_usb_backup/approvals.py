"""The disks approved for backups, and each disk's key: ``<state dir>/disks.toml``.

```toml
[[disk]]                      # approved with `approve`
uuid = "6F5F-FDC3"
label = "Backup"
approved_at = "2026-11-26T23:30:00+00:00"
key_sha256 = "9c1f..."        # the hash of the key `approve` wrote onto the disk

[[key]]                       # a disk approved in the config ([disks] approved)
uuid = "1A2B-3C4D"
key_sha256 = "..."
set_at = "2026-11-27T10:00:00+00:00"
```

Only the key's hash is kept here; the key itself is on the disk (``trust``). A damaged
file raises ``state.StateDamaged``: a run never proceeds on half-read approvals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from immich_usb_backup import state
from immich_usb_backup.policy import normalise_uuid

FILE_NAME = state.DISKS


@dataclass(frozen=True)
class Approval:
    uuid: str
    label: str
    approved_at: str
    key_sha256: str = ""  # "" for an approval made before disks had keys


@dataclass(frozen=True)
class Key:
    """The key of a disk approved in the config, recorded on its first plug."""

    uuid: str
    key_sha256: str
    set_at: str


def _read(state_dir: Path) -> tuple[list[Approval], list[Key]]:
    data = state.read_toml(state_dir, FILE_NAME)
    approvals = [Approval(normalise_uuid(d["uuid"]), str(d.get("label", "")),
                          str(d.get("approved_at", "")), str(d.get("key_sha256", "")))
                 for d in state.tables(data, "disk") if isinstance(d.get("uuid"), str)]
    keys = [Key(normalise_uuid(d["uuid"]), str(d.get("key_sha256", "")), str(d.get("set_at", "")))
            for d in state.tables(data, "key")
            if isinstance(d.get("uuid"), str) and d.get("key_sha256")]
    return approvals, keys


def _write(state_dir: Path, approvals: list[Approval], keys: list[Key]) -> None:
    data: dict[str, Any] = {"disk": [asdict(a) for a in approvals]}
    if keys:
        data["key"] = [asdict(k) for k in keys]
    state.write_toml(state_dir, FILE_NAME, data, mode=0o600)


def load(state_dir: Path) -> list[Approval]:
    """The approvals recorded so far (none when the file does not exist)."""
    return _read(state_dir)[0]


def approved_uuids(state_dir: Path) -> set[str]:
    return {a.uuid for a in load(state_dir)}


def known_key(state_dir: Path, uuid: str) -> str | None:
    """The hash of the key this server knows for the disk ``uuid``, or None."""
    u = normalise_uuid(uuid)
    approvals, keys = _read(state_dir)
    for a in approvals:
        if a.uuid == u and a.key_sha256:
            return a.key_sha256
    return next((k.key_sha256 for k in keys if k.uuid == u), None)


def add(state_dir: Path, approval: Approval) -> bool:
    """Record ``approval`` (replacing one for the same UUID, and a config disk's key
    entry). Return False if the UUID was approved already."""
    approvals, keys = _read(state_dir)
    existed = any(a.uuid == approval.uuid for a in approvals)
    _write(state_dir, [a for a in approvals if a.uuid != approval.uuid] + [approval],
           [k for k in keys if k.uuid != approval.uuid])
    return not existed


def set_key(state_dir: Path, uuid: str, key_sha256: str, at: str) -> None:
    """Record the hash of the disk ``uuid``'s key: on its approval when it has one made
    with ``approve``, else as a config disk's key."""
    u = normalise_uuid(uuid)
    approvals, keys = _read(state_dir)
    if any(a.uuid == u for a in approvals):
        approvals = [Approval(a.uuid, a.label, a.approved_at, key_sha256)
                     if a.uuid == u else a for a in approvals]
    else:
        keys = [k for k in keys if k.uuid != u] + [Key(u, key_sha256, at)]
    _write(state_dir, approvals, keys)
