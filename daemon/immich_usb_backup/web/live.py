"""What the web UI knows and how it learns it: the daemon (through its control socket)
for the disks plugged in now, the live status and every action; the state dir (read
only) for the history, and for the status when the daemon is not running (a ``run`` by
hand still shows).

``Live`` holds one subscription to the daemon's events while at least one page listens
(server-sent events), and passes each event on to every page; with no page open it
holds none and reads nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

from immich_usb_backup import clock, drill, history, overview, state
from immich_usb_backup.config import Config
from immich_usb_backup.control import (
    ControlClient,
    ControlError,
    ControlUnavailable,
    status_events,
)
from immich_usb_backup.filecache import FileCache
from immich_usb_backup.policy import normalise_uuid
from immich_usb_backup.record import RunRecord
from immich_usb_backup.status import read_status
from immich_usb_backup.web.follow import Follower

log = logging.getLogger(__name__)

RUNS_KEPT = 200  # the newest runs, parsed, for the pages (the history page shows 100)
RETRY_DAEMON_S = 5.0  # without the daemon: the state dir's status, the daemon tried again
QUEUE = 16


class Live:
    """The daemon's answers, or the state dir's when it is not running."""

    def __init__(self, config: Config, client: ControlClient | None = None) -> None:
        self.config = config
        self.client = client or ControlClient(config.web.socket)
        self.daemon_error: str | None = None  # why the daemon could not be asked, last time
        self._pages: set[asyncio.Queue[dict[str, Any]]] = set()
        self._pump: asyncio.Task[None] | None = None
        sd = config.state_dir
        self.history_file = Follower(config, RUNS_KEPT)
        self._drills = FileCache([sd / state.DRILLS], lambda: drill.load_outcomes(sd))

    def why_unavailable(self) -> str:
        """Why the daemon could not be asked, for a page or an answer."""
        return self.daemon_error or "the daemon is not running"

    def recent_runs(self, n: int) -> list[RunRecord]:
        """The newest ``n`` (at most :data:`RUNS_KEPT`) runs, oldest first. Blocking."""
        return self.history_file.runs(n)

    def disk_summaries(self) -> list[overview.DiskSummary]:
        """Every approved disk at a glance, with its health (``overview.disks``,
        ``overview.with_health``). Blocking."""
        return overview.with_health(self.history_file.disks(), self.config.state_dir,
                                    clock.now())

    def drills(self) -> list[drill.DrillOutcome]:
        """Each disk's last restore drill. Blocking."""
        return self._drills.get()

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """The daemon's answer to ``op``; a refusal raises ControlError, a daemon that
        cannot be reached ControlUnavailable."""
        try:
            answer = await self.client.call(op, **args)
        except ControlUnavailable as exc:
            self.daemon_error = str(exc)
            raise
        self.daemon_error = None
        if not answer.get("ok"):
            code = str(answer.pop("error", "failed"))
            message = str(answer.pop("message", "the daemon refused"))
            answer.pop("ok", None)
            if code == "forbidden":
                raise ControlUnavailable(
                    f"the daemon does not let this user use its control socket: run the "
                    f"web UI with the group {self.config.web.group}")
            raise ControlError(code, message, **answer)
        return answer

    async def status(self) -> dict[str, Any]:
        """``status --json``'s object, with ``daemon`` (reachable or not)."""
        try:
            st = (await self.call("status"))["status"]
            return {**st, "daemon": True}
        except (ControlUnavailable, ControlError, KeyError):
            return await self._local_status()

    async def _local_status(self) -> dict[str, Any]:
        """The status as the state dir tells it (the daemon could not be asked)."""
        return {**await asyncio.to_thread(read_status, self.config.state_dir),
                "daemon": False}

    async def disks(self) -> list[dict[str, Any]] | None:
        """The disks plugged in now (None when the daemon cannot say); the free space of
        one that is not mounted as its last backup left it (``free_bytes_at``)."""
        try:
            disks = (await self.call("disks"))["disks"]
        except (ControlUnavailable, ControlError, KeyError):
            return None
        known = {d.uuid: d for d in await asyncio.to_thread(self.history_file.disks)}
        out = []
        for disk in disks:
            if not isinstance(disk, dict):
                continue
            last = known.get(normalise_uuid(str(disk.get("uuid") or "")))
            if (disk.get("free_bytes") is None and last is not None
                    and last.free_bytes is not None):
                disk = {**disk, "free_bytes": last.free_bytes,  # noqa: PLW2901
                        "free_bytes_at": last.last_backup_at}
            out.append(disk)
        return out

    async def history(self, last: int | None) -> list[dict[str, Any]]:
        """``history --json``'s records, read from the state dir (readable without the
        daemon)."""
        return await asyncio.to_thread(history.last_records, self.config.state_dir, last)

    # events ------------------------------------------------------------------------------

    async def subscribe(self) -> AsyncGenerator[dict[str, Any], None]:
        """The status events for one page, while it listens."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE)
        self._pages.add(queue)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run())
        try:
            while True:
                yield await queue.get()
        finally:
            self._pages.discard(queue)
            if not self._pages and self._pump is not None:
                self._pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._pump
                self._pump = None

    def _send(self, event: dict[str, Any]) -> None:
        for queue in self._pages:
            if queue.full():  # a slow page gets the newest, not a backlog
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    async def _run(self) -> None:
        while True:
            try:
                async for event in self.client.events():
                    self.daemon_error = None
                    if event.get("event") == "status":
                        self._send({**event, "status": {**event.get("status", {}),
                                                        "daemon": True}})
                    else:
                        self._send(event)
            except ControlUnavailable as exc:
                self.daemon_error = str(exc)
            await self._from_state_dir()

    async def _from_state_dir(self) -> None:
        """The state dir's status for a while, then the daemon is asked again."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RETRY_DAEMON_S):
                async for event in status_events(self._local_status):
                    self._send(event)
