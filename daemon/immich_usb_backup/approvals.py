"""Disks approved with ``approve``: ``<state dir>/disks.toml``, written with tomli-w.

```toml
[[disk]]
uuid = "6F5F-FDC3"
label = "Backup"
approved_at = "2026-11-26T23:30:00+00:00"
```
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w

from immich_usb_backup.fsutil import replace_file
from immich_usb_backup.policy import normalise_uuid

FILE_NAME = "disks.toml"


@dataclass(frozen=True)
class Approval:
    uuid: str
    label: str
    approved_at: str


def load(state_dir: Path) -> list[Approval]:
    """The approvals recorded so far (none when the file does not exist)."""
    try:
        data = tomllib.loads((state_dir / FILE_NAME).read_text())
    except FileNotFoundError:
        return []
    out = []
    for d in data.get("disk", []):
        if isinstance(d, dict) and isinstance(d.get("uuid"), str):
            out.append(Approval(normalise_uuid(d["uuid"]), str(d.get("label", "")),
                                str(d.get("approved_at", ""))))
    return out


def approved_uuids(state_dir: Path) -> set[str]:
    return {a.uuid for a in load(state_dir)}


def add(state_dir: Path, approval: Approval) -> bool:
    """Record ``approval`` (replacing one for the same UUID). Return False if it was there."""
    current = load(state_dir)
    existed = any(a.uuid == approval.uuid for a in current)
    kept = [a for a in current if a.uuid != approval.uuid] + [approval]
    state_dir.mkdir(parents=True, exist_ok=True)
    replace_file(state_dir / FILE_NAME, tomli_w.dumps({"disk": [asdict(a) for a in kept]})
                 .encode())
    return not existed
