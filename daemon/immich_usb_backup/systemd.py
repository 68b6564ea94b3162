"""``sd_notify`` for ``Type=notify`` units: READY, STATUS, STOPPING.

A no-op when not started by systemd (``NOTIFY_SOCKET`` unset).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> None:
    """Send ``fields`` (e.g. "READY=1", "STATUS=idle") to systemd, if it listens."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)
