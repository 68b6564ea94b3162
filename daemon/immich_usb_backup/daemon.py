"""The long-running daemon: udev events in, one backup at a time out.

Life: connect to UDisks2, start the udev monitor, consider the disks already connected
(coldplug), tell systemd READY, then wait. Eligible disks are queued and handled one at
a time by ``flow.backup_plugged``. A disk removed mid-backup cancels that backup (rsync is
stopped, the run is recorded ``interrupted``); SIGTERM does the same, unmounts what was
mounted and exits 0. Idle means blocked in the event loop: no polling; one timer, for
the "no backup for N days" reminder, wakes up when a reminder could next be due (or
every few hours at most) and never while a backup runs. With the web UI on (``[web]
listen``), the control socket (``control``, answered by ``daemon_control``) is open
while the daemon runs; its actions are queued on the same worker as plugged disks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from immich_usb_backup import clock, flow, overview, policy, systemd
from immich_usb_backup.config import Config
from immich_usb_backup.control import ControlServer
from immich_usb_backup.daemon_control import DaemonHandler, Job
from immich_usb_backup.devices import BlockDevice, DeviceEvent, DeviceMonitor, list_block_devices
from immich_usb_backup.errors import BackupError
from immich_usb_backup.udisks import UDisks

log = logging.getLogger(__name__)

STOP_GRACE_S = 90.0  # within systemd's TimeoutStopSec: record, unmount, then go


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        # a plugged disk (no job: backup_plugged), or an action of the control socket
        self.queue: asyncio.Queue[tuple[BlockDevice, Job | None, str]] = asyncio.Queue()
        self.seen: set[tuple[str, str | None]] = set()  # one plug of one file system
        self.current: tuple[BlockDevice, asyncio.Task[Any]] | None = None
        self.current_what = ""
        self.pulled: set[str] = set()
        self.udisks: UDisks | None = None

    def on_event(self, event: DeviceEvent) -> None:
        """Called on the loop for every udev block event; never blocks."""
        dev = event.device
        candidate = policy.is_candidate(dev.bus, dev.fs_type, dev.devtype, dev.usb_driver)
        if event.action == "remove":
            self._gone(dev.device)
            return
        if not candidate:
            self._gone(dev.device)  # a change that took the file system away ends its plug
            log.debug("ignored %s: bus=%s fs=%s", dev.device, dev.bus, dev.fs_type)
            return
        if dev.key in self.seen:
            return  # several change events arrive per plug: act once
        self.seen = {k for k in self.seen if k[0] != dev.device}
        self.seen.add(dev.key)
        log.info("eligible disk %s (%s, UUID %s): queued", dev.device, dev.label, dev.uuid)
        self.queue.put_nowait((dev, None, "backup"))

    def submit(self, dev: BlockDevice, job: Job, what: str) -> None:
        """Queue an action of the control socket (``what``: backup, verify, drill)."""
        self.queue.put_nowait((dev, job, what))

    def busy(self) -> dict[str, Any] | None:
        """The job running or waiting (kind and disk), or None when idle."""
        if self.current is not None:
            dev = self.current[0]
        elif not self.queue.empty():
            dev = self.queue._queue[0][0]  # type: ignore[attr-defined]
        else:
            return None
        return {"kind": self.current_what or "backup", "running": self.current is not None,
                "disk": {"uuid": dev.uuid, "label": dev.label, "device": dev.device}}

    def cancel_current(self) -> bool:
        """Stop the running job as a pulled disk does (recorded ``interrupted``)."""
        if self.current is None:
            return False
        log.warning("%s: cancelled from the web UI", self.current[0].device)
        self.pulled.add(self.current[0].device)
        self.current[1].cancel()
        return True

    def _gone(self, device: str) -> None:
        self.seen = {k for k in self.seen if k[0] != device}
        if self.current and self.current[0].device == device:
            log.warning("%s was removed during the backup: stopping it", device)
            self.pulled.add(device)
            self.current[1].cancel()

    async def worker(self) -> None:
        assert self.udisks is not None
        while True:
            dev, run, what = await self.queue.get()
            systemd.notify(f"STATUS=backing up to {dev.label or dev.device}")
            work = run() if run is not None else flow.backup_plugged(
                self.config, self.udisks, dev.device, uuid=dev.uuid, label=dev.label)
            job: asyncio.Task[Any] = asyncio.create_task(work)
            self.current, self.current_what = (dev, job), what
            try:
                outcome = await asyncio.shield(job)
                log.info("%s: %s", dev.device, outcome)
            except asyncio.CancelledError:
                if dev.device in self.pulled:  # the disk was pulled: carry on
                    self.pulled.discard(dev.device)
                    continue
                job.cancel()  # we are stopping: let the run record itself and unmount
                await asyncio.wait([job], timeout=STOP_GRACE_S)
                raise
            except BackupError as exc:
                log.error("%s: %s", dev.device, exc)
            except Exception:
                log.exception("%s: unexpected error", dev.device)
            finally:
                self.current, self.current_what = None, ""
                try:  # a state file found damaged outside the run: recorded, told
                    await flow.record_state_damage(self.config, "plug")
                except Exception:
                    log.exception("recording a damaged state file failed")
                systemd.notify("STATUS=idle, waiting for a backup disk")

    async def reminders(self) -> None:
        """The reminder's timer: check at start, then when one could next be due."""
        while True:
            delay = overview.CHECK_AT_LEAST_EVERY_S
            try:  # a reminder must never stop the daemon
                at = clock.now()
                if self.current is None:
                    await flow.remind(self.config, at)
                delay = await asyncio.to_thread(overview.next_check_in, self.config, at)
            except Exception:
                log.exception("the reminder check failed")
            log.debug("next reminder check in %.0f s", delay)
            await asyncio.sleep(delay)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        self.udisks = await UDisks.connect()
        # The monitor starts before the coldplug listing, so no plug falls between. The
        # listing reads udev's database of every block device: a thread does it, and the
        # events that arrive meanwhile wait until the disks already there are considered.
        early: list[DeviceEvent] = []
        monitor = DeviceMonitor(early.append)
        monitor.start()
        for dev in await asyncio.to_thread(list_block_devices):
            self.on_event(DeviceEvent("add", dev))
        for event in early:
            self.on_event(event)
        monitor.on_event = self.on_event
        worker = asyncio.create_task(self.worker())
        reminders = asyncio.create_task(self.reminders())
        control = await self._open_control()
        systemd.notify("READY=1", "STATUS=idle, waiting for a backup disk")
        log.info("immich-usb-backup daemon ready")
        stopping = asyncio.create_task(stop.wait())
        bus_lost = asyncio.create_task(self.udisks.wait_disconnected())
        await asyncio.wait([stopping, bus_lost], return_when=asyncio.FIRST_COMPLETED)
        lost = bus_lost.done()
        bus_lost.cancel()
        stopping.cancel()
        if lost:
            log.error("lost the connection to the system bus; exiting so that the service "
                      "manager restarts the daemon")
        log.info("stopping")
        systemd.notify("STOPPING=1")
        if control is not None:
            await control.stop()
        reminders.cancel()
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        with contextlib.suppress(asyncio.CancelledError):
            await reminders
        monitor.stop()
        self.udisks.close()
        if lost:
            raise BackupError("lost the connection to the system bus")

    async def _open_control(self) -> ControlServer | None:
        """The control socket, when the web UI is on; a failure is only logged (plugged
        disks are still backed up)."""
        if not self.config.web.listen:
            return None
        server = ControlServer(self.config.web.socket, self.config.web.group,
                               DaemonHandler(self))
        try:
            await server.start()
        except OSError as exc:
            log.error("cannot open the control socket %s: %s; the web UI cannot start "
                      "backups", self.config.web.socket, exc)
            return None
        return server


def run_daemon(config: Config) -> None:
    asyncio.run(Daemon(config).run())
