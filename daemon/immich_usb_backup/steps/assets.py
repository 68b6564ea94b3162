"""Assets step: the database and the photos on the disk agree, by Immich's own checksum.

After the library is mirrored (its ``finish`` put the SHA-1s into the hash cache), the
asset rows of the dump this run put on the disk are read (once per dump: ``assetstore``)
and every original of the upload location is looked for in the mirror, its SHA-1 held
against Immich's checksum (``assetcheck``). It writes nothing to the disk; what it finds
is one line of the run and, for a missing or differing original, a problem (the run is
``partial``). ``verify TARGET`` does the same from the disk alone. docs/usage.md says
what the check proves and what it cannot.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from immich_usb_backup import dumps, layout
from immich_usb_backup.assetcheck import AssetCheck, Lookup, Seen
from immich_usb_backup.assetstore import (
    AssetStore,
    MirrorIndex,
    check_dump,
    disk_lookup,
    excluded_by,
    kept_or_checked,
    mirror_fingerprint,
)
from immich_usb_backup.config import Config
from immich_usb_backup.hashcache import HashCache
from immich_usb_backup.policy import Space
from immich_usb_backup.record import StepResult
from immich_usb_backup.scan import FILES_LIST, Excludes
from immich_usb_backup.steps.base import DiskCheck, Preflight, Step, in_thread

log = logging.getLogger(__name__)


@dataclass
class AssetsResult(StepResult):
    line: str | None = None  # "assets: 41230 in the database, all on the disk, ..."
    counts: dict[str, Any] | None = None  # AssetCheck.as_dict()

    def finished_lines(self) -> list[str]:
        return [f"{self.line[0].upper()}{self.line[1:]}."] if self.line else []

    def disk_info(self) -> dict[str, Any]:
        return {"assets": self.line} if self.line else {}


class AssetsStep(Step):
    """Check the dump's assets against the mirror; write nothing."""

    name = "assets"

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.database.enabled and config.library.enabled

    async def preflight(self, cluster: int) -> Preflight:
        return Preflight(Space())

    async def write(self) -> StepResult:
        return AssetsResult()

    async def finish(self, result: StepResult) -> None:
        """The check, once every step wrote and the library's digests are in the cache."""
        assert isinstance(result, AssetsResult)
        ctx = self.ctx
        name = getattr(ctx.results.get("database"), "dump", None)
        files_list = ctx.work_dir / FILES_LIST
        if not name:
            return  # no dump on the disk: the database step named that problem
        if not files_list.is_file():
            result.line = ("assets: not checked (the run keeps no list of the mirror's "
                           "files without library.manifest)")
            return
        dump = ctx.root.path(layout.DATABASE, name)
        ctx.status.set_phase("assets", 0, f"checking {name} against the library")
        found = await in_thread(ctx, lambda: _check(ctx.config, ctx.disk_key, ctx.work_dir,
                                                    dump, files_list, ctx.cancel))
        result.line, result.counts = found.line(), found.as_dict()
        for problem in found.problems():
            ctx.problems.add(problem)
        log.info("%s", result.line)

    @classmethod
    def check_disk(cls, check: DiskCheck) -> None:
        """``verify TARGET``: the newest dump's assets against the disk's files, with the
        SHA-1s the library's check read back (a ``--sample``: the sampled assets read)."""
        newest = dumps.newest_in(check.root / layout.DATABASE)
        if newest is None:
            return
        dump, size = newest
        check.status.set_phase("verify", 0, f"checking the assets of {dump.name}")
        mirror = check.root / layout.LIBRARY
        with (contextlib.nullcontext(disk_lookup(mirror, stop=check.stop))
              if check.sample is not None else _read_back(check)) as lookup:
            found = check_dump(dump.name, size, lambda: iter(dumps.Stream(dump)),
                               lookup, media_location=check.config.immich.media_location,
                               excluded=excluded_by(Excludes(check.config.library.excludes)),
                               share=check.sample, stop=check.stop)
        check.report.assets = {"line": found.line(), **found.as_dict()}
        for problem in found.problems():
            check.report.asset_problems.add(problem)


def _check(config: Config, disk: str, work: Path, dump: Path, files_list: Path,
           stop: Any) -> AssetCheck:
    """In a thread: the check of ``dump`` against the mirror the files list describes,
    given back as it was when nothing it depends on changed."""
    size = dump.stat().st_size
    cache = HashCache(config.state_dir)
    try:
        generation = cache.generation()
    finally:
        cache.close()
    key = json.dumps([dump.name, size, config.immich.media_location,
                      list(config.library.excludes), mirror_fingerprint(files_list),
                      generation])
    store = AssetStore(config.state_dir)

    def check() -> AssetCheck:  # only when nothing is kept: no index, no join otherwise
        index = MirrorIndex(work / "assets-index.sqlite", config.state_dir,
                            source=config.immich.upload_location)
        try:
            index.add_files_list(files_list)
            return check_dump(dump.name, size, lambda: iter(dumps.Stream(dump)), index,
                              store=store, media_location=config.immich.media_location,
                              excluded=excluded_by(Excludes(config.library.excludes)),
                              stop=stop)
        finally:
            index.close()
    try:
        return kept_or_checked(store, disk, key, check)
    finally:
        store.close()


@contextlib.contextmanager
def _read_back(check: DiskCheck) -> Iterator[Lookup]:
    """What the library's check read back (every file, no sample): present, and the SHA-1
    of the disk's copy; a chunk of paths a query."""
    import sqlite3  # noqa: PLC0415

    if check.library_reads is None:
        yield disk_lookup(check.root / layout.LIBRARY, stop=check.stop)
        return
    db = sqlite3.connect(check.library_reads)

    def lookup(rels: Sequence[str]) -> list[Seen]:
        marks = ",".join("?" * len(rels))
        found = dict(db.execute(
            "SELECT d.path, r.sha1 FROM d LEFT JOIN r USING (path) "  # noqa: S608
            f"WHERE d.path IN ({marks})", list(rels)).fetchall())
        return [Seen(True, found[rel], "disk") if rel in found else Seen(False)
                for rel in rels]
    try:
        yield lookup
    finally:
        db.close()

