"""Immich's API: the one call the backup makes, "start the database backup job now".

``POST /api/jobs`` with ``{"name": "backup-database"}`` (answers 204); a server that does
not know it (404: Immich before the job queues API) gets the older
``PUT /api/jobs/backupDatabase`` with ``{"command": "start"}``. The admin API key (with
the ``job.create`` permission) goes in the ``x-api-key`` header. Blocking (urllib):
call it in a thread.

The key is a secret: it is read from a root-only file, sent only in that header, and
never put into a message, a log line or an exception text.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

from immich_usb_backup.errors import BackupError

log = logging.getLogger(__name__)

NEW_ENDPOINT = ("POST", "/api/jobs", {"name": "backup-database"})
OLD_ENDPOINT = ("PUT", "/api/jobs/backupDatabase", {"command": "start"})
REQUEST_TIMEOUT_S = 30.0


class ImmichError(BackupError):
    """Immich could not be asked: unreachable, the key refused, an unexpected answer."""


def read_key(path: Path) -> str:
    """The API key in ``path`` (its first line). Raise ImmichError when it cannot be read
    or is empty."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ImmichError(f"cannot read immich.api_key_file {path}: "
                          f"{exc.strerror or exc}") from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise ImmichError(f"immich.api_key_file {path} is empty")
    return key


def key_file_problems(path: Path) -> list[str]:
    """For ``check``: the key file missing, empty, or readable by others than its owner."""
    try:
        st = path.stat()
    except OSError as exc:
        return [f"immich.api_key_file {path}: {exc.strerror or exc}"]
    problems = []
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        problems.append(f"immich.api_key_file {path} can be read by others (mode "
                        f"{stat.S_IMODE(st.st_mode):04o}): the API key is a secret; run "
                        f"chmod 600 {path}")
    if st.st_uid != os.geteuid():
        problems.append(f"immich.api_key_file {path} is owned by uid {st.st_uid}, not by "
                        "the user the backup runs as (root): chown it")
    try:
        read_key(path)
    except ImmichError as exc:
        problems.append(str(exc))
    return problems


def start_database_backup(url: str, key: str, timeout_s: float = REQUEST_TIMEOUT_S) -> str:
    """Ask Immich at ``url`` to start its database backup job now. Return the endpoint
    that took it. Raise ImmichError saying why not (never showing the key)."""
    for method, path, body in (NEW_ENDPOINT, OLD_ENDPOINT):
        status = _call(url, method, path, body, key, timeout_s)
        if status == 404 and path == NEW_ENDPOINT[1]:
            log.info("Immich does not know %s %s (an older server): trying %s %s",
                     method, path, *OLD_ENDPOINT[:2])
            continue
        if 200 <= status < 300:
            log.info("Immich started its database backup job (%s %s)", method, path)
            return f"{method} {path}"
        if status in (401, 403):
            raise ImmichError(
                f"Immich refused the API key (HTTP {status}): check immich.api_key_file, and "
                "that the key belongs to an admin and has the job.create permission")
        raise ImmichError(f"Immich answered {method} {path} with HTTP {status}")
    raise ImmichError("Immich knows neither way to start its database backup job (HTTP 404)")


def _call(url: str, method: str, path: str, body: dict[str, str], key: str,
          timeout_s: float) -> int:
    if not url.startswith(("http://", "https://")):
        raise ImmichError(f"immich.url must start with http:// or https:// (got {url!r})")
    import urllib.error  # noqa: PLC0415 - here: 15 ms of start-up for every run otherwise
    import urllib.request  # noqa: PLC0415

    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        url.rstrip("/") + path, data=json.dumps(body).encode(), method=method,
        headers={"x-api-key": key, "Content-Type": "application/json",
                 "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - http(s) checked by config
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImmichError(f"Immich could not be reached at {url} ({reason})") from None
