"""The Nix packaging in nix/: every file parses, and the module agrees with the program.

- Each ``nix/*.nix`` parses with Nix's own parser (Debian's ``nix-bin``), which also
  reports undefined variables. ``--store dummy://`` keeps it away from any Nix store: no
  daemon, no /nix/store, nothing written.
- The module's typed settings are real configuration keys (``config.schema_keys()``),
  its command lines are ones the program's parser accepts, the files the package installs
  exist, and every module option is documented in docs/install.md.

Nothing here builds or evaluates against nixpkgs: that needs a Nix store and the network.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, need
from immich_usb_backup.cli import build_parser
from immich_usb_backup.config import schema_keys

NIX = REPO / "nix"
NIX_FILES = sorted(NIX.glob("*.nix"))
MODULE = NIX / "module.nix"
PACKAGE = NIX / "package.nix"
INSTALL_DOC = REPO / "docs" / "install.md"

MODULE_OPTIONS = {"enable", "package", "settings", "approvedDisks", "notificationUrlsFile",
                  "schedule"}

# `name = mkOption {` / `name = lib.mkEnableOption ...`: an option of the module itself.
OPTION = re.compile(r"^\s*([A-Za-z][A-Za-z0-9]*)\s*=\s*(?:lib\.)?mk(?:Option|EnableOption|"
                    r"PackageOption)\b", re.MULTILINE)
# `section.key = mkOption {`: a typed key of `settings` (the only dotted declarations).
SETTING = re.compile(r"^\s*([a-z_]+\.[a-z_]+)\s*=\s*(?:lib\.)?mkOption\b", re.MULTILINE)
# The command lines of the units: `"${exe} -c ${configFile} daemon"`.
EXEC = re.compile(r'ExecStart = "\$\{exe\} -c \$\{configFile\} ([^"$]+)";')


def nix_parse(path: Path) -> subprocess.CompletedProcess[str]:
    need(shutil.which("nix-instantiate") is not None,
         "needs nix-instantiate (apt-get install nix-bin)")
    return subprocess.run(["nix-instantiate", "--parse", "--store", "dummy://", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_the_three_nix_files_are_there() -> None:
    assert {p.name for p in NIX_FILES} >= {"package.nix", "module.nix", "flake.nix"}


@pytest.mark.parametrize("path", NIX_FILES, ids=[p.name for p in NIX_FILES])
def test_nix_file_parses(path: Path) -> None:
    r = nix_parse(path)
    assert r.returncode == 0, f"{path.relative_to(REPO)} does not parse:\n{r.stderr}"
    assert r.stdout.strip(), "the parser printed no expression"


def test_a_broken_file_is_caught(tmp_path: Path) -> None:
    """The check can fail: a syntax error and an undefined variable are both reported."""
    for text in ("{ a = ; }\n", "{ lib }: { a = lib.x + notDefined; }\n"):
        bad = tmp_path / "bad.nix"
        bad.write_text(text)
        r = nix_parse(bad)
        assert r.returncode != 0, text
        assert "error" in r.stderr, r.stderr


def test_module_declares_its_options() -> None:
    assert set(OPTION.findall(MODULE.read_text())) == MODULE_OPTIONS


def test_typed_settings_are_configuration_keys() -> None:
    typed = SETTING.findall(MODULE.read_text())
    assert len(typed) == len(set(typed)), "a settings key is declared twice"
    unknown = sorted(set(typed) - set(schema_keys()))
    assert not unknown, f"module.nix types settings keys the program does not know: {unknown}"
    assert {"immich.upload_location", "database.enabled", "config_backup.paths",
            "library.mode", "library.excludes", "disks.allow_any_marked", "disks.power_off",
            "state.dir"} <= set(typed)


def test_module_options_end_up_in_configuration_keys() -> None:
    text = MODULE.read_text()
    assert re.search(r"disks\.approved = cfg\.approvedDisks;", text)
    assert re.search(r"notify\.urls_file = .*cfg\.notificationUrlsFile;", text)
    assert {"disks.approved", "notify.urls_file"} <= set(schema_keys())


def test_unit_command_lines_are_accepted_by_the_program() -> None:
    commands = EXEC.findall(MODULE.read_text())
    assert "daemon" in commands
    assert "run approved --trigger schedule" in commands
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(["-c", "/etc/immich-usb-backup/config.toml",
                                  *command.split()])
        assert args.config == "/etc/immich-usb-backup/config.toml"
    scheduled = parser.parse_args(["run", "approved", "--trigger", "schedule"])
    assert (scheduled.command, scheduled.target, scheduled.trigger) == (
        "run", "approved", "schedule")


def test_package_installs_files_that_exist() -> None:
    text = PACKAGE.read_text()
    installed = re.findall(r"install -Dm644 (\S+) -t \$out/lib/udev/rules\.d/", text)
    assert installed == ["udev/90-immich-usb-backup.rules"]
    assert (REPO / installed[0]).is_file()
    # the version is read from this line (package.nix matches it exactly)
    init = (REPO / "daemon" / "immich_usb_backup" / "__init__.py").read_text()
    assert re.search(r'^__version__ = "[^"]+"$', init, re.MULTILINE)


def test_module_options_are_documented() -> None:
    assert INSTALL_DOC.is_file(), "docs/install.md is missing"
    doc = INSTALL_DOC.read_text()
    assert "services.immich-usb-backup" in doc
    missing = sorted(o for o in MODULE_OPTIONS if not re.search(rf"\b{o}\b", doc))
    assert not missing, f"docs/install.md does not mention the module options {missing}"


def test_module_offers_exactly_the_programs_modes() -> None:
    from immich_usb_backup.config import MODES

    block = re.search(r"library\.mode = mkOption \{\s*type = types\.enum \[([^\]]*)\]",
                      MODULE.read_text())
    assert block is not None
    assert tuple(re.findall(r'"([^"]+)"', block.group(1))) == MODES
