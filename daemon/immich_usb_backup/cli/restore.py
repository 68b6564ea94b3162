"""``restore``: the plan, its confirmation, the restore, the outcome."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from immich_usb_backup.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ProgressPrinter,
    is_device_target,
    with_progress,
)
from immich_usb_backup.cliformat import (
    format_dump_list,
    format_restore,
    format_restore_plan,
)
from immich_usb_backup.config import Config
from immich_usb_backup.errors import BackupError


def cmd_restore(config: Config, args: argparse.Namespace) -> int:
    """``restore``: the plan, confirmed, carried out; exit 0 only when the files, the
    database and the asset check all passed (docs/usage.md). ``--list``: the dumps."""
    import asyncio  # noqa: PLC0415 - see cmd_run

    from immich_usb_backup import restore  # noqa: PLC0415

    device, source = is_device_target(args.source), Path(args.source)
    if not args.list and (args.upload_location is None or args.database is None):
        print("restore: give --upload-location DIR and --database TARGET (or --list)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        owner = restore.parse_owner(args.owner) if args.owner else None
        options = restore.Options(args.upload_location, args.database, args.dry_run,
                                  args.merge, owner, args.dump, args.replace_database)
    except ValueError as exc:
        print(f"restore: {exc}", file=sys.stderr)
        return EXIT_USAGE
    progress = ProgressPrinter()
    confirm = _Confirmation(args.yes, progress)

    async def work() -> Any:
        if args.list:
            return await (restore.list_device(args.source) if device else
                          restore.list_path(source))
        if device:
            return await restore.restore_device(config, args.source, options, confirm.ask)
        return await restore.restore_path(config, source, options, confirm.ask)

    try:
        outcome = asyncio.run(with_progress(config, work, progress))
    except restore.TargetError as exc:
        print(f"restore: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BackupError as exc:
        print(f"restore{'' if args.list else ' FAILED'}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if outcome is None:
        print("restore interrupted: the files copied so far stay in the upload location "
              "(run it again with --merge); the database is as it was unless a load "
              "finished", file=sys.stderr)
        return EXIT_FAILED
    if args.list:
        print(format_dump_list(outcome))
        return EXIT_OK
    if outcome.status == "declined" and confirm.shown:
        print(confirm.why)
        return EXIT_USAGE if confirm.no_terminal else EXIT_FAILED
    print(format_restore(outcome))
    return EXIT_OK if outcome.status in ("success", "planned") else EXIT_FAILED


class _Confirmation:
    """The plan shown and confirmed: on a terminal by typing ``yes``; ``--yes`` for
    scripts; without either nothing is done (exit 2)."""

    def __init__(self, yes: bool, progress: ProgressPrinter) -> None:
        self.yes, self.progress = yes, progress
        self.shown = self.no_terminal = False
        self.why = ""

    async def ask(self, plan: Any) -> bool:
        self.progress.paused = True
        self.progress.end()  # the progress line, if one is drawn, ends here
        try:
            print(f"restore plan\n{format_restore_plan(plan)}", flush=True)
            self.shown = True
            if self.yes:
                print("confirmed by --yes", flush=True)
                return True
            if not sys.stdin.isatty():
                self.no_terminal = True
                self.why = ("no terminal to confirm on and no --yes: nothing was done "
                            "(run it again with --yes to go ahead)")
                return False
            print("Type yes to restore, anything else to stop: ", end="", flush=True)
            answer = await _read_line()
            self.why = "not confirmed: nothing was done"
            return answer.strip().lower() == "yes"
        finally:
            self.progress.paused = False


async def _read_line() -> str:
    """A line from the terminal, read without a thread (Ctrl-C stops the wait)."""
    import asyncio  # noqa: PLC0415 - see cmd_run

    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()
    fd = sys.stdin.fileno()

    def readable() -> None:
        if not got.done():
            got.set_result(os.read(fd, 4096))

    loop.add_reader(fd, readable)
    try:
        return (await got).decode(errors="replace")
    finally:
        loop.remove_reader(fd)
