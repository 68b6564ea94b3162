"""The configuration: one TOML file loaded once into frozen, typed dataclasses.

The dataclasses below are the schema. ``load_config`` validates a file against them and
reports every problem at once, each naming the file, the key path and what is wrong.
Nothing else in the project reads TOML configuration.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, cast

from immich_usb_backup.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/immich-usb-backup/config.toml")
CONFIG_ENV = "IMMICH_USB_BACKUP_CONFIG"

MODES = ("quick", "verify", "full")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S")
NOTIFY_EVENTS = ("started", "finished", "refused", "needs_approval")


def _doc(text: str, **constraints: Any) -> dict[str, Any]:
    return {"doc": text, **constraints}


@dataclass(frozen=True)
class ImmichConfig:
    """[immich]: where Immich keeps its files."""

    upload_location: Path = field(
        metadata=_doc("Immich's UPLOAD_LOCATION (the folder mounted at /data).", required=True)
    )
    require_markers: bool = field(
        default=True,
        metadata=_doc(
            "Refuse to mirror unless Immich's `.immich` marker files are in its folders."
        ),
    )


@dataclass(frozen=True)
class DatabaseConfig:
    """[database]: copy Immich's newest nightly database dump."""

    enabled: bool = field(default=True, metadata=_doc("Copy the newest database dump."))
    dumps_dir: Path | None = field(
        default=None,
        metadata=_doc("Where Immich writes its dumps; default `<upload_location>/backups`."),
    )
    keep: int = field(default=3, metadata=_doc("Dumps kept on the disk.", min=1))
    max_age_hours: float = field(
        default=26.0,
        metadata=_doc("Report a problem when the newest dump is older than this.", min=0),
    )


@dataclass(frozen=True)
class ConfigBackupConfig:
    """[config_backup]: zip the server's configuration files."""

    enabled: bool = field(default=True, metadata=_doc("Zip the configured paths."))
    paths: tuple[Path, ...] = field(
        default=(), metadata=_doc("Files and folders (recursively) to put in the zip.")
    )
    keep: int = field(default=10, metadata=_doc("Config archives kept on the disk.", min=1))


@dataclass(frozen=True)
class LibraryConfig:
    """[library]: mirror the upload location with rsync."""

    enabled: bool = field(default=True, metadata=_doc("Mirror the upload location."))
    mode: str = field(
        default="quick",
        metadata=_doc(
            "How copies are checked: quick (size and time), verify (also compare contents "
            "of the files copied and of a rolling share of the rest), full (compare every "
            "file).",
            choices=MODES,
        ),
    )
    verify_rotation_runs: int = field(
        default=10,
        metadata=_doc(
            "In verify mode, compare 1/N of the files not copied in the run, in turns, so "
            "the whole library is re-read every N verify runs; 0 = only the copied files.",
            min=0,
        ),
    )
    manifest: bool = field(
        default=True,
        metadata=_doc("Keep library.sha256 on the disk (checkable with sha256sum -c)."),
    )
    keep_deleted_days: int = field(
        default=30,
        metadata=_doc(
            "Move files deleted or replaced on the server into deleted/YYYY-MM-DD/ on the "
            "disk and keep them this many days; 0 = delete them from the backup at once.",
            min=0,
        ),
    )
    excludes: tuple[str, ...] = field(
        default=(), metadata=_doc("Patterns of paths (relative to upload_location) to skip.")
    )
    max_delete_percent: float = field(
        default=20.0,
        metadata=_doc(
            "Refuse a run that would delete more than this share of the backed-up files.",
            min=0,
            max=100,
        ),
    )
    bwlimit_kib: int = field(
        default=0, metadata=_doc("Limit the copy to this many KiB/s; 0 means no limit.", min=0)
    )


@dataclass(frozen=True)
class DisksConfig:
    """[disks]: which plugged-in disks the daemon backs up to."""

    approved: tuple[str, ...] = field(
        default=(),
        metadata=_doc("File system UUIDs of approved disks (`approve` adds to the state dir)."),
    )
    allow_any_marked: bool = field(
        default=False,
        metadata=_doc("Back up to any USB exFAT disk that has the marker folder."),
    )
    power_off: bool = field(
        default=True,
        metadata=_doc("Power the disk off after a backup that mounted it, when it can."),
    )


@dataclass(frozen=True)
class NotifyConfig:
    """[notify]: messages by e-mail, push or chat through Apprise (docs/notifications.md)."""

    urls: tuple[str, ...] = field(
        default=(),
        metadata=_doc("Apprise URLs to notify (mailto://, ntfy://, tgram://, json://...)."),
    )
    urls_file: Path | None = field(
        default=None,
        metadata=_doc(
            "A file of more Apprise URLs, one a line (`#` starts a comment line): keeps "
            "passwords out of this file."
        ),
    )
    events: tuple[str, ...] = field(
        default=NOTIFY_EVENTS,
        metadata=_doc(
            "Which events are sent: started, finished, refused, needs_approval.",
            choices=NOTIFY_EVENTS,
        ),
    )
    timeout_s: float = field(
        default=30.0,
        metadata=_doc("Give up sending one notification after this many seconds.", min=1,
                      max=60),
    )


@dataclass(frozen=True)
class StateConfig:
    """[state]: where history, status and caches live."""

    dir: Path = field(
        default=Path("/var/lib/immich-usb-backup"),
        metadata=_doc("Directory for history, live status, lock and caches."),
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
    state: StateConfig
    source: Path | None = None

    @property
    def dumps_dir(self) -> Path:
        """Where Immich's dumps are: the configured folder or ``<upload_location>/backups``."""
        return self.database.dumps_dir or self.immich.upload_location / "backups"

    @property
    def state_dir(self) -> Path:
        return self.state.dir


SECTIONS: dict[str, type[Any]] = {
    "immich": ImmichConfig,
    "database": DatabaseConfig,
    "config_backup": ConfigBackupConfig,
    "library": LibraryConfig,
    "disks": DisksConfig,
    "notify": NotifyConfig,
    "state": StateConfig,
}


def schema_keys() -> list[str]:
    """Return every configuration key as ``section.key``, in schema order."""
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in fields(cls)]


def schema_doc(key: str) -> str:
    """Return the one-line description of ``section.key``."""
    section, name = key.split(".", 1)
    for f in fields(SECTIONS[section]):
        if f.name == name:
            return str(f.metadata["doc"])
    raise KeyError(key)


def resolve_config_path(cli_value: str | None) -> Path:
    """Given ``-c`` (or None), return the config path: flag, then env variable, then default."""
    if cli_value:
        return Path(cli_value)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH


def load_config(path: Path) -> Config:
    """Read and validate ``path``. Raise ConfigError listing every problem found."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse_config(data, str(path), source=path)


def parse_config(data: dict[str, Any], where: str, source: Path | None = None) -> Config:
    """Validate an already-parsed TOML document. Raise ConfigError listing every problem."""
    problems: list[str] = []
    for name in data:
        if name not in SECTIONS:
            problems.append(f"{where}: unknown section [{name}]{_suggest(name, SECTIONS)}")
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        section = data.get(name, {})
        if not isinstance(section, dict):
            problems.append(f"{where}: [{name}] must be a table, got {_kind(section)}")
            section = {}
        built[name] = _build_section(cls, name, section, where, problems)

    if all(v is not None for v in built.values()):
        cfg = Config(source=source, **built)
        _check_relations(cfg, where, problems)
        if not problems:
            return cfg
    elif all(built.get(k) is not None for k in ("immich", "state", "library")):
        _check_relations(cast(Config, _Partial(**built)), where, problems)
    raise ConfigError(problems)


def _build_section(
    cls: type[Any], name: str, section: dict[str, Any], where: str, problems: list[str]
) -> Any:
    known = {f.name: f for f in fields(cls)}
    for key in section:
        if key not in known:
            problems.append(
                f"{where}: unknown key `{key}` in [{name}]{_suggest(key, known, quote='`')}"
            )
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    ok = True
    for f in fields(cls):
        keypath = f"{name}.{f.name}"
        if f.name not in section:
            if f.metadata.get("required"):
                problems.append(f"{where}: {keypath}: required key is missing")
                ok = False
            continue
        try:
            values[f.name] = _coerce(section[f.name], hints[f.name], f.metadata)
        except ValueError as exc:
            problems.append(f"{where}: {keypath}: {exc}")
            ok = False
    if not ok:
        return None
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in values]
    if missing:
        return None
    return cls(**values)


def _coerce(value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], meta)
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"must be a list, got {_kind(value)}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(_coerce(item, args[0], meta))
            except ValueError as exc:
                raise ValueError(f"item {i + 1}: {exc}") from None
        return tuple(out)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number, got {_kind(value)}")
        _check_range(value, meta)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        _check_range(value, meta)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {_kind(value)}")
        choices = meta.get("choices")
        if choices and value not in choices:
            allowed = ", ".join(f'"{c}"' for c in choices)
            raise ValueError(f'must be one of {allowed}, got "{value}"')
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise ValueError(f"must be a path string, got {_kind(value)}")
        if not value:
            raise ValueError("must not be empty")
        if "\0" in value:
            raise ValueError("must not contain a NUL character")
        if not value.startswith("/"):
            raise ValueError(f'must be an absolute path, got "{value}"')
        return Path(os.path.normpath(value))
    raise TypeError(f"unsupported schema type {hint!r}")  # pragma: no cover - schema bug


def _check_range(value: float, meta: typing.Mapping[str, Any]) -> None:
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        raise ValueError(f"must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"must be at most {high}, got {value}")


def _check_relations(cfg: Config, where: str, problems: list[str]) -> None:
    """Checks that need more than one key."""
    upload = cfg.immich.upload_location
    state = cfg.state.dir
    if _overlaps(upload, state):
        problems.append(
            f"{where}: state.dir: must not be inside immich.upload_location or contain it "
            f"({state} and {upload})"
        )
    for uuid in getattr(getattr(cfg, "disks", None), "approved", ()):
        if not uuid.strip() or any(c.isspace() for c in uuid):
            problems.append(f'{where}: disks.approved: "{uuid}" is not a file system UUID')
    for i, url in enumerate(getattr(getattr(cfg, "notify", None), "urls", ()), 1):
        if not _URL.match(url.strip()):  # the URL itself is not shown: it may hold a password
            problems.append(f"{where}: notify.urls: item {i} is not an Apprise URL "
                            "(scheme://...); see docs/notifications.md")
    for pattern in cfg.library.excludes:
        if pattern.strip("/") in {"", "*", "**"}:
            problems.append(
                f'{where}: library.excludes: pattern "{pattern}" would exclude everything'
            )
        elif ".." in pattern.split("/"):
            problems.append(f'{where}: library.excludes: pattern "{pattern}" must not use ".."')


@dataclass(frozen=True)
class _Partial:
    """The sections that did validate, for cross-key checks while others have errors."""

    immich: ImmichConfig
    library: LibraryConfig
    state: StateConfig
    database: DatabaseConfig | None = None
    config_backup: ConfigBackupConfig | None = None
    disks: DisksConfig | None = None
    notify: NotifyConfig | None = None


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _suggest(word: str, candidates: typing.Iterable[str], quote: str = "") -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    if not close:
        return ""
    if quote:
        return f": did you mean {quote}{close[0]}{quote}?"
    return f": did you mean [{close[0]}]?"


def _kind(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "a whole number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)
