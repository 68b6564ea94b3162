"""Benchmark: content hashing (verify mode, the manifest) against bare sha256sum.

Three measurements, each against the bare tool timed in the same run:

1. one side, one core: ``hashing.hash_files`` against ``sha256sum FILES...`` over the same
   files, page cache warm (CPU speed) and dropped (informational);
2. both sides at once: ``hashing.hash_both`` (server's copy and an exFAT disk's copy, one
   thread each) against ``sha256sum`` of the one then of the other;
3. the manifest's cost: no-change runs of the real CLI with ``[library] manifest = true``
   against ``manifest = false`` (two exFAT disks, one per setting), and a run that
   copies one new 5 MB file.

Our hashing runs in a child process of this script (``--worker``) so that its peak RSS
is its own, not the benchmark's. Prints a summary with ratios and targets and writes
bench/results/verify.json. Needs root. See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import bench_pipeline as bp  # the folder of this script is first on sys.path
from bench_pipeline import Disk
from immich_usb_backup import manifest
from immich_usb_backup.hashing import BLOCK, hash_both, hash_files
from immich_usb_backup.rsync import base_args as rsync_base_args

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
RESULTS = REPO / "bench" / "results" / "verify.json"
WORK = Path("/var/tmp/iub-bench-verify")  # not bench_pipeline's folder: both can be kept
HASHSET = WORK / "hashset"  # measurements 1 and 2
HASHSET_STAMP = WORK / "hashset.stamp.json"
LIBRARY = WORK / "library"  # measurement 3 (bench_pipeline's generator)
LIBRARY_STAMP = WORK / "library.stamp.json"
RUN_DIR = WORK / "run"  # lists, configs, state dirs, logs of the last run
NEW_DIR = "upload/bench-verify-new"  # measurement 3's added files, removed at the end
HASHSET_GENERATOR = 1  # bump when the hash set's layout changes
KIB, MIB, GIB = 1024, 1024**2, 1024**3
MB = 1e6
GNU_TIME = bp.GNU_TIME
TARGET_WARM = 0.90  # ours / sha256sum MB/s, warm page cache: at least
TARGET_MANIFEST = 1.10  # no-change run, manifest on / off seconds: at most
RUNNING: list[subprocess.Popen[bytes]] = []  # stopped in the finally on Ctrl-C


class BenchError(RuntimeError):
    """Something the benchmark needs did not work: it stops, loudly."""


# data ---------------------------------------------------------------------------------

def build_hashset(gb: float, videos: int, seed: int) -> dict[str, Any]:
    """Photos of 2-8 MiB and ``videos`` videos of ~100 MB, ``gb`` GB in all, laid out
    like Immich's upload folder; seeded random bytes. Cached with a stamp."""
    params = {"gb": gb, "videos": videos, "seed": seed, "generator": HASHSET_GENERATOR}
    if HASHSET.is_dir() and HASHSET_STAMP.is_file():
        stamp: dict[str, Any] = json.loads(HASHSET_STAMP.read_text())
        if stamp.get("params") == params:
            print(f"hash set: cached at {HASHSET} ({len(stamp['rels'])} files, "
                  f"{stamp['bytes'] / MB:.0f} MB)")
            return stamp
    print(f"hash set: generating {gb} GB at {HASHSET}")
    HASHSET_STAMP.unlink(missing_ok=True)
    shutil.rmtree(HASHSET, ignore_errors=True)
    rng = random.Random(seed)  # noqa: S311 - reproducible data, not secrets
    users = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(2)]

    def rel(suffix: str) -> str:
        aid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return f"upload/{rng.choice(users)}/{aid[:2]}/{aid[2:4]}/{aid}{suffix}"

    total = int(gb * 1e9)
    files = [(rel(".mp4"), rng.randint(90 * 10**6, 110 * 10**6)) for _ in range(videos)]
    left = total - sum(size for _, size in files)
    while left > 0:
        size = min(left, rng.randint(2 * MIB, 8 * MIB))
        files.append((rel(".jpg"), size))
        left -= size
    for name, size in files:
        path = HASHSET / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for off in range(0, size, 8 * MIB):
                f.write(rng.randbytes(min(8 * MIB, size - off)))
    rels = sorted(name for name, _ in files)  # the order a scan of the tree gives
    stamp = {"params": params, "rels": rels, "bytes": sum(s for _, s in files),
             "videos": videos, "photos": len(files) - videos}
    HASHSET_STAMP.write_text(json.dumps(stamp, indent=1) + "\n")  # last: half-made is redone
    return stamp


def build_library(files: int, gb: float, seed: int) -> dict[str, Any]:
    """bench_pipeline's library generator, pointed at this benchmark's own folder."""
    saved = bp.LIBRARY, bp.STAMP
    bp.LIBRARY, bp.STAMP = LIBRARY, LIBRARY_STAMP
    try:
        shutil.rmtree(LIBRARY / NEW_DIR, ignore_errors=True)  # an earlier run killed hard
        lib = bp.build_library(files, gb, seed)
        bp.refresh_dump()  # the pipeline reports an old dump as a problem
        return lib
    finally:
        bp.LIBRARY, bp.STAMP = saved


# system helpers -----------------------------------------------------------------------

def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm(root: Path, rels: list[str]) -> None:
    """Read the files once (into the page cache), in a child process."""
    subprocess.run(["cat", "--", *rels], cwd=root, stdout=subprocess.DEVNULL, check=True)


def buffers_mb() -> float:
    """The kernel's block-device page cache ("Buffers" in /proc/meminfo), in MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Buffers:"):
            return int(line.split()[1]) * KIB / MB
    raise BenchError("no Buffers line in /proc/meminfo")


@dataclass
class Run:
    """One timed hashing run."""

    seconds: float
    cpu_s: float | None  # user + system CPU time of the hashing process(es)
    rss_kib: int | None  # peak RSS of the (largest) hashing process
    fingerprints: list[str]  # sha256 of "digest  rel\n" lines, per side hashed
    rss_before_kib: int | None = None  # ours: peak RSS before hashing (Python, imports)
    side_s: dict[str, float] | None = None  # hash_both: when each side read its last block


def sha256sum(root: Path, rels: list[str], tag: str) -> Run:
    """``sha256sum FILES...`` in ``root``, output to /dev/null; its time, CPU and peak RSS
    (GNU time ``%M``; else ``os.wait4``'s rusage of the child)."""
    logs = RUN_DIR / "logs"
    timing, err = logs / f"{tag}.time", logs / f"{tag}.err"
    wrap = [GNU_TIME, "-f", "%M %U %S", "-o", str(timing)] if GNU_TIME else []
    with open(err, "wb") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen([*wrap, "sha256sum", "--", *rels], cwd=root,
                                stdout=subprocess.DEVNULL, stderr=err_f)
        if GNU_TIME:
            status = proc.wait()
            seconds = time.perf_counter() - t0
            rss, user, system = timing.read_text().split()[-3:]
            peak, cpu = int(rss), float(user) + float(system)
        else:
            _, wstatus, ru = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
            proc.returncode = status = os.waitstatus_to_exitcode(wstatus)
            peak, cpu = ru.ru_maxrss, ru.ru_utime + ru.ru_stime
    if status != 0:
        raise BenchError(f"{tag}: sha256sum exit status {status}: {err.read_text()[-2000:]}")
    return Run(seconds, cpu, peak, [])


def sha256sum_both(source: Path, disk: Path, rels: list[str], tag: str) -> Run:
    """The baseline of hash_both: sha256sum of the server's files, then of the disk's."""
    a = sha256sum(source, rels, f"{tag}-source")
    b = sha256sum(disk, rels, f"{tag}-disk")
    cpu = a.cpu_s + b.cpu_s if a.cpu_s is not None and b.cpu_s is not None else None
    return Run(a.seconds + b.seconds, cpu, max(a.rss_kib or 0, b.rss_kib or 0) or None, [],
               side_s={"source": a.seconds, "disk": b.seconds})


def reference(root: Path, rels: list[str]) -> str:
    """The fingerprint of sha256sum's output (untimed): what every run must reproduce."""
    out = subprocess.run(["sha256sum", "--", *rels], cwd=root, capture_output=True,
                         check=True).stdout
    return hashlib.sha256(out).hexdigest()


def ours(kind: str, rels_file: Path, root: Path, disk_root: Path | None = None) -> Run:
    """Run our hashing in a child process (``--worker``), which times itself."""
    spec = RUN_DIR / "worker.json"
    spec.write_text(json.dumps({"kind": kind, "list": str(rels_file), "root": str(root),
                                "disk_root": str(disk_root) if disk_root else None}))
    proc = subprocess.run([str(PYTHON), str(Path(__file__).resolve()), "--worker", str(spec)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"worker ({kind}) failed, status {proc.returncode}:\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    r = json.loads(proc.stdout.splitlines()[-1])
    if r["errors"]:
        raise BenchError(f"worker ({kind}): files not hashed: {r['errors'][:5]}")
    return Run(r["seconds"], r["cpu_s"], r["rss_kib"], r["fingerprints"], r["rss_before_kib"],
               r["side_s"] or None)


def peak_rss_kib() -> int:
    """This process's peak RSS: VmHWM, which is this process image's own. Not
    ``getrusage(RUSAGE_SELF).ru_maxrss``: in a process started by exec it also counts the
    peak of the image exec replaced (here the benchmark, which forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(spec_path: str) -> int:
    """Child process: hash as the spec says, print one JSON line about it."""
    spec = json.loads(Path(spec_path).read_text())
    rels = Path(spec["list"]).read_text().splitlines()
    sides = [hashlib.sha256(), hashlib.sha256()]
    errors: list[str] = []
    rss_before = peak_rss_kib()  # the interpreter and the imports
    done: dict[str, float] = {}  # hash_both: when each side's thread read its last block

    def on_bytes(_n: int) -> None:  # as integrity.compare passes one (it counts bytes)
        done[threading.current_thread().name] = time.perf_counter()

    t0, c0 = time.perf_counter(), os.times()
    if spec["kind"] == "files":
        for h in hash_files(spec["root"], rels):
            if h.digest is None:
                errors.append(f"{h.rel}: {h.error}")
            sides[0].update(f"{h.digest}  {h.rel}\n".encode())
        sides.pop()
    else:
        for s, d in hash_both(spec["root"], spec["disk_root"], lambda: iter(rels),
                              on_bytes=on_bytes):
            for side, h in zip(sides, (s, d), strict=True):
                if h.digest is None:
                    errors.append(f"{h.rel}: {h.error}")
                side.update(f"{h.digest}  {h.rel}\n".encode())
    seconds, c1 = time.perf_counter() - t0, os.times()
    print(json.dumps({
        "seconds": seconds,
        "cpu_s": (c1.user - c0.user) + (c1.system - c0.system),
        "rss_kib": peak_rss_kib(),
        "rss_before_kib": rss_before,
        "side_s": {name.removeprefix("hash-"): t - t0 for name, t in sorted(done.items())},
        "fingerprints": [side.hexdigest() for side in sides],
        "errors": errors,
    }))
    return 0


def check(run: Run, expected: str, what: str) -> Run:
    bad = [fp for fp in run.fingerprints if fp != expected]
    if bad:
        raise BenchError(f"{what}: the digests differ from sha256sum's")
    return run


def median(runs: list[Run], key: str = "seconds") -> float:
    values = [getattr(r, key) for r in runs]
    if any(v is None for v in values):
        raise BenchError(f"median of {key}: a run has no value")
    return float(statistics.median(values))


# 1. one side, one core ---------------------------------------------------------------

def measure_one_side(hs: dict[str, Any], rels_file: Path, repeats: int,
                     expected: str) -> dict[str, Any]:
    rels: list[str] = hs["rels"]
    runs: dict[str, dict[str, list[Run]]] = {c: {"sha256sum": [], "ours": []}
                                             for c in ("warm", "cold")}
    for i in range(repeats):
        order = ("sha256sum", "ours") if i % 2 == 0 else ("ours", "sha256sum")
        for cache in ("warm", "cold"):
            if cache == "warm":
                warm(HASHSET, rels)  # read once first: the runs compare CPU speed
            for tool in order:
                if cache == "cold":
                    drop_caches()
                if tool == "sha256sum":
                    r = sha256sum(HASHSET, rels, f"one-{cache}{i}")
                else:
                    r = check(ours("files", rels_file, HASHSET), expected, "hash_files")
                runs[cache][tool].append(r)
                print(f"  1. one side {cache:<4} {tool:<9} {r.seconds:7.2f} s "
                      f"{hs['bytes'] / MB / r.seconds:8.0f} MB/s")
    out: dict[str, Any] = {}
    for cache, by_tool in runs.items():
        mbs = {tool: hs["bytes"] / MB / median(rs) for tool, rs in by_tool.items()}
        out[cache] = {"ours_mb_s": mbs["ours"], "sha256sum_mb_s": mbs["sha256sum"],
                      "ratio": mbs["ours"] / mbs["sha256sum"],
                      "runs": {t: [asdict(r) for r in rs] for t, rs in by_tool.items()}}
    out["ours_rss_kib"] = max(r.rss_kib or 0 for c in runs.values() for r in c["ours"])
    out["ours_rss_before_kib"] = max(r.rss_before_kib or 0 for c in runs.values()
                                     for r in c["ours"])
    out["sha256sum_rss_kib"] = max(r.rss_kib or 0 for c in runs.values()
                                   for r in c["sha256sum"]) or None
    return out


# 2. both sides at once ------------------------------------------------------------------

def setup_hash_disk(disk: Disk, hs: dict[str, Any]) -> tuple[Path, dict[str, float]]:
    """An exFAT image (direct I/O on the loop device: no cache of the image file in between)
    with a copy of the hash set made by rsync, as a backup would."""
    bp.make_disk(disk, max(3 * GIB, int(hs["bytes"] * 1.25) + GIB // 2))
    bp.sh("losetup", "--direct-io=on", disk.device)
    dio = Path("/sys/block") / Path(disk.device).name / "loop" / "dio"
    if dio.read_text().strip() != "1":
        raise BenchError(f"{disk.device}: direct I/O did not turn on")
    target = disk.mount / "immich-server-backups" / "library"
    drop_caches()
    before = buffers_mb()
    print(f"  copying the hash set onto {disk.device} (exFAT via exfat-fuse)")
    t0 = time.perf_counter()
    subprocess.run([*rsync_base_args(), "--recursive", f"{HASHSET}/", f"{target}/"],
                   check=True, stdout=subprocess.DEVNULL)
    os.sync()
    copy_s = time.perf_counter() - t0
    after = buffers_mb()
    if bp.tree_stats(target) != (len(hs["rels"]), hs["bytes"]):
        raise BenchError(f"the copy on {target} does not match the hash set")
    return target, {"copy_s": copy_s, "buffers_before_mb": before, "buffers_after_mb": after}


def fuse_pid(mount: Path) -> int:
    """The exfat-fuse process serving ``mount``."""
    want = os.fsencode(str(mount))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in args and b"exfat" in args[0]:
            return int(entry.name)
    raise BenchError(f"no exfat-fuse process serves {mount}")


def process_cpu_s(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def device_read_mb(device: str) -> float:
    """MB read from a block device so far (its sectors read, /sys/block/*/stat)."""
    return int((Path("/sys/block") / Path(device).name / "stat").read_text().split()[2]) \
        * 512 / MB


def drop_device_cache(device: str) -> None:
    """posix_fadvise(DONTNEED) on the block device: drops its clean cached pages."""
    fd = os.open(device, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


BOTH_CASES = ("cold", "source warm")  # sha256sum vs ours
AFTER_COPY = ("after copy", "after copy, device cache dropped")  # ours only


def measure_both(hs: dict[str, Any], rels_file: Path, disk: Disk, disk_root: Path,
                 repeats: int, expected: str) -> dict[str, Any]:
    """Per repeat (tools interleaved, alternating who goes first):

    - cold: caches dropped before each run;
    - source warm: caches dropped, the server's files read once, then the run;
    - after copy (hash_both only): caches dropped, both sides read once (through
      exfat-fuse, which fills the block device's cache as its writes after a copy do),
      then the run; and the same with the block device's cache dropped before the run
      (``posix_fadvise(DONTNEED)`` on the device, what a fix would do).

    Around every run: MB read from the disk's loop device, and exfat-fuse's CPU time.
    """
    rels: list[str] = hs["rels"]
    pid = fuse_pid(disk.mount)
    runs: dict[str, dict[str, list[Run]]] = {c: {"sha256sum": [], "ours": []}
                                             for c in BOTH_CASES}
    runs |= {c: {"ours": []} for c in AFTER_COPY}
    extra: dict[str, dict[str, list[dict[str, float]]]] = {
        c: {t: [] for t in by_tool} for c, by_tool in runs.items()}

    def one(case: str, tool: str, i: int) -> None:
        buffers = buffers_mb()
        read0, fuse0 = device_read_mb(disk.device), process_cpu_s(pid)
        if tool == "sha256sum":
            r = sha256sum_both(HASHSET, disk_root, rels, f"both-{i}")
        else:
            r = check(ours("both", rels_file, HASHSET, disk_root), expected, "hash_both")
        sides = r.side_s or {}
        if set(sides) != {"source", "disk"}:
            raise BenchError(f"{case} {tool}: no time for each side: {sides}")
        more = {"device_read_mb": device_read_mb(disk.device) - read0,
                "fuse_cpu_per_wall": (process_cpu_s(pid) - fuse0) / r.seconds,
                "buffers_before_mb": buffers, "source_s": sides["source"],
                "disk_s": sides["disk"]}
        runs[case][tool].append(r)
        extra[case][tool].append(more)
        cpu = f"CPU/wall {r.cpu_s / r.seconds:.2f}" if r.cpu_s is not None else ""
        print(f"  2. both sides {case:<32} {tool:<9} {r.seconds:6.2f} s (source "
              f"{sides['source']:.2f}, disk {sides['disk']:.2f})  {cpu}, exfat-fuse "
              f"{more['fuse_cpu_per_wall']:.2f}; read from the device "
              f"{more['device_read_mb']:5.0f} MB")

    for i in range(repeats):
        order = ("sha256sum", "ours") if i % 2 == 0 else ("ours", "sha256sum")
        for case in BOTH_CASES:
            for tool in order:
                drop_caches()
                if case == "source warm":
                    warm(HASHSET, rels)
                one(case, tool, i)
        for case in AFTER_COPY if i % 2 == 0 else AFTER_COPY[::-1]:
            drop_caches()
            warm(HASHSET, rels)
            warm(disk_root, rels)
            if case != "after copy":
                drop_device_cache(disk.device)
            one(case, "ours", i)
    out: dict[str, Any] = {}
    for case, by_tool in runs.items():
        row: dict[str, Any] = {"ours_s": median(by_tool["ours"])}
        if "sha256sum" in by_tool:
            row["sha256sum_s"] = median(by_tool["sha256sum"])
            row["ratio"] = row["ours_s"] / row["sha256sum_s"]
        row["ours_cpu_per_wall"] = statistics.median(
            (r.cpu_s or 0) / r.seconds for r in by_tool["ours"])
        for key in ("device_read_mb", "fuse_cpu_per_wall", "buffers_before_mb", "source_s",
                    "disk_s"):
            row[f"ours_{key}"] = statistics.median(m[key] for m in extra[case]["ours"])
        row["runs"] = {t: [asdict(r) | m for r, m in zip(rs, extra[case][t], strict=True)]
                       for t, rs in by_tool.items()}
        out[case] = row
    out["ours_rss_kib"] = max(r.rss_kib or 0 for c in runs.values() for r in c["ours"])
    out["ours_rss_before_kib"] = max(r.rss_before_kib or 0 for c in runs.values()
                                     for r in c["ours"])
    return out


# 3. manifest on vs off, real CLI --------------------------------------------------------

SETTINGS = ("on", "off")


def write_config(setting: str) -> Path:
    state = RUN_DIR / f"state-{setting}"
    state.mkdir(parents=True)
    config = RUN_DIR / f"config-{setting}.toml"
    config.write_text(f'[immich]\nupload_location = "{LIBRARY}"\n\n[database]\nenabled = true'
                      '\n\n[config_backup]\nenabled = false\n\n'
                      f'[library]\nmanifest = {"true" if setting == "on" else "false"}\n\n'
                      f'[state]\ndir = "{state}"\n')
    return config


def cli_run(config: Path, disk: Disk, tag: str) -> tuple[float, int]:
    """One ``run`` of the real CLI, timed until it exited and a following sync() returned;
    returns (seconds, files copied)."""
    logs = RUN_DIR / "logs"
    out, err = logs / f"{tag}.out", logs / f"{tag}.err"
    argv = [str(PYTHON), "-m", "immich_usb_backup", "-c", str(config), "run", str(disk.mount)]
    with open(out, "wb") as out_f, open(err, "wb") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out_f, stderr=err_f, start_new_session=True)
        RUNNING.append(proc)
        proc.wait()
        os.sync()
        seconds = time.perf_counter() - t0
        RUNNING.remove(proc)
    stdout = out.read_text(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"{tag}: exit status {proc.returncode}\n{stdout[-2000:]}\n"
                         f"{err.read_text(errors='replace')[-2000:]}")
    m = re.search(r"copied:\s+(\d+) files", stdout)
    if not m:
        raise BenchError(f"{tag}: no 'copied:' line in the output:\n{stdout[-2000:]}")
    return seconds, int(m.group(1))


def manifest_state(disk: Disk) -> tuple[int, int] | None:
    try:
        st = os.stat(disk.mount / "immich-server-backups" / manifest.NAME)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def timed_run(setting: str, config: Path, disk: Disk, tag: str, new_rel: str | None) -> float:
    """A run that must be a no-change run (``new_rel`` None) or copy exactly ``new_rel``;
    checks that the manifest was left alone, rewritten, or is absent, as it must."""
    before = manifest_state(disk)
    seconds, copied = cli_run(config, disk, tag)
    after = manifest_state(disk)
    want = 0 if new_rel is None else 1
    if copied != want:
        raise BenchError(f"{tag}: copied {copied} files, expected {want}")
    if setting == "off" and after is not None:
        raise BenchError(f"{tag}: manifest = false, but {manifest.NAME} is on the disk")
    if setting == "on":
        if after is None:
            raise BenchError(f"{tag}: manifest = true, but no {manifest.NAME} on the disk")
        if new_rel is None and after != before:
            raise BenchError(f"{tag}: a no-change run rewrote {manifest.NAME}")
        if new_rel is not None:
            text = (disk.mount / "immich-server-backups" / manifest.NAME).read_text()
            if f"  {manifest.PREFIX}{new_rel}\n" not in text:
                raise BenchError(f"{tag}: {new_rel} is not in the rewritten manifest")
    return seconds


def measure_manifest(disks: dict[str, Disk], lib: dict[str, Any], repeats: int,
                     seed: int) -> dict[str, Any]:
    configs = {s: write_config(s) for s in SETTINGS}
    size = max(3 * GIB, int(lib["bytes"] * 1.5) + GIB)
    for s in SETTINGS:
        bp.make_disk(disks[s], size)
        t0 = time.perf_counter()
        _, copied = cli_run(configs[s], disks[s], f"first-{s}")
        print(f"  3. first backup, manifest {s:<3}: {copied} files, "
              f"{time.perf_counter() - t0:.1f} s")
        if copied < lib["files"]:
            raise BenchError(f"first backup with manifest {s}: copied {copied} files of "
                             f"{lib['files']}")
        timed_run(s, configs[s], disks[s], f"warmup-{s}", None)  # untimed: steady state
    same: dict[str, list[float]] = {s: [] for s in SETTINGS}
    new: dict[str, list[float]] = {s: [] for s in SETTINGS}
    rng = random.Random(seed)  # noqa: S311
    for i in range(repeats):
        order = SETTINGS if i % 2 == 0 else SETTINGS[::-1]
        for s in order:
            same[s].append(timed_run(s, configs[s], disks[s], f"same{i}-{s}", None))
            print(f"  3. no change  manifest {s:<3} {same[s][-1]:7.2f} s")
    for i in range(repeats):  # a new file each round: each run copies exactly one
        order = SETTINGS if i % 2 == 0 else SETTINGS[::-1]
        rel = f"{NEW_DIR}/new-{i}.jpg"
        (LIBRARY / NEW_DIR).mkdir(parents=True, exist_ok=True)
        (LIBRARY / rel).write_bytes(rng.randbytes(5 * 10**6))
        for s in order:
            new[s].append(timed_run(s, configs[s], disks[s], f"new{i}-{s}", rel))
            print(f"  3. one new    manifest {s:<3} {new[s][-1]:7.2f} s")
    out: dict[str, Any] = {}
    for name, data in (("no change", same), ("one new file", new)):
        on, off = (statistics.median(data[s]) for s in SETTINGS)
        out[name] = {"on_s": on, "off_s": off, "ratio": on / off, "runs": data}
    return out


# report ---------------------------------------------------------------------------------

def verdict(ratio: float, target: float, at_least: bool) -> str:
    return "PASS" if (ratio >= target if at_least else ratio <= target) else "OVER"


def summary_lines(res: dict[str, Any]) -> list[str]:
    one, both, man = res["one_side"], res["both_sides"], res["manifest"]
    hs = res["hash_set"]
    lines = [
        f"summary ({res['finished_at']}, {res['machine']})",
        f"hash set: {hs['files']} files, {hs['bytes'] / MB:.0f} MB ({hs['photos']} photos of "
        f"2-8 MiB, {hs['videos']} video(s) of ~100 MB); library: {res['library']['files']} "
        f"files, {res['library']['bytes'] / MB:.0f} MB; medians of {res['repeats']} "
        "interleaved runs",
        "",
        f"{'measurement':<44} {'ours':>10} {'bare':>10} {'ratio':>7} {'target':>8}  result",
    ]

    def row(name: str, a: float, b: float, unit: str, ratio: float, target: str,
            result: str) -> None:
        lines.append(f"{name:<44} {a:>7.2f}{unit:>3} {b:>7.2f}{unit:>3} {ratio:>7.3f} "
                     f"{target:>8}  {result}")

    w, c = one["warm"], one["cold"]
    row("1. one side, warm cache (MB/s)", w["ours_mb_s"], w["sha256sum_mb_s"], "", w["ratio"],
        f">= {TARGET_WARM:.2f}", verdict(w["ratio"], TARGET_WARM, at_least=True))
    row("1. one side, cold cache (MB/s)", c["ours_mb_s"], c["sha256sum_mb_s"], "", c["ratio"],
        "-", "info")
    for case in ("cold", "source warm"):
        b = both[case]
        row(f"2. both sides, {case} (s)", b["ours_s"], b["sha256sum_s"],
            " s", b["ratio"], "-", "info")
    for name in ("no change", "one new file"):
        m = man[name]
        target = f"<= {TARGET_MANIFEST:.2f}" if name == "no change" else "-"
        result = verdict(m["ratio"], TARGET_MANIFEST, at_least=False) \
            if name == "no change" else "info"
        row(f"3. {name}, manifest on / off (s)", m["on_s"], m["off_s"], " s", m["ratio"],
            target, result)
    lines += [
        "",
        "1. bare: sha256sum FILES... > /dev/null; ours: hashing.hash_files, consumed to the end",
        "2. bare: sha256sum of the server's files, then of the disk's; ours: hashing.hash_both",
        "   (one thread a side). The disk: an exFAT image, exfat-fuse, loop device with direct",
        "   I/O, on the same virtual disk as the server's files.",
        "3. the real CLI (python -m immich_usb_backup run), quick mode, one disk image per",
        "   setting, each backed up once before; seconds until it exited and sync() returned",
        "",
        f"{'2. hash_both (medians)':<35} {'seconds':>7} {'source':>6} {'disk':>6} "
        f"{'CPU/wall':>8} {'exfat-fuse':>10} {'dev. read':>9} {'dev. cache':>10}",
    ]
    for case in (*BOTH_CASES, *AFTER_COPY):
        b = both[case]
        lines.append(f"   {case:<32} {b['ours_s']:>7.2f} {b['ours_source_s']:>6.2f} "
                     f"{b['ours_disk_s']:>6.2f} {b['ours_cpu_per_wall']:>8.2f} "
                     f"{b['ours_fuse_cpu_per_wall']:>10.2f} {b['ours_device_read_mb']:>6.0f} MB "
                     f"{b['ours_buffers_before_mb']:>7.0f} MB")
    ac, fixed = both["after copy"], both["after copy, device cache dropped"]
    lines += [
        "   source, disk: seconds until that side's thread read its last block; CPU/wall: our",
        "   process's CPU time / wall time (> 1.5: both cores busy); exfat-fuse: the same for",
        "   the FUSE daemon; dev. read: MB read from the loop device during the run; dev.",
        "   cache: the block devices' page cache (Buffers in /proc/meminfo) before the run.",
        "   hash_both drops the disk side's page cache per file (posix_fadvise DONTNEED on the",
        "   file), so in the cold and source-warm runs the disk side is read from the device.",
        f"   After a copy it is not: the copy left {res['copy']['buffers_after_mb']:.0f} MB in "
        "the block device's cache",
        "   (exfat-fuse reads and writes through it), DONTNEED on the FUSE file does not drop",
        f"   that, and hash_both read {ac['ours_device_read_mb']:.0f} MB from the device "
        f"({fixed['ours_device_read_mb']:.0f} MB once the device's",
        "   cache was dropped first).",
    ]
    how = "GNU time %M" if GNU_TIME else "os.wait4 ru_maxrss, an upper bound"
    lines += [
        "",
        "peak RSS while hashing: ours (VmHWM of the worker) hash_files "
        f"{one['ours_rss_kib'] / KIB:.1f} MiB, hash_both {both['ours_rss_kib'] / KIB:.1f} MiB,",
        f"   of which {one['ours_rss_before_kib'] / KIB:.1f} MiB before hashing started "
        f"(Python and the imports; BLOCK = {BLOCK // KIB} KiB a side);",
        f"   sha256sum {(one['sha256sum_rss_kib'] or 0) / KIB:.1f} MiB ({how})",
    ]
    return lines


def _terminate(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    p = argparse.ArgumentParser(description="Time verify hashing and the manifest against "
                                            "bare sha256sum.")
    p.add_argument("--hash-gb", type=float, help="GB hashed in 1. and 2. (default 1.5)")
    p.add_argument("--videos", type=int, help="~100 MB videos in the hash set (default 3)")
    p.add_argument("--files", type=int, help="files in the library of 3. (default 20000)")
    p.add_argument("--lib-gb", type=float, help="size of the library of 3. (default 1.0)")
    p.add_argument("--small", action="store_true",
                   help="quick check: 0.3 GB hash set, 1 video, 2000-file library")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (default 3)")
    p.add_argument("--seed", type=int, default=1, help="seed of the generators")
    p.add_argument("--keep", action="store_true",
                   help=f"keep what is in {WORK}: the generated data (reused next time), "
                   "the disk images and the logs")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    hash_gb = args.hash_gb or (0.3 if args.small else 1.5)
    videos = args.videos if args.videos is not None else (1 if args.small else 3)
    files = args.files or (2000 if args.small else 20_000)
    lib_gb = args.lib_gb or (0.1 if args.small else 1.0)
    if min(files, args.repeats) < 1 or videos < 0 or min(hash_gb, lib_gb) <= 0:
        p.error("sizes and counts must be positive")
    if videos * 0.11 > hash_gb:
        p.error("--videos: that many ~100 MB videos do not fit in --hash-gb")
    if os.geteuid() != 0:
        print("bench: run as root (loop devices, mounts, drop_caches)", file=sys.stderr)
        return 2
    tools = ("sha256sum", "cat", "rsync", "mkfs.exfat", "mount.exfat-fuse", "losetup",
             "umount")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing or not PYTHON.exists():
        print(f"bench: not found: {', '.join(missing) or PYTHON}; run tools/setup",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    WORK.mkdir(parents=True, exist_ok=True)
    disks = {name: Disk(f"IUBV{name.upper()}", WORK / f"disk-{name}.img", WORK / f"mnt-{name}")
             for name in ("hash", *SETTINGS)}
    started = time.perf_counter()
    try:
        for disk in disks.values():
            bp.teardown(disk)  # leftovers of a run killed hard
        shutil.rmtree(RUN_DIR, ignore_errors=True)
        (RUN_DIR / "logs").mkdir(parents=True)
        hs = build_hashset(hash_gb, videos, args.seed)
        rels_file = RUN_DIR / "hashset.list"
        rels_file.write_text("".join(f"{r}\n" for r in hs["rels"]))
        lib = build_library(files, lib_gb, args.seed)
        lib_files, lib_bytes = bp.tree_stats(LIBRARY)

        print("1. one side, one core: sha256sum FILES... vs hash_files")
        warm(HASHSET, hs["rels"])
        expected = reference(HASHSET, hs["rels"])
        one = measure_one_side(hs, rels_file, args.repeats, expected)

        print("2. both sides at once: sha256sum source; sha256sum disk vs hash_both")
        disk_root, copy = setup_hash_disk(disks["hash"], hs)
        both = measure_both(hs, rels_file, disks["hash"], disk_root, args.repeats, expected)
        bp.teardown(disks["hash"])

        print(f"3. manifest on vs off: no-change runs of the CLI, {lib_files} files")
        man = measure_manifest({s: disks[s] for s in SETTINGS}, lib, args.repeats, args.seed)

        cpu = next((line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "?")
        res: dict[str, Any] = {
            "finished_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": f"{os.cpu_count()} cores ({cpu}), Linux {os.uname().release}",
            "repeats": args.repeats,
            "hash_set": {"files": len(hs["rels"]), "bytes": hs["bytes"],
                         "photos": hs["photos"], "videos": hs["videos"]},
            "library": {**lib, "files": lib_files, "bytes": lib_bytes},
            "copy": copy, "one_side": one, "both_sides": both, "manifest": man,
            "sha256sum": bp.sh("sha256sum", "--version").splitlines()[0],
            "bench_seconds": time.perf_counter() - started,
        }
        print("\n" + "\n".join(summary_lines(res)))
        print(f"\nwhole benchmark: {res['bench_seconds']:.0f} s")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(res, indent=2) + "\n")
        print(f"results: {RESULTS}" + (f"; logs: {RUN_DIR / 'logs'}" if args.keep else ""))
        return 0
    except KeyboardInterrupt:
        print("\nbench: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        for proc in RUNNING:
            bp.stop(proc)
        for disk in disks.values():
            bp.teardown(disk)
            if not args.keep:
                disk.image.unlink(missing_ok=True)
                if disk.mount.is_dir() and not bp.is_mounted(disk.mount):
                    disk.mount.rmdir()
        shutil.rmtree(LIBRARY / NEW_DIR, ignore_errors=True)
        if not args.keep:
            for path in (HASHSET, LIBRARY, RUN_DIR):
                shutil.rmtree(path, ignore_errors=True)
            for path in (HASHSET_STAMP, LIBRARY_STAMP):
                path.unlink(missing_ok=True)
            if WORK.is_dir() and not any(WORK.iterdir()):
                WORK.rmdir()


if __name__ == "__main__":
    sys.exit(main())
