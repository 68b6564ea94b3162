"""The command line: parses arguments, prints, returns exit codes. Nothing else prints.

Exit codes: 0 success; 1 the backup failed, was partial, refused or interrupted (or
``check`` found a problem); 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from immich_usb_backup import __version__, history
from immich_usb_backup.cliformat import (
    format_disks,
    format_disks_all,
    format_dump_list,
    format_restore,
    format_restore_plan,
    format_status_line,
    format_summary,
    format_verify,
)
from immich_usb_backup.config import (
    MODES,
    Config,
    load_config,
    parse_config,
    resolve_config_path,
)
from immich_usb_backup.errors import BackupError, ConfigError
from immich_usb_backup.record import RunRecord
from immich_usb_backup.state import StateDamaged, take_damages
from immich_usb_backup.status import read_status
from immich_usb_backup.text import human_bytes, plural

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="immich-usb-backup",
        description="Back up an Immich server onto an approved exFAT USB disk.",
    )
    p.add_argument("-c", "--config", help="config file (default: $IMMICH_USB_BACKUP_CONFIG "
                   "or /etc/immich-usb-backup/config.toml)")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("daemon", help="wait for approved disks to be plugged in; back up to each")

    run = sub.add_parser("run", help="back up now onto TARGET")
    run.add_argument("target", metavar="TARGET",
                     help="a device (/dev/sdb1), UUID=XXXX-XXXX, the mount point of the "
                     "exFAT backup disk (e.g. /media/backup), or `approved`: every "
                     "approved disk connected now")
    run.add_argument("--mode", choices=MODES,
                     help="override library.mode for this run: quick (size and time), "
                     "verify (also compare the contents of what was copied and of a "
                     "rolling share of the rest), full (compare every file)")
    run.add_argument("--trigger", choices=("cli", "schedule"), default="cli",
                     help="recorded in the history; a timer passes `schedule`")

    ve = sub.add_parser("verify", help="check a backup disk against its manifest "
                        "(library.sha256), without the server")
    ve.add_argument("target", metavar="TARGET",
                    help="a device (/dev/sdb1), UUID=XXXX-XXXX (mounted read-only for the "
                    "check), or the mount point of the backup disk")
    ve.add_argument("--sample", type=_percent, metavar="PERCENT",
                    help="read back only this share of the files, chosen at random (a "
                    "quick check); the file lists are always compared in full")
    ve.add_argument("--restore-drill", action="store_true",
                    help="also load the newest database dump into a throwaway PostgreSQL "
                    "(needs PostgreSQL's programs: database.postgres_bin_dir) and count "
                    "Immich's assets, users and albums")
    ve.add_argument("--json", action="store_true", help="print the report as one JSON object")

    st = sub.add_parser("status", help="show the running backup's progress")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.add_argument("--watch", action="store_true", help="keep updating until the run ends")

    hi = sub.add_parser("history", help="show past backup runs")
    hi_out = hi.add_mutually_exclusive_group()
    hi_out.add_argument("--json", action="store_true", help="print a JSON array, oldest first")
    hi_out.add_argument("--html", type=Path, metavar="FILE",
                        help="write a self-contained HTML page of the runs to FILE")
    hi.add_argument("--last", type=_positive, metavar="N", help="only the last N runs")
    hi.add_argument("--disk", metavar="UUID", help="only the runs onto the disk with this "
                    "file system UUID")

    ck = sub.add_parser("check", help="validate the config and the environment")
    ck.add_argument("--send-test", action="store_true", help="also send a test message "
                    "through every configured notification URL and say how each went")

    dk = sub.add_parser("disks", help="list the USB exFAT disks connected now")
    dk.add_argument("--json", action="store_true", help="print a JSON array")
    dk.add_argument("--all", action="store_true", help="every disk ever approved, plugged in "
                    "or not: its last backup, its age, free space and files then, its last "
                    "content check")

    sub.add_parser("remind", help="send the \"no backup for N days\" reminder if it is due "
                   "(for a timer, on a machine without the daemon)")

    ap = sub.add_parser("approve", help="approve a disk for backups (once per disk)")
    ap.add_argument("device", metavar="DEVICE", help="/dev/sdb1 or UUID=XXXX-XXXX")
    ap.add_argument("--create-marker", action="store_true",
                    help="create the immich-server-backups folder if the disk lacks it")

    rs = sub.add_parser("restore", help="bring a server back from the disk (photos, "
                        "database, configuration), then prove it (docs/restore.md)")
    rs.add_argument("source", metavar="SOURCE", help="the backup disk, only read: a device, "
                    "UUID=XXXX-XXXX (mounted read-only meanwhile) or where it is mounted")
    rs.add_argument("--upload-location", type=Path, metavar="DIR",
                    help="Immich's upload location to restore into: empty or new")
    rs.add_argument("--database", metavar="TARGET", help="a PostgreSQL URL "
                    "(postgresql:///immich?host=/run/postgresql), docker:CONTAINER, or "
                    "immich-api (Immich 2.5+ restores the dump itself)")
    rs.add_argument("--dry-run", action="store_true", help="show the plan, do nothing")
    rs.add_argument("--yes", action="store_true", help="go ahead without asking")
    rs.add_argument("--merge", action="store_true",
                    help="copy only the files DIR lacks, never over one")
    rs.add_argument("--owner", metavar="UID:GID", help="owner of the restored files "
                    "(default: DIR's, or its parent's when DIR is new)")
    rs.add_argument("--dump", metavar="NAME", help="this dump instead of the newest")
    rs.add_argument("--list", action="store_true", help="list the disk's dumps, do nothing")
    rs.add_argument("--replace-database", action="store_true", help="the database may hold "
                    "Immich's tables: saved next to DIR first, then replaced")

    sub.add_parser("web", help="serve the web UI ([web] listen), without root")
    sub.add_parser("web-password", help="set the web UI's password (asked twice on a "
                   "terminal, else read from standard input)")
    return p


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _percent(text: str) -> float:
    try:
        n = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < n <= 100:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 100")
    return n


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    default_level = logging.INFO if args.command in ("daemon", "web") else logging.WARNING
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else default_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    path = resolve_config_path(args.config)
    if args.command in ("verify", "restore") and not args.config and not path.exists():
        return _without_config(args)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"configuration error ({len(exc.problems)}):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    handler = {
        "run": cmd_run,
        "verify": cmd_verify,
        "status": cmd_status,
        "history": cmd_history,
        "check": cmd_check,
        "daemon": cmd_daemon,
        "disks": cmd_disks,
        "remind": cmd_remind,
        "approve": cmd_approve,
        "restore": cmd_restore,
        "web": cmd_web,
        "web-password": cmd_web_password,
    }[args.command]
    try:
        code = handler(config, args)
    except StateDamaged as exc:  # the approvals: nothing done on half-read ones
        print(f"error: {exc}", file=sys.stderr)
        _record_damage(config, args.command, str(exc))
        return EXIT_FAILED
    damages = take_damages()
    if damages:  # found on the way (the drills, the reminder): recorded, told
        for damage in damages:
            print(f"warning: {damage}", file=sys.stderr)
            _record_damage(config, args.command, str(damage))
    return code


def _record_damage(config: Config, command: str, text: str) -> None:
    """A damaged state file in the history and a message (``flow.record_problem``)."""
    import asyncio  # noqa: PLC0415 - see cmd_run

    from immich_usb_backup.flow import record_problem  # noqa: PLC0415

    trigger = "schedule" if command == "remind" else "cli"
    asyncio.run(record_problem(config, trigger, text))


# run ---------------------------------------------------------------------------------

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

    records = asyncio.run(_with_progress(config, work))
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


async def _with_progress(config: Config, work: Callable[[], Awaitable[T]],
                         progress: _ProgressPrinter | None = None) -> T | None:
    """Run ``work`` with the live progress on stderr; Ctrl-C or SIGTERM cancels it (the
    work records what it must) and gives None."""
    import asyncio  # noqa: PLC0415 - see cmd_run

    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    progress = progress or _ProgressPrinter()
    watcher = asyncio.create_task(progress.follow(config.state_dir))
    try:
        return await work()
    except asyncio.CancelledError:
        return None
    finally:
        watcher.cancel()
        progress.end()


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
        report = asyncio.run(_with_progress(config, work))
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


def _without_config(args: argparse.Namespace) -> int:
    """``verify`` or ``restore`` on a machine that has no configuration (a laptop, a new
    server): they only need the disk, and a scratch state dir for the lock and lists."""
    scratch = Path(tempfile.mkdtemp(prefix=f"immich-usb-backup-{args.command}-"))
    try:
        state = scratch / "state"
        config = parse_config({"immich": {"upload_location": str(scratch / "no-server")},
                               "state": {"dir": str(state)}},
                              f"({args.command} without a configuration file)")
        return (cmd_verify if args.command == "verify" else cmd_restore)(config, args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def is_device_target(target: str) -> bool:
    return target.startswith("/dev/") or target.upper().startswith("UUID=")


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


class _ProgressPrinter:
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
            st = read_status(state_dir)
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


# restore -------------------------------------------------------------------------------

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
    progress = _ProgressPrinter()
    confirm = _Confirmation(args.yes, progress)

    async def work() -> Any:
        if args.list:
            return await (restore.list_device(args.source) if device else
                          restore.list_path(source))
        if device:
            return await restore.restore_device(config, args.source, options, confirm.ask)
        return await restore.restore_path(config, source, options, confirm.ask)

    try:
        outcome = asyncio.run(_with_progress(config, work, progress))
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

    def __init__(self, yes: bool, progress: _ProgressPrinter) -> None:
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

def environment_problems(config: Config) -> list[str]:
    """Every problem of the environment that would stop or weaken a backup: each enabled
    step's (``Step.check``), the notification URLs', the state dir's."""
    import asyncio  # noqa: PLC0415 - see cmd_run

    from immich_usb_backup.notify import url_problems  # noqa: PLC0415 - apprise is heavy
    from immich_usb_backup.steps import STEPS  # noqa: PLC0415 - not for status

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


def cmd_check(config: Config, args: argparse.Namespace) -> int:
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


# daemon, disks, approve -----------------------------------------------------------------

def cmd_daemon(config: Config, args: argparse.Namespace) -> int:
    from immich_usb_backup.daemon import run_daemon  # noqa: PLC0415

    try:
        run_daemon(config)
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_disks_all(config: Config, args: argparse.Namespace) -> int:
    """``disks --all``: every approved disk, plugged in or not (from the history)."""
    from immich_usb_backup import clock, overview  # noqa: PLC0415

    at, days = clock.now(), config.notify.remind_after_days
    rows = [d.as_dict(at, days) for d in overview.disks(config)]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print("no disk is approved yet (see `immich-usb-backup approve`)")
        return EXIT_OK
    print(format_disks_all(rows))
    return EXIT_OK


def cmd_disks(config: Config, args: argparse.Namespace) -> int:
    if args.all:
        return cmd_disks_all(config, args)
    import asyncio  # noqa: PLC0415 - see cmd_run

    from immich_usb_backup import overview  # noqa: PLC0415

    rows = overview.plugged(config)
    asyncio.run(_read_health(config, rows))
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print("no USB exFAT disk is connected")
        return EXIT_OK
    print(format_disks(rows))
    return EXIT_OK


async def _read_health(config: Config, rows: list[dict[str, Any]]) -> None:
    """Each plugged disk's health, read now without waking a sleeping disk and without
    keeping it (the next backup compares and warns)."""
    from immich_usb_backup import clock, health  # noqa: PLC0415

    at = clock.now()
    for row in rows:
        if row["uuid"]:
            result = await health.check(health.Disk(row["device"], row["uuid"],
                                                    row["label"] or ""),
                                        config.health, config.state_dir, at, awake=False,
                                        store=False)
            row["health"] = None if result is None else result.to_dict()


def cmd_approve(config: Config, args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see cmd_run

    from immich_usb_backup.approve import approve_device  # noqa: PLC0415

    try:
        approval, created = asyncio.run(approve_device(config, args.device, args.create_marker))
    except BackupError as exc:
        print(f"not approved: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if created:
        print("created the folder immich-server-backups on the disk")
    print(f"approved {approval.label or '(no label)'} (UUID {approval.uuid}): it is backed up "
          "whenever it is plugged in")
    print("its key was written to immich-server-backups/disk-key.txt: keep that file on the "
          "disk (see docs/first-disk.md)")
    return EXIT_OK


# web, web-password ------------------------------------------------------------------------

def cmd_web(config: Config, args: argparse.Namespace) -> int:
    from immich_usb_backup.web.server import WebError, serve  # noqa: PLC0415 - aiohttp

    try:
        serve(config)
    except WebError as exc:
        print(f"web: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_web_password(config: Config, args: argparse.Namespace) -> int:
    import getpass  # noqa: PLC0415

    from immich_usb_backup.web.security import PasswordError, write_password  # noqa: PLC0415

    path = config.web.password_file
    try:
        if sys.stdin.isatty():
            password = getpass.getpass("New web UI password: ")
            if getpass.getpass("The same again: ") != password:
                print("the two passwords differ: nothing changed", file=sys.stderr)
                return EXIT_USAGE
        else:
            password = sys.stdin.readline().rstrip("\r\n")
        write_password(path, password, config.web.group)
    except (PasswordError, EOFError, KeyboardInterrupt) as exc:
        print(f"web-password: {exc or 'cancelled'}: nothing changed", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"web-password: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote the web UI's password hash to {path}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
