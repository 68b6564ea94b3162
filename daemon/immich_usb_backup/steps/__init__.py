"""Pipeline steps: their shape is in ``base``; ``STEPS`` is the order they run in
(Immich's advised order: the database first, then the config, then the library; then
the check that the database and the library agree).

Adding a step: see docs/design.md ("Adding a step").
"""

from __future__ import annotations

from immich_usb_backup.steps.assets import AssetsStep
from immich_usb_backup.steps.base import (
    Cancelled,
    DiskCheck,
    Preflight,
    RunContext,
    Step,
    in_thread,
)
from immich_usb_backup.steps.config_archive import ConfigStep
from immich_usb_backup.steps.database import DatabaseStep
from immich_usb_backup.steps.library import LibraryStep

STEPS: tuple[type[Step], ...] = (DatabaseStep, ConfigStep, LibraryStep, AssetsStep)

__all__ = ["STEPS", "Cancelled", "DiskCheck", "Preflight", "RunContext", "Step", "in_thread"]
