"""Benchmark the daemon on the real stack: plug-to-first-byte latency, idle cost.

Brings up the same stack as the end-to-end tests (system D-Bus, udevd, UDisks2, a
test-only rule making loop devices look like USB disks), starts
``immich-usb-backup daemon``, then:

1. idle: samples the daemon's CPU time and RSS from /proc for ``--idle`` seconds (60);
2. latency, ``--plugs`` times (5): adds a photo to the library, attaches a partitioned
   exFAT image (``partx -a``: udev announces the partition as for a USB stick) and
   measures from the udev ``add`` event, seen by this process's own udev monitor, to the
   disk being mounted and to rsync starting to copy (the daemon's log times, same
   clock), mount, marker check and preflight included; then waits for the history record
   and the unmount, and unplugs the disk.

Targets: first byte < 2 s after the event, idle CPU 0.0 %, idle RSS < 60 MB.
Run as root: ``sudo .venv/bin/python bench/bench_daemon.py``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pyudev

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import stack as st  # noqa: E402 - the tests' stack helpers
from immich_usb_backup import history  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_library(root: Path) -> Path:
    upload = root / "immich"
    for folder in ("upload", "library", "profile", "thumbs", "encoded-video", "backups"):
        (upload / folder).mkdir(parents=True)
        (upload / folder / ".immich").write_bytes(b"")
    photos = upload / "upload" / "user" / "ab"
    photos.mkdir(parents=True)
    for i in range(200):
        (photos / f"IMG_{i:04d}.jpg").write_bytes(os.urandom(200_000))
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    dump = upload / "backups" / f"immich-db-backup-{stamp}-v1.130.0-pg14.17.sql.gz"
    dump.write_bytes(gzip.compress(b"-- PostgreSQL database dump complete\n"))
    return upload


def wait_ready(s: socket.socket) -> None:
    s.settimeout(30)
    try:
        while b"READY=1" not in s.recv(4096):
            pass
    finally:
        s.close()


def _log_time(line: str) -> float:
    stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def first_byte_latency(image: st.Image, state: Path, monitor: pyudev.Monitor,
                       daemon_log: Path, upload: Path, n: int) -> tuple[float, float]:
    """Plug ``image`` (after adding a photo, so there is something to copy); return the
    seconds from the udev event to the disk mounted and to rsync copying."""
    (upload / "upload" / "user" / "ab" / f"NEW_{n:04d}.jpg").write_bytes(os.urandom(2_000_000))
    before = len(history.last_records(state, None))
    log_size = daemon_log.stat().st_size
    plugged = st.plug(image)
    try:
        return _time_plug(plugged, state, monitor, daemon_log, before, log_size)
    finally:
        if st.is_mounted(plugged.device):
            subprocess.run(["umount", plugged.device], check=False)
        plugged.pull()


def _time_plug(plugged: st.Plug, state: Path, monitor: pyudev.Monitor, daemon_log: Path,
               before: int, log_size: int) -> tuple[float, float]:
    t_event = None
    while t_event is None:
        dev = monitor.poll(timeout=10)
        if dev is None:
            raise RuntimeError("no udev event for the plugged disk")
        if dev.action in ("add", "change") and dev.device_node == plugged.device:
            t_event = time.time()
    st.wait_for(lambda: len(history.last_records(state, None)) > before, "the record", 120)
    rec = history.last_records(state, 1)[0]
    if rec["status"] != "success" or rec["steps"]["library"]["files"] < 1:
        raise RuntimeError(f"backup {rec['status']}: {rec['problems']} {rec['steps']}")
    with open(daemon_log, "rb") as f:
        f.seek(log_size)
        lines = f.read().decode(errors="replace").splitlines()
    mounted = next(_log_time(x) for x in lines if "udisks: mounted" in x)
    copying = next(_log_time(x) for x in lines if "running rsync" in x)
    st.wait_for(lambda: "udisks: unmounted" in daemon_log.read_text(errors="replace")
                [log_size:], "the unmount", 60)
    return mounted - t_event, copying - t_event


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--idle", type=float, default=60.0, help="idle seconds sampled (60)")
    p.add_argument("--plugs", type=int, default=5, help="plugs timed (5)")
    args = p.parse_args()
    missing = st.missing_pieces()
    if missing:
        print(f"needs: {', '.join(missing)}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="iub-bench-daemon-"))
    stack = st.Stack(work / "stack", images_under=work)  # only its own image is "USB"
    daemon = None
    try:
        stack.start()
        upload = make_library(work)
        state = work / "state"
        image = st.make_image(work / "disk.img", "Bench", partitioned=True, size_mb=256)
        uuid = subprocess.run(
            ["blkid", "-p", "-o", "value", "-s", "UUID", "--offset", str(1024 * 1024),
             str(image.path)], capture_output=True, text=True, check=True).stdout.strip()
        config = work / "config.toml"
        config.write_text(
            f'[immich]\nupload_location = "{upload}"\n[config_backup]\nenabled = false\n'
            f'[disks]\napproved = ["{uuid}"]\n[state]\ndir = "{state}"\n')
        notify = work / "notify.sock"
        ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ready.bind(str(notify))
        env = {**stack.env, "NOTIFY_SOCKET": str(notify)}
        log = open(work / "daemon.log", "wb")  # noqa: SIM115
        daemon = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "immich-usb-backup"), "-c", str(config), "-v",
             "daemon"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_ready(ready)
        time.sleep(2)  # let start-up settle before sampling idle
        cpu0, t0 = proc_cpu_s(daemon.pid), time.monotonic()
        rss = []
        while time.monotonic() - t0 < args.idle:
            rss.append(proc_rss_mb(daemon.pid))
            time.sleep(1)
        cpu_pct = 100 * (proc_cpu_s(daemon.pid) - cpu0) / (time.monotonic() - t0)
        monitor = pyudev.Monitor.from_netlink(pyudev.Context())
        monitor.filter_by("block")
        monitor.start()
        timed = [first_byte_latency(image, state, monitor, work / "daemon.log", upload, n)
                 for n in range(args.plugs)]
        mounts = [m for m, _ in timed]
        latencies = [c for _, c in timed]
        after_rss = proc_rss_mb(daemon.pid)

        print(f"\nidle over {args.idle:.0f} s: CPU {cpu_pct:.2f} % (target 0.0 %), "
              f"RSS {max(rss):.1f} MB (target < 60 MB)")
        print(f"udev add -> first byte copied, {args.plugs} plugs: median "
              f"{statistics.median(latencies):.3f} s, max {max(latencies):.3f} s "
              f"(target < 2 s): {', '.join(f'{x:.3f}' for x in latencies)}")
        print(f"udev add -> mounted: median {statistics.median(mounts):.3f} s")
        print(f"RSS after {args.plugs} backups: {after_rss:.1f} MB")
        out = REPO / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "daemon.json").write_text(json.dumps({
            "idle_cpu_percent": round(cpu_pct, 3), "idle_rss_mb": round(max(rss), 1),
            "latencies_s": [round(x, 3) for x in latencies],
            "mount_latencies_s": [round(x, 3) for x in mounts],
            "rss_after_backups_mb": round(after_rss, 1)}, indent=2))
        return 0
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
        stack.stop()


if __name__ == "__main__":
    raise SystemExit(main())
