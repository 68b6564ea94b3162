"""`run` onto a real exFAT file system: the pipeline and every safety rule of PRODUCT.md.

Each test drives the real command line against a loop-device exFAT disk (see conftest).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest

from helpers import ExfatDisk, LoopWatch, Server, note_loop_blocks, run_cli, tree, write_dump

pytestmark = pytest.mark.exfat


@pytest.fixture(autouse=True)
def _loop_never_blocked(no_blocked_loop: LoopWatch) -> LoopWatch:
    """Every test fails if the product's event loop was blocked for 100 ms (conftest)."""
    return no_blocked_loop


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Path -> (size, mtime_ns, content) for every file and folder: to prove nothing changed."""
    out: dict[str, tuple[int, int, bytes]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = p.lstat()
            content = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, content)
    return out


def history(server: Server) -> list[dict[str, object]]:
    r = run_cli("history", "--json", config=server.config_path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def library_tree(disk: ExfatDisk) -> dict[str, bytes]:
    return tree(disk.marker / "library")


# The pipeline -----------------------------------------------------------------------

def test_first_backup_writes_the_whole_layout_and_leaves_user_files_alone(
    make_exfat, server: Server
) -> None:
    disk = make_exfat()
    (disk.mount_point / "My Notes.txt").write_text("mine, not the backup's\n")
    (disk.mount_point / "Holiday").mkdir()
    (disk.mount_point / "Holiday" / "beach.jpg").write_bytes(os.urandom(5000))
    user_before = {k: v for k, v in snapshot(disk.mount_point).items()
                   if not k.startswith("immich-server-backups")}
    source_before = snapshot(server.upload)

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    assert "backup SUCCESS" in r.stdout
    m = disk.marker
    assert {p.name for p in m.iterdir()} == {
        "library", "database", "config", "README.txt", "backup-info.toml", "history.html",
        "library.sha256"}
    page = (m / "history.html").read_text()
    assert 'data-status="success"' in page and "Backup" in page
    assert 'data-status="success"' in (server.state / "history.html").read_text()
    assert library_tree(disk) == tree(server.upload)
    dumps = sorted(p.name for p in (m / "database").iterdir())
    assert dumps == sorted(p.name for p in (server.upload / "backups").glob("*.sql.gz"))
    (archive,) = (m / "config").iterdir()
    assert archive.name.startswith("config-") and archive.suffix == ".zip"
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        assert "RESTORE.txt" in names
        arc = os.path.relpath(server.etc / "immich-config.json", "/")
        assert zf.read(arc) == (server.etc / "immich-config.json").read_bytes()
    info = tomllib.loads((m / "backup-info.toml").read_text())["backup"]
    assert info["status"] == "success"
    assert info["library_files"] == len(tree(server.upload))
    assert "restore" in (m / "README.txt").read_text().lower()
    # the user's own files beside the marker: byte-identical, same times
    user_after = {k: v for k, v in snapshot(disk.mount_point).items()
                  if not k.startswith("immich-server-backups")}
    assert user_after == user_before
    # safety rule 2: the source is only read
    assert snapshot(server.upload) == source_before
    (rec,) = history(server)
    assert rec["status"] == "success" and rec["trigger"] == "cli" and rec["mode"] == "quick"
    assert rec["disk"] == {"uuid": rec["disk"]["uuid"], "label": "Backup"}  # type: ignore[index]
    assert rec["problems"] == []
    for key in ("started_at", "finished_at", "files_transferred", "bytes_transferred",
                "duration_s"):
        assert key in rec


def test_second_run_without_changes_copies_no_library_file(make_exfat, server: Server) -> None:
    disk = make_exfat()
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    last = history(server)[-1]
    assert last["steps"]["library"]["files"] == 0  # type: ignore[index]
    assert last["steps"]["database"]["files"] == 0  # type: ignore[index]
    assert len(list((disk.marker / "config").iterdir())) == 2  # timestamped: both kept


def test_the_verbose_log_says_how_long_rsync_spent_on_its_list(make_exfat,
                                                               server: Server) -> None:
    """rsync reads a --files-from list one byte a system call before it copies anything:
    -v says how long, from rsync's own --stats, so a slow first backup can be explained."""
    disk = make_exfat()
    r = run_cli("-v", "run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"rsync batch copy-0000: (\d+\.\d) s, (\d+\.\d{3}) s of it building its "
                  r"file list", r.stderr)
    assert m is not None, r.stderr
    assert float(m.group(2)) <= float(m.group(1)) + 0.05


def test_names_rsync_would_read_as_comments_are_copied(make_exfat, server: Server) -> None:
    """rsync skips a --files-from entry starting with '#' or ';' (a comment), --from0 or
    not, and says nothing: at the top of the upload location (Synology's #recycle)."""
    (server.upload / "#recycle").mkdir()
    (server.upload / "#recycle" / "a.jpg").write_bytes(os.urandom(1000))
    (server.upload / ";notes.txt").write_bytes(b"kept\n")
    (server.upload / "upload" / "#inside.jpg").write_bytes(os.urandom(900))
    disk = make_exfat()

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    assert library_tree(disk) == tree(server.upload)
    assert (disk.marker / "library" / "#recycle" / "a.jpg").is_file()
    assert (disk.marker / "library" / ";notes.txt").read_bytes() == b"kept\n"
    copied = history(server)[-1]["steps"]["library"]["files"]  # type: ignore[index]
    assert copied == sum(1 for p in server.upload.rglob("*") if p.is_file())


def test_changed_added_and_deleted_files_are_mirrored(make_exfat, server: Server) -> None:
    disk = make_exfat()
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    photos = next((server.upload / "upload").rglob("*.jpg")).parent
    victim = sorted(photos.iterdir())[0]
    victim.unlink()
    changed = sorted(photos.iterdir())[0]
    changed.write_bytes(changed.read_bytes() + b"edited")
    (photos / "new photo ü.jpg").write_bytes(os.urandom(1234))

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    assert library_tree(disk) == tree(server.upload)
    last = history(server)[-1]
    assert last["steps"]["library"]["files"] == 2  # type: ignore[index]
    assert last["steps"]["library"]["deleted"] == 1  # type: ignore[index]
    assert last["steps"]["library"]["kept"] == 2  # type: ignore[index]


def test_deleted_and_replaced_files_are_kept_in_a_dated_folder(
    make_exfat, server: Server
) -> None:
    disk = make_exfat()
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    photos = next((server.upload / "upload").rglob("*.jpg")).parent
    rel_dir = photos.relative_to(server.upload)
    victim, changed = sorted(photos.iterdir())[:2]
    victim_bytes, changed_bytes = victim.read_bytes(), changed.read_bytes()
    victim.unlink()
    changed.write_bytes(b"encrypted by ransomware")

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    assert library_tree(disk) == tree(server.upload)
    day = disk.marker / "deleted" / date.today().isoformat()
    assert (day / rel_dir / victim.name).read_bytes() == victim_bytes
    assert (day / rel_dir / changed.name).read_bytes() == changed_bytes
    # a second change the same day keeps the first version too, under a new name
    changed.write_bytes(b"encrypted twice")
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    assert (day / rel_dir / changed.name).read_bytes() == changed_bytes
    stem, ext = changed.name.rsplit(".", 1)
    assert (day / rel_dir / f"{stem} (2).{ext}").read_bytes() == b"encrypted by ransomware"


def test_most_of_the_library_changing_at_once_is_refused_like_ransomware(
    make_exfat, server: Server
) -> None:
    disk = make_exfat()
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    photos = sorted((server.upload / "upload").rglob("*.jpg"))
    for p in photos:
        p.write_bytes(b"ENCRYPTED" + p.read_bytes()[::-1])
    before = snapshot(disk.mount_point)

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 1
    rec = history(server)[-1]
    assert rec["status"] == "refused"
    assert f"replace {len(photos)} of the" in rec["problems"][0]  # type: ignore[index]
    assert "ransomware" in rec["problems"][0]  # type: ignore[index]
    assert snapshot(disk.mount_point) == before


def test_keep_area_folders_past_their_days_are_pruned_others_left(
    make_exfat, server: Server
) -> None:
    disk = make_exfat()
    area = disk.marker / "deleted"
    old = date.today() - timedelta(days=8)
    recent = date.today() - timedelta(days=6)
    for name in (old.isoformat(), recent.isoformat(), "my notes"):
        (area / name / "upload").mkdir(parents=True)
        (area / name / "upload" / "x.jpg").write_bytes(b"x")
    server.write_config("[library]\nkeep_deleted_days = 7\n")

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in area.iterdir()) == sorted([recent.isoformat(), "my notes"])
    assert history(server)[-1]["steps"]["library"]["pruned_days"] == [  # type: ignore[index]
        old.isoformat()]


def test_dumps_immich_rotated_away_are_not_kept(make_exfat, server: Server) -> None:
    disk = make_exfat()
    older = write_dump(server.upload / "backups", datetime.now() - timedelta(days=1))
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    assert (disk.marker / "library" / "backups" / older.name).is_file()
    older.unlink()  # Immich's nightly job keeps its last 14

    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0

    assert not (disk.marker / "library" / "backups" / older.name).exists()
    assert not (disk.marker / "deleted").exists()


def test_without_the_keep_area_deletions_are_final(make_exfat, server: Server) -> None:
    disk = make_exfat()
    server.write_config("[library]\nkeep_deleted_days = 0\n")
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    next((server.upload / "upload").rglob("*.jpg")).unlink()
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    assert library_tree(disk) == tree(server.upload)
    assert not (disk.marker / "deleted").exists()


def test_old_dumps_and_archives_are_pruned_to_keep(make_exfat, server: Server) -> None:
    from datetime import datetime, timedelta

    from helpers import write_dump

    disk = make_exfat()
    for days in range(1, 5):
        write_dump(server.upload / "backups", datetime.now() - timedelta(days=days))
    server.write_config("[database]\nkeep = 2\n[library]\nexcludes = [\"/backups\"]\n")
    for _ in range(3):
        assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    dumps = sorted(p.name for p in (disk.marker / "database").iterdir())
    assert dumps == sorted(p.name for p in (server.upload / "backups").glob("*.sql.gz"))[-1:]
    assert not (disk.marker / "library" / "backups").exists()  # excluded


# Safety rule 1: nothing outside the marker folder --------------------------------------

def test_upload_location_on_the_backup_disk_is_refused_before_writing(
    make_exfat, server: Server
) -> None:
    disk = make_exfat()
    inside = disk.mount_point / "photos"
    (inside / "upload").mkdir(parents=True)
    (inside / "upload" / ".immich").write_bytes(b"")
    (inside / "upload" / "a.jpg").write_bytes(b"x")
    server.upload = inside
    server.write_config("[database]\nenabled = false\n")
    before = snapshot(disk.mount_point)

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 1
    assert "overlaps the backup disk" in r.stdout
    assert snapshot(disk.mount_point) == before
    assert history(server)[-1]["status"] == "refused"


def test_state_dir_on_the_backup_disk_is_refused(make_exfat, server: Server) -> None:
    disk = make_exfat()
    server.state = disk.mount_point / "state"
    server.state.mkdir()
    server.write_config()
    before = snapshot(disk.marker)
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 1
    assert "is on the backup disk" in r.stdout
    assert snapshot(disk.marker) == before


def test_a_folder_inside_the_disk_is_not_a_target(make_exfat, server: Server) -> None:
    disk = make_exfat()
    sub = disk.mount_point / "sub"
    (sub / "immich-server-backups").mkdir(parents=True)
    r = run_cli("run", str(sub), config=server.config_path)
    assert r.returncode == 1
    assert "not the mount point" in r.stdout
    assert list((sub / "immich-server-backups").iterdir()) == []


def test_a_disk_that_is_not_exfat_is_refused(tmp_path: Path, server: Server) -> None:
    from helpers import need

    need(os.geteuid() == 0, "needs root to mount a tmpfs")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "immich-server-backups").mkdir()
        r = run_cli("run", str(mnt), config=server.config_path)
        assert r.returncode == 1
        assert "tmpfs file system" in r.stdout and "exFAT" in r.stdout
        assert list((mnt / "immich-server-backups").iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_writes_that_resolve_outside_the_backup_folder_are_refused(tmp_path: Path) -> None:
    from immich_usb_backup.errors import Refused
    from immich_usb_backup.fsutil import BackupRoot, atomic_write_bytes

    root = tmp_path / "immich-server-backups"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "config").symlink_to(outside)
    br = BackupRoot(root)
    with pytest.raises(Refused):
        br.path("config", "x.zip")
    with pytest.raises(Refused):
        atomic_write_bytes(br, root / "config" / "x.zip", b"data")
    with pytest.raises(Refused):
        br.path("..", "escape.txt")
    assert list(outside.iterdir()) == []


# Safety rule 3: the marker must already exist ------------------------------------------

def test_disk_without_marker_is_refused_and_left_unchanged(make_exfat, server: Server) -> None:
    disk = make_exfat(marker=False)
    (disk.mount_point / "family.jpg").write_bytes(b"mine")
    before = snapshot(disk.mount_point)
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 1
    assert "no `immich-server-backups` folder" in r.stdout
    assert snapshot(disk.mount_point) == before
    assert history(server)[-1]["status"] == "refused"


def test_legacy_marker_is_recognised_and_the_rename_explained(
    make_exfat, server: Server
) -> None:
    disk = make_exfat(marker=False)
    (disk.mount_point / "immich-server-backup").mkdir()
    before = snapshot(disk.mount_point)
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 1
    assert "old web UI" in r.stdout and "mv " in r.stdout
    assert snapshot(disk.mount_point) == before


# Safety rule 4: a mirror never wipes a good backup ----------------------------------

@pytest.mark.parametrize("breakage", ["missing", "empty", "marker_gone", "not_immich"])
def test_a_source_that_looks_wrong_is_refused_and_the_backup_kept(
    make_exfat, server: Server, breakage: str
) -> None:
    import shutil

    disk = make_exfat()
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    good = snapshot(disk.marker / "library")
    if breakage == "missing":
        shutil.rmtree(server.upload)
    elif breakage == "empty":
        shutil.rmtree(server.upload)
        server.upload.mkdir()
    elif breakage == "marker_gone":
        (server.upload / "upload" / ".immich").unlink()
    else:
        shutil.rmtree(server.upload)
        (server.upload / "photos").mkdir(parents=True)
        (server.upload / "photos" / "a.jpg").write_bytes(b"x")

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 1, r.stdout
    rec = history(server)[-1]
    assert rec["status"] == "refused"
    assert "nothing was copied or deleted" in " ".join(rec["problems"]).lower()  # type: ignore[arg-type]
    assert snapshot(disk.marker / "library") == good


def test_deleting_more_than_the_allowed_share_is_refused_and_nothing_deleted(
    make_exfat, server: Server
) -> None:
    disk = make_exfat()
    photos = next((server.upload / "upload").rglob("*.jpg")).parent
    for i in range(20):
        (photos / f"extra-{i}.jpg").write_bytes(os.urandom(100))
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    good = snapshot(disk.marker / "library")
    for p in sorted(photos.iterdir())[:15]:
        p.unlink()

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 1
    assert "would delete 15 of the" in r.stdout and "max_delete_percent" in r.stdout
    assert snapshot(disk.marker / "library") == good
    # a person who really deleted them raises the limit for one run
    server.write_config("[library]\nmax_delete_percent = 60\n")
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout
    assert library_tree(disk) == tree(server.upload)


# Safety rule 5: capacity checked before writing ------------------------------------

def test_a_backup_that_cannot_fit_is_refused_up_front(make_exfat, server: Server) -> None:
    disk = make_exfat(size_mb=16)
    (server.upload / "upload" / "video.mp4").write_bytes(os.urandom(24 * 1024 * 1024))
    before = snapshot(disk.mount_point)

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 1
    assert "not enough space" in r.stdout and "MiB" in r.stdout
    assert snapshot(disk.mount_point) == before


def test_space_freed_by_deletions_counts(make_exfat, server: Server) -> None:
    disk = make_exfat(size_mb=48)
    big = server.upload / "upload" / "old-video.mp4"
    big.write_bytes(os.urandom(28 * 1024 * 1024))
    server.write_config("[library]\nmax_delete_percent = 100\nkeep_deleted_days = 0\n")
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    big.unlink()
    (server.upload / "upload" / "new-video.mp4").write_bytes(os.urandom(28 * 1024 * 1024))
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout
    assert library_tree(disk) == tree(server.upload)


def test_the_keep_area_counts_as_used_space(make_exfat, server: Server) -> None:
    # the same swap with the keep area on: the old video is kept, so the new one does not
    # fit, and the refusal says where the space went; nothing is moved or written
    disk = make_exfat(size_mb=48)
    big = server.upload / "upload" / "old-video.mp4"
    big.write_bytes(os.urandom(28 * 1024 * 1024))
    server.write_config("[library]\nmax_delete_percent = 100\n")
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    big.unlink()
    (server.upload / "upload" / "new-video.mp4").write_bytes(os.urandom(28 * 1024 * 1024))
    before = snapshot(disk.mount_point)

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 1
    rec = history(server)[-1]
    assert rec["status"] == "refused"
    assert "not enough space" in rec["problems"][0]  # type: ignore[index]
    assert "keep area" in rec["problems"][0]  # type: ignore[index]
    assert snapshot(disk.mount_point) == before


# Safety rule 6: what exFAT cannot hold is named, and the run is partial -------------

def test_files_exfat_cannot_hold_are_reported_and_the_run_is_partial(
    make_exfat, server: Server
) -> None:
    disk = make_exfat()
    d = server.upload / "upload" / "odd"
    d.mkdir()
    (d / "a:b?.jpg").write_bytes(b"1")
    (d / "Case.jpg").write_bytes(b"2")
    (d / "case.jpg").write_bytes(b"3")
    (d / "link.jpg").symlink_to("Case.jpg")
    # (names over 255 UTF-16 units cannot exist on Linux's 255-byte file systems: the
    # policy function is tested on its own in test_policy)
    (d / "fine.jpg").write_bytes(b"5")

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 1
    rec = history(server)[-1]
    assert rec["status"] == "partial"
    text = "\n".join(rec["problems"])  # type: ignore[arg-type]
    assert "upload/odd/a:b?.jpg" in text
    assert "upload/odd/case.jpg" in text and "differs only in case" in text
    assert "upload/odd/link.jpg" in text and "symbolic link" in text
    mirrored = disk.marker / "library" / "upload" / "odd"
    assert (mirrored / "fine.jpg").read_bytes() == b"5"
    assert (mirrored / "Case.jpg").read_bytes() == b"2"
    assert "partial" in r.stdout.lower()


# Safety rule 7: temp names, and an interrupted run leaves a readable backup --------------

def test_a_failing_write_leaves_the_old_file_and_no_temporary(make_exfat) -> None:
    from immich_usb_backup.fsutil import BackupRoot, atomic_write

    disk = make_exfat()
    root = BackupRoot(disk.marker)
    final = disk.marker / "backup-info.toml"
    final.write_text("old = true\n")

    def half_then_fail(f) -> None:  # type: ignore[no-untyped-def]
        f.write(b"new = ")
        raise OSError("disk pulled")

    with pytest.raises(OSError, match="disk pulled"):
        atomic_write(root, final, half_then_fail)
    disk.remount()
    assert final.read_text() == "old = true\n"
    assert [p.name for p in disk.marker.iterdir()] == ["backup-info.toml"]


def _wait_for(predicate, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_sigterm_mid_copy_stops_rsync_records_interrupted_and_next_run_finishes(
    make_exfat, server: Server
) -> None:
    disk = make_exfat(size_mb=128)
    (server.upload / "upload" / "video.mp4").write_bytes(os.urandom(12 * 1024 * 1024))
    server.write_config("[library]\nbwlimit_kib = 1024\n")
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "immich_usb_backup", "-c", str(server.config_path), "run",
         str(disk.mount_point)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )

    def copying() -> bool:
        st = json.loads(run_cli("status", "--json", config=server.config_path).stdout)
        return st["state"] == "running" and st["phase"] == "library" and st["percent"] > 1

    _wait_for(copying)
    st = json.loads(run_cli("status", "--json", config=server.config_path).stdout)
    assert 0 < st["percent"] < 100 and st["bytes_total"] > 0
    assert st["disk"]["label"] == "Backup"
    m = re.fullmatch(r"(\d+) of (\d+) files copied", st["detail"])  # counted as rsync goes
    assert m and int(m.group(1)) < int(m.group(2)) and int(m.group(2)) > 1, st
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    note_loop_blocks("immich-usb-backup run (SIGTERM)", err)

    assert proc.returncode == 1, out + err
    assert "INTERRUPTED" in out
    assert history(server)[-1]["status"] == "interrupted"
    rsyncs = subprocess.run(["pgrep", "-f", f"rsync.*{disk.mount_point}"],
                            capture_output=True, text=True)
    assert rsyncs.stdout == ""
    assert json.loads(run_cli("status", "--json", config=server.config_path).stdout) == {
        "state": "idle"}
    # the dump and config written before the copy are complete, readable files
    assert tomllib.loads((disk.marker / "backup-info.toml").read_text())["backup"][
        "status"] == "interrupted"
    server.write_config()
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert library_tree(disk) == tree(server.upload)


def test_a_manifest_left_stale_by_an_interrupted_run_is_rewritten_by_the_next(
    make_exfat, server: Server
) -> None:
    disk = make_exfat(size_mb=128)
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    small = server.upload / "upload" / "a-small"  # copied first (the walk's order)
    small.mkdir()
    for i in range(5):
        (small / f"{i}.jpg").write_bytes(os.urandom(3000))
    video = server.upload / "upload" / "z-video" / "video.mp4"
    video.parent.mkdir()
    video.write_bytes(os.urandom(12 * 1024 * 1024))
    server.write_config("[library]\nbwlimit_kib = 1024\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "immich_usb_backup", "-c", str(server.config_path), "run",
         str(disk.mount_point)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def copying_video() -> bool:
        st = json.loads(run_cli("status", "--json", config=server.config_path).stdout)
        return st["state"] == "running" and st["phase"] == "library" and st["percent"] > 1

    _wait_for(copying_video)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    note_loop_blocks("immich-usb-backup run (SIGTERM)", err)
    assert (disk.marker / "library" / "upload" / "a-small" / "0.jpg").is_file()
    video.unlink()
    video.parent.rmdir()
    server.write_config()

    # nothing left to copy, yet the manifest on the disk lacks the small files
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0

    r = run_cli("verify", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    listed = (disk.marker / "library.sha256").read_text()
    assert "library/upload/a-small/4.jpg" in listed


# Safety rule 8: one backup at a time -------------------------------------------------

def test_a_second_backup_while_one_runs_is_refused(make_exfat, server: Server) -> None:
    from immich_usb_backup.lock import backup_lock

    disk = make_exfat()
    with backup_lock(server.state):
        r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 1
    assert "another backup is already running" in r.stdout
    assert list(disk.marker.iterdir()) == []
    assert history(server)[-1]["status"] == "refused"


# Configuration and environment checks ----------------------------------------------

def test_check_lists_every_environment_problem(server: Server) -> None:
    server.write_config(
        f'[database]\ndumps_dir = "{server.root}/no-dumps"\n'
    )
    (server.upload / "library" / ".immich").unlink()
    server.config_path.write_text(server.config_path.read_text().replace(
        str(server.etc), str(server.root / "no-etc")))
    r = run_cli("check", config=server.config_path)
    assert r.returncode == 1
    assert "3 problems with" in r.stdout
    assert "library/.immich" in r.stdout
    assert "no-dumps does not exist" in r.stdout
    assert "no-etc does not exist" in r.stdout
    # said as a check: nothing was about to be copied
    assert "nothing was copied" not in r.stdout.lower()
    assert "a backup would be refused" in r.stdout


def test_check_names_a_notification_url_apprise_cannot_use_without_showing_it(
    server: Server,
) -> None:
    server.write_config('[notify]\nurls = ["nosuchservice://user:s3cret@host/x"]\n')
    r = run_cli("check", config=server.config_path)
    assert r.returncode == 1
    assert "notify.urls #1: not a URL Apprise understands" in r.stdout
    assert "s3cret" not in r.stdout + r.stderr


def test_check_passes_on_a_good_setup(server: Server) -> None:
    r = run_cli("check", config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout
