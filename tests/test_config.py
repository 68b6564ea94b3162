"""Unit tests for the configuration: schema, validation messages, path resolution.

Plain files in temporary folders only; no exFAT, no root.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from helpers import REPO, run_cli
from immich_usb_backup import config as cfgmod
from immich_usb_backup.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    Config,
    load_config,
    parse_config,
    resolve_config_path,
    schema_keys,
)
from immich_usb_backup.errors import ConfigError

EXAMPLE = REPO / "config.example.toml"
CONFIG_DOC = REPO / "docs" / "configuration.md"


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def one_problem_about(problems: list[str], needle: str) -> str:
    hits = [p for p in problems if needle in p]
    assert len(hits) == 1, f"expected one problem mentioning {needle!r}, got {problems}"
    return hits[0]


def minimal(tmp_path: Path, extra: str = "") -> str:
    upload = tmp_path / "immich"
    return f'[immich]\nupload_location = "{upload}"\n\n{extra}'


# loading a valid file ----------------------------------------------------------------


def test_full_valid_file_loads_every_value_with_the_schema_types(tmp_path: Path) -> None:
    upload = tmp_path / "immich"
    state = tmp_path / "state"
    path = write(
        tmp_path,
        f"""
[immich]
upload_location = "{upload}/"
require_markers = false

[database]
enabled = false
dumps_dir = "/srv/dumps"
keep = 5
max_age_hours = 30

[config_backup]
enabled = true
paths = ["/etc/immich", "/opt/immich/docker-compose.yml"]
keep = 4

[library]
enabled = true
mode = "quick"
excludes = ["thumbs", "/encoded-video"]
max_delete_percent = 12.5
bwlimit_kib = 2048

[state]
dir = "{state}"
""",
    )
    cfg = load_config(path)

    assert isinstance(cfg, Config)
    assert cfg.source == path
    assert cfg.immich.upload_location == upload  # trailing slash normalised away
    assert isinstance(cfg.immich.upload_location, Path)
    assert cfg.immich.require_markers is False
    assert cfg.database.enabled is False
    assert cfg.database.dumps_dir == Path("/srv/dumps")
    assert cfg.dumps_dir == Path("/srv/dumps")
    assert cfg.database.keep == 5
    assert type(cfg.database.keep) is int
    assert cfg.database.max_age_hours == 30.0
    assert type(cfg.database.max_age_hours) is float
    assert cfg.config_backup.paths == (Path("/etc/immich"), Path("/opt/immich/docker-compose.yml"))
    assert isinstance(cfg.config_backup.paths, tuple)
    assert all(isinstance(p, Path) for p in cfg.config_backup.paths)
    assert cfg.config_backup.keep == 4
    assert cfg.library.mode == "quick"
    assert cfg.library.excludes == ("thumbs", "/encoded-video")
    assert isinstance(cfg.library.excludes, tuple)
    assert cfg.library.max_delete_percent == 12.5
    assert cfg.library.bwlimit_kib == 2048
    assert cfg.state.dir == state
    assert cfg.state_dir == state


def test_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    upload = tmp_path / "immich"
    cfg = load_config(write(tmp_path, minimal(tmp_path)))

    assert cfg.immich.upload_location == upload
    assert cfg.immich.require_markers is True
    assert cfg.database.enabled is True
    assert cfg.database.dumps_dir is None
    assert cfg.dumps_dir == upload / "backups"
    assert cfg.database.keep == 3
    assert cfg.database.max_age_hours == 26.0
    assert cfg.config_backup.enabled is True
    assert cfg.config_backup.paths == ()
    assert cfg.config_backup.keep == 10
    assert cfg.library.enabled is True
    assert cfg.library.mode == "quick"
    assert cfg.library.excludes == ()
    assert cfg.library.max_delete_percent == 20.0
    assert cfg.library.bwlimit_kib == 0
    assert cfg.state.dir == Path("/var/lib/immich-usb-backup")


def test_loaded_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, minimal(tmp_path)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.database.keep = 7  # type: ignore[misc]


def test_whole_number_is_accepted_for_a_float_key_and_stored_as_float(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, minimal(tmp_path, "[library]\nmax_delete_percent = 100\n")))
    assert cfg.library.max_delete_percent == 100.0
    assert type(cfg.library.max_delete_percent) is float


# every problem at once ---------------------------------------------------------------


def test_several_bad_keys_are_all_reported_each_naming_file_and_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        minimal(
            tmp_path,
            """
[database]
enabled = "yes"
keep = -1

[config_backup]
keep = true

[library]
mode = "fastest"
max_delete_percent = 150
""",
        ),
    )
    problems = problems_of(path)

    assert len(problems) == 5, problems
    for keypath in (
        "database.enabled",
        "database.keep",
        "config_backup.keep",
        "library.mode",
        "library.max_delete_percent",
    ):
        problem = one_problem_about(problems, f"{keypath}:")
        assert problem.startswith(f"{path}: "), problem


def test_config_error_message_joins_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(tmp_path, '[database]\nkeep = 0\n[library]\nmode = "x"\n'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "\n".join(info.value.problems)
    assert len(info.value.problems) == 2


def test_relation_problems_are_reported_together_with_key_problems(tmp_path: Path) -> None:
    # "reports every problem at once": a cross-key problem (state.dir inside the upload
    # location) must not wait until an unrelated bad key elsewhere has been fixed.
    upload = tmp_path / "immich"
    path = write(
        tmp_path,
        f'[immich]\nupload_location = "{upload}"\n'
        f'[state]\ndir = "{upload}/state"\n'
        "[database]\nkeep = 0\n",
    )
    problems = problems_of(path)
    one_problem_about(problems, "database.keep:")
    one_problem_about(problems, "state.dir:")


# unknown keys and sections -----------------------------------------------------------


def test_unknown_key_suggests_the_closest_name(tmp_path: Path) -> None:
    path = write(tmp_path, f'[immich]\nupload_locaton = "{tmp_path}/immich"\n')
    problems = problems_of(path)
    problem = one_problem_about(problems, "upload_locaton")
    assert problem.startswith(f"{path}: ")
    assert "[immich]" in problem
    assert "did you mean `upload_location`?" in problem


def test_unknown_key_with_nothing_close_gets_no_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(tmp_path, "[library]\nzzzzzz = 1\n"))
    problem = one_problem_about(problems_of(path), "zzzzzz")
    assert "[library]" in problem
    assert "did you mean" not in problem


def test_misspelt_required_key_is_also_reported_as_missing(tmp_path: Path) -> None:
    path = write(tmp_path, f'[immich]\nupload_locaton = "{tmp_path}/immich"\n')
    problems = problems_of(path)
    assert len(problems) == 2, problems
    one_problem_about(problems, "immich.upload_location: required key is missing")


def test_unknown_section_suggests_the_closest_section(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(tmp_path, "[librar]\nenabled = true\n"))
    problem = one_problem_about(problems_of(path), "unknown section")
    assert problem.startswith(f"{path}: ")
    assert "[librar]" in problem
    assert "did you mean [library]?" in problem


def test_section_that_is_not_a_table_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "library = 5\n" + minimal(tmp_path))
    problem = one_problem_about(problems_of(path), "[library]")
    assert "must be a table" in problem
    assert "a whole number" in problem


# wrong types and ranges --------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "keypath", "wanted"),
    [
        ('[immich]\nrequire_markers = "false"', "immich.require_markers",
         "must be true or false, got a string"),
        ("[database]\nenabled = 1", "database.enabled", "must be true or false, got a whole"),
        ("[database]\nkeep = true", "database.keep", "must be a whole number, got a boolean"),
        ("[database]\nkeep = 2.5", "database.keep", "must be a whole number, got a number"),
        ("[database]\nkeep = -1", "database.keep", "must be at least 1, got -1"),
        ("[database]\nkeep = 0", "database.keep", "must be at least 1, got 0"),
        ("[config_backup]\nkeep = -3", "config_backup.keep", "must be at least 1"),
        ("[database]\nmax_age_hours = -0.5", "database.max_age_hours", "must be at least 0"),
        ("[database]\nmax_age_hours = true", "database.max_age_hours",
         "must be a number, got a boolean"),
        ("[database]\nmax_age_hours = nan", "database.max_age_hours", "finite"),
        ("[library]\nmax_delete_percent = 100.5", "library.max_delete_percent",
         "must be at most 100, got 100.5"),
        ("[library]\nmax_delete_percent = 101", "library.max_delete_percent",
         "must be at most 100"),
        ("[library]\nmax_delete_percent = inf", "library.max_delete_percent", "finite"),
        ("[library]\nbwlimit_kib = -1", "library.bwlimit_kib", "must be at least 0"),
        ('[library]\nmode = "fast"', "library.mode",
         'must be one of "quick", "verify", "full", got "fast"'),
        ("[library]\nkeep_deleted_days = -1", "library.keep_deleted_days",
         "must be at least 0, got -1"),
        ("[library]\nmode = 1", "library.mode", "must be a string, got a whole number"),
        ('[library]\nexcludes = "thumbs"', "library.excludes", "must be a list, got a string"),
        ('[library]\nexcludes = ["ok", 3]', "library.excludes", "item 2: must be a string"),
        ('[database]\ndumps_dir = "backups"', "database.dumps_dir",
         'must be an absolute path, got "backups"'),
        ('[database]\ndumps_dir = ""', "database.dumps_dir", "must not be empty"),
        ("[database]\ndumps_dir = 5", "database.dumps_dir", "must be a path string"),
        ('[config_backup]\npaths = ["/etc/ok", "relative/file"]', "config_backup.paths",
         'item 2: must be an absolute path, got "relative/file"'),
        ('[state]\ndir = "state"', "state.dir", "must be an absolute path"),
    ],
)
def test_wrong_value_is_reported_with_file_key_path_and_reason(
    tmp_path: Path, extra: str, keypath: str, wanted: str
) -> None:
    text = minimal(tmp_path)
    section = extra.split("\n", 1)[0]
    if section == "[immich]":
        text = text.replace("[immich]\n", extra + "\n", 1)
    else:
        text += extra + "\n"
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: {keypath}: "), problems[0]
    assert wanted in problems[0]


def test_relative_upload_location_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[immich]\nupload_location = "immich/library"\n')
    problem = one_problem_about(problems_of(path), "immich.upload_location:")
    assert problem.startswith(f"{path}: ")
    assert "absolute path" in problem


def test_missing_upload_location_is_reported_as_required(tmp_path: Path) -> None:
    path = write(tmp_path, "[database]\nkeep = 4\n")
    problems = problems_of(path)
    assert problems == [f"{path}: immich.upload_location: required key is missing"]


def test_empty_file_reports_the_missing_upload_location(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert problems_of(path) == [f"{path}: immich.upload_location: required key is missing"]


# file-level problems -----------------------------------------------------------------


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[immich\nupload_location = '/x'\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: invalid TOML")


def test_missing_file_is_reported_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert problems_of(path) == [f"{path}: file not found"]


def test_file_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[immich]\nupload_location = "/x\xff"\n')
    assert problems_of(path) == [f"{path}: not UTF-8 text"]


def test_parse_config_names_the_given_source_in_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"immich": {}, "library": {"mode": "slow"}}, "<inline>")
    assert len(info.value.problems) == 2
    assert all(p.startswith("<inline>: ") for p in info.value.problems)


# relations between keys --------------------------------------------------------------


@pytest.mark.parametrize("state_rel", ["immich/state", "immich", "."])
def test_state_dir_overlapping_upload_location_is_refused(tmp_path: Path, state_rel: str) -> None:
    state = tmp_path / state_rel
    path = write(tmp_path, minimal(tmp_path, f'[state]\ndir = "{state}"\n'))
    problem = one_problem_about(problems_of(path), "state.dir:")
    assert problem.startswith(f"{path}: ")
    assert "upload_location" in problem


def test_state_dir_beside_upload_location_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(tmp_path, f'[state]\ndir = "{tmp_path}/immich-state"\n'))
    assert load_config(path).state.dir == tmp_path / "immich-state"


@pytest.mark.parametrize("pattern", ["*", "**", "/", "", "/*"])
def test_exclude_pattern_that_matches_everything_is_refused(
    tmp_path: Path, pattern: str
) -> None:
    path = write(tmp_path, minimal(tmp_path, f'[library]\nexcludes = ["thumbs", "{pattern}"]\n'))
    problem = one_problem_about(problems_of(path), "library.excludes:")
    assert problem.startswith(f"{path}: ")
    assert "exclude everything" in problem


@pytest.mark.parametrize("pattern", ["..", "../etc", "upload/../../x"])
def test_exclude_pattern_with_dotdot_is_refused(tmp_path: Path, pattern: str) -> None:
    path = write(tmp_path, minimal(tmp_path, f'[library]\nexcludes = ["{pattern}"]\n'))
    problem = one_problem_about(problems_of(path), "library.excludes:")
    assert '".."' in problem


def test_ordinary_exclude_patterns_are_accepted(tmp_path: Path) -> None:
    pats = '["thumbs", "*.tmp", "/encoded-video", "upload/abc", "..hidden"]'
    cfg = load_config(write(tmp_path, minimal(tmp_path, f"[library]\nexcludes = {pats}\n")))
    assert cfg.library.excludes == ("thumbs", "*.tmp", "/encoded-video", "upload/abc", "..hidden")


# where the file is -------------------------------------------------------------------


def test_config_path_from_the_flag_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CONFIG_ENV, "/from/env.toml")
    assert resolve_config_path("/from/flag.toml") == Path("/from/flag.toml")


def test_config_path_comes_from_the_environment_without_the_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CONFIG_ENV, "/from/env.toml")
    assert resolve_config_path(None) == Path("/from/env.toml")


def test_config_path_defaults_to_etc_without_flag_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert resolve_config_path(None) == DEFAULT_CONFIG_PATH
    assert Path("/etc/immich-usb-backup/config.toml") == DEFAULT_CONFIG_PATH


def test_empty_environment_variable_falls_back_to_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CONFIG_ENV, "")
    assert resolve_config_path(None) == DEFAULT_CONFIG_PATH


# the command line --------------------------------------------------------------------


def test_cli_exits_2_and_prints_every_config_problem(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'[immich]\nupload_locaton = "{tmp_path}"\n[database]\nkeep = 0\n[libary]\n',
    )
    problems = problems_of(path)
    assert len(problems) == 4, problems

    result = run_cli("history", config=path)

    assert result.returncode == 2, result.stderr
    assert f"configuration error ({len(problems)}):" in result.stderr
    for problem in problems:
        assert problem in result.stderr
    assert "did you mean `upload_location`?" in result.stderr


def test_cli_reads_the_config_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[database]\nkeep = 0\n", name="from-env.toml")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    result = run_cli("history")
    assert result.returncode == 2
    assert f"{path}: database.keep: must be at least 1" in result.stderr


def test_cli_with_a_valid_config_does_not_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(tmp_path, f'[state]\ndir = "{tmp_path}/state"\n'))
    result = run_cli("history", config=path)
    assert result.returncode == 0, result.stderr
    assert "no backups yet" in result.stdout


# the schema --------------------------------------------------------------------------


def test_schema_keys_lists_every_dataclass_field_as_section_dot_key() -> None:
    keys = schema_keys()
    assert len(keys) == len(set(keys))
    assert "immich.upload_location" in keys
    assert "library.max_delete_percent" in keys
    assert "state.dir" in keys
    expected = {
        f"{section}.{f.name}"
        for section, cls in cfgmod.SECTIONS.items()
        for f in dataclasses.fields(cls)
    }
    assert set(keys) == expected


# config.example.toml -----------------------------------------------------------------

_SECTION = re.compile(r"^\[([A-Za-z0-9_]+)\]\s*(?:#.*)?$")
_COMMENTED_KEY = re.compile(r"^#\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*\S")


def example_keys(text: str) -> set[str]:
    """Keys set in the example plus keys shown commented out (``# key = value``)."""
    keys = {
        f"{section}.{key}"
        for section, table in tomllib.loads(text).items()
        for key in (table if isinstance(table, dict) else {})
    }
    section = None
    for line in text.splitlines():
        stripped = line.strip()
        if m := _SECTION.match(stripped):
            section = m.group(1)
        elif section and (m := _COMMENTED_KEY.match(stripped)):
            keys.add(f"{section}.{m.group(1)}")
    return keys


def test_example_key_reader_sees_commented_out_keys() -> None:
    text = '[immich]\nupload_location = "/x"\n# require_markers = true\n# a remark\n'
    assert example_keys(text) == {"immich.upload_location", "immich.require_markers"}


def test_config_example_loads(tmp_path: Path) -> None:
    assert EXAMPLE.is_file(), f"{EXAMPLE} is missing"
    text = EXAMPLE.read_text()
    upload = tmp_path / "immich"
    text = re.sub(
        r'(?m)^(\s*upload_location\s*=\s*)"[^"]*"', rf'\g<1>"{upload}"', text, count=1
    )
    path = write(tmp_path, text)

    cfg = load_config(path)
    assert cfg.immich.upload_location == upload
    assert parse_config(tomllib.loads(text), "example") == dataclasses.replace(cfg, source=None)


def test_config_example_shows_every_schema_key() -> None:
    assert EXAMPLE.is_file(), f"{EXAMPLE} is missing"
    assert example_keys(EXAMPLE.read_text()) == set(schema_keys())


# docs/configuration.md ---------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")


def section_blocks(markdown: str) -> dict[str, str]:
    """Text under each heading that names a ``[section]``, up to the next heading as high."""
    lines = markdown.splitlines()
    blocks: dict[str, str] = {}
    for i, line in enumerate(lines):
        m = _HEADING.match(line)
        if not m:
            continue
        level = len(m.group(1))
        for section in re.findall(r"\[([a-z_]+)\]", m.group(2)):
            body = []
            for later in lines[i + 1 :]:
                h = _HEADING.match(later)
                if h and len(h.group(1)) <= level:
                    break
                body.append(later)
            blocks[section] = blocks.get(section, "") + "\n".join(body)
    return blocks


def test_docs_section_reader_finds_keys_under_their_heading() -> None:
    md = "# Config\n## [immich]\n`upload_location` is needed\n### more\nrequire_markers\n## [x]\n"
    blocks = section_blocks(md)
    assert "upload_location" in blocks["immich"]
    assert "require_markers" in blocks["immich"]
    assert "upload_location" not in blocks["x"]


def test_configuration_doc_mentions_every_schema_key() -> None:
    assert CONFIG_DOC.is_file(), f"{CONFIG_DOC} is missing"
    text = CONFIG_DOC.read_text()
    blocks = section_blocks(text)
    missing = []
    for key in schema_keys():
        section, name = key.split(".", 1)
        if key in text:
            continue
        if re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])",
                     blocks.get(section, "")):
            continue
        missing.append(key)
    assert missing == [], f"{CONFIG_DOC} does not mention {missing}"


def test_a_fresh_dump_source_needs_what_it_uses(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[immich]\nupload_location = "/srv/immich"\n\n'
                    '[database]\nsource = "immich-api"\n')
    problems = problems_of(path)
    one_problem_about(problems, "immich.url: required when database.source")
    one_problem_about(problems, "immich.api_key_file: required when database.source")
    path.write_text('[immich]\nupload_location = "/srv/immich"\nurl = "127.0.0.1:2283"\n'
                    'api_key_file = "/etc/key"\n\n[database]\nsource = "immich-api"\n')
    one_problem_about(problems_of(path), "immich.url: must start with http")
    path.write_text('[immich]\nupload_location = "/srv/immich"\n\n'
                    '[database]\nsource = "command"\n')
    one_problem_about(problems_of(path), "database.command: required")
    path.write_text('[immich]\nupload_location = "/srv/immich"\n\n'
                    '[database]\nsource = "sometimes"\n')
    one_problem_about(problems_of(path), "database.source")
    path.write_text('[immich]\nupload_location = "/srv/immich"\n\n'
                    '[database]\nenabled = false\nsource = "command"\n')
    assert load_config(path).database.source == "command"  # off: nothing to check


def test_the_error_example_in_the_docs_is_what_the_program_prints(tmp_path: Path) -> None:
    doc = CONFIG_DOC.read_text()
    shown = re.search(r"For example, a file with.*?```\n(configuration error.*?)```", doc,
                      re.S)
    assert shown is not None
    path = write(tmp_path, '[immich]\nupload_locaton = "/srv/immich/library"\n\n'
                           '[database]\nkeep = 0\n')
    r = run_cli("check", config=path)
    assert r.returncode == 2
    assert r.stderr.replace(str(path), "/etc/immich-usb-backup/config.toml") == shown[1]
