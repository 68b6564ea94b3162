"""Benchmark the web UI with the real daemon: page time, event rate, idle cost.

Brings up the tests' real stack (system D-Bus, udevd, UDisks2), writes a history of
``--runs`` runs (2,000) onto ``--disks`` approved disks, starts ``immich-usb-backup
daemon`` and ``immich-usb-backup web`` (as they run in production: two processes, the
control socket between them), logs in over HTTP, then:

1. pages: ``--requests`` GETs (50) of ``/`` and of ``/history``, and of the static style
   sheet as the floor (the same HTTP round trip, no work); median and 95th percentile,
   and each page's median as a ratio of the floor's; then ``/history`` right after each
   of 5 new runs (the history file changed: its new line is read). Target: a page
   under 50 ms;
2. idle: with no page open, samples both processes' CPU time and memory from /proc for
   ``--idle`` seconds (30). Targets: 0.0 % CPU, the two together under 80 MB (their
   proportional set size, PSS: what they cost the machine together; their RSS, which
   counts the libraries both map twice, is printed too);
3. events: a backup by hand (``run`` onto an exFAT image mounted here, rsync limited to
   ``--bwlimit`` KiB/s so that it lasts) while ``/api/events`` is read; the gaps between
   status events while the run is on. Target: at least two a second (every gap under
   0.5 s).

Run as root: ``sudo .venv/bin/python bench/bench_web.py`` (``--runs 200 --idle 5`` for a
quick look). Memory is printed in MiB (what /proc counts) and in MB of 10^6 bytes (the
target's). Results also go to bench/results/web.json.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import stack as st  # noqa: E402 - the tests' stack helpers
from bench_daemon import make_library, proc_cpu_s, proc_rss_mb  # noqa: E402
from immich_usb_backup import approvals, clock, history  # noqa: E402
from immich_usb_backup.record import RunRecord  # noqa: E402
from immich_usb_backup.web import security  # noqa: E402

PASSWORD = "benchmark password"  # noqa: S105 - the benchmark's own


def write_history(state: Path, runs: int, disks: int) -> None:
    """``runs`` runs, one every 8 hours up to now, over ``disks`` approved disks, a few
    partial or failed with problems (as the page shows them)."""
    now = clock.now()
    for d in range(disks):
        approvals.add(state, approvals.Approval(f"AAAA-{d:04d}", f"Disk {d}",
                                                clock.iso(now - timedelta(days=900))))
    statuses = ["success"] * 8 + ["partial", "failed"]
    for i in range(runs):
        started = now - timedelta(hours=8 * (runs - i))
        status = statuses[i % len(statuses)]
        history.append(state, RunRecord.from_dict({
            "started_at": clock.iso(started), "finished_at": clock.iso(started),
            "status": status, "trigger": "plug", "mode": "quick",
            "disk": {"uuid": f"AAAA-{i % disks:04d}", "label": f"Disk {i % disks}"},
            "files_transferred": 1000 + i, "bytes_transferred": 10_000_000 * i,
            "duration_s": 95.0, "problems": [] if status == "success" else
            [f"problem {k} of run {i}" for k in range(4)],
            "disk_free_bytes": 10**12, "disk_size_bytes": 2 * 10**12,
            "steps": {"library": {"files": 3, "bytes": 4, "source_files": 40000 + i}}}))


def write_history_run(state: Path, i: int) -> None:
    when = clock.iso(clock.now())
    history.append(state, RunRecord.from_dict({
        "started_at": when, "finished_at": when, "status": "success", "trigger": "plug",
        "mode": "quick", "disk": {"uuid": "AAAA-0000", "label": "Disk 0"},
        "files_transferred": i, "bytes_transferred": i, "duration_s": 1.0, "problems": []}))


class Web:
    """An HTTP client with the session cookie and the CSRF token."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookie = ""
        self.csrf = ""

    def request(self, method: str, path: str, body: dict[str, object] | None = None,
                ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Cookie": self.cookie, "X-CSRF-Token": self.csrf}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        out = r.read()
        if r.getheader("Set-Cookie"):
            self.cookie = r.getheader("Set-Cookie", "").split(";")[0]
        conn.close()
        return r.status, out

    def login(self) -> None:
        status, body = self.request("POST", "/api/login", {"password": PASSWORD})
        assert status == 200, body
        self.csrf = json.loads(body)["csrf"]

    def timed(self, path: str, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            status, _ = self.request("GET", path)
            out.append((time.perf_counter() - t0) * 1000)
            assert status == 200, (path, status)
        return out


def events(port: int, cookie: str, stamps: list[float], stop: threading.Event) -> None:
    """Read /api/events; note the time of each status event of a running backup."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/api/events", headers={"Cookie": cookie})
    r = conn.getresponse()
    while not stop.is_set():
        line = r.fp.readline()
        if not line:
            return
        if line.startswith(b"data: ") and json.loads(line[6:]).get("state") == "running":
            stamps.append(time.monotonic())
    conn.close()


def proc_pss_mb(pid: int) -> float:
    """Proportional set size: shared pages divided among the processes that map them."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def summary(name: str, ms: list[float], floor: float) -> str:
    ms = sorted(ms)
    med = statistics.median(ms)
    p95 = ms[int(len(ms) * 0.95) - 1]
    return (f"  {name:<10} median {med:6.1f} ms  p95 {p95:6.1f} ms  "
            f"({med / floor:5.1f} x the static file)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--disks", type=int, default=3)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument("--bwlimit", type=int, default=4096, help="KiB/s for the run")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the real stack, loop devices, mounts)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-web-"))
    stack = st.Stack(work / "stack", work / "images")
    procs: list[subprocess.Popen[bytes]] = []
    mounted: Path | None = None
    loop = ""
    try:
        stack.start()
        upload = make_library(work)
        state = work / "state"
        port = free_port()
        config = work / "config.toml"
        config.write_text(
            f'[immich]\nupload_location = "{upload}"\n[config_backup]\nenabled = false\n'
            f'[library]\nbwlimit_kib = {args.bwlimit}\n[state]\ndir = "{state}"\n'
            f'[web]\nlisten = "127.0.0.1:{port}"\npassword_file = "{state}/pw"\n'
            f'socket = "{work}/run/control.sock"\n')
        write_history(state, args.runs, args.disks)
        security.write_password(state / "pw", PASSWORD, "immich-usb-backup")
        program = [sys.executable, "-m", "immich_usb_backup", "-c", str(config)]
        env = stack.env
        for command, ready in (("daemon", work / "run" / "control.sock"), ("web", None)):
            log = open(work / f"{command}.log", "wb")  # noqa: SIM115 - lives with it
            procs.append(subprocess.Popen([*program, command], env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
            st.wait_for(lambda r=ready: (r.exists() if r else _answers(port)),
                        f"the {command}", 60)
        web = Web(port)
        web.login()
        print(f"history: {args.runs} runs on {args.disks} disks")

        floor_ms = web.timed("/static/style.css", args.requests)
        floor = statistics.median(floor_ms)
        print("pages (GET, logged in; target: under 50 ms):")
        print(summary("static", floor_ms, floor))
        out: dict[str, object] = {"runs": args.runs, "requests": args.requests,
                                  "static_ms": floor_ms}
        for path in ("/", "/history"):
            out[f"{path}_ms"] = page_ms = web.timed(path, args.requests)
            print(summary(path, page_ms, floor))
        cold = []
        for i in range(5):  # a new run: the web UI reads the new line only
            write_history_run(state, i)
            cold += web.timed("/history", 1)
        print(f"  /history right after each new run: median "
              f"{statistics.median(cold):.1f} ms, longest {max(cold):.1f} ms")
        out["/history_after_a_run_ms"] = cold

        time.sleep(2)  # the page requests' work settles
        cpu0 = [proc_cpu_s(p.pid) for p in procs]
        time.sleep(args.idle)
        cpu = sum(proc_cpu_s(p.pid) - c for p, c in zip(procs, cpu0, strict=True))
        rss = [proc_rss_mb(p.pid) for p in procs]
        pss = [proc_pss_mb(p.pid) for p in procs]
        mb = 2**20 / 1e6  # /proc counts KiB; the target is in MB of 10^6 bytes
        print(f"idle, no page open ({args.idle:g} s): CPU {100 * cpu / args.idle:.2f} % "
              f"(target 0.0)\n  memory (target: under 80 MB together): PSS daemon "
              f"{pss[0]:.1f} MiB + web {pss[1]:.1f} MiB = {sum(pss):.1f} MiB, "
              f"{sum(pss) * mb:.1f} MB ({'PASS' if sum(pss) * mb < 80 else 'OVER'}); RSS "
              f"{rss[0]:.1f} + {rss[1]:.1f} = {sum(rss):.1f} MiB, {sum(rss) * mb:.1f} MB "
              f"({'PASS' if sum(rss) * mb < 80 else 'OVER'}; RSS counts the libraries both "
              "map, libpython and OpenSSL among them, twice)")
        out.update(idle_s=args.idle, idle_cpu_percent=100 * cpu / args.idle,
                   pss_mib={"daemon": pss[0], "web": pss[1]},
                   rss_mib={"daemon": rss[0], "web": rss[1]})

        image = work / "disk.img"  # not under the stack's USB images: the daemon ignores it
        with open(image, "wb") as f:
            f.truncate(512 * 1024 * 1024)
        subprocess.run(["mkfs.exfat", "-L", "Bench", str(image)], check=True,
                       capture_output=True)
        loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                              capture_output=True, text=True).stdout.strip()
        mounted = work / "mnt"
        mounted.mkdir()
        tool = ["mount.exfat-fuse"] if shutil.which("mount.exfat-fuse") else ["mount"]
        subprocess.run([*tool, loop, str(mounted)], check=True, capture_output=True)
        (mounted / "immich-server-backups").mkdir()
        stamps: list[float] = []
        stop = threading.Event()
        reader = threading.Thread(target=events, args=(port, web.cookie, stamps, stop),
                                  daemon=True)
        reader.start()
        subprocess.run([*program, "run", str(mounted)], env=env, capture_output=True,
                       check=False)
        stop.set()
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        out["event_gaps_s"] = gaps
        if gaps:
            print(f"events during a run of {stamps[-1] - stamps[0]:.1f} s: {len(stamps)}, "
                  f"{len(stamps) / max(stamps[-1] - stamps[0], 0.001):.1f} a second; "
                  f"gaps median {statistics.median(gaps):.2f} s, longest {max(gaps):.2f} s "
                  "(target: under 0.5)")
        else:
            print("events: none seen during the run (too short? raise --bwlimit's effect "
                  "with a smaller value)")
        results = REPO / "bench" / "results" / "web.json"
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(out, indent=2) + "\n")
        print(f"results: {results}")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], check=False, capture_output=True)
            st.wait_for(lambda: not st.fuse_helpers_running(loop), "exfat-fuse", 30)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
