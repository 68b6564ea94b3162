"""What the commands share: exit codes, the live progress on stderr while work runs,
what a device target looks like."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from immich_usb_backup.cliformat import (
    format_status_line,
)
from immich_usb_backup.config import Config
from immich_usb_backup.status import read_status

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
T = TypeVar("T")


async def with_progress(config: Config, work: Callable[[], Awaitable[T]],
                         progress: ProgressPrinter | None = None) -> T | None:
    """Run ``work`` with the live progress on stderr; Ctrl-C or SIGTERM cancels it (the
    work records what it must) and gives None."""
    import asyncio  # noqa: PLC0415 - see cmd_run

    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    progress = progress or ProgressPrinter()
    watcher = asyncio.create_task(progress.follow(config.state_dir))
    try:
        return await work()
    except asyncio.CancelledError:
        return None
    finally:
        watcher.cancel()
        progress.end()


def is_device_target(target: str) -> bool:
    return target.startswith("/dev/") or target.upper().startswith("UUID=")


class ProgressPrinter:
    """Shows the live status on stderr while ``run`` works: one updating line on a
    terminal, a line per phase otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.phase = ""
        self.shown = False
        self.paused = False  # while a question waits for its answer

    async def follow(self, state_dir: Path) -> None:
        import asyncio  # noqa: PLC0415 - see cmd_run

        while True:
            await asyncio.sleep(0.5)
            st = await asyncio.to_thread(read_status, state_dir)  # a busy disk is slow
            if self.paused or st.get("state") != "running" or st.get("pid") != os.getpid():
                continue
            if self.tty:
                width = shutil.get_terminal_size().columns
                sys.stderr.write("\r" + format_status_line(st)[: width - 1].ljust(width - 1))
                sys.stderr.flush()
                self.shown = True
            elif st.get("phase") != self.phase:
                self.phase = str(st.get("phase"))
                print(f"{self.phase}: {st.get('detail', '')}", file=sys.stderr)

    def end(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            self.shown = False
