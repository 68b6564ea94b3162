"""Verified backups on a real exFAT disk: the manifest, `verify TARGET`, verify and full
modes. Damage is made the way it happens: bytes changed on the disk (or on the server)
with the file's size and modification time left as they were, so that no size-and-time
check can see it."""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from helpers import ExfatDisk, Server, run_cli, tree

pytestmark = pytest.mark.exfat


def history(server: Server) -> list[dict[str, object]]:
    r = run_cli("history", "--json", config=server.config_path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def backup(server: Server, disk: ExfatDisk, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("run", str(disk.mount_point), *extra, config=server.config_path)


def flip_a_bit(path: Path, offset: int = 100) -> None:
    """Damage ``path`` in place, keeping its size and modification time (bit rot)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def some_photo(server: Server) -> tuple[Path, str]:
    photo = sorted((server.upload / "upload").rglob("*.jpg"))[0]
    return photo, str(photo.relative_to(server.upload))


def manifest_lines(disk: ExfatDisk) -> dict[str, str]:
    out = {}
    for line in (disk.marker / "library.sha256").read_text().splitlines():
        digest, name = line.split("  ", 1)
        out[name] = digest
    return out


# The manifest -------------------------------------------------------------------------

def test_sha256sum_and_shasum_check_a_fresh_backup(make_exfat, server: Server) -> None:
    disk = make_exfat()
    assert backup(server, disk).returncode == 0

    listed = manifest_lines(disk)
    assert set(listed) == {f"library/{p}" for p in tree(server.upload)}
    for cmd in (["sha256sum", "-c", "--strict", "library.sha256"],
                ["shasum", "-a", "256", "-c", "library.sha256"]):
        r = subprocess.run(cmd, cwd=disk.marker, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.count(": OK") == len(listed)
    # every file was hashed while rsync copied it: the manifest hashed none itself
    lib = history(server)[-1]["steps"]["library"]  # type: ignore[index]
    assert lib["manifest"] == {"entries": len(listed), "hashed": 0, "left_out": 0}


def test_manifest_hashes_only_new_or_changed_files(make_exfat, server: Server) -> None:
    disk = make_exfat()
    assert backup(server, disk).returncode == 0
    photo, rel = some_photo(server)
    # Put a wrong digest into the cache for a file that does not change: if the next run
    # hashed everything again the manifest would be right; it must come from the cache.
    fake = "0" * 64
    db = sqlite3.connect(server.state / "hashes.sqlite")
    assert db.execute("UPDATE files SET sha256 = ? WHERE path = ?", (fake, rel)).rowcount == 1
    db.commit()
    db.close()
    new = photo.with_name("new.jpg")
    new.write_bytes(os.urandom(5000))

    assert backup(server, disk).returncode == 0

    listed = manifest_lines(disk)
    assert listed[f"library/{rel}"] == fake
    new_rel = f"library/{new.relative_to(server.upload)}"
    r = subprocess.run(["sha256sum", new], capture_output=True, text=True, check=True)
    assert listed[new_rel] == r.stdout.split()[0]


def test_a_second_disk_is_not_hashed_again(make_exfat, server: Server) -> None:
    # the cache is the server's: a second disk's first (full) copy reuses it
    first, second = make_exfat(label="One"), make_exfat(label="Two")
    assert backup(server, first).returncode == 0
    _, rel = some_photo(server)
    fake = "f" * 64
    db = sqlite3.connect(server.state / "hashes.sqlite")
    assert db.execute("UPDATE files SET sha256 = ? WHERE path = ?", (fake, rel)).rowcount == 1
    db.commit()
    db.close()

    assert backup(server, second).returncode == 0

    assert manifest_lines(second)[f"library/{rel}"] == fake


def test_unchanged_run_leaves_the_manifest_as_it_is(make_exfat, server: Server) -> None:
    disk = make_exfat()
    first = run_cli("-v", "run", str(disk.mount_point), config=server.config_path)
    assert first.returncode == 0, first.stderr
    assert "hashing while copying:" in first.stderr  # the first backup hashed as it copied
    before = (disk.marker / "library.sha256").stat().st_mtime_ns
    again = run_cli("-v", "run", str(disk.mount_point), config=server.config_path)
    assert again.returncode == 0, again.stderr
    assert "hashing while copying" not in again.stderr  # nothing copied: no hashing thread
    assert (disk.marker / "library.sha256").stat().st_mtime_ns == before
    lib = history(server)[-1]["steps"]["library"]  # type: ignore[index]
    assert lib["manifest"]["unchanged"] == 1  # type: ignore[index]


def test_manifest_off_removes_a_stale_one(make_exfat, server: Server) -> None:
    disk = make_exfat()
    assert backup(server, disk).returncode == 0
    server.write_config("[library]\nmanifest = false\n")
    assert backup(server, disk).returncode == 0
    assert not (disk.marker / "library.sha256").exists()


# verify TARGET --------------------------------------------------------------------------

def verify(server: Server, disk: ExfatDisk, *extra: str) -> tuple[int, dict[str, object]]:
    r = run_cli("verify", str(disk.mount_point), "--json", *extra, config=server.config_path)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return r.returncode, json.loads(r.stdout)


def test_verify_passes_a_good_disk_and_finds_a_flipped_bit(make_exfat, server: Server) -> None:
    disk = make_exfat()
    assert backup(server, disk).returncode == 0
    code, report = verify(server, disk)
    assert code == 0, report
    assert report["checked_files"] == len(tree(server.upload))
    assert report["dumps_checked"] == 1 and report["archives_checked"] == 1

    _, rel = some_photo(server)
    flip_a_bit(disk.marker / "library" / rel)
    disk.remount()  # what a drawer does: nothing of the file left in memory

    code, report = verify(server, disk)
    assert code == 1
    assert report["changed"] == {"count": 1, "paths": [f"library/{rel}"]}
    r = run_cli("verify", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 1
    assert "verify FAILED" in r.stdout and f"library/{rel}" in r.stdout


def test_verify_reports_missing_unexpected_and_damaged_dump(make_exfat, server: Server) -> None:
    disk = make_exfat()
    assert backup(server, disk).returncode == 0
    lib = disk.marker / "library"
    gone = sorted((lib / "upload").rglob("*.jpg"))[0]
    gone.unlink()
    (lib / "profile" / "stray.jpg").write_bytes(b"not from the server")
    dump = next((disk.marker / "database").glob("*.sql.gz"))
    data = dump.read_bytes()
    dump.write_bytes(data[: len(data) // 2])

    code, report = verify(server, disk)

    assert code == 1
    assert report["missing"] == {"count": 1, "paths": [f"library/{gone.relative_to(lib)}"]}
    assert report["unexpected"] == {"count": 1, "paths": ["library/profile/stray.jpg"]}
    damaged = report["damaged"]
    assert damaged["count"] == 1  # type: ignore[index]
    assert dump.name in damaged["paths"][0]  # type: ignore[index]


def test_verify_sample_reads_back_only_a_share(make_exfat, server: Server) -> None:
    many = server.upload / "upload" / "many"
    many.mkdir()
    for i in range(300):
        (many / f"{i}.jpg").write_bytes(os.urandom(100))
    disk = make_exfat()
    assert backup(server, disk).returncode == 0
    total = len(tree(server.upload))

    code, report = verify(server, disk, "--sample", "30")

    assert code == 0
    checked = int(report["checked_files"])  # type: ignore[call-overload]
    assert 0.15 * total < checked < 0.45 * total
    assert report["sample_percent"] == 30


def test_a_sample_of_a_small_library_reads_at_least_one_file(
    make_exfat, server: Server
) -> None:
    disk = make_exfat()
    assert backup(server, disk).returncode == 0
    for _ in range(5):  # 0.1 % of a dozen files draws nothing most of the time
        code, report = verify(server, disk, "--sample", "0.1")
        assert code == 0
        assert report["checked_files"] == 1
    r = run_cli("verify", str(disk.mount_point), "--sample", "0.1", config=server.config_path)
    assert "read back: 1 file, " in r.stdout


def test_verify_works_on_a_machine_without_a_configuration(
    make_exfat, server: Server
) -> None:
    disk = make_exfat()
    assert backup(server, disk).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "IMMICH_USB_BACKUP_CONFIG"}
    assert not Path("/etc/immich-usb-backup/config.toml").exists()
    r = subprocess.run([sys.executable, "-m", "immich_usb_backup", "verify",
                        str(disk.mount_point)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify OK" in r.stdout


def test_verify_without_a_manifest_says_so(make_exfat, server: Server) -> None:
    disk = make_exfat()
    r = run_cli("verify", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 1
    assert "no manifest" in r.stderr


def test_verify_never_writes_to_the_disk(make_exfat, server: Server) -> None:
    disk = make_exfat()
    assert backup(server, disk).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in disk.mount_point.rglob("*")}
    verify(server, disk)
    assert {p: p.stat().st_mtime_ns for p in disk.mount_point.rglob("*")} == before


# verify and full modes --------------------------------------------------------------------

def test_full_mode_finds_damage_on_the_disk_recopies_and_fails(
    make_exfat, server: Server
) -> None:
    disk = make_exfat()
    assert backup(server, disk).returncode == 0
    photo, rel = some_photo(server)
    on_disk = disk.marker / "library" / rel
    flip_a_bit(on_disk)
    damaged = on_disk.read_bytes()
    disk.remount()
    assert backup(server, disk).returncode == 0  # quick cannot see it

    r = backup(server, disk, "--mode", "full")

    assert r.returncode == 1, r.stdout
    rec = history(server)[-1]
    assert rec["status"] == "failed" and rec["mode"] == "full"
    text = "\n".join(rec["problems"])  # type: ignore[arg-type]
    assert f"library/{rel}" in text and "the disk's copy is damaged" in text
    assert "copied again and checked" in text
    assert rec["steps"]["library"]["mismatches"] == 1  # type: ignore[index]
    assert on_disk.read_bytes() == photo.read_bytes()
    kept = disk.marker / "deleted" / date.today().isoformat() / rel
    assert kept.read_bytes() == damaged
    assert backup(server, disk, "--mode", "full").returncode == 0
    assert subprocess.run(["sha256sum", "-c", "--quiet", "library.sha256"],
                          cwd=disk.marker).returncode == 0


def test_full_mode_names_a_file_changed_on_the_server_behind_its_time(
    make_exfat, server: Server
) -> None:
    disk = make_exfat()
    assert backup(server, disk).returncode == 0
    photo, rel = some_photo(server)
    good = photo.read_bytes()
    flip_a_bit(photo)  # damage on the server's storage

    r = backup(server, disk, "--mode", "full")

    assert r.returncode == 1
    text = "\n".join(history(server)[-1]["problems"])  # type: ignore[arg-type]
    assert f"library/{rel}" in text and "the server's file changed" in text
    # the backup's earlier, good copy is not lost
    kept = disk.marker / "deleted" / date.today().isoformat() / rel
    assert kept.read_bytes() == good
    # and the manifest describes what the disk holds now
    assert subprocess.run(["sha256sum", "-c", "--quiet", "library.sha256"],
                          cwd=disk.marker).returncode == 0


def sectors_read(device: str) -> int:
    return int(Path(f"/sys/block/{Path(device).name}/stat").read_text().split()[2])


def test_the_disk_side_is_read_from_the_disk_not_from_memory(
    make_exfat, server: Server
) -> None:
    # Right after a copy, the copy's blocks are still cached in memory (with a FUSE
    # driver, in the block device's own cache): a check must not be answered from there.
    size = 24 * 1024 * 1024
    (server.upload / "upload" / "video.mp4").write_bytes(os.urandom(size))
    disk = make_exfat()
    assert backup(server, disk).returncode == 0
    before = sectors_read(disk.device)

    assert backup(server, disk, "--mode", "full").returncode == 0

    assert (sectors_read(disk.device) - before) * 512 >= size

    before = sectors_read(disk.device)
    code, _ = verify(server, disk)
    assert code == 0
    assert (sectors_read(disk.device) - before) * 512 >= size


def test_verify_mode_rereads_the_whole_library_over_its_rotation(
    make_exfat, server: Server
) -> None:
    disk = make_exfat()
    server.write_config('[library]\nmode = "verify"\nverify_rotation_runs = 3\n')
    assert backup(server, disk).returncode == 0
    assert history(server)[-1]["mode"] == "verify"
    _, rel = some_photo(server)
    flip_a_bit(disk.marker / "library" / rel)
    disk.remount()

    outcomes = [backup(server, disk).returncode for _ in range(3)]

    assert sorted(outcomes) == [0, 0, 1], outcomes  # found in exactly one turn of three
    problems = [p for rec in history(server)[-3:] for p in rec["problems"]]  # type: ignore[attr-defined]
    assert any(f"library/{rel}" in p for p in problems)
    assert backup(server, disk).returncode == 0


def test_verify_mode_compares_what_it_copied(make_exfat, server: Server) -> None:
    disk = make_exfat()
    server.write_config('[library]\nmode = "verify"\nverify_rotation_runs = 0\n')
    assert backup(server, disk).returncode == 0
    lib = history(server)[-1]["steps"]["library"]  # type: ignore[index]
    assert lib["compared"] == len(tree(server.upload))  # type: ignore[index]
    assert backup(server, disk).returncode == 0
    lib = history(server)[-1]["steps"]["library"]  # type: ignore[index]
    assert lib["compared"] == 0  # type: ignore[index]


def test_dump_on_the_disk_is_a_complete_gzip_stream(make_exfat, server: Server) -> None:
    disk = make_exfat()
    assert backup(server, disk).returncode == 0
    dump = next((disk.marker / "database").glob("*.sql.gz"))
    with gzip.open(dump) as f:
        assert f.read().rstrip().endswith(b"dump complete\n--")
