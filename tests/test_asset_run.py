"""The asset check in a whole backup and in ``verify TARGET``, against a real dump.

A sample Immich server whose database (real PostgreSQL, dumped with real ``pg_dump``)
records every photo with its SHA-1; one photo changed after it was uploaded, one that
the database lists is gone from the server. The backup names both and ends ``partial``;
``verify`` finds the same from the disk alone; a run that changed nothing says the same
without reading the dump again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest

from helpers import ExfatDisk, LoopWatch, Server, run_cli
from immich_db import Asset, Postgres, immich_db, postgres, sha1  # noqa: F401 - a fixture

pytestmark = pytest.mark.exfat


@pytest.fixture(autouse=True)
def _loop_never_blocked(no_blocked_loop: LoopWatch) -> LoopWatch:
    return no_blocked_loop


def server_with_database(server: Server, pg: Postgres, name: str) -> tuple[str, str]:
    """Give ``server`` a database dump listing its photos; return the paths (in the
    upload location) of the photo changed after upload and of the one gone."""
    photos = sorted((server.upload / "upload").rglob("*.jpg"))
    assets = [Asset(f"/data/{p.relative_to(server.upload)}", sha1(p.read_bytes()))
              for p in photos]
    gone = "upload/9f1d6c1a-user/ab/cd/GONE.jpg"
    assets.append(Asset(f"/data/{gone}", sha1(b"a photo that was deleted by hand")))
    assets.append(Asset("/data/upload/9f1d6c1a-user/ab/cd/trashed.jpg", sha1(b"t"),
                        trashed=True))
    changed = photos[0]
    with open(changed, "ab") as f:  # damaged on the server after Immich recorded it
        f.write(b"\0")
    immich_db(pg, name, assets)
    for old in (server.upload / "backups").glob("*.sql.gz"):
        old.unlink()
    when = datetime.now() + timedelta(seconds=1)
    pg.dump(name, server.upload / "backups" /
            f"immich-db-backup-{when:%Y%m%dT%H%M%S}-v2.7.0-pg15.14.sql.gz")
    return str(changed.relative_to(server.upload)), gone


def test_a_backup_and_verify_prove_the_database_and_the_photos_agree_and_name_what_not(
    make_exfat: Callable[..., ExfatDisk], server: Server, postgres: Postgres,  # noqa: F811
) -> None:
    changed, gone = server_with_database(server, postgres, "immich_run")
    disk = make_exfat()
    photos = len(list((server.upload / "upload").rglob("*.jpg")))

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 1 and "backup PARTIAL" in r.stdout, r.stdout + r.stderr
    line = (f"Assets: {photos + 1} in the database, {photos} on the disk, 1 missing, "
            f"{photos - 1} matched by Immich's checksum, 1 differs; 1 in the trash "
            "(1 of them no longer on the disk).")
    assert line in r.stdout
    assert f"assets: library/{gone} is missing from the server and from the disk" in r.stdout
    assert f"assets: library/{changed} changed or damaged since it was uploaded" in r.stdout
    record = json.loads(run_cli("history", "--json", config=server.config_path).stdout)[-1]
    assert record["steps"]["assets"]["counts"]["matched"] == photos - 1
    assert "assets" in (disk.marker / "backup-info.toml").read_text()
    page = (disk.marker / "history.html").read_text()  # the history page says it too
    assert f"assets: {photos + 1} in the database, {photos} on the disk, 1 missing" in page

    v = run_cli("verify", str(disk.mount_point), config=server.config_path)
    assert v.returncode == 1, v.stdout + v.stderr
    assert f"  assets: {photos + 1} in the database, {photos} on the disk, 1 missing" in v.stdout
    assert f"library/{gone} is not on the disk" in v.stdout
    assert f"library/{changed} changed or damaged since it was uploaded" in v.stdout

    again = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert line in again.stdout  # the same, told again
    assert "not read yet" not in again.stdout  # the SHA-1s survived without reading again


def test_a_dump_without_an_asset_table_is_a_named_problem_not_a_crash(
    make_exfat: Callable[..., ExfatDisk], server: Server,
) -> None:
    from helpers import write_dump

    for old in (server.upload / "backups").glob("*.sql.gz"):
        old.unlink()
    write_dump(server.upload / "backups", datetime.now(),
               b"-- PostgreSQL database dump\nCREATE TABLE photo (x int);\n"
               b"-- PostgreSQL database dump complete\n")
    disk = make_exfat()
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "Assets: not checked (" in r.stdout
    assert "assets: " in r.stdout.split("problems")[1]
    assert os.path.exists(disk.marker / "library.sha256")  # the rest of the backup is there
