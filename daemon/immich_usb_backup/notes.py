"""``README.txt`` and ``backup-info.toml`` in the backup folder, written at the end of
every run that wrote: what the folder is and how to restore, in plain words (each
step says what its folder holds), and the last run's numbers."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import tomli_w

from immich_usb_backup import __version__, layout
from immich_usb_backup.fsutil import BackupRoot, atomic_write_bytes
from immich_usb_backup.steps.base import Step

README_NAME = layout.README
INFO_NAME = layout.INFO

README = """\
IMMICH SERVER BACKUP
====================

This folder is a backup of an Immich photo server, made by immich-usb-backup
(version {version}) on {host}. Last backup: {finished} ({status}).

What is here
{steps}
  backup-info.toml  details of the last backup run.
  history.html      every recent backup run: open it in a web browser.
  disk-key.txt      tells the server that this is the disk it approved: keep
                    it (without it the server no longer backs up to this disk).

Only this folder is written by the backup; everything else on this disk is
yours and is never touched.

HOW TO RESTORE
The full guide, every command tested: docs/restore.md in the immich-usb-backup
project. In short:

Check the disk. In this folder:  sha256sum -c --quiet library.sha256
  on a Mac:                      shasum -a 256 -c --quiet library.sha256
  where immich-usb-backup runs:  immich-usb-backup verify DISK
  No FAILED line: every file is as it was backed up.

Just the photos: copy library/upload/ and library/library/ anywhere.

A deleted photo: copy it out of deleted/<day>/ and upload it to Immich again.

The whole server (as root, in this folder):
1. Unzip the newest config/ zip; put docker-compose.yml and .env (or
   /etc/nixos) back. Install the Immich version in the newest dump's name
   (...-v1.130.0-pg14.17.sql.gz: Immich 1.130.0). Keep Immich stopped.
2. Copy library/ into UPLOAD_LOCATION, owned by Immich's user (docker:
   root:root, NixOS: immich:immich):
     rsync -rt --chmod=D750,F640 library/ UPLOAD_LOCATION/
     chown -R root:root UPLOAD_LOCATION
3. Restore the newest dump into Immich's PostgreSQL:
     DUMP=database/immich-db-backup-....sql.gz
     OLD="set_config('search_path', '', false)"
     NEW="set_config('search_path', 'public, pg_catalog', true)"
     gunzip --stdout "$DUMP" | sed "s/$OLD/$NEW/g" | PSQL
   where PSQL depends on the 2nd line of  gunzip --stdout "$DUMP" | head -n 2
   "-- PostgreSQL database cluster dump" (Immich 2.4 and older):
     docker exec -i immich_postgres psql --dbname=postgres --username=postgres
     runuser -u postgres -- psql --dbname=postgres                  # NixOS
   "-- PostgreSQL database dump" (newer), into an empty database immich:
     docker exec -i immich_postgres psql --dbname=immich --username=postgres
     runuser -u postgres -- psql --dbname=immich                    # NixOS
   docker: on a new, empty DB_DATA_LOCATION, with only immich_postgres
   started (docker compose create; docker start immich_postgres).
   NixOS, before that:
     runuser -u postgres -- dropdb --force --if-exists immich
     runuser -u postgres -- createdb -O immich immich     # database dump only
4. Start Immich: docker compose up -d, or systemctl start immich-server.
"""


def readme(steps: Sequence[type[Step]], info: dict[str, Any]) -> str:
    """README.txt for a run whose summary is ``info``; ``steps`` say what their folders
    hold."""
    return README.format(
        version=__version__, host=socket.gethostname(),
        finished=str(info.get("finished_at", "")), status=info.get("status", "?"),
        steps="\n".join(step.readme for step in steps if step.readme))


def write(root: BackupRoot, steps: Sequence[type[Step]], info: dict[str, Any]) -> None:
    """Write README.txt and backup-info.toml atomically. ``info`` is the run summary."""
    text = readme(steps, info)
    atomic_write_bytes(root, root.path(README_NAME), text.encode())
    doc = {
        "backup": {
            "tool": "immich-usb-backup",
            "version": __version__,
            "host": socket.gethostname(),
            **{k: v for k, v in info.items() if v is not None},
        }
    }
    atomic_write_bytes(root, root.path(INFO_NAME), tomli_w.dumps(doc).encode())

