"""`status` and `status --watch` while a real backup runs onto a real exFAT disk."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import Server, run_cli

pytestmark = pytest.mark.exfat


def test_status_watch_follows_a_run_to_its_end_and_says_how_it_ended(
    make_exfat, server: Server
) -> None:
    disk = make_exfat(size_mb=64)
    (server.upload / "upload" / "video.mp4").write_bytes(os.urandom(4 * 1024 * 1024))
    server.write_config("[library]\nbwlimit_kib = 1024\n")
    assert run_cli("status", config=server.config_path).stdout.startswith(
        "idle: no backup is running (no backups yet)")
    backup = subprocess.Popen(
        [sys.executable, "-m", "immich_usb_backup", "-c", str(server.config_path), "run",
         str(disk.mount_point)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while run_cli("status", "--json", config=server.config_path).stdout.startswith(
                '{"state": "idle"'):
            assert backup.poll() is None, backup.communicate()
        watch = run_cli("status", "--watch", config=server.config_path, timeout=120)
    finally:
        backup.communicate(timeout=120)

    lines = watch.stdout.splitlines()
    running = [x for x in lines if x.startswith("running on Backup: [")]
    assert len(running) >= 2, watch.stdout  # it kept updating
    assert any("%" in x and "/s" in x for x in running), watch.stdout  # percent and rate
    assert lines[-1].startswith("finished: success on Backup at "), watch.stdout
    assert backup.returncode == 0
    after = run_cli("status", config=server.config_path).stdout
    assert after.startswith("idle: no backup is running; last backup success on Backup")
