"""``daemon``, ``disks``, ``approve``, ``web``, ``web-password``."""

from __future__ import annotations

import argparse
import json
import sys

from immich_usb_backup.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from immich_usb_backup.cliformat import (
    format_disks,
    format_disks_all,
)
from immich_usb_backup.config import Config
from immich_usb_backup.errors import BackupError


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
    rows = [d.as_dict(at, days)
            for d in overview.with_health(overview.disks(config), config.state_dir, at)]
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

    from immich_usb_backup import (  # noqa: PLC0415
        clock,
        health,
        overview,
    )

    at = clock.now()
    rows = overview.plugged(config, at)
    asyncio.run(health.read_plugged(rows, config.health, config.state_dir, at))
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print("no USB exFAT disk is connected")
        return EXIT_OK
    print(format_disks(rows))
    return EXIT_OK


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
