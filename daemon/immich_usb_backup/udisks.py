"""UDisks2 over D-Bus: find, mount, unmount and power off a disk. The only module that
imports the D-Bus library (dbus-fast, the maintained successor of dbus-next).

Spec: https://storaged.org/doc/udisks2-api/latest/ (org.freedesktop.UDisks2.Manager,
.Block, .Filesystem, .Drive). Every call passes ``auth.no_user_interaction`` so that a
daemon never waits for a password prompt nobody can answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from immich_usb_backup.errors import BackupError
from immich_usb_backup.record import DiskState

log = logging.getLogger(__name__)

SERVICE = "org.freedesktop.UDisks2"
MANAGER_PATH = "/org/freedesktop/UDisks2/Manager"
IFACE_MANAGER = "org.freedesktop.UDisks2.Manager"
IFACE_BLOCK = "org.freedesktop.UDisks2.Block"
IFACE_FS = "org.freedesktop.UDisks2.Filesystem"
IFACE_DRIVE = "org.freedesktop.UDisks2.Drive"
IFACE_PROPS = "org.freedesktop.DBus.Properties"
ERR = "org.freedesktop.UDisks2.Error."

NO_INTERACTION = {"auth.no_user_interaction": Variant("b", True)}
CALL_TIMEOUT_S = 15.0  # reading properties, resolving devices
ACTION_TIMEOUT_S = 120.0  # mounting, unmounting, powering off


class UDisksError(BackupError):
    """A UDisks2 call failed; ``name`` is the D-Bus error name."""

    def __init__(self, message: str, name: str = "") -> None:
        super().__init__(message)
        self.name = name


_FRIENDLY = {
    ERR + "DeviceBusy": "the disk is busy: a program has files open on it",
    ERR + "NotAuthorized": "not allowed by the system's policy (run as root)",
    ERR + "NotAuthorizedCanObtain": "not allowed without a password (run as root)",
    ERR + "NotAuthorizedDismissed": "not allowed: the request was dismissed",
    ERR + "AlreadyMounted": "the disk is already mounted",
    ERR + "NotMounted": "the disk is not mounted",
    "org.freedesktop.DBus.Error.ServiceUnknown": "UDisks2 is not running; start it with: "
    "systemctl start udisks2",
}


@dataclass(frozen=True)
class BlockInfo:
    """What UDisks2 knows of a block device."""

    object_path: str
    device: str
    uuid: str
    label: str
    fs_type: str
    size: int
    drive: str | None  # object path of its Drive, None when it has none (a loop device)
    mount_points: tuple[str, ...]


def _bytes_to_path(raw: bytes) -> str:
    """UDisks2 sends paths as NUL-terminated byte arrays."""
    return os.fsdecode(raw.rstrip(b"\0"))


class UDisks:
    """A connection to UDisks2 on the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` honoured)."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

    @classmethod
    async def connect(cls) -> UDisks:
        try:
            bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=False).connect()
        except (OSError, ValueError) as exc:
            raise UDisksError(
                f"cannot reach the system D-Bus ({exc}): is it running? Start it, and "
                "UDisks2, with: systemctl start dbus udisks2") from exc
        return cls(bus)

    def close(self) -> None:
        self.bus.disconnect()

    async def wait_disconnected(self) -> None:
        """Return when the connection to the system bus is lost."""
        await self.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    async def _call(
        self, path: str, interface: str, member: str, signature: str = "", body: Any = None,
        timeout_s: float = CALL_TIMEOUT_S,
    ) -> list[Any]:
        message = Message(
            destination=SERVICE, path=path, interface=interface, member=member,
            signature=signature, body=body or [],
        )
        try:
            async with asyncio.timeout(timeout_s):
                reply = await self.bus.call(message)
        except TimeoutError:
            raise UDisksError(f"UDisks2 {member}: no answer within {timeout_s:g} s") from None
        except (OSError, EOFError) as exc:
            raise UDisksError(f"UDisks2 {member}: the system bus went away ({exc})") from exc
        if reply is None:
            raise UDisksError(f"UDisks2 {member}: no reply (the system bus went away?)")
        if reply.message_type == MessageType.ERROR:
            name = reply.error_name or ""
            detail = reply.body[0] if reply.body else ""
            friendly = _FRIENDLY.get(name, "")
            text = f"{friendly} ({detail})" if friendly else f"{name}: {detail}"
            raise UDisksError(f"UDisks2 {member}: {text}", name)
        return list(reply.body)

    async def _props(self, path: str, interface: str) -> dict[str, Any]:
        (props,) = await self._call(path, IFACE_PROPS, "GetAll", "s", [interface])
        return {k: v.value for k, v in props.items()}

    async def resolve(self, device: str) -> str | None:
        """The block object for ``/dev/...``, or None when UDisks2 does not know it (yet)."""
        spec = {"path": Variant("s", device)}
        (paths,) = await self._call(MANAGER_PATH, IFACE_MANAGER, "ResolveDevice",
                                    "a{sv}a{sv}", [spec, {}])
        return str(paths[0]) if paths else None

    async def device_for(self, target: str) -> str:
        """``/dev/...`` or ``UUID=...`` -> the device node UDisks2 knows it by."""
        if target.upper().startswith("UUID="):
            spec = {"uuid": Variant("s", target.split("=", 1)[1])}
        else:
            spec = {"path": Variant("s", target)}
        (paths,) = await self._call(MANAGER_PATH, IFACE_MANAGER, "ResolveDevice",
                                    "a{sv}a{sv}", [spec, {}])
        if not paths:
            raise UDisksError(f"no disk {target} is connected")
        block = await self._props(str(paths[0]), IFACE_BLOCK)
        return _bytes_to_path(bytes(block["Device"]))

    async def wait_for_filesystem(self, device: str, bound_s: float = 10.0) -> BlockInfo:
        """Wait (bounded) until UDisks2 publishes ``device`` with a file system on it.

        The udev event arrives before UDisks2 has processed the device: never assume it
        is there.
        """
        deadline = asyncio.get_running_loop().time() + bound_s
        delay = 0.02
        last: Exception | None = None
        while True:
            try:
                path = await self.resolve(device)
                if path is not None:
                    return await self.info(path)
            except UDisksError as exc:
                last = exc
            if asyncio.get_running_loop().time() >= deadline:
                why = f": {last}" if last else ""
                raise UDisksError(f"UDisks2 did not publish {device} within {bound_s:g} s{why}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def info(self, path: str) -> BlockInfo:
        """Block and Filesystem properties of the object at ``path``."""
        block = await self._props(path, IFACE_BLOCK)
        fs = await self._props(path, IFACE_FS)  # raises when there is no file system
        drive = str(block.get("Drive", "/"))
        return BlockInfo(
            object_path=path,
            device=_bytes_to_path(bytes(block.get("PreferredDevice") or block["Device"])),
            uuid=str(block.get("IdUUID", "")),
            label=str(block.get("IdLabel", "")),
            fs_type=str(block.get("IdType", "")),
            size=int(block.get("Size", 0)),
            drive=None if drive == "/" else drive,
            mount_points=tuple(_bytes_to_path(bytes(m)) for m in fs.get("MountPoints", [])),
        )

    async def mount(self, path: str, read_only: bool = False, retries: int = 5) -> str:
        """Mount the file system at object ``path``; return the mount point.

        UDisks2's view can lag behind an unmount through FUSE and answer AlreadyMounted
        for a device that is no longer mounted: re-read its state and retry, bounded.
        """
        options = dict(NO_INTERACTION)
        if read_only:
            options["options"] = Variant("s", "ro")
        for attempt in range(retries):
            try:
                (mount_point,) = await self._call(path, IFACE_FS, "Mount", "a{sv}", [options],
                                                  timeout_s=ACTION_TIMEOUT_S)
                return str(mount_point)
            except UDisksError as exc:
                if exc.name != ERR + "AlreadyMounted" or attempt == retries - 1:
                    raise
                info = await self.info(path)
                if info.mount_points:
                    return info.mount_points[0]
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    async def unmount(self, path: str, retries: int = 5) -> None:
        """Unmount object ``path``; a busy disk is retried a few times, not-mounted is fine."""
        for attempt in range(retries):
            try:
                await self._call(path, IFACE_FS, "Unmount", "a{sv}", [dict(NO_INTERACTION)],
                                 timeout_s=ACTION_TIMEOUT_S)
                return
            except UDisksError as exc:
                if exc.name == ERR + "NotMounted":
                    return
                if exc.name != ERR + "DeviceBusy" or attempt == retries - 1:
                    raise
                await asyncio.sleep(0.5 * (attempt + 1))

    async def power_off(self, drive: str) -> bool:
        """Power the drive off when it can be; return whether it was."""
        props = await self._props(drive, IFACE_DRIVE)
        if not props.get("CanPowerOff", False):
            log.info("drive %s cannot be powered off; left on", drive)
            return False
        await self._call(drive, IFACE_DRIVE, "PowerOff", "a{sv}", [dict(NO_INTERACTION)],
                         timeout_s=ACTION_TIMEOUT_S)
        return True


# Mount, use, unmount: the one way every caller does it -----------------------------------

_GONE = ("org.freedesktop.DBus.Error.UnknownMethod", "org.freedesktop.DBus.Error.UnknownObject")


@dataclass
class Mount:
    """A file system in use: where it is mounted, and whether we mounted it (and so
    unmount it). ``state`` says how it was left once ``release`` ran."""

    udisks: UDisks
    info: BlockInfo
    mount_point: Path
    ours: bool
    read_only: bool
    state: DiskState = "busy"
    _detaching: asyncio.Future[DiskState] | None = field(default=None, repr=False)

    async def release(self, *, power_off: bool = False) -> DiskState:
        """Unmount (and power off, when asked and the drive can) what we mounted; leave
        a disk someone else mounted as it was. Return how the disk is left; a later call
        waits for the first one's answer.

        The sync, unmount and power-off run as one task shielded from cancellation: a
        SIGTERM (or a second one) while they run does not stop them half-way; the caller
        is cancelled, the disk is still detached. A failure is logged, never raised: the
        state says "busy" (still mounted) or "gone" (pulled out).
        """
        if self._detaching is None:
            self._detaching = asyncio.ensure_future(self._detach(power_off))
        return await asyncio.shield(self._detaching)

    async def _detach(self, power_off: bool) -> DiskState:
        if not self.ours:
            self.state = "left-mounted"
            return self.state
        device = self.info.device
        try:
            if not self.read_only:
                await asyncio.to_thread(os.sync)
            await self.udisks.unmount(self.info.object_path)
            log.info("unmounted %s", device)
            self.state = "unmounted"
            if power_off and self.info.drive and await self.udisks.power_off(self.info.drive):
                log.info("powered off %s: safe to unplug", device)
                self.state = "powered-off"
        except UDisksError as exc:
            if exc.name in _GONE:
                log.info("%s is gone (pulled out?); UDisks2 cleans up its mount point", device)
                if self.state == "busy":
                    self.state = "gone"
            else:
                log.warning("could not %s %s: %s", "power off" if self.state == "unmounted"
                            else "unmount", device, exc)
        return self.state


@contextlib.asynccontextmanager
async def mounted(udisks: UDisks, info: BlockInfo, *,
                  read_only: bool = False) -> AsyncIterator[Mount]:
    """Use the file system ``info`` describes: as it is when it is mounted already (and
    then left mounted), else mounted here (read-only when asked) and unmounted again on
    the way out, whatever happens inside (see ``Mount.release``)."""
    if info.mount_points:
        yield Mount(udisks, info, Path(info.mount_points[0]), ours=False,
                    read_only=read_only)
        return
    mount = Mount(udisks, info, Path(await udisks.mount(info.object_path,
                                                        read_only=read_only)),
                  ours=True, read_only=read_only)
    log.info("mounted %s at %s%s", info.device, mount.mount_point,
             " (read-only)" if read_only else "")
    try:
        yield mount
    finally:
        await mount.release()
