"""The configuration's schema: one frozen dataclass a ``[section]``, ``Config`` of them all.
Each section's docstring and each key's ``_doc`` are the documentation's one source
(``tools/config-docs`` renders them), written for users; ``config`` loads and checks.
"""

from __future__ import annotations

import enum
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/immich-usb-backup/config.toml")
CONFIG_ENV = "IMMICH_USB_BACKUP_CONFIG"

MODES = ("quick", "verify", "full")
DUMP_SOURCES = ("nightly", "immich-api", "command")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S")


class Event(enum.StrEnum):
    """The notifications a run can send; ``[notify] events`` names them by value."""

    STARTED = "started"
    FINISHED = "finished"
    REFUSED = "refused"
    NEEDS_APPROVAL = "needs_approval"
    REMINDER = "reminder"
    DISK_HEALTH = "disk_health"


NOTIFY_EVENTS = tuple(e.value for e in Event)


def _doc(text: str, *, values: dict[str, str] | None = None, more: str = "",
         example: Any = None, default_doc: str = "", **constraints: Any) -> dict[str, Any]:
    """A field's metadata: its documentation and the constraints ``load_config`` checks.

    Written for users, in Markdown, one paragraph without ``|``: ``text`` says what the key
    does, ``values`` describes each allowed value (in order), ``more`` follows them,
    ``example`` is a value worth showing besides the default (needed when there is no
    default), ``default_doc`` says what a default of None means. ``constraints`` are
    ``required``, ``min``, ``max`` and ``choices``.
    """
    return {"doc": text, "values": values or {}, "more": more, "example": example,
            "default_doc": default_doc, **constraints}


@dataclass(frozen=True)
class ImmichConfig:
    """Where Immich keeps its files."""

    upload_location: Path = field(
        metadata=_doc(
            "Immich's `UPLOAD_LOCATION`: the folder mounted at `/data` in Immich's container "
            "(it holds `upload/`, `library/`, `profile/`, `thumbs/`, `encoded-video/` and "
            "`backups/`). Mirrored into `library/` on the disk.",
            example="/srv/immich/library",
            required=True,
        )
    )
    require_markers: bool = field(
        default=True,
        metadata=_doc(
            "Refuse to back up unless each of Immich's folders (`upload/`, `library/`, "
            "`profile/`, `thumbs/`, `encoded-video/`, `backups/`) that exists holds Immich's "
            "empty `.immich` file, and at least one of them exists. This is how an unmounted "
            "or moved library is told apart from a real one, so a mirror never wipes a good "
            "backup. Turn off only for Immich versions that write no markers."
        ),
    )
    url: str | None = field(
        default=None,
        metadata=_doc(
            "Immich's address, for `database.source = \"immich-api\"`: the backup asks "
            "Immich for a fresh database dump through its API; and for `restore --database "
            "immich-api` (Immich 2.5+ restores the dump itself).",
            example="http://127.0.0.1:2283",
        ),
    )
    media_location: str | None = field(
        default=None,
        metadata=_doc(
            "The prefix of the paths in Immich's database (`originalPath`): Immich's media "
            "location as Immich sees it, `/data` on docker installs since 1.136, "
            "`/usr/src/app/upload` before, `upload` in old dumps with relative paths, the "
            "upload location itself without docker (NixOS). The asset check finds it from "
            "the rows; set it when the check reports rows \"outside the upload location\".",
            example="/data",
            default_doc="found from the database's rows",
        ),
    )
    api_key_file: Path | None = field(
        default=None,
        metadata=_doc(
            "A file holding an Immich API key (one line) of an admin, with the `job.create` "
            "permission, for `database.source = \"immich-api\"` (for `restore --database "
            "immich-api` also `backup.upload` and `maintenance`). The key is a secret: the "
            "file must be readable by root only (`chmod 600`; `check` says when it is not), "
            "and the key never appears in logs, the history, messages or on the disk.",
            example="/etc/immich-usb-backup/immich-api-key",
        ),
    )


@dataclass(frozen=True)
class DatabaseConfig:
    """Immich's database: its nightly dumps, the newest copied into `database/` on the disk."""

    enabled: bool = field(
        default=True,
        metadata=_doc(
            "Copy the newest of Immich's nightly database dumps into `database/` on the disk."
        ),
    )
    dumps_dir: Path | None = field(
        default=None,
        metadata=_doc(
            "Where Immich writes its dumps.",
            example="/srv/immich/library/backups",
            default_doc="`<upload_location>/backups`",
        ),
    )
    keep: int = field(
        default=3,
        metadata=_doc(
            "How many dumps to keep on the disk (the newest); older ones (by the time in "
            "their names) are removed after the new one is safely written.",
            min=1,
        ),
    )
    max_age_hours: float = field(
        default=26.0,
        metadata=_doc(
            "When the newest dump is older than this many hours, the run reports a problem "
            "(and is `partial`): Immich's nightly dump job may have stopped.",
            min=0,
        ),
    )
    source: str = field(
        default="nightly",
        metadata=_doc(
            "Where the dump comes from.",
            values={
                "nightly": "the newest of the dumps Immich (or `dump_glob`) already wrote: "
                "last night's.",
                "immich-api": "Immich makes a fresh one now: the backup starts Immich's "
                "database backup job (`immich.url`, `immich.api_key_file`) and waits for the "
                "new dump, at most `fresh_timeout_s`. When Immich cannot be reached, refuses "
                "the key or takes too long, the newest nightly dump is copied and the reason "
                "named in the problems (`partial`).",
                "command": "`command` writes a fresh dump to its standard output now; it is "
                "kept in the state dir's work folder (room for one plain dump is needed there), "
                "checked to be whole, then compressed onto the disk.",
            },
            choices=DUMP_SOURCES,
        ),
    )
    fresh_timeout_s: float = field(
        default=900.0,
        metadata=_doc(
            "How long to wait for a fresh dump (`immich-api`: for Immich's job to finish "
            "writing it; `command`: for the command to end), in seconds.",
            min=1,
        ),
    )
    command: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "For `source = \"command\"`: the command (a list: program, then arguments, no "
            "shell) that writes a plain SQL dump of Immich's database to its standard "
            "output (for docker, no `-t`: a terminal would change its line ends). A non-zero "
            "exit, an empty or incomplete dump or a timeout is a problem named in the run. "
            "On NixOS (PostgreSQL on the host): `[\"setpriv\", \"--reuid=postgres\", "
            "\"--regid=postgres\", \"--init-groups\", \"--pdeathsig=KILL\", \"--\", "
            "\"pg_dump\", \"--clean\", \"--if-exists\", \"immich\"]` (`setpriv` runs "
            "pg_dump in its own place, so it ends with the run; `runuser` would fork it).",
            example=("docker", "exec", "immich_postgres", "pg_dump", "-U", "postgres",
                     "immich"),
        ),
    )
    dump_glob: str | None = field(
        default=None,
        metadata=_doc(
            "For dumps other tools write (`source = \"nightly\"`): a pattern of their paths, "
            "used instead of Immich's dumps folder. The newest by the time in the name when "
            "the names carry one, else by modification time. NixOS "
            "`services.postgresqlBackup` writes `/var/backup/postgresql/immich.sql.gz`.",
            example="/var/backup/postgresql/immich.sql.gz",
        ),
    )
    postgres_bin_dir: Path | None = field(
        default=None,
        metadata=_doc(
            "Where PostgreSQL's programs (`initdb`, `postgres`, `psql`) are, for `verify "
            "--restore-drill`; `restore` takes `psql` and `pg_dump` from here too.",
            example="/usr/lib/postgresql/16/bin",
            default_doc="found on `PATH`, then the newest `/usr/lib/postgresql/*/bin`",
        ),
    )


@dataclass(frozen=True)
class ConfigBackupConfig:
    """The server's configuration files, zipped into `config/` on the disk."""

    enabled: bool = field(
        default=True,
        metadata=_doc(
            "Zip the configured paths into `config/config-YYYY-MM-DDTHHMMSS.zip` on the disk, "
            "with a `RESTORE.txt` note."
        ),
    )
    paths: tuple[Path, ...] = field(
        default=(),
        metadata=_doc(
            "Files, and folders recursively, to archive (absolute paths). Each file is stored "
            "under its full path without the leading `/` (`etc/nixos/configuration.nix`). The "
            "`RESTORE.txt` note in the zip lists the paths and how to put them back. A missing "
            "or unreadable path is reported as a problem. Links to folders are not followed "
            "(they are listed in the note).",
            example=("/etc/nixos", "/srv/immich/immich-config.json", "/root/immich-app"),
        ),
    )
    keep: int = field(
        default=10,
        metadata=_doc("How many archives to keep on the disk (the newest).", min=1),
    )


@dataclass(frozen=True)
class LibraryConfig:
    """The photos and videos: `upload_location` mirrored into `library/` with rsync."""

    enabled: bool = field(
        default=True,
        metadata=_doc("Mirror `upload_location` into `library/` on the disk with rsync."),
    )
    mode: str = field(
        default="quick",
        metadata=_doc(
            "How the copy is checked.",
            values={
                "quick": "files are compared by size and modification time (with a "
                "one-second window, as exFAT stores times coarsely); fast, like rsync.",
                "verify": "quick, then the contents (SHA-256) of the server's file and the "
                "disk's copy are compared for every file copied in the run, plus one turn of "
                "the rest (`verify_rotation_runs`), both read at once.",
                "full": "quick, then the contents of every file are compared.",
            },
            more="A file whose copy differs is copied again at once (the differing copy is "
            "kept in `deleted/`), and the run is reported as failed with the file's path, "
            "because something (the disk, or the server's storage) changed data it should "
            "not have. `run --mode` overrides this for one run. See "
            "[Verified backups](usage.md#verified-backups).",
            choices=MODES,
        ),
    )
    verify_rotation_runs: int = field(
        default=10,
        metadata=_doc(
            "In `verify` mode, the files not copied in the run are compared in turns: 1/N of "
            "them per run (a fixed share for each path, taken in turn per disk), so the whole "
            "library is re-read every N verify runs. `0` compares only the files copied in "
            "the run.",
            min=0,
        ),
    )
    manifest: bool = field(
        default=True,
        metadata=_doc(
            "Keep `immich-server-backups/library.sha256` on the disk: the SHA-256 of every "
            "file in `library/`, in `sha256sum`'s format, so any computer can check the "
            "backup without this program (`cd immich-server-backups && sha256sum -c "
            "library.sha256`; on macOS `shasum -a 256 -c library.sha256`) and "
            "`immich-usb-backup verify` can find bit rot. Only new or changed files are "
            "hashed (a cache in the state dir, `hashes.sqlite`), in quick mode while rsync "
            "copies them. `false` removes a manifest left from before, as it would go stale."
        ),
    )
    keep_deleted_days: int = field(
        default=30,
        metadata=_doc(
            "Files deleted or changed on the server are not deleted or overwritten in the "
            "backup: the disk's copy is moved into `immich-server-backups/deleted/YYYY-MM-DD/` "
            "(the day of the run, then its path inside `library/`) and kept this many days, "
            "so a photo deleted by mistake, or encrypted by ransomware on the server, can "
            "still be got back. Dated folders older than that are removed at the start of a "
            "later backup (only folders named as dates; anything else you put there is left "
            "alone). A second version of a path on the same day is kept beside the first as "
            "`name (2).ext`. Immich's own nightly dumps in `backups/`, which Immich rotates "
            "itself, are not kept (the newest are in `database/`). The capacity check counts "
            "the keep area as used space: when the disk is full because of it, the run is "
            "refused with its size, never pruned early. `0` deletes at once (no keep area).",
            min=0,
        ),
    )
    excludes: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "Paths to leave out, relative to `upload_location`. A pattern without `/` "
            "matches a name at any depth (`*.tmp`, `thumbs`); a pattern that starts with `/` "
            "or has one inside matches the whole path from the top (`/thumbs` is only the "
            "top folder, `upload/some-user`). A trailing `/` is ignored. Shell wildcards `*`, "
            "`?`, `[...]`. A matching folder is skipped with everything in it. Paths "
            "excluded that are already on the disk are left there: never deleted, never "
            "counted. Patterns that would exclude everything (`*`, `/`, `/*`) and patterns "
            "with `..` are refused. `thumbs/` and `encoded-video/` hold files Immich "
            "generates from the originals: after a restore, Immich's jobs (\"Generate "
            "thumbnails\", \"Transcode videos\") rebuild them, which takes hours on a big "
            "library, so excluding them saves space on the disk at that cost. The default "
            "keeps everything.",
            example=("/thumbs", "/encoded-video"),
        ),
    )
    max_delete_percent: float = field(
        default=20.0,
        metadata=_doc(
            "Refuse a run that would delete more than this share (percent) of the files in "
            "the backup, or replace more than this share with changed versions (Immich never "
            "changes an original in place: most of a library changing at once looks like "
            "ransomware encrypting the server). It stops a mistake on the server (a wiped or "
            "moved library) from spreading to the disk: nothing is deleted or replaced then, "
            "and the run is `refused`. Raise it for one run when you really removed that "
            "many photos, after turning on Immich's storage template (which moves every "
            "file), or when you know why the files changed.",
            min=0,
            max=100,
        ),
    )
    bwlimit_kib: int = field(
        default=0,
        metadata=_doc(
            "Limit the copy speed to this many KiB/s (rsync's `--bwlimit`), to keep a small "
            "server responsive; `0` means no limit.",
            min=0,
        ),
    )


@dataclass(frozen=True)
class DisksConfig:
    """Which plugged-in disks the daemon backs up to.

    A disk is written to only when it is a USB exFAT file system, has the folder
    `immich-server-backups` at its root, and is approved (or `allow_any_marked` is on).
    """

    approved: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "File system UUIDs (`XXXX-XXXX` for exFAT, any case; `immich-usb-backup disks` "
            "shows them) of disks the daemon backs up to. Usually you run "
            "`immich-usb-backup approve /dev/sdX1` instead, which records the disk in the "
            "state dir (`disks.toml`); both count. List disks here when the configuration is "
            "managed elsewhere (NixOS).",
            example=("6F5F-FDC3",),
        ),
    )
    allow_any_marked: bool = field(
        default=False,
        metadata=_doc(
            "`true`: back up to any USB exFAT disk that carries the `immich-server-backups` "
            "folder, approved or not."
        ),
    )
    power_off: bool = field(
        default=True,
        metadata=_doc(
            "After a backup that mounted the disk, unmount it and power it off (UDisks2 "
            "`Drive.PowerOff`, when the drive can), so it is safe to unplug. A disk someone "
            "else had mounted is left mounted and on."
        ),
    )


@dataclass(frozen=True)
class NotifyConfig:
    """Messages by e-mail, push or chat through Apprise.

    Sent when a backup starts, finishes, is refused, or a disk needs approval. See
    [notifications](notifications.md) for setting up each service. A message that cannot
    be sent never fails a backup.
    """

    urls: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "[Apprise](https://github.com/caronc/apprise/wiki) URLs to send messages to: "
            "`mailto://…`, `ntfy://…`, `tgram://…`, `json://…` and a hundred more, e.g. "
            "`mailto://user:app-password@gmail.com`, `ntfys://ntfy.sh/my-topic`, "
            "`tgram://bottoken/chatid`. Passwords written here end up in this file: prefer "
            "`urls_file`. A URL that does not look like `scheme://…` is a configuration "
            "error (the message names its position, never the URL, which may hold a "
            "password).",
            example=("ntfys://ntfy.sh/my-secret-topic",),
        ),
    )
    urls_file: Path | None = field(
        default=None,
        metadata=_doc(
            "A file with more URLs, one a line; blank lines and lines starting with `#` are "
            "skipped. It is read at each notification, so it may be readable by root only, "
            "and it is never put in the config archive. The way to keep passwords out of "
            "`config.toml` (which on NixOS lives in the world-readable store). The "
            "environment variable `IMMICH_USB_BACKUP_NOTIFY_URLS` can hold more URLs; all "
            "three sources are used together.",
            example="/etc/immich-usb-backup/notify-urls",
        ),
    )
    events: tuple[str, ...] = field(
        default=NOTIFY_EVENTS,
        metadata=_doc(
            "Which events are sent; remove the ones you do not want.",
            values={
                "started": "the checks passed and writing begins (the message says what "
                "will be copied).",
                "finished": "the result (files and bytes copied, duration, free space, the "
                "first problems) and whether the disk is safe to unplug.",
                "refused": "a safety rule stopped the backup; the message says why, and what "
                "to do.",
                "needs_approval": "a disk with the backup folder was plugged in but is not "
                "approved; the message has the exact `approve` command.",
                "reminder": "no backup for `remind_after_days` days: which disks to plug in, "
                "and when each was last backed up.",
                "disk_health": "a backup disk's SMART readings got worse since the last "
                "reading (sectors reallocated, unreadable, transfer errors, wear), or the "
                "drive says it is failing: what changed, and what to do. See "
                "[health](health.md).",
            },
            choices=NOTIFY_EVENTS,
        ),
    )
    timeout_s: float = field(
        default=30.0,
        metadata=_doc(
            "Give up on a service that has not answered after this many seconds. Sending "
            "never blocks the backup: `started` is sent while the copy runs.",
            min=1,
            max=60,
        ),
    )
    remind_after_days: int = field(
        default=7,
        metadata=_doc(
            "Send a `reminder` when the newest successful backup onto any approved disk is "
            "older than this many days (a disk never backed up counts from its approval): "
            "at most one a day, none while a backup runs. The daemon checks by itself; "
            "without the daemon, run `immich-usb-backup remind` from a timer. 0: never.",
            min=0,
        ),
    )
    heartbeat_urls: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "URLs fetched (HTTP GET) after each successful backup, for an outside monitor "
            "that tells you when backups stop: a healthchecks.io check, an Uptime Kuma push "
            "monitor. Same time limit as messages; a failure is noted in the history and "
            "never fails the backup. Like notification URLs they are secrets: never shown "
            "in logs, the history or on the disk.",
            example=("https://hc-ping.com/your-check-uuid",),
        ),
    )


@dataclass(frozen=True)
class HealthConfig:
    """A backup disk's health: its SMART data, read with `smartctl` at each backup and verify.

    Only read, never changed: no self-test is started, and a disk asleep is not woken.
    What is read, what "worse" means and which USB enclosures report nothing: see
    [health](health.md).
    """

    enabled: bool | None = field(
        default=None,
        metadata=_doc(
            "Read the disk's SMART data (overall assessment, reallocated, pending and "
            "uncorrectable sectors, transfer errors, hours, temperature; for NVMe the "
            "critical warning, wear and media errors) at each backup and `verify`, keep it "
            "per disk in the state dir (`health.toml`), and send a `disk_health` message "
            "when it got worse. `true` with no `smartctl` installed says so in every run "
            "(\"health: not reported\"); `false` turns it off.",
            example=True,
            default_doc="on when `smartctl` (below) is installed, off without a word when "
            "it is not",
        ),
    )
    smartctl: str = field(
        default="smartctl",
        metadata=_doc(
            "The `smartctl` program (smartmontools 7.0 or newer, for its JSON output): a "
            "name looked up on `PATH`, or an absolute path."
        ),
    )


@dataclass(frozen=True)
class WebConfig:
    """The web UI: a page to see the disks and the history, and to start a backup.

    `immich-usb-backup web` serves it, as a process of its own without root; it asks the
    daemon through a control socket that only root and members of `group` can use. See
    [the web UI](web.md) for setting it up behind a reverse proxy with TLS.
    """

    listen: str = field(
        default="",
        metadata=_doc(
            "Where `immich-usb-backup web` listens, `HOST:PORT` (`[::1]:8429` for IPv6). "
            "Keep it on the loopback address and put a reverse proxy with TLS in front for "
            "access from the LAN. Empty: no web UI (`web` refuses to start).",
            example="127.0.0.1:8429",
        ),
    )
    password_file: Path = field(
        default=Path("/var/lib/immich-usb-backup/web-password"),
        metadata=_doc(
            "The web UI's password, as a scrypt hash, written by `immich-usb-backup "
            "web-password`. `web` refuses to start without it. Readable by root and `group` "
            "only (mode 0640); the password itself is never stored."
        ),
    )
    socket: Path = field(
        default=Path("/run/immich-usb-backup/control.sock"),
        metadata=_doc(
            "The daemon's control socket, which the web UI asks for the disks plugged in "
            "now, the live progress, and to start, cancel or check a backup. Made by the "
            "daemon, owned by root and `group`, mode 0660."
        ),
    )
    group: str = field(
        default="immich-usb-backup",
        metadata=_doc(
            "The group whose members may use the control socket (the web UI's service "
            "runs with it as a supplementary group). When it does not exist, only root can "
            "(create it with `groupadd --system immich-usb-backup`)."
        ),
    )
    trusted_proxies: tuple[str, ...] = field(
        default=("127.0.0.1", "::1"),
        metadata=_doc(
            "Addresses of reverse proxies whose `X-Forwarded-Proto` and `X-Forwarded-For` "
            "headers are believed: behind such a proxy with TLS the session cookie is "
            "`Secure` and failed logins are counted per client address. A request from any "
            "other address is taken as it comes."
        ),
    )


@dataclass(frozen=True)
class StateConfig:
    """Where the program keeps what it knows between runs, on the server."""

    dir: Path = field(
        default=Path("/var/lib/immich-usb-backup"),
        metadata=_doc(
            "Holds `history.jsonl` (one record per run), `status.json` (the running backup's "
            "progress), `backup.lock` (one backup at a time), `disks.toml` (disks approved "
            "with `approve`), `hashes.sqlite` (the manifest's cache) and `run/` (the current "
            "run's file lists, removed at its end). Must be on the server: a state dir "
            "inside `upload_location`, or on the backup disk, is refused."
        ),
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    immich: ImmichConfig
    database: DatabaseConfig
    config_backup: ConfigBackupConfig
    library: LibraryConfig
    disks: DisksConfig
    notify: NotifyConfig
    health: HealthConfig
    web: WebConfig
    state: StateConfig
    source: Path | None = None

    @property
    def dumps_dir(self) -> Path:
        """Where Immich's dumps are: the configured folder or ``<upload_location>/backups``."""
        return self.database.dumps_dir or self.immich.upload_location / "backups"

    @property
    def state_dir(self) -> Path:
        return self.state.dir


# Every [section], in the order of Config's fields: a section is its dataclass and a field.
SECTIONS: dict[str, type[Any]] = {
    name: hint for name, hint in typing.get_type_hints(Config).items()
    if name != "source" and isinstance(hint, type)
}
