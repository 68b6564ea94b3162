"""Config step: zip the configured files and folders, plus a restore note, into
``config/config-YYYY-MM-DDTHHMMSS.zip`` (timestamped, so two runs a day keep both);
keep the last N archives.

Files that hold secrets (``notify.urls_file``, ``immich.api_key_file``, and this
program's config file when it lists ``notify.urls``) are left out, so that no password
or key lands on the disk; the restore note says so.
"""

from __future__ import annotations

import logging
import os
import socket
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from immich_usb_backup import __version__, layout, policy
from immich_usb_backup.config import Config
from immich_usb_backup.errors import BackupError
from immich_usb_backup.fsutil import atomic_write, fsync_dir, remove_stale_temps
from immich_usb_backup.policy import Space
from immich_usb_backup.record import StepResult
from immich_usb_backup.steps.base import DiskCheck, Preflight, RunContext, Step, in_thread
from immich_usb_backup.text import plural

log = logging.getLogger(__name__)

FOLDER = layout.CONFIG
NOTE_NAME = "RESTORE.txt"


@dataclass
class ConfigResult(StepResult):
    archive: str | None = None  # the archive's name in config/
    files_in_archive: int | None = None

    def disk_info(self) -> dict[str, Any]:
        return {"latest_archive": self.archive} if self.archive else {}


class ConfigStep(Step):
    """Zip the configured paths into ``config/``, keep the last N archives."""

    name = "config"
    folder = FOLDER
    readme = """\
  config/           the server's configuration files, zipped, with a
                    RESTORE.txt inside."""

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.config_backup.enabled

    @classmethod
    async def check(cls, config: Config) -> list[str]:
        problems = []
        for p in config.config_backup.paths:
            if not p.exists():
                problems.append(f"config_backup.paths: {p} does not exist")
            elif not os.access(p, os.R_OK):
                problems.append(f"config_backup.paths: {p} is not readable by this user")
        return problems

    @classmethod
    def check_disk(cls, check: DiskCheck) -> None:
        """Every archive's checksums tested."""
        folder = check.root / FOLDER
        for archive in sorted(folder.glob("*.zip")) if folder.is_dir() else []:
            check.check_stop()
            why = _check_archive(archive)
            check.report.archives_checked += 1
            if why:
                check.report.damaged.add(f"{FOLDER}/{archive.name}: {why}")

    async def preflight(self, cluster: int) -> Preflight:
        size = await in_thread(self.ctx, lambda: estimate(self.ctx))
        paths = len(self.ctx.config.config_backup.paths)
        return Preflight(Space(to_write=size), "config: an archive of "
                         f"{plural(paths, 'configured path')}", 1, size)

    async def write(self) -> StepResult:
        return await run(self.ctx)


def _check_archive(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        return f"not a readable zip ({exc})"
    return f"{bad} inside is damaged" if bad else None


def _walk(path: Path, skipped: list[str]) -> Iterator[Path]:
    """Regular files under ``path`` (or ``path`` itself). Links to folders are not followed."""
    if path.is_file():
        yield path
        return
    for dirpath, dirnames, filenames in os.walk(path, onerror=lambda e: skipped.append(
            f"{e.filename}: {e.strerror}")):
        for d in list(dirnames):
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                skipped.append(f"{full}: link to a folder, not followed ({os.readlink(full)})")
                dirnames.remove(d)
        for name in sorted(filenames):
            file = Path(dirpath, name)
            if file.is_file():
                yield file
            else:
                skipped.append(f"{file}: not a regular file")
    return


def estimate(ctx: RunContext) -> int:
    """An upper bound of the archive's size: the bytes of every file to be zipped."""
    if not ctx.config.config_backup.enabled:
        return 0
    total = 0
    for p in ctx.config.config_backup.paths:
        if not p.exists():
            continue
        for f in _walk(p, []):
            try:
                total += f.stat().st_size
            except OSError:
                continue
    return total + 64 * 1024


def _start(ctx: RunContext) -> str:
    """Make the folder, remove what an interrupted run left; return the archive's name."""
    remove_stale_temps(ctx.root.mkdir(FOLDER))
    return archive_name(ctx)


def archive_name(ctx: RunContext) -> str:
    stamp = ctx.started.strftime("%Y-%m-%dT%H%M%S")
    name = f"config-{stamp}.zip"
    n = 2
    while (ctx.root.root / FOLDER / name).exists():
        name = f"config-{stamp}-{n}.zip"
        n += 1
    return name


def secret_files(config: Config) -> set[Path]:
    """The files that hold secrets (notification URLs with passwords or tokens, the
    Immich API key), resolved."""
    files = [config.notify.urls_file, config.immich.api_key_file]
    if config.notify.urls:
        files.append(config.source)
    return {p.resolve() for p in files if p is not None}


def _restore_note(ctx: RunContext, included: list[str], problems: list[str],
                  withheld: list[str]) -> str:
    lines = [
        "Configuration backup made by immich-usb-backup",
        f"version {__version__}, host {socket.gethostname()}, "
        f"at {ctx.started.isoformat(timespec='seconds')}",
        "",
        "Every file is stored under its full path on the server, without the leading /.",
        "To restore, unzip into a scratch folder and copy back what you need, e.g.:",
        "  unzip config-....zip -d /tmp/restore",
        "  sudo cp -a /tmp/restore/etc/nixos/. /etc/nixos/",
        "Then rebuild or restart the services (nixos-rebuild switch, or",
        "docker compose up -d in the folder holding Immich's docker-compose.yml).",
        "",
        "Configured paths:",
        *(f"  {p}" for p in included),
    ]
    if problems:
        lines += ["", "Not included:", *(f"  {p}" for p in problems)]
    if withheld:
        lines += ["", "Left out on purpose, as they hold secrets (notification URLs with",
                  "passwords or tokens, the Immich API key): recreate them from your",
                  "password manager:",
                  *(f"  {p}" for p in withheld)]
    return "\n".join(lines) + "\n"


async def run(ctx: RunContext) -> ConfigResult:
    """Write the archive (temp name, fsync, rename), then prune beyond ``keep``."""
    result = ConfigResult()
    cfg = ctx.config.config_backup
    name = await in_thread(ctx, lambda: _start(ctx))
    final = ctx.root.path(FOLDER, name)
    ctx.status.set_phase("config", 0, name)
    skipped: list[str] = []
    for p in cfg.paths:
        if not p.exists():
            skipped.append(f"{p}: does not exist")
    files = 0
    secret = secret_files(ctx.config)
    withheld: list[str] = []

    def write(f: BinaryIO) -> None:
        nonlocal files
        with zipfile.ZipFile(
            f, "w", compression=zipfile.ZIP_DEFLATED, strict_timestamps=False
        ) as zf:
            for p in cfg.paths:
                if not p.exists():
                    continue
                for file in _walk(p, skipped):
                    ctx.check_cancel()
                    if file.resolve() in secret:
                        withheld.append(str(file))
                        continue
                    arc = os.path.relpath(file, "/")
                    try:
                        zf.write(file, arc)
                        files += 1
                    except OSError as exc:
                        skipped.append(f"{file}: {exc.strerror}")
            zf.writestr(NOTE_NAME, _restore_note(ctx, [str(p) for p in cfg.paths], skipped,
                                                 withheld))

    try:
        await in_thread(ctx, lambda: atomic_write(ctx.root, final, write))
    except OSError as exc:
        raise BackupError(f"config: writing {name} failed: {exc}") from exc
    for s in skipped:
        ctx.problems.add(f"config: not in the archive: {s}")
    result.files, result.bytes = 1, await in_thread(ctx, lambda: _prune(ctx, final))
    result.archive, result.files_in_archive = name, files
    return result


def _prune(ctx: RunContext, final: Path) -> int:
    """Prune archives beyond ``keep``; return the size of the new one."""
    folder = final.parent
    names = [e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    for old in policy.archives_to_prune(names, ctx.config.config_backup.keep):
        ctx.root.path(FOLDER, old).unlink()
        log.info("pruned old config archive %s", old)
    fsync_dir(folder)
    return final.stat().st_size
