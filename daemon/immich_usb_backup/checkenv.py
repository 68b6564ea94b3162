"""The ``check`` command: every problem of the environment that would stop or weaken a
backup, from each enabled step (``Step.check``), the notification URLs and the state
dir, found at once."""

from __future__ import annotations

import asyncio
import os

from immich_usb_backup.config import Config
from immich_usb_backup.notify import url_problems
from immich_usb_backup.steps import STEPS


def environment_problems(config: Config) -> list[str]:
    """Every problem of the environment that would stop or weaken a backup: each enabled
    step's (``Step.check``), the notification URLs', the state dir's."""
    async def steps() -> list[str]:
        found: list[str] = []
        for step in STEPS:
            if step.enabled(config):
                found += await step.check(config)
        return found

    problems = asyncio.run(steps())
    problems += url_problems(config.notify)
    state = config.state_dir
    probe = state if state.exists() else next((p for p in state.parents if p.exists()), None)
    if probe is None or not os.access(probe, os.W_OK):
        problems.append(f"state.dir: {state} cannot be created or written by this user")
    return problems
