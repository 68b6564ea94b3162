"""udev block-device events on the asyncio loop. The only module that imports pyudev.

pyudev has no asyncio support of its own: the monitor's netlink socket is watched with
``loop.add_reader`` and drained without blocking. Devices come out as plain
``BlockDevice`` values; deciding what to do with them is ``policy``'s business.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyudev

from immich_usb_backup.target import decode_udev

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class BlockDevice:
    """A block device as udev describes it."""

    device: str  # /dev/sdb1
    devtype: str  # "partition" or "disk"
    bus: str | None  # ID_BUS: "usb", "ata", ...
    usb_driver: str | None  # ID_USB_DRIVER: "usb-storage", "uas" on any USB disk
    fs_type: str | None  # ID_FS_TYPE
    uuid: str | None  # ID_FS_UUID
    label: str | None  # the true label, from ID_FS_LABEL_ENC
    model: str | None
    size: int  # bytes

    @property
    def key(self) -> tuple[str, str | None]:
        """What one plug of one file system is known by."""
        return (self.device, self.uuid)


@dataclass(frozen=True)
class DeviceEvent:
    action: str  # "add", "change" or "remove"
    device: BlockDevice


def _from_pyudev(dev: Any) -> BlockDevice | None:
    node = dev.device_node
    if not node:
        return None
    props = dev.properties
    try:
        size = int(dev.attributes.asint("size")) * 512
    except (KeyError, ValueError, AttributeError):
        size = 0
    label = decode_udev(props.get("ID_FS_LABEL_ENC")) or props.get("ID_FS_LABEL")
    model = decode_udev(props.get("ID_MODEL_ENC")) or props.get("ID_MODEL")
    return BlockDevice(
        device=str(node),
        devtype=str(props.get("DEVTYPE", "")),
        bus=props.get("ID_BUS"),
        usb_driver=props.get("ID_USB_DRIVER"),
        fs_type=props.get("ID_FS_TYPE"),
        uuid=props.get("ID_FS_UUID"),
        label=label,
        model=model.strip() if model else None,
        size=size,
    )


def list_block_devices() -> list[BlockDevice]:
    """Every block device udev knows now (coldplug)."""
    context = pyudev.Context()
    out = []
    for dev in context.list_devices(subsystem="block"):
        bd = _from_pyudev(dev)
        if bd is not None:
            out.append(bd)
    return out


class DeviceMonitor:
    """Calls ``on_event`` on the loop for every udev event of a block device."""

    def __init__(self, on_event: Callable[[DeviceEvent], None]) -> None:
        self.on_event = on_event
        self._monitor: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start listening. Call before the coldplug listing so no event falls between."""
        self._loop = asyncio.get_running_loop()
        self._monitor = pyudev.Monitor.from_netlink(pyudev.Context())
        self._monitor.filter_by("block")
        self._monitor.start()
        self._loop.add_reader(self._monitor.fileno(), self._drain)

    def _drain(self) -> None:
        while True:
            dev = self._monitor.poll(timeout=0)
            if dev is None:
                return
            bd = _from_pyudev(dev)
            if bd is not None and dev.action in ("add", "change", "remove"):
                self.on_event(DeviceEvent(str(dev.action), bd))

    def stop(self) -> None:
        if self._loop is not None and self._monitor is not None:
            self._loop.remove_reader(self._monitor.fileno())
            self._monitor = None
