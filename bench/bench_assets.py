"""Benchmark: reading the asset rows of an Immich dump, against ``gzip -dc DUMP | wc -l``.

A dump shaped like Immich's (``pg_dump`` text, gzip'd with ``--rsyncable``): ``asset``
with Immich's 31 columns, two ``asset_file`` rows per asset (thumbnail, preview), and a
``smart_search`` row of 512 floats per asset (the search embeddings, which make most of a
real dump). Generated once from a seed and cached in /var/tmp/iub-bench-assets.

Measured, each against the bare tool in the same round (rounds alternate who goes first;
medians):

1. **rows**: ``assets.DumpReader`` over the streamed gunzip, every row consumed: wall time
   of a child process (``--worker``) and its peak RSS (VmHWM). Targets: 200,000 assets in
   at most 15 s and 100 MB.
2. **first check** (informational): the same, with the rows classified, stored
   (``AssetStore.remember``) and checked against the mirror's index: what a backup pays
   the first time it meets a dump. The index is built from a files list in the scan's
   format (every original, thumbnail and preview) and joined with a hash cache holding
   every file's SHA-1.
3. **check after a change** (informational): the dump's files recalled from the store,
   the index built and joined again: what a run that copied or deleted anything pays.
4. **no-change check** (informational): the outcome kept by 3. found again under its key
   (the files list's fingerprint, the hash cache's generation): what a run that changed
   nothing pays.

Prints a table, writes bench/results/assets.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from bench_verify import peak_rss_kib  # the folder of this script is first on sys.path

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
RESULTS = REPO / "bench" / "results" / "assets.json"
WORK = Path("/var/tmp/iub-bench-assets")
GENERATOR = 1  # bump when the dump's layout changes
TARGET_S = 15.0
TARGET_BYTES = 100_000_000
USER = "9f1d6c1a-0000-4000-8000-000000000001"
MB = 1e6

ASSET_COLUMNS = (
    'id, "deviceAssetId", "ownerId", "deviceId", type, "originalPath", "fileCreatedAt", '
    '"fileModifiedAt", "isFavorite", duration, "encodedVideoPath", checksum, '
    '"livePhotoVideoId", "updatedAt", "createdAt", "originalFileName", thumbhash, '
    '"isOffline", "libraryId", "isExternal", "deletedAt", "localDateTime", "stackId", '
    '"duplicateId", status, "updateId", visibility, width, height, "isEdited", '
    '"checksumAlgorithm"')


# The dump --------------------------------------------------------------------------------

def assets(n: int, seed: int) -> Iterator[tuple[str, str]]:
    """(asset id, checksum hex) of each of the ``n`` assets, the same for the same seed."""
    rng = random.Random(seed)  # noqa: S311  (test data)
    for _ in range(n):
        yield str(uuid.UUID(int=rng.getrandbits(128), version=4)), rng.randbytes(20).hex()


def paths(asset_id: str) -> tuple[str, str, str]:
    """The original's, the thumbnail's and the preview's path inside the mirror."""
    folder = f"{USER}/{asset_id[:2]}/{asset_id[2:4]}"
    return (f"upload/{folder}/{asset_id}.jpg", f"thumbs/{folder}/{asset_id}-thumbnail.webp",
            f"thumbs/{folder}/{asset_id}-preview.jpeg")


def write_dump(path: Path, n: int, seed: int) -> int:
    """The dump of ``n`` assets into ``path`` through ``gzip --rsyncable``; its size
    unzipped."""
    rng = random.Random(seed + 1)  # noqa: S311  (test data)
    pool = ["[" + ",".join(f"{rng.uniform(-0.12, 0.12):.8g}" for _ in range(512)) + "]"
            for _ in range(2000)]
    total = 0
    with open(path, "wb") as out:
        gz = subprocess.Popen(["gzip", "--rsyncable", "-c"], stdin=subprocess.PIPE,
                              stdout=out)
        assert gz.stdin is not None

        def w(text: str) -> None:
            nonlocal total
            data = text.encode()
            total += len(data)
            gz.stdin.write(data)  # type: ignore[union-attr]

        w("--\n-- PostgreSQL database dump\n--\n\n\\restrict bench\n\n"
          "SET client_encoding = 'UTF8';\n\n"
          "CREATE TABLE public.asset (id uuid NOT NULL);\n\n")
        w(f"COPY public.asset ({ASSET_COLUMNS}) FROM stdin;\n")
        rows = []
        for i, (aid, checksum) in enumerate(assets(n, seed)):
            original = paths(aid)[0]
            rows.append(
                f"{aid}\tdevice-{i}\t{USER}\tphone\tIMAGE\t/data/{original}\t"
                "2024-06-01 10:00:00+00\t2024-06-01 10:00:00+00\tf\t\\N\t\\N\t"
                f"\\\\x{checksum}\t\\N\t2024-06-02 10:00:00+00\t2024-06-02 10:00:00+00\t"
                f"IMG_{i:05d}.jpg\t\\\\x1a0a0a\tf\t\\N\tf\t\\N\t2024-06-01 12:00:00+00\t"
                f"\\N\t\\N\tactive\t{aid}\ttimeline\t4032\t3024\tf\tsha1\n")
            if len(rows) == 1000:
                w("".join(rows))
                rows.clear()
        w("".join(rows) + "\\.\n\n\n")
        w('COPY public.asset_file (id, "assetId", "createdAt", "updatedAt", type, path, '
          '"updateId", "isEdited", "isProgressive") FROM stdin;\n')
        for aid, _ in assets(n, seed):
            _, thumb, preview = paths(aid)
            rows.append(f"{aid[:-4]}0001\t{aid}\t2024-06-02 10:00:00+00\t2024-06-02 "
                        f"10:00:00+00\tthumbnail\t/data/{thumb}\t{aid}\tf\tf\n"
                        f"{aid[:-4]}0002\t{aid}\t2024-06-02 10:00:00+00\t2024-06-02 "
                        f"10:00:00+00\tpreview\t/data/{preview}\t{aid}\tf\tt\n")
            if len(rows) == 1000:
                w("".join(rows))
                rows.clear()
        w("".join(rows) + "\\.\n\n\n")
        w('COPY public.smart_search ("assetId", embedding) FROM stdin;\n')
        for aid, _ in assets(n, seed):
            rows.append(f"{aid}\t{pool[rng.randrange(len(pool))]}\n")
            if len(rows) == 200:
                w("".join(rows))
                rows.clear()
        w("".join(rows) + "\\.\n\n\n--\n-- PostgreSQL database dump complete\n--\n\n"
          "\\unrestrict bench\n")
        gz.stdin.close()
        if gz.wait() != 0:
            raise SystemExit("bench: gzip failed")
    return total


def build_dump(n: int, seed: int) -> dict[str, Any]:
    params = {"assets": n, "seed": seed, "generator": GENERATOR}
    path = WORK / f"immich-db-backup-bench-{n}-{seed}.sql.gz"
    stamp = path.with_suffix(".stamp.json")
    if path.exists() and stamp.exists():
        known: dict[str, Any] = json.loads(stamp.read_text())
        if known.get("params") == params:
            print(f"dump: cached at {path} ({path.stat().st_size / MB:.0f} MB, "
                  f"{known['unzipped'] / MB:.0f} MB unzipped)")
            return known
    print(f"dump: writing {n} assets to {path} (once; takes a while at full size)")
    t0 = time.perf_counter()
    unzipped = write_dump(path, n, seed)
    known = {"params": params, "path": str(path), "unzipped": unzipped}
    stamp.write_text(json.dumps(known))
    print(f"dump: {path.stat().st_size / MB:.0f} MB, {unzipped / MB:.0f} MB unzipped, "
          f"{time.perf_counter() - t0:.0f} s")
    return known


def build_state(n: int, seed: int, state: Path, files_list: Path) -> None:
    """A hash cache with every file's SHA-1 (the originals' equal to the dump's
    checksums), and the mirror's files list as the scan writes it, in its order."""
    from immich_usb_backup.hashcache import HashCache  # noqa: PLC0415  (run by .venv)
    from immich_usb_backup.scan import files_record  # noqa: PLC0415

    cache = HashCache(state)
    batch: list[tuple[str, int, int, str, str | None]] = []
    for aid, checksum in assets(n, seed):
        for rel, sha1 in zip(paths(aid), (checksum, "a" * 40, "b" * 40), strict=True):
            batch.append((rel, 1000, 1_700_000_000_000_000_000, "c" * 64, sha1))
        if len(batch) >= 3000:
            cache.put_many(batch)
            batch.clear()
    cache.put_many(batch)
    cache.close()
    rels = sorted(rel for aid, _ in assets(n, seed) for rel in paths(aid))  # walk order
    with open(files_list, "wb") as out:
        for rel in rels:
            out.write(files_record(b"K", 1000, 1_700_000_000_000_000_000, rel))


# Runs --------------------------------------------------------------------------------------

def gunzip_chunks(path: Path, size: int = 1 << 18) -> Iterator[bytes]:
    """Stand-in for the product's streamed gunzip: ``size`` bytes of input at a time."""
    d = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        while block := f.read(size):
            data = d.decompress(block)
            while d.unused_data:
                rest = d.unused_data
                d = zlib.decompressobj(wbits=31)
                data += d.decompress(rest)
            if data:
                yield data


def worker(spec_path: str) -> int:
    """Child process: one measurement as the spec says; prints one JSON line."""
    spec = json.loads(Path(spec_path).read_text())
    from immich_usb_backup.assets import AssetRow, DumpReader  # noqa: PLC0415
    from immich_usb_backup.assetstore import (  # noqa: PLC0415  (run with .venv's python)
        AssetStore,
        MirrorIndex,
        check_dump,
        mirror_fingerprint,
    )
    from immich_usb_backup.hashcache import HashCache  # noqa: PLC0415

    dump, kind, state = Path(spec["dump"]), spec["kind"], Path(spec["state"])
    out: dict[str, Any] = {"rss_before_kib": peak_rss_kib()}
    t0 = time.perf_counter()
    if kind == "rows":
        reader = DumpReader()
        count = sum(isinstance(r, AssetRow) for r in reader.rows(gunzip_chunks(dump)))
        out.update(assets=count, problems=reader.problems)
    else:
        files_list = Path(spec["files_list"])
        cache = HashCache(state)
        key = json.dumps([dump.name, dump.stat().st_size, mirror_fingerprint(files_list),
                          cache.generation()])
        cache.close()
        store = AssetStore(state)
        result = store.result("bench-disk", key) if kind == "memo" else None
        if result is None:
            if kind == "memo":
                raise SystemExit("bench: no outcome kept under the key")
            index = MirrorIndex(state / "index.sqlite", state)
            t1 = time.perf_counter()
            index.add_files_list(files_list)
            out["index_s"] = time.perf_counter() - t1
            result = check_dump(dump.name, dump.stat().st_size, lambda: gunzip_chunks(dump),
                                index, store=store)
            index.close()
            store.keep_result("bench-disk", key, result)
        store.close()
        out.update(assets=result.originals, line=result.line(), problems=result.problems())
    out["seconds"] = time.perf_counter() - t0
    out["rss_kib"] = peak_rss_kib()
    print(json.dumps(out))
    return 0


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    path = WORK / "run" / "worker.json"
    path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    proc = subprocess.run([str(PYTHON), str(Path(__file__).resolve()), "--worker", str(path)],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench: worker failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    r: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    r["wall"] = wall
    return r


def bare(dump: Path) -> tuple[float, int]:
    """``gzip -dc DUMP | wc -l``: seconds (until both ended) and the line count."""
    t0 = time.perf_counter()
    gz = subprocess.Popen(["gzip", "-dc", str(dump)], stdout=subprocess.PIPE)
    wc = subprocess.run(["wc", "-l"], stdin=gz.stdout, capture_output=True, text=True,
                        check=True)
    assert gz.stdout is not None
    gz.stdout.close()
    if gz.wait() != 0:
        raise SystemExit("bench: gzip -dc failed")
    return time.perf_counter() - t0, int(wc.stdout.split()[0])


def main() -> int:
    p = argparse.ArgumentParser(description="Reading an Immich dump's asset rows against "
                                            "gzip -dc | wc -l.")
    p.add_argument("--assets", type=int, help="assets in the dump (default 200000)")
    p.add_argument("--small", action="store_true", help="quick check: 20,000 assets")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true",
                   help=f"keep the generated dump in {WORK} (reused next time)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    n = args.assets or (20_000 if args.small else 200_000)
    if min(n, args.rounds) < 1:
        p.error("--assets and --rounds must be positive")
    if not PYTHON.exists() or shutil.which("gzip") is None or shutil.which("wc") is None:
        print(f"bench: needs gzip, wc and {PYTHON} (tools/setup)", file=sys.stderr)
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    run = WORK / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    started = time.perf_counter()
    try:
        info = build_dump(n, args.seed)
        dump = Path(info["path"])
        files_list = run / "files.list"
        state = run / "state"
        state.mkdir()
        build_state(n, args.seed, state, files_list)
        samples: dict[str, list[float]] = {"bare": [], "rows": [], "first": [], "again": [],
                                           "memo": []}
        rss: dict[str, list[int]] = {"rows": [], "first": [], "again": [], "memo": []}
        lines = 0
        last: dict[str, Any] = {}
        for round_ in range(args.rounds):
            (state / "assets.sqlite").unlink(missing_ok=True)  # the first check reads
            order = ["bare", "rows"] if round_ % 2 == 0 else ["rows", "bare"]
            for who in [*order, "first", "again", "memo"]:
                if who == "bare":
                    seconds, lines = bare(dump)
                    samples["bare"].append(seconds)
                    continue
                kind = {"rows": "rows", "memo": "memo"}.get(who, "check")
                r = run_worker({"dump": str(dump), "kind": kind, "state": str(state),
                                "files_list": str(files_list)})
                if r["assets"] != n or r["problems"]:
                    raise SystemExit(f"bench: {who} read {r['assets']} of {n} assets: "
                                     f"{r['problems'][:3]}")
                samples[who].append(r["wall"])
                rss[who].append(r["rss_kib"])
                last[who] = r
            print(f"round {round_ + 1}: bare {samples['bare'][-1]:.2f} s, rows "
                  f"{samples['rows'][-1]:.2f} s, first check {samples['first'][-1]:.2f} s, "
                  f"after a change {samples['again'][-1]:.2f} s, no change "
                  f"{samples['memo'][-1]:.2f} s")
        med = {k: statistics.median(v) for k, v in samples.items()}
        peak = {k: max(v) * 1024 for k, v in rss.items()}
        ok_s, ok_mem = med["rows"] <= TARGET_S, peak["rows"] <= TARGET_BYTES
        print(f"\n{n} assets; dump {dump.stat().st_size / MB:.0f} MB gzip'd, "
              f"{info['unzipped'] / MB:.0f} MB ({lines} lines) unzipped; medians of "
              f"{args.rounds} rounds\n")
        print(f"{'measurement':<34} {'seconds':>8} {'/ bare':>7} {'peak RSS':>9}  target")
        print(f"{'bare: gzip -dc | wc -l':<34} {med['bare']:>8.2f} {1:>7.2f} {'':>9}")
        print(f"{'1. rows (DumpReader)':<34} {med['rows']:>8.2f} "
              f"{med['rows'] / med['bare']:>7.2f} {peak['rows'] / MB:>6.0f} MB  "
              f"<= {TARGET_S:.0f} s: {'PASS' if ok_s else 'OVER'}, <= "
              f"{TARGET_BYTES / MB:.0f} MB: {'PASS' if ok_mem else 'OVER'}")
        for key, label in (("first", "2. first check (read, store)"),
                           ("again", "3. after a change (recalled)"),
                           ("memo", "4. no change (outcome kept)")):
            print(f"{label:<34} {med[key]:>8.2f} {med[key] / med['bare']:>7.2f} "
                  f"{peak[key] / MB:>6.0f} MB  info")
        again = last["again"]
        print(f"   2. and 3.: building the mirror's index {again['index_s']:.2f} s; "
              f"Python's start and imports ~{again['wall'] - again['seconds']:.2f} s of each")
        print(f"   line: {last['again']['line']}")
        res = {
            "finished_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": f"{os.cpu_count()} cores, Linux {os.uname().release}",
            "assets": n, "rounds": args.rounds, "dump_bytes": dump.stat().st_size,
            "unzipped_bytes": info["unzipped"], "medians_s": med, "peak_rss_bytes": peak,
            "samples_s": samples, "bench_seconds": time.perf_counter() - started,
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(res, indent=2) + "\n")
        print(f"\nresults: {RESULTS}")
        return 0
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(run, ignore_errors=True)
        if not args.keep:
            for leftover in WORK.glob("immich-db-backup-bench-*"):
                leftover.unlink()
            if WORK.is_dir() and not any(WORK.iterdir()):
                WORK.rmdir()


if __name__ == "__main__":
    sys.exit(main())
