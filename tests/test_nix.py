"""The Nix packaging in nix/: every file parses, and the module agrees with the program.

- Each ``nix/*.nix`` parses with Nix's own parser (Debian's ``nix-bin``), which also
  reports undefined variables. ``--store dummy://`` keeps it away from any Nix store: no
  daemon, no /nix/store, nothing written.
- The module's typed settings are real configuration keys (``config.schema_keys()``),
  its command lines are ones the program's parser accepts, the files the package installs
  exist, and every module option is documented in docs/install.md.
- package.nix, evaluated with stand-ins for nixpkgs: its check phase leaves out the
  ``exfat`` marker and every other test that needs the real stack, and it brings in
  Apprise 2 (notify.py's API) when nixpkgs' apprise is older.
- The module's example sets what the module asserts (an upload location), so it
  evaluates on a host without Immich's module.

Nothing here builds against nixpkgs: that needs a Nix store and the network.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO, need
from immich_usb_backup.cli import build_parser
from immich_usb_backup.config import schema_keys

NIX = REPO / "nix"
NIX_FILES = sorted(NIX.glob("*.nix"))
MODULE = NIX / "module.nix"
PACKAGE = NIX / "package.nix"
INSTALL_DOC = REPO / "docs" / "install.md"
TESTS = REPO / "tests"

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


def test_module_offers_exactly_the_programs_dump_sources() -> None:
    from immich_usb_backup.config import DUMP_SOURCES

    block = re.search(r"database\.source = mkOption \{\s*type = types\.enum \[([^\]]*)\]",
                      MODULE.read_text())
    assert block is not None
    assert tuple(re.findall(r'"([^"]+)"', block.group(1))) == DUMP_SOURCES


# package.nix, evaluated with stand-ins ------------------------------------------------

def nix_eval(expr: str) -> Any:
    """The value of the Nix expression ``expr``, as JSON, evaluated without a store."""
    need(shutil.which("nix-instantiate") is not None,
         "needs nix-instantiate (apt-get install nix-bin)")
    r = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--store",
                        "dummy://", "-E", expr], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"nix-instantiate --eval failed:\n{r.stderr}"
    return json.loads(r.stdout)


def nix_path(path: Path) -> str:
    """``path`` as a Nix path expression."""
    return f"(/. + {json.dumps(str(path.resolve()))})"


def package_attrs(nixpkgs_apprise: str | None = None) -> dict[str, Any]:
    """What package.nix hands to buildPythonApplication: the check phase settings, and
    with ``nixpkgs_apprise`` (the version of nixpkgs' apprise) the Apprise it depends on.

    Every python3Packages attribute package.nix names, and every other argument, stands
    for itself as its name; lib has only what those attributes use.
    """
    text = PACKAGE.read_text()
    special = {"buildPythonApplication", "fetchPypi", "apprise"}
    names = sorted(set(re.findall(r"python3Packages\.([A-Za-z0-9_-]+)", text)) - special)
    attrs: dict[str, Any] = nix_eval(f"""
      let
        f = import {nix_path(PACKAGE)};
        lib.versionAtLeast = v: w: builtins.compareVersions v w >= 0;
        others = builtins.mapAttrs (name: _: name)
          (builtins.removeAttrs (builtins.functionArgs f) [ "lib" "python3Packages" ]);
        nixpkgsApprise = {{
          pname = "apprise";
          version = {json.dumps(nixpkgs_apprise or "")};
          dependencies = [ "requests" ];
        }};
        python3Packages = builtins.listToAttrs
          (map (name: {{ inherit name; value = name; }}) {json.dumps(names).replace(",", "")})
          // {{
            buildPythonApplication = attrs: attrs;
            fetchPypi = args: {{ fetchPypi = args; }};
            apprise = nixpkgsApprise // {{
              overridePythonAttrs = g: nixpkgsApprise // g nixpkgsApprise;
            }};
          }};
        p = f (others // {{ inherit lib python3Packages; }});
        apprise = builtins.head (builtins.filter
          (d: builtins.isAttrs d && (d.pname or "") == "apprise") p.dependencies);
      in {{
        doCheck = p.doCheck or true;
        nativeCheckInputs = p.nativeCheckInputs or [ ];
        disabledTestMarks = p.disabledTestMarks or [ ];
        disabledTestPaths = p.disabledTestPaths or [ ];
        disabledTests = p.disabledTests or [ ];
        apprise = if {json.dumps(nixpkgs_apprise is not None)} then {{
          inherit (apprise) version dependencies;
          src = apprise.src or null;
          doCheck = apprise.doCheck or true;
        }} else null;
      }}
    """)
    return attrs


def test_package_runs_its_tests_without_the_exfat_marker() -> None:
    attrs = package_attrs()
    assert attrs["doCheck"] is True
    assert "pytestCheckHook" in attrs["nativeCheckInputs"]
    assert "exfat" in attrs["disabledTestMarks"]
    markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"][
        "ini_options"]["markers"]
    assert any(m.split(":")[0].strip() == "exfat" for m in markers), \
        "the marker package.nix leaves out is not the one the tests use"
    # pyproject.toml's per-test timeout needs the plugin; the notify tests an SMTP server
    assert {"pytest-timeout", "aiosmtpd", "rsync"} <= set(attrs["nativeCheckInputs"])


def test_package_disabled_test_paths_exist() -> None:
    """pytestCheckHook aborts the build on a disabled path that does not exist."""
    for path in package_attrs()["disabledTestPaths"]:
        assert (REPO / path).is_file(), f"package.nix disables {path}, which does not exist"
        assert not path.startswith("nix/"), "nix/ is not in the package's source"


def _called_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    out = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                out.add(node.func.id)
            elif isinstance(node.func, ast.Attribute):
                out.add(node.func.attr)
    return out


def _marked_exfat(node: ast.expr) -> bool:
    return ast.unparse(node) in ("pytest.mark.exfat", "mark.exfat")


def stack_tests() -> dict[str, list[str]]:
    """``{"tests/test_x.py": [test names]}``: the tests that call ``need(...)`` or
    ``missing_pieces()``, directly, through a helper, or through a fixture (or a fixture
    of a fixture) that does; with whether each is marked ``exfat``, as ``"name [exfat]"``.
    """
    trees = {path: ast.parse(path.read_text()) for path in sorted(TESTS.glob("*.py"))}
    uses: dict[str, set[str]] = {}  # function or fixture -> what it calls or requests
    for tree in trees.values():
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                uses.setdefault(node.name, set()).update(
                    _called_names(node), (a.arg for a in node.args.args))
    needing = {"need", "missing_pieces"}
    while grown := {n for n, u in uses.items() if n not in needing and u & needing}:
        needing |= grown
    out: dict[str, list[str]] = {}
    for path, tree in trees.items():
        module_exfat = any(
            isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
            and _marked_exfat(node.value) for node in tree.body)
        for node in tree.body:
            if (isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    and node.name.startswith("test_") and node.name in needing):
                exfat = module_exfat or any(map(_marked_exfat, node.decorator_list))
                out.setdefault(f"tests/{path.name}", []).append(
                    node.name + (" [exfat]" if exfat else ""))
    return out


def test_the_finder_of_stack_tests_finds_them() -> None:
    found = stack_tests()
    assert "test_the_unit_keeps_its_hardening" not in str(found)
    assert any(n.startswith("test_the_udev_rule_marks") for n in
               found["tests/test_install_files.py"])
    assert any(n.startswith("test_chromium") for n in found["tests/test_report.py"])
    assert all(n.endswith("[exfat]") for n in found["tests/test_run_exfat.py"])
    assert "tests/test_daemon_e2e.py" in found


def test_package_check_leaves_out_every_test_that_needs_the_real_stack() -> None:
    """The sandbox is not root and sets no CI, so such a test would skip itself there;
    package.nix names them all the same, by marker, file or name."""
    attrs = package_attrs()
    paths, keywords = set(attrs["disabledTestPaths"]), attrs["disabledTests"]
    left = [f"{path}::{name}" for path, names in stack_tests().items()
            if path not in paths for name in names
            if not name.endswith("[exfat]") and not any(k in name for k in keywords)]
    assert not left, f"package.nix would run tests that need the real stack: {left}"


def test_package_disables_by_name_only_tests_that_need_the_stack() -> None:
    needing = [n for names in stack_tests().values() for n in names]
    every = [m for path in TESTS.glob("test_*.py")
             for m in re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M)]
    for keyword in package_attrs()["disabledTests"]:
        hits = [n for n in every if keyword in n]
        assert hits, f"package.nix disables {keyword!r}, which names no test"
        assert all(any(n == h or n.startswith(h + " ") for n in needing) for h in hits), \
            f"{keyword!r} also leaves out tests that need no real stack: {hits}"


def test_package_brings_apprise_2_when_nixpkgs_has_an_older_one() -> None:
    old = package_attrs(nixpkgs_apprise="1.13.1")["apprise"]
    assert int(old["version"].split(".")[0]) >= 2
    assert old["src"]["fetchPypi"]["version"] == old["version"]
    assert old["src"]["fetchPypi"]["hash"].startswith("sha256-")
    assert {"requests", "certifi", "urllib3"} <= set(old["dependencies"])
    new = package_attrs(nixpkgs_apprise="2.1.0")["apprise"]
    assert new["version"] == "2.1.0" and new["src"] is None, "nixpkgs' own Apprise 2 is used"


# The module's example ----------------------------------------------------------------

def test_module_example_sets_what_the_module_asserts() -> None:
    """The module asserts an upload location unless Immich's own module runs on the same
    machine: the example at its top sets one, so it evaluates on any host. (Checked once
    with nixpkgs' real lib.evalModules; nixpkgs is not on any registry CI reaches.)"""
    text = MODULE.read_text()
    assert "upload_location must be set" in text
    start = text.index("#   imports = ")
    example = text[start:text.index("\n\n", start)]
    assert re.search(r'settings\.immich\.upload_location = "/[^"]+";', example), example
