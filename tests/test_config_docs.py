"""Tests for tools/config-docs: config.example.toml and docs/configuration.md come from the schema.

Plain files in temporary folders only; no root.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType

import pytest

from helpers import REPO
from immich_usb_backup.config import SECTIONS, parse_config, schema_keys

TOOL = REPO / "tools" / "config-docs"
EXAMPLE = Path("config.example.toml")
REFERENCE = Path("docs/configuration.md")


def load_tool() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("config_docs", str(TOOL))
    spec = importlib.util.spec_from_loader("config_docs", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


tool = load_tool()


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A folder holding copies of the two generated files, laid out as in the repository."""
    for name in (EXAMPLE, REFERENCE):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, tmp_path / name)
    return tmp_path


def change_line(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


# the committed files -----------------------------------------------------------------


def test_committed_files_are_what_the_tool_generates() -> None:
    assert os.access(TOOL, os.X_OK), f"{TOOL} is not executable"
    result = subprocess.run([sys.executable, str(TOOL), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


# --check -------------------------------------------------------------------------------


def test_check_of_an_edited_example_exits_1_names_the_file_and_writes_nothing(
    repo_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = repo_copy / EXAMPLE
    change_line(example, "\nkeep = 3\n", "\nkeep = 4\n")
    edited = example.read_text()

    assert tool.main(["--check"], root=repo_copy) == 1

    out = capsys.readouterr().out
    assert "config.example.toml differs" in out
    assert "-keep = 4" in out
    assert "+keep = 3" in out
    assert "docs/configuration.md" not in out
    assert example.read_text() == edited


def test_check_of_an_edited_key_table_exits_1(
    repo_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    change_line(repo_copy / REFERENCE, "| `database.keep` | int >= 1 | `3` |",
                "| `database.keep` | int >= 1 | `4` |")

    assert tool.main(["--check"], root=repo_copy) == 1

    out = capsys.readouterr().out
    assert "docs/configuration.md differs" in out
    assert "+| `database.keep` | int >= 1 | `3` |" in out


def test_check_ignores_edits_to_the_hand_written_prose(repo_copy: Path) -> None:
    change_line(repo_copy / REFERENCE, "so two runs a\nday keep both.",
                "so two runs a\nday keep both (edited by hand).")
    assert tool.main(["--check"], root=repo_copy) == 0


def test_generating_rewrites_stale_files_then_check_passes(repo_copy: Path) -> None:
    change_line(repo_copy / EXAMPLE, "\nkeep = 3\n", "\nkeep = 4\n")
    change_line(repo_copy / REFERENCE, "| `state.dir` |", "| `state.directory` |")

    assert tool.main([], root=repo_copy) == 0

    assert tool.main(["--check"], root=repo_copy) == 0
    assert (repo_copy / EXAMPLE).read_text() == (REPO / EXAMPLE).read_text()
    assert (repo_copy / REFERENCE).read_text() == (REPO / REFERENCE).read_text()


def test_reference_without_the_region_of_a_section_is_an_error(
    repo_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    change_line(repo_copy / REFERENCE, "<!-- BEGIN GENERATED: tools/config-docs [state] -->\n", "")
    assert tool.main(["--check"], root=repo_copy) == 2
    assert "no region for [state]" in capsys.readouterr().err


# what is rendered ----------------------------------------------------------------------


def test_every_schema_key_is_in_both_outputs() -> None:
    example = tool.render_example()
    reference = tool.splice_reference((REPO / REFERENCE).read_text())
    current = None
    shown = set()
    for line in example.splitlines():
        if m := re.match(r"^\[(\w+)\]$", line):
            current = m.group(1)
        elif m := re.match(r"^(?:# )?(\w+) = \S", line):
            shown.add(f"{current}.{m.group(1)}")
    assert shown == set(schema_keys())
    for key in schema_keys():
        assert f"\n| `{key}` | " in reference, key


def test_rendered_example_loads_as_the_defaults(tmp_path: Path) -> None:
    text = tool.render_example()
    data = tomllib.loads(text)
    assert parse_config(data, "example") == parse_config(
        {"immich": {"upload_location": data["immich"]["upload_location"]}}, "defaults"
    )


def test_every_example_value_is_valid() -> None:
    text = "".join(
        f"[{section}]\n" + "".join(
            f"{f.name} = {tool.toml_value(f.metadata['example'])}\n"
            for f in fields(cls) if f.metadata.get("example") is not None
        )
        for section, cls in SECTIONS.items()
    )
    cfg = parse_config(tomllib.loads(text), "examples")
    assert cfg.library.excludes == ("/thumbs", "/encoded-video")


def test_every_comment_line_fits_the_width() -> None:
    long = [line for line in tool.render_example().splitlines()
            if line.startswith("#") and len(line) > tool.WIDTH]
    assert long == []


@dataclass(frozen=True)
class _Undocumented:
    """A section with a key nobody documented."""

    size: int = field(default=1)


@dataclass(frozen=True)
class _NoExample:
    """A section with a key that has no default and no example."""

    where: Path | None = field(default=None, metadata={"doc": "Somewhere."})


@pytest.mark.parametrize(
    ("section", "wanted"),
    [(_Undocumented, "x.size: no documentation"), (_NoExample, "x.where: a key without")],
)
def test_a_key_the_tool_cannot_document_is_refused(section: type, wanted: str) -> None:
    with pytest.raises(tool.SchemaDocError, match=re.escape(wanted)):
        tool.render_example({"x": section})
