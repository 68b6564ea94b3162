"""The state dir's one error policy, the approvals with their keys, and the key's verdict.

A damaged state file is never half-used and never silent: it is kept aside, named in a
history record and a message with what to do, and the product goes on.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from helpers import Server, run_cli
from immich_usb_backup import approvals, overview, state, trust
from immich_usb_backup.trust import DiskFacts

AT = datetime(2026, 12, 1, 0, 6, tzinfo=timezone(timedelta(hours=1)))
CUT = '[[disk]]\nuuid = "6F5F-FDC3"\nlabel = "Backup"\nat = "2026-'


def test_a_damaged_file_is_kept_aside_with_its_time_and_a_fresh_one_started(
    tmp_path: Path,
) -> None:
    (tmp_path / "disks.toml").write_text(CUT)
    with pytest.raises(state.StateDamaged) as caught:
        state.read_toml(tmp_path, "disks.toml", at=AT)
    aside = tmp_path / "disks.toml.damaged-20261201T000600"
    assert caught.value.kept_as == aside and aside.read_text() == CUT
    assert "approve each backup disk again" in str(caught.value)
    assert not (tmp_path / "disks.toml").exists()
    assert state.read_toml(tmp_path, "disks.toml") == {}  # a fresh start, not the damage
    (tmp_path / "disks.toml").write_bytes(b"\xff\xfe not text")
    with pytest.raises(state.StateDamaged):
        state.read_toml(tmp_path, "disks.toml", at=AT)
    assert (tmp_path / "disks.toml.damaged-20261201T000600-2").exists()  # both kept


def test_files_whose_loss_costs_no_backup_read_as_empty_and_wait_to_be_told(
    tmp_path: Path,
) -> None:
    state.take_damages()
    (tmp_path / "reminder.toml").write_text("last_sent = 2026-13-45\n")
    assert overview.last_sent(tmp_path) is None
    (damage,) = state.take_damages()
    assert "reminder.toml was damaged" in str(damage)
    assert "may be sent again" in str(damage)
    assert state.take_damages() == []  # told once


def test_a_damaged_drills_file_found_by_a_command_is_recorded_and_told(
    server: Server, tmp_path: Path
) -> None:
    from test_notify import Hook

    hook = Hook()
    try:
        server.write_config(f'[notify]\nurls = ["{hook.url()}"]\n')
        server.state.mkdir(parents=True, exist_ok=True)
        (server.state / "drills.toml").write_text("[[disk]]\nuuid = \n")
        r = run_cli("history", "--html", str(tmp_path / "page.html"),
                    config=server.config_path)
        assert r.returncode == 0, r.stderr
        assert "warning: the state file" in r.stderr and "drills.toml was damaged" in r.stderr
        assert (tmp_path / "page.html").exists()
        (rec,) = json.loads(run_cli("history", "--json", config=server.config_path).stdout)
        assert rec["status"] == "failed" and rec["trigger"] == "cli"
        assert "verify DISK --restore-drill" in rec["problems"][0]
        (msg,) = hook.wait_for(1)
        assert msg["title"] == "Immich backup: a state file was damaged"
        assert "drills.toml was damaged" in msg["message"]
        assert len(list(server.state.glob("drills.toml.damaged-*"))) == 1
    finally:
        hook.close()


def test_damaged_approvals_stop_a_command_that_needs_them(server: Server) -> None:
    server.state.mkdir(parents=True, exist_ok=True)
    (server.state / "disks.toml").write_text(CUT)
    r = run_cli("disks", "--all", config=server.config_path)
    assert r.returncode == 1
    assert "error: the state file" in r.stderr and "disks.toml was damaged" in r.stderr
    (rec,) = json.loads(run_cli("history", "--json", config=server.config_path).stdout)
    assert rec["status"] == "failed" and "disks.toml was damaged" in rec["problems"][0]


def test_approvals_keep_each_disks_key_hash_and_a_config_disks_key_apart(
    tmp_path: Path,
) -> None:
    approvals.add(tmp_path, approvals.Approval("6F5F-FDC3", "Backup", "t", "a" * 64))
    approvals.set_key(tmp_path, "1a2b-3c4d", "b" * 64, "t")  # approved in the config
    assert approvals.approved_uuids(tmp_path) == {"6F5F-FDC3"}  # a key is no approval
    assert approvals.known_key(tmp_path, "6f5f-fdc3") == "a" * 64
    assert approvals.known_key(tmp_path, "1A2B-3C4D") == "b" * 64
    assert approvals.known_key(tmp_path, "0000-0000") is None
    approvals.set_key(tmp_path, "6F5F-FDC3", "c" * 64, "t")
    assert approvals.known_key(tmp_path, "6F5F-FDC3") == "c" * 64
    assert (tmp_path / "disks.toml").stat().st_mode & 0o777 == 0o600


KEY = "d" * 64


@pytest.mark.parametrize(("known", "key", "proven", "backed_up", "want"), [
    (KEY, KEY, False, True, "match"),
    (KEY, None, True, True, "missing"),  # proof does not stand in for a known key
    (KEY, "e" * 64, True, True, "wrong"),
    (None, None, False, False, "establish"),  # never backed up: its first plug
    (None, KEY, False, False, "adopt"),
    (None, None, True, True, "establish"),  # proven ours: it gets its key
    (None, KEY, True, True, "adopt"),
    (None, None, False, True, "missing"),  # backed up before, nothing proves it is ours
    (None, KEY, False, True, "unproven"),
])
def test_the_keys_verdict(known: str | None, key: str | None, proven: bool,
                          backed_up: bool, want: str) -> None:
    facts = DiskFacts(key, None, None)
    assert trust.verdict(known, facts, proven, backed_up) == want


def test_a_disks_facts_are_read_and_a_damaged_key_is_no_key(tmp_path: Path) -> None:
    (tmp_path / "disk-key.txt").write_text(f"immich-usb-backup disk key\n{KEY}\n\nnote\n")
    (tmp_path / "backup-info.toml").write_text(f'[backup]\nrun_id = "{"7" * 32}"\n')
    facts = trust.read_facts(tmp_path)
    assert facts.key_sha256 == trust.key_sha256(KEY) and facts.run_id == "7" * 32
    (tmp_path / "disk-key.txt").write_text("immich-usb-backup disk key\nshort\n")
    (tmp_path / "backup-info.toml").write_text('[backup]\nrun_id = "x"\n')
    assert trust.read_facts(tmp_path) == DiskFacts(None, None, None)


@pytest.mark.exfat
def test_a_run_by_hand_onto_a_disk_whose_key_does_not_match_warns_and_backs_up(
    make_exfat, server: Server
) -> None:
    disk = make_exfat()
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    uuid = json.loads(run_cli("history", "--json", config=server.config_path).stdout)[-1][
        "disk"]["uuid"]
    assert r.returncode == 0 and not (disk.marker / "disk-key.txt").exists()  # not approved
    server.write_config(f'[disks]\napproved = ["{uuid}"]\n')
    approvals.set_key(server.state, uuid, "f" * 64, "t")  # the key of another disk

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    assert (f"warning: the disk Backup (UUID {uuid}) is not proven to be the approved disk "
            "(its key is missing); it was backed up to because you named it") in r.stdout
    last = json.loads(run_cli("history", "--json", config=server.config_path).stdout)[-1]
    assert last["status"] == "success" and last["notes"][0].startswith("warning:")
    assert not (disk.marker / "disk-key.txt").exists()  # not given one by a hand run


@pytest.mark.exfat
def test_a_config_disk_backed_up_by_hand_gets_its_key_and_keeps_it(
    make_exfat, server: Server
) -> None:
    disk = make_exfat()
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    uuid = json.loads(run_cli("history", "--json", config=server.config_path).stdout)[-1][
        "disk"]["uuid"]
    server.write_config(f'[disks]\napproved = ["{uuid}"]\n')  # approved after a backup

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning" not in r.stdout  # proven: its backup-info.toml names our last run
    facts = trust.read_facts(disk.marker)
    assert facts.key_sha256 is not None
    assert approvals.known_key(server.state, uuid) == facts.key_sha256
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    assert trust.read_facts(disk.marker).key_sha256 == facts.key_sha256  # kept, not new
