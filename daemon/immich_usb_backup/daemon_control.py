"""What the daemon answers on its control socket (``control.Handler``).

Questions are answered from the state dir and udev (in threads); actions go through the
flow's own functions, as a plug or the command line would: a backup is
``flow.backup_device(..., trigger="web")``, queued on the daemon's one-at-a-time worker
like a plugged disk; ``verify`` and ``drill`` are ``diskcheck.verify_device`` (read-only,
the drill's outcome kept in the state dir); ``approve`` is ``approve.approve_device``;
``cancel`` stops the running backup as SIGTERM does. A second action while one runs is
refused with ``busy`` and the running one's status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from immich_usb_backup import approvals, approve, clock, health, history, overview, policy
from immich_usb_backup.config import Config
from immich_usb_backup.control import ControlError, status_events
from immich_usb_backup.devices import BlockDevice
from immich_usb_backup.errors import BackupError
from immich_usb_backup.lock import is_running
from immich_usb_backup.state import LOCK as LOCK_NAME
from immich_usb_backup.status import read_status
from immich_usb_backup.udisks import UDisks

log = logging.getLogger(__name__)

Job = Callable[[], Coroutine[Any, Any, object]]


class DaemonLike(Protocol):
    """What the handler needs of the daemon (``daemon.Daemon``)."""

    config: Config
    udisks: UDisks | None

    def busy(self) -> dict[str, Any] | None: ...
    def submit(self, dev: BlockDevice, job: Job, what: str) -> None: ...
    def cancel_current(self) -> bool: ...


class DaemonHandler:
    """The daemon's answers (see the module doc)."""

    def __init__(self, daemon: DaemonLike) -> None:
        self.daemon = daemon
        self.config = daemon.config
        self.last_check: dict[str, Any] | None = None  # the last verify or drill

    async def status(self) -> dict[str, Any]:
        st = await asyncio.to_thread(read_status, self.config.state_dir)
        job = self.daemon.busy()
        if job is not None:
            st = {**st, "job": job}
            if st.get("state") == "idle":  # queued, or between the lock and the status
                st["state"] = "running"
                st.setdefault("phase", "starting")
        if self.last_check is not None:
            st["last_check"] = self.last_check
        return st

    async def disks(self) -> list[dict[str, Any]]:
        """The plugged disks, each with its last health reading kept in the state dir (a
        live SMART read takes seconds: a page does not wait for it)."""
        at = clock.now()
        rows = await asyncio.to_thread(overview.plugged, self.config, at)
        kept = await asyncio.to_thread(health.read_stored, self.config.state_dir, at)
        for row in rows:
            reading = kept.get(str(row["uuid"] or "").upper())
            row["health"] = reading.to_dict() if reading is not None else None
        return rows

    async def history(self, last: int | None) -> list[dict[str, Any]]:
        return await asyncio.to_thread(history.last_records, self.config.state_dir, last)

    def events(self) -> AsyncIterator[dict[str, Any]]:
        return status_events(self.status)

    # actions -------------------------------------------------------------------------

    async def _plugged(self, uuid: str) -> tuple[BlockDevice, dict[str, Any]]:
        from immich_usb_backup.devices import list_block_devices  # noqa: PLC0415

        wanted = policy.normalise_uuid(uuid)
        for d in await asyncio.to_thread(list_block_devices):
            if (d.uuid and policy.normalise_uuid(d.uuid) == wanted
                    and policy.is_candidate(d.bus, d.fs_type, d.devtype, d.usb_driver)):
                return d, {"uuid": d.uuid, "label": d.label, "device": d.device}
        raise ControlError("not-found", f"no USB exFAT disk with the UUID {uuid} is "
                           "plugged in")

    async def _approved(self, dev: BlockDevice) -> bool:
        recorded = await asyncio.to_thread(approvals.approved_uuids, self.config.state_dir)
        return policy.is_approved(dev.uuid, self.config.disks.approved, recorded)

    async def _not_busy(self) -> None:
        job = self.daemon.busy()
        if job is not None or await asyncio.to_thread(is_running, self.config.state_dir):
            raise ControlError("busy", "a backup or a check is running; wait for it to end "
                               "or cancel it", running=await self.status())

    async def backup(self, disk: str, mode: str | None) -> dict[str, Any]:
        dev, ref = await self._plugged(disk)
        approved = await self._approved(dev)
        if not (approved or self.config.disks.allow_any_marked):
            raise ControlError("refused", f"the disk {dev.label or disk} is not approved: "
                               "approve it first")
        await self._not_busy()
        udisks = self.daemon.udisks
        if udisks is None:
            raise ControlError("failed", "the daemon is not connected to UDisks2 yet")
        from immich_usb_backup import flow  # noqa: PLC0415

        mode = mode or self.config.library.mode

        async def job() -> object:
            # as for a plugged disk: an approved UUID must hold its key (rule 10)
            return await flow.backup_device(self.config, udisks, dev.device,
                                            trigger="web", mode=mode, key_required=approved)

        self.daemon.submit(dev, job, "backup")
        log.info("web: backup of %s (%s) in %s mode", dev.device, dev.label, mode)
        return {"started": {"kind": "backup", "disk": ref, "mode": mode}}

    async def approve(self, disk: str, create_marker: bool) -> dict[str, Any]:
        dev, _ref = await self._plugged(disk)
        await self._not_busy()

        try:
            approval, created = await approve.approve_device(
                self.config, f"UUID={dev.uuid}", create_marker)
        except BackupError as exc:
            raise ControlError("refused", str(exc)) from None
        log.info("web: approved %s (UUID %s)%s", approval.label, approval.uuid,
                 ", marker folder created" if created else "")
        return {"approved": {"uuid": approval.uuid, "label": approval.label,
                             "approved_at": approval.approved_at},
                "created_marker": created}

    async def verify(self, disk: str) -> dict[str, Any]:
        return await self._check(disk, drill=False)

    async def drill(self, disk: str) -> dict[str, Any]:
        return await self._check(disk, drill=True)

    async def _check(self, disk: str, *, drill: bool) -> dict[str, Any]:
        dev, ref = await self._plugged(disk)
        if not await self._approved(dev):
            raise ControlError("refused", f"the disk {dev.label or disk} is not approved")
        await self._not_busy()
        from immich_usb_backup import diskcheck  # noqa: PLC0415

        kind = "drill" if drill else "verify"

        async def job() -> object:
            started = clock.iso(clock.now())
            outcome: dict[str, Any] = {"kind": kind, "disk": ref, "started_at": started}
            try:
                report = await diskcheck.verify_device(self.config, f"UUID={dev.uuid}",
                                                       None, drill)
                outcome["ok"] = bool(report.ok)
                outcome["report"] = report.as_dict()
            except BackupError as exc:
                outcome.update(ok=False, message=str(exc))
            except asyncio.CancelledError:
                outcome.update(ok=False, message="cancelled")
                raise
            finally:
                outcome["finished_at"] = clock.iso(clock.now())
                self.last_check = outcome
            return outcome

        self.daemon.submit(dev, job, kind)
        log.info("web: %s of %s (%s)", kind, dev.device, dev.label)
        return {"started": {"kind": kind, "disk": ref}}

    async def cancel(self) -> dict[str, Any]:
        if self.daemon.cancel_current():
            return {"cancelled": "the daemon's run"}
        pid = await asyncio.to_thread(_lock_holder, self.config.state_dir)
        if pid is not None and pid != os.getpid():
            os.kill(pid, signal.SIGTERM)  # a `run` by hand: stopped the way Ctrl-C does
            return {"cancelled": f"process {pid}"}
        raise ControlError("not-found", "no backup is running")


def _lock_holder(state_dir: Path) -> int | None:
    """The process holding the backup lock (it writes its pid there), or None."""
    if not is_running(state_dir):
        return None
    try:
        text = (state_dir / LOCK_NAME).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 1 else None
