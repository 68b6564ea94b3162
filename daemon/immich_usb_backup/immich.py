"""Immich's API: the only HTTP to Immich. Blocking (urllib): call it in a thread.

The backup's one call, "start the database backup job now": ``POST /api/jobs`` with
``{"name": "backup-database"}`` (answers 204); a server that does not know it (404:
Immich before the job queues API) gets the older ``PUT /api/jobs/backupDatabase`` with
``{"command": "start"}``. The admin API key (with the ``job.create`` permission) goes in
the ``x-api-key`` header.

``restore --database immich-api`` (Immich 2.5+): the server's version and state
(``GET /api/server/version``, ``/api/server/config``: ``maintenanceMode``), the dumps it
holds (``GET /api/admin/database-backups``), a dump uploaded (``POST
/api/admin/database-backups/upload``, multipart field ``file``, streamed), the restore
started (``POST /api/admin/maintenance``) and followed (``GET
/api/admin/maintenance/status`` while Immich is in maintenance mode).

The key is a secret: it is read from a root-only file, sent only in that header, and
never put into a message, a log line or an exception text.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
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


# Restoring through the API (Immich 2.5+) -------------------------------------------------

UPLOAD_BLOCK = 1 << 20
_KEEP_BODY = 1 << 20  # at most this much of an answer is read


def server_version(url: str, timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[int, int, int]:
    """The version Immich at ``url`` reports (public, no key). Raise ImmichError."""
    status, body = _exchange(url, "GET", "/api/server/version", None, timeout_s)
    if status != 200:
        raise ImmichError(f"Immich answered GET /api/server/version with HTTP {status}")
    try:
        answer = json.loads(body)
        return int(answer["major"]), int(answer["minor"]), int(answer["patch"])
    except (ValueError, KeyError, TypeError):
        raise ImmichError("Immich's answer to GET /api/server/version is not a "
                          "version") from None


def in_maintenance(url: str, timeout_s: float = REQUEST_TIMEOUT_S) -> bool:
    """Whether Immich at ``url`` is in maintenance mode (``maintenanceMode`` of its public
    server config). Raise ImmichError when it does not answer (restarting, say)."""
    status, body = _exchange(url, "GET", "/api/server/config", None, timeout_s)
    if status != 200:
        raise ImmichError(f"Immich answered GET /api/server/config with HTTP {status}")
    try:
        return bool(json.loads(body).get("maintenanceMode", False))
    except (ValueError, AttributeError):
        raise ImmichError("Immich's answer to GET /api/server/config is not JSON") from None


def maintenance_status(url: str, timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, object]:
    """What Immich in maintenance mode says it is doing: ``{"active", "action", "task",
    "progress", "error"}`` (``task`` is ``"error"`` when the action failed). Raise
    ImmichError when it does not answer."""
    status, body = _exchange(url, "GET", "/api/admin/maintenance/status", None, timeout_s)
    if status != 200:
        raise ImmichError(f"Immich answered GET /api/admin/maintenance/status with HTTP "
                          f"{status}")
    try:
        answer = json.loads(body)
    except ValueError:
        raise ImmichError("Immich's maintenance status is not JSON") from None
    if not isinstance(answer, dict):
        raise ImmichError("Immich's maintenance status is not a JSON object")
    return answer


def database_backups(url: str, key: str,
                     timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, int | None]:
    """The dumps Immich holds in its backups folder, by name (with their sizes when it
    says them): ``GET /api/admin/database-backups`` (permission ``maintenance``)."""
    status, body = _exchange(url, "GET", "/api/admin/database-backups", None, timeout_s,
                             key=key)
    _raise_for(status, "GET /api/admin/database-backups", "maintenance")
    try:
        entries = json.loads(body)["backups"]
    except (ValueError, KeyError, TypeError):
        raise ImmichError("Immich's list of database backups is not what Immich "
                          "sends") from None
    out: dict[str, int | None] = {}
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, str):  # 2.5 answered names only
            out[entry] = None
        elif isinstance(entry, dict) and isinstance(entry.get("filename"), str):
            size = entry.get("filesize")
            out[entry["filename"]] = int(size) if isinstance(size, int | float) else None
    return out


def upload_database_backup(url: str, key: str, path: Path,
                           on_bytes: Callable[[int], None] | None = None,
                           timeout_s: float = REQUEST_TIMEOUT_S) -> None:
    """Upload the dump ``path`` (``POST /api/admin/database-backups/upload``, multipart
    field ``file``, permission ``backup.upload``), streamed a block at a time; Immich
    keeps it as ``uploaded-<its name>``. ``on_bytes`` gets the size of each block sent."""
    boundary = f"immich-usb-backup-{os.urandom(12).hex()}"
    name = path.name.replace('"', "")  # Immich's names: letters, digits, - and .
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{name}\"\r\nContent-Type: application/gzip\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = path.stat().st_size

    def body() -> Iterator[bytes]:
        yield head
        with open(path, "rb") as f:
            while block := f.read(UPLOAD_BLOCK):
                if on_bytes is not None:
                    on_bytes(len(block))
                yield block
        yield tail

    status, _ = _exchange(url, "POST", "/api/admin/database-backups/upload", body(),
                          timeout_s, key=key, headers={
                              "Content-Type": f"multipart/form-data; boundary={boundary}",
                              "Content-Length": str(len(head) + size + len(tail))})
    _raise_for(status, "POST /api/admin/database-backups/upload", "backup.upload")


def start_database_restore(url: str, key: str, name: str,
                           timeout_s: float = REQUEST_TIMEOUT_S) -> None:
    """Ask Immich to restore its database from the dump ``name`` in its backups folder
    (``POST /api/admin/maintenance``, permission ``maintenance``): it goes into
    maintenance mode, makes a restore point, restores, and comes back."""
    payload = json.dumps({"action": "restore_database", "restoreBackupFilename": name})
    status, _ = _exchange(url, "POST", "/api/admin/maintenance", payload.encode(),
                          timeout_s, key=key, headers={"Content-Type": "application/json"})
    _raise_for(status, "POST /api/admin/maintenance", "maintenance")


def _raise_for(status: int, call: str, permission: str) -> None:
    if 200 <= status < 300:
        return
    if status in (401, 403):
        raise ImmichError(f"Immich refused the API key (HTTP {status}) for {call}: check "
                          "immich.api_key_file, and that the key belongs to an admin and "
                          f"has the {permission} permission")
    if status == 404:
        raise ImmichError(f"Immich does not know {call} (HTTP 404): restoring through its "
                          "API needs Immich 2.5 or newer")
    raise ImmichError(f"Immich answered {call} with HTTP {status}")


def _exchange(url: str, method: str, path: str, body: bytes | Iterable[bytes] | None,
              timeout_s: float, *, key: str | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request; (HTTP status, the start of the answer's body). Raise ImmichError when
    Immich cannot be reached; never shows the key."""
    if not url.startswith(("http://", "https://")):
        raise ImmichError(f"immich.url must start with http:// or https:// (got {url!r})")
    import urllib.error  # noqa: PLC0415 - see _call
    import urllib.request  # noqa: PLC0415

    sent = {"Accept": "application/json", **(headers or {})}
    if key is not None:
        sent["x-api-key"] = key
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        url.rstrip("/") + path, data=body, method=method, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return int(response.status), response.read(_KEEP_BODY)
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImmichError(f"Immich could not be reached at {url} ({reason})") from None
