"""The configuration: one TOML file loaded once into the frozen, typed dataclasses of
``configschema``, which this module re-exports.

``load_config`` validates a file against the schema and reports every problem at once,
each naming the file, the key path and what is wrong ("did you mean ...?" for an unknown
key). Nothing else in the project reads TOML configuration.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, cast

from immich_usb_backup.configschema import (
    _URL,
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DUMP_SOURCES,
    MODES,
    NOTIFY_EVENTS,
    SECTIONS,
    Config,
    ConfigBackupConfig,
    DatabaseConfig,
    DisksConfig,
    Event,
    HealthConfig,
    ImmichConfig,
    LibraryConfig,
    NotifyConfig,
    StateConfig,
    WebConfig,
)
from immich_usb_backup.errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "DUMP_SOURCES",
    "MODES",
    "NOTIFY_EVENTS",
    "SECTIONS",
    "Config",
    "ConfigBackupConfig",
    "DatabaseConfig",
    "DisksConfig",
    "Event",
    "HealthConfig",
    "ImmichConfig",
    "LibraryConfig",
    "NotifyConfig",
    "StateConfig",
    "WebConfig",
    "load_config",
    "parse_config",
    "parse_listen",
    "resolve_config_path",
    "schema_keys",
]


def schema_keys() -> list[str]:
    """Return every configuration key as ``section.key``, in schema order."""
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in fields(cls)]


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
        # the sections that did validate, for cross-key checks while others have errors
        partial = types.SimpleNamespace(**built)
        _check_relations(cast(Config, partial), where, problems)
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
    for i, url in enumerate(getattr(getattr(cfg, "notify", None), "heartbeat_urls", ()), 1):
        if not re.match(r"^https?://\S", url.strip()):
            problems.append(f"{where}: notify.heartbeat_urls: item {i} is not an http:// or "
                            "https:// URL")
    listen = getattr(getattr(cfg, "web", None), "listen", "")
    if listen and parse_listen(listen) is None:
        problems.append(f'{where}: web.listen: must be HOST:PORT ("127.0.0.1:8429", '
                        f'"[::1]:8429"), got "{listen}"')
    db = getattr(cfg, "database", None)
    if db is not None and db.enabled and db.source == "immich-api":
        for key, value in (("url", cfg.immich.url), ("api_key_file", cfg.immich.api_key_file)):
            if not value:
                problems.append(f'{where}: immich.{key}: required when database.source = '
                                '"immich-api"')
        if cfg.immich.url and not re.match(r"^https?://[^/\s]+", cfg.immich.url):
            problems.append(f"{where}: immich.url: must start with http:// or https:// "
                            f"(got {cfg.immich.url!r})")
    if db is not None and db.enabled and db.source == "command" and not db.command:
        problems.append(f'{where}: database.command: required when database.source = '
                        '"command" (a list: program, then arguments)')
    health = getattr(cfg, "health", None)
    if health is not None and (not health.smartctl.strip() or "\0" in health.smartctl):
        problems.append(f"{where}: health.smartctl: must name a program (\"smartctl\" or a "
                        "path)")
    for pattern in cfg.library.excludes:
        if pattern.strip("/") in {"", "*", "**"}:
            problems.append(
                f'{where}: library.excludes: pattern "{pattern}" would exclude everything'
            )
        elif ".." in pattern.split("/"):
            problems.append(f'{where}: library.excludes: pattern "{pattern}" must not use ".."')


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


def parse_listen(value: str) -> tuple[str, int] | None:
    """``"127.0.0.1:8429"`` -> ``("127.0.0.1", 8429)``, ``"[::1]:8429"`` -> ``("::1",
    8429)``; None when it is not ``HOST:PORT`` with a port from 1 to 65535."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\s\[\]]+):(\d{1,5})", value)
    if m is None:
        return None
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return (host, int(port)) if 0 < int(port) < 65536 else None
