"""Heartbeats for outside monitors: an HTTP GET to each ``notify.heartbeat_urls`` after a
successful backup (healthchecks.io, an Uptime Kuma push monitor), so that someone notices
when backups stop. Each is bounded by ``notify.timeout_s``; a failure is recorded and
never fails the backup. The URLs are secrets (a token is in them): named by their
position, never shown.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from immich_usb_backup.config import NotifyConfig

log = logging.getLogger(__name__)

GUARD_S = 2.0  # past the timeout the request is given, we stop waiting for its thread


async def ping_all(config: NotifyConfig) -> list[dict[str, Any]]:
    """GET every heartbeat URL at once; return one outcome each for the history."""
    if not config.heartbeat_urls:
        return []
    results = await asyncio.gather(*(
        _ping(f"notify.heartbeat_urls #{i}", url.strip(), config.timeout_s)
        for i, url in enumerate(config.heartbeat_urls, 1)))
    return list(results)


async def _ping(name: str, url: str, timeout_s: float) -> dict[str, Any]:
    try:
        async with asyncio.timeout(timeout_s + GUARD_S):
            error = await asyncio.to_thread(_get, url, timeout_s)
    except TimeoutError:
        error = f"timed out after {timeout_s:g} s"
    if error is None:
        log.info("heartbeat %s sent", name)
        return {"event": "heartbeat", "ok": True}
    log.warning("heartbeat %s not sent: %s", name, error)
    return {"event": "heartbeat", "ok": False, "error": f"{name}: {error}"}


def _get(url: str, timeout_s: float) -> str | None:
    """In a thread: None when the monitor answered 2xx, else why not (no URL in it)."""
    if not url.startswith(("http://", "https://")):
        return "not an http:// or https:// URL"
    import urllib.error  # noqa: PLC0415 - here: 15 ms of start-up for every run otherwise
    import urllib.request  # noqa: PLC0415

    request = urllib.request.Request(url, method="GET",  # noqa: S310 - http(s) only
                                     headers={"User-Agent": "immich-usb-backup"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            response.read(4096)
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except TimeoutError:
        return f"timed out after {timeout_s:g} s"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if "timed out" in str(reason):
            return f"timed out after {timeout_s:g} s"
        return f"could not connect ({type(reason).__name__})"
