"""How the web UI is installed: its systemd unit (no root, the group of the control
socket), the daemon's runtime dir for the socket, and the NixOS module's web options."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, need
from immich_usb_backup.cli import build_parser
from immich_usb_backup.config import parse_config
from immich_usb_backup.errors import ConfigError
from test_install_files import PRODUCT_EXEC, unit_settings

WEB_UNIT = REPO / "systemd" / "immich-usb-backup-web.service"
DAEMON_UNIT = REPO / "systemd" / "immich-usb-backup.service"
MODULE = REPO / "nix" / "module.nix"
WEB_DOC = REPO / "docs" / "web.md"


def defaults() -> object:
    return parse_config({"immich": {"upload_location": "/srv/immich"}}, "test").web


def test_the_web_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    need(shutil.which("systemd-analyze") is not None, "needs systemd-analyze (systemd)")
    binary = Path(sys.executable).parent / "immich-usb-backup"
    need(binary.is_file(), f"needs the installed program at {binary}")
    text = WEB_UNIT.read_text()
    assert f"ExecStart={PRODUCT_EXEC} web\n" in text
    unit = tmp_path / WEB_UNIT.name
    unit.write_text(text.replace(f"ExecStart={PRODUCT_EXEC} ", f"ExecStart={binary} "))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == "", r.stderr


def test_the_web_unit_runs_without_root_in_the_socket_s_group() -> None:
    s = unit_settings(WEB_UNIT.read_text())
    web = defaults()
    assert s["Service.ExecStart"] == [f"{PRODUCT_EXEC} web"]
    assert s["Service.DynamicUser"] == ["yes"]
    assert s["Service.SupplementaryGroups"] == [web.group]  # type: ignore[attr-defined]
    assert "Service.User" not in s and "Service.Group" not in s  # no fixed user, no root
    assert s["Service.CapabilityBoundingSet"] == [""]
    assert sorted(s["Service.RestrictAddressFamilies"][0].split()) == [
        "AF_INET", "AF_INET6", "AF_UNIX"]
    assert "immich-usb-backup.service" in s["Unit.After"][0].split()
    args = build_parser().parse_args(["web"])
    assert args.command == "web"


def test_the_daemon_unit_makes_the_folder_of_the_control_socket() -> None:
    s = unit_settings(DAEMON_UNIT.read_text())
    socket = defaults().socket  # type: ignore[attr-defined]
    assert s["Service.RuntimeDirectory"] == [socket.parent.name]
    assert str(socket.parent) == f"/run/{socket.parent.name}"
    assert s["Service.RuntimeDirectoryMode"] == ["0755"]  # the socket itself is 0660


def test_the_module_has_the_web_options_and_passes_them_on() -> None:
    text = MODULE.read_text()
    declared = set(re.findall(r"^\s*web\.(\w+)\s*=\s*(?:lib\.)?mk(?:Option|EnableOption)\b",
                              text, re.M))
    assert declared == {"enable", "listen", "passwordFile", "openFirewall"}
    assert re.search(r"listen = cfg\.web\.listen;", text)
    assert re.search(r"password_file = cfg\.web\.passwordFile;", text)
    assert 'ExecStart = "${exe} -c ${configFile} web";' in text
    assert "DynamicUser = true;" in text
    assert 'SupplementaryGroups = [ "immich-usb-backup" ];' in text
    assert "users.groups.immich-usb-backup" in text
    assert re.search(r"allowedTCPPorts = lib\.mkIf \(cfg\.web\.enable && "
                     r"cfg\.web\.openFirewall\)", text)
    web = defaults()
    assert '"${defaultStateDir}/web-password"' in text
    assert str(web.password_file).endswith("/web-password")  # type: ignore[attr-defined]
    assert web.group == "immich-usb-backup"  # type: ignore[attr-defined]


def test_the_module_s_listen_pattern_takes_what_the_program_takes() -> None:
    """The module's `strMatching` for web.listen, run as the POSIX regex Nix runs."""
    need(shutil.which("nix-instantiate") is not None,
         "needs nix-instantiate (apt-get install nix-bin)")
    pattern = re.search(r'web\.listen = mkOption \{\s*type = types\.strMatching "([^"]+)"',
                        MODULE.read_text())
    assert pattern is not None
    for value, ok in (("127.0.0.1:8429", True), ("[::1]:8429", True), ("nas:80", True),
                      ("8429", False), ("127.0.0.1", False), ("a b:1", False)):
        expr = f'builtins.match "{pattern.group(1)}" "{value}" != null'
        r = subprocess.run(["nix-instantiate", "--eval", "--store", "dummy://", "-E", expr],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == ("true" if ok else "false"), value
        data = {"immich": {"upload_location": "/srv/immich"}, "web": {"listen": value}}
        if ok:
            parse_config(data, "t")
        else:
            with pytest.raises(ConfigError, match=r"web\.listen"):
                parse_config(data, "t")


def test_the_module_s_web_options_are_documented() -> None:
    doc = WEB_DOC.read_text()
    for option in ("web.enable", "web.listen", "web.passwordFile", "web.openFirewall"):
        assert f"services.immich-usb-backup.{option}" in doc, option
