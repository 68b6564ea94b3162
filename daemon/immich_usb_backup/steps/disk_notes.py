"""Last step: ``README.txt`` and ``backup-info.toml`` in the backup folder."""

from __future__ import annotations

import socket
from datetime import datetime
from typing import Any

import tomli_w

from immich_usb_backup import __version__
from immich_usb_backup.fsutil import BackupRoot, atomic_write_bytes

README_NAME = "README.txt"
INFO_NAME = "backup-info.toml"

README = """\
IMMICH SERVER BACKUP
====================

This folder is a backup of an Immich photo server, made by immich-usb-backup
(version {version}) on {host}. Last backup: {finished} ({status}).

What is here
  library/        a copy of Immich's upload location: your original photos and
                  videos (upload/, library/), profile pictures, and whatever else
                  Immich keeps there. Plain files: open them on any computer.
  database/       Immich's database dumps (immich-db-backup-*.sql.gz): albums,
                  people, descriptions, who owns what. The newest one matches
                  the library copy best.
  config/         zip archives of the server's configuration files, each with a
                  RESTORE.txt inside.
  backup-info.toml   details of the last backup run.
  history.html       every recent backup run: open it in a web browser.

Only this folder is written by the backup; everything else on this disk is yours
and is never touched.

Getting your photos back
  Just the photos: copy them out of library/upload/ and library/library/.

  The whole server:
  1. Install Immich again with the same version and the same UPLOAD_LOCATION.
  2. Copy the contents of library/ back into UPLOAD_LOCATION.
  3. Restore the newest database dump into Immich's PostgreSQL, with Immich's
     own steps ("Backup and Restore" in Immich's documentation); for docker:
       gunzip --stdout database/immich-db-backup-....sql.gz \\
       | docker exec -i immich_postgres psql --dbname=postgres --username=postgres
  4. Start Immich. Restore your configuration from the newest config/ zip.
"""


def write(root: BackupRoot, info: dict[str, Any]) -> None:
    """Write README.txt and backup-info.toml atomically. ``info`` is the run summary."""
    finished = str(info.get("finished_at", ""))
    readme = README.format(
        version=__version__, host=socket.gethostname(), finished=finished,
        status=info.get("status", "?"),
    )
    atomic_write_bytes(root, root.path(README_NAME), readme.encode())
    doc = {
        "backup": {
            "tool": "immich-usb-backup",
            "version": __version__,
            "host": socket.gethostname(),
            **{k: v for k, v in info.items() if v is not None},
        }
    }
    atomic_write_bytes(root, root.path(INFO_NAME), tomli_w.dumps(doc).encode())


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
