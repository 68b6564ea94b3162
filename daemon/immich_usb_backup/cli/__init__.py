"""The command line: parses arguments, prints, returns exit codes. Nothing else prints.

Exit codes: 0 success; 1 the backup failed, was partial, refused or interrupted (or
``check`` found a problem); 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from immich_usb_backup import __version__
from immich_usb_backup.cli.backup import (
    cmd_check,
    cmd_history,
    cmd_remind,
    cmd_run,
    cmd_status,
    cmd_verify,
)
from immich_usb_backup.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from immich_usb_backup.cli.disks import (
    cmd_approve,
    cmd_daemon,
    cmd_disks,
    cmd_web,
    cmd_web_password,
)
from immich_usb_backup.cli.restore import cmd_restore
from immich_usb_backup.config import (
    MODES,
    Config,
    load_config,
    parse_config,
    resolve_config_path,
)
from immich_usb_backup.errors import ConfigError
from immich_usb_backup.state import StateDamaged, take_damages

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


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
    handler: Callable[[Config, argparse.Namespace], int] = {
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


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
