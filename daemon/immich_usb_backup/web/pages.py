"""The web UI's pages: what each shows, gathered from the daemon and the state dir, and
rendered with the same templates as the history page (``report.environment``).

Each page is whole without JavaScript (the status as it was when the page was made, the
buttons as forms); ``static/app.js`` only keeps the live parts live.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

from aiohttp import web

from immich_usb_backup import __version__, clock, page, report
from immich_usb_backup.config import MODES, Config
from immich_usb_backup.text import duration, human_bytes
from immich_usb_backup.web.live import Live
from immich_usb_backup.web.security import session_of

TITLE = "Immich USB backups"
WEEK_RUNS = 200  # enough runs for the last 7 days
TIMER_UNITS = (Path("/etc/systemd/system/immich-usb-backup-scheduled.timer"),
               Path("/run/systemd/system/immich-usb-backup-scheduled.timer"))


async def render(request: web.Request, template: str, status: int = 200,
                 **context: Any) -> web.Response:
    """``template`` with what every page has: the session's CSRF token and message,
    the warning when run as root."""
    session = session_of(request)
    flash = None
    if session is not None:
        flash, session.flash = session.flash, None
    html = await asyncio.to_thread(  # CPU work: off the loop (a history page of 100 runs)
        report.environment().get_template(template).render,
        title=TITLE, version=__version__, css=None, static="/static",
        csrf=session.csrf if session else "", flash=flash, root_warning=root_warning(),
        logged_in=session is not None, **context)
    return web.Response(text=html, content_type="text/html", charset="utf-8", status=status)


def load_templates() -> None:
    """Compile the templates once, at start-up (in a thread: a few hundred ms)."""
    env = report.environment()
    for name in ("web/login.html", "web/backup.html", "web/history.html",
                 "web/approve.html"):
        env.get_template(name)


def root_warning() -> str | None:
    """The warning for a web UI run as root (it needs none)."""
    if os.geteuid() != 0:
        return None
    return ("This web UI runs as root, which it does not need: run it as its own service "
            "(immich-usb-backup-web.service), without root, in the group that may use the "
            "daemon's control socket.")


def live_view(st: dict[str, Any]) -> dict[str, Any]:
    """The status as the page's live panel shows it (``static/app.js`` makes the same
    words from each event)."""
    running = st.get("state") == "running"
    disk = st.get("disk") or (st.get("job") or {}).get("disk")
    if not isinstance(disk, dict):
        disk = {}
    label = disk.get("label") or disk.get("uuid") or "?"
    done, total = int(st.get("bytes_done") or 0), int(st.get("bytes_total") or 0)
    rate, eta = int(st.get("rate_bps") or 0), st.get("eta_s")
    kind = (st.get("job") or {}).get("kind", "backup")
    return {
        "running": running,
        "headline": (f"{kind.capitalize()} running on {label}" if running
                     else "No backup is running"),
        "phase": str(st.get("phase") or "-"),
        "detail": str(st.get("detail") or ""),
        "percent": float(st.get("percent") or 0.0),
        "bytes": f"{human_bytes(done)} of {human_bytes(total)}" if total else "-",
        "rate": f"{human_bytes(rate)}/s" if rate else "-",
        "eta": duration(float(eta)) if isinstance(eta, int | float) else "-",
    }


def disk_view(d: dict[str, Any]) -> dict[str, Any]:
    marker = {"marked": "yes", "legacy": "old name (immich-server-backup)", None: "no"}.get(
        d.get("marker"), str(d.get("marker")))
    if d.get("mount_point") is None:
        marker = "not known (not mounted)"
    free = d.get("free_bytes")
    size = int(d.get("size") or 0)
    return {
        "uuid": str(d.get("uuid") or ""), "label": str(d.get("label") or "(no label)"),
        "device": str(d.get("device") or ""), "model": str(d.get("model") or "-"),
        "size": human_bytes(size) if size else "?",
        "free": "?" if free is None else f"{human_bytes(int(free))}"
        + ("" if d.get("mount_point") else " (at the last backup)"),
        "marker": marker, "approved": bool(d.get("approved")),
        "can_back_up": bool(d.get("approved") or d.get("any_marked")),
    }


def _live_parts(live: Live, st: dict[str, Any], disks: list[dict[str, Any]] | None,
                approved_only: bool = False) -> dict[str, Any]:
    """What both pages show of the daemon: the live panel, the disks plugged in now (the
    approved ones only for the history page), why the daemon could not be asked."""
    return {"status_now": st, "live": live_view(st),
            "disks": None if disks is None else [
                disk_view(d) for d in disks if d.get("approved") or not approved_only],
            "daemon_error": None if st.get("daemon") else live.why_unavailable()}


async def backup(request: web.Request, live: Live, config: Config) -> web.Response:
    st, disks = await asyncio.gather(live.status(), live.disks())
    runs = await asyncio.to_thread(live.recent_runs, WEEK_RUNS)
    return await render(
        request, "web/backup.html", **_live_parts(live, st, disks),
        week=report.week(runs, clock.now()), modes=MODES, default_mode=config.library.mode,
        state_dir=str(config.state_dir))


def _history_view(live: Live, config: Config) -> dict[str, Any]:
    """In a thread: what the history page shows (as the state dir's page)."""
    return report.view(live.recent_runs(page.RUNS), clock.now(), live.drills(),
                       live.disk_summaries(), config.notify.remind_after_days)


async def history_page(request: web.Request, live: Live, config: Config) -> web.Response:
    view, st, disks = await asyncio.gather(asyncio.to_thread(_history_view, live, config),
                                           live.status(), live.disks())
    return await render(
        request, "web/history.html", view=view, **_live_parts(live, st, disks, True),
        schedule=await asyncio.to_thread(schedule, config),
        last_check=st.get("last_check"))


async def approve(request: web.Request, live: Live, uuid: str) -> web.Response:
    disks = await live.disks()
    found = next((d for d in disks or [] if d.get("uuid") == uuid), None)
    if found is None:
        return await render(request, "web/approve.html", status=404, disk=None,
                            daemon_error=live.daemon_error if disks is None else None)
    return await render(request, "web/approve.html", disk=disk_view(found),
                        daemon_error=None)


def schedule(config: Config) -> dict[str, Any]:
    """When backups happen, as configured (and a systemd timer, when one is installed)."""
    calendar: list[str] = []
    for unit in TIMER_UNITS:
        try:
            text = unit.read_text()
        except OSError:
            continue
        calendar = [m.strip() for m in re.findall(r"^OnCalendar\s*=\s*(.+)$", text, re.M)]
        break
    return {"mode": config.library.mode, "timer": calendar,
            "remind_after_days": config.notify.remind_after_days,
            "power_off": config.disks.power_off,
            "keep_deleted_days": config.library.keep_deleted_days,
            "allow_any_marked": config.disks.allow_any_marked}


def outcome_text(name: str, status: int, answer: dict[str, Any]) -> str:
    """What a button did, in a sentence for the next page."""
    if status < 300:
        started = answer.get("started") or {}
        ref = started.get("disk") or {}
        disk = ref.get("label") or ref.get("uuid") or "the disk"
        if name == "backup":
            return f"Backup of {disk} started ({started.get('mode')} mode)."
        if name in ("verify", "drill"):
            return f"{'Restore drill' if started.get('kind') == 'drill' else 'Check'} " \
                   f"of {disk} started."
        if name == "approve":
            approved = answer.get("approved") or {}
            made = (" The folder immich-server-backups was created."
                    if answer.get("created_marker") else "")
            return f"Approved {approved.get('label') or approved.get('uuid')}.{made}"
        if name == "cancel":
            return "The backup is being stopped."
    return str(answer.get("message") or f"{name} failed ({status})")
