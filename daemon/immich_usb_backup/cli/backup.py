"""``run``, ``verify``, ``status``, ``history``, ``remind``, ``check``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from immich_usb_backup import history
from immich_usb_backup.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    is_device_target,
    with_progress,
)
from immich_usb_backup.cliformat import (
    format_status_line,
    format_summary,
    format_verify,
)
from immich_usb_backup.config import Config
from immich_usb_backup.errors import BackupError
from immich_usb_backup.record import RunRecord
from immich_usb_backup.status import read_status
from immich_usb_backup.text import human_bytes, plural


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - not at start-up: status and history need none

    from immich_usb_backup.flow import run_backup  # noqa: PLC0415 - keeps `status` fast

    async def work() -> list[RunRecord]:
        trigger = args.trigger
        try:
            if args.target == "approved":
                return await _run_on_approved(config, trigger, args.mode)
            if is_device_target(args.target):
                return [await _run_on_device(config, args.target, trigger, args.mode)]
            return [await run_backup(config, Path(args.target), trigger=trigger,
                                     mode=args.mode)]
        except BackupError as exc:  # the device could not be found or mounted: recorded
            from immich_usb_backup.flow import record_unusable  # noqa: PLC0415

            return [await record_unusable(config, args.target, trigger,
                                          args.mode or config.library.mode, str(exc))]

    records = asyncio.run(with_progress(config, work))
    if records is None:
        last = history.load_runs(config.state_dir, 1)
        if not last:
            last = [RunRecord.begin(args.trigger, "", args.target)]
            last[0].status = "interrupted"
        records = last[-1:]
    if not records:
        print("no approved disk is connected: nothing to do")
        return EXIT_OK
    print("\n".join(format_summary(r) for r in records))
    return EXIT_OK if all(r.status == "success" for r in records) else EXIT_FAILED


def cmd_verify(config: Config, args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see cmd_run

    from immich_usb_backup import diskcheck  # noqa: PLC0415
    from immich_usb_backup.diskreport import Report  # noqa: PLC0415

    async def work() -> Report:
        if is_device_target(args.target):
            return await diskcheck.verify_device(config, args.target, args.sample,
                                                 args.restore_drill)
        return await diskcheck.verify_path(config, Path(args.target), args.sample,
                                           args.restore_drill)

    try:
        report = asyncio.run(with_progress(config, work))
    except BackupError as exc:
        print(f"verify FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if report is None:
        print("verify interrupted", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_verify(report))
    return EXIT_OK if report.ok else EXIT_FAILED


async def _run_on_device(config: Config, target: str, trigger: str,
                         mode: str | None) -> RunRecord:
    from immich_usb_backup.flow import backup_device  # noqa: PLC0415
    from immich_usb_backup.udisks import UDisks  # noqa: PLC0415

    udisks = await UDisks.connect()
    try:
        device = await udisks.device_for(target)
        return await backup_device(config, udisks, device, trigger=trigger, mode=mode)
    finally:
        udisks.close()


async def _run_on_approved(config: Config, trigger: str,
                           mode: str | None) -> list[RunRecord]:
    from immich_usb_backup.flow import backup_approved  # noqa: PLC0415

    return await backup_approved(config, trigger=trigger, mode=mode)


# status, history ---------------------------------------------------------------------

def cmd_status(config: Config, args: argparse.Namespace) -> int:
    """The live status; with --watch, again every second until the run ends (Ctrl-C
    stops watching, not the backup). On a terminal the line is redrawn in place."""
    redraw = args.watch and not args.json and sys.stdout.isatty()
    saw_run = False
    try:
        while True:
            st = read_status(config.state_dir)
            if args.json:
                print(json.dumps(st), flush=True)
            elif st["state"] == "idle":
                if redraw and saw_run:
                    sys.stdout.write("\n")
                print(_idle_text(config, saw_run))
            else:
                saw_run = True
                disk = st.get("disk") or {}
                line = (f"running on {disk.get('label') or disk.get('mount_point') or '?'}: "
                        f"{format_status_line(st)}")
                if redraw:
                    width = shutil.get_terminal_size().columns
                    sys.stdout.write("\r" + line[: width - 1].ljust(width - 1))
                    sys.stdout.flush()
                else:
                    print(line, flush=True)
            if not args.watch or st["state"] == "idle":
                return EXIT_OK
            time.sleep(1)
    except KeyboardInterrupt:
        if redraw:
            sys.stdout.write("\n")
        return EXIT_OK


def _idle_text(config: Config, just_finished: bool) -> str:
    last = history.load_runs(config.state_dir, 1)
    if not last:
        return "idle: no backup is running (no backups yet)"
    r = last[0]
    when = (r.finished_at or r.started_at or "?")[:19].replace("T", " ")
    summary = (f"{r.status} on {r.disk.label or '-'} at {when}: "
               f"{plural(r.files_transferred, 'file')}, {human_bytes(r.bytes_transferred or 0)}")
    if just_finished:
        return f"finished: {summary}"
    return f"idle: no backup is running; last backup {summary}"


def cmd_history(config: Config, args: argparse.Namespace) -> int:
    if args.json:  # as stored, whatever version wrote it
        print(json.dumps(history.last_records(config.state_dir, args.last, args.disk),
                         indent=2, ensure_ascii=False))
        return EXIT_OK
    records = history.load_runs(config.state_dir, args.last, args.disk)
    if args.html is not None:
        from immich_usb_backup import page  # noqa: PLC0415 - only this option needs it

        try:
            page.write(args.html, config, args.last, args.disk)
        except OSError as exc:
            print(f"cannot write {args.html}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"wrote {args.html} ({plural(len(records), 'run')})")
        return EXIT_OK
    if not records:
        print("no backups yet" if args.disk is None else f"no backups onto {args.disk} yet")
    else:
        print(history.format_table(records))
    return EXIT_OK


def cmd_remind(config: Config, args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see cmd_run

    from immich_usb_backup import clock  # noqa: PLC0415
    from immich_usb_backup.flow import remind  # noqa: PLC0415

    sent = asyncio.run(remind(config, clock.now()))
    print(f"sent: {sent}" if sent else "no reminder due")
    return EXIT_OK


# check -------------------------------------------------------------------------------

def cmd_check(config: Config, args: argparse.Namespace) -> int:
    from immich_usb_backup.checkenv import environment_problems  # noqa: PLC0415

    problems = environment_problems(config)
    if problems:
        print(f"{plural(len(problems), 'problem')} with {config.source}:")
        for problem in problems:
            print(f"  - {problem}")
    else:
        print(f"{config.source}: configuration and environment OK")
    sent_ok = True
    if args.send_test:
        sent_ok = _send_test(config)
    return EXIT_OK if not problems and sent_ok else EXIT_FAILED


def _send_test(config: Config) -> bool:
    import asyncio  # noqa: PLC0415 - see cmd_run

    from immich_usb_backup.notify import send_test  # noqa: PLC0415 - apprise is heavy

    answers = asyncio.run(send_test(config.notify))
    if not answers:
        print("no notification URL is configured ([notify] urls, urls_file, or "
              "$IMMICH_USB_BACKUP_NOTIFY_URLS): nothing to send")
        return False
    print(f"test message to {plural(len(answers), 'service')}:")
    for name, why in answers:
        print(f"  {name}: {'sent' if why is None else 'NOT sent: ' + why}")
    return all(why is None for _, why in answers)
