"""Running the web UI: the checks before it starts, then aiohttp until SIGTERM.

``serve`` refuses to start (``WebError``, which the command line turns into exit 2)
without ``[web] listen`` or without a password file; run as root it warns, and works.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from immich_usb_backup.config import Config, parse_listen
from immich_usb_backup.web import security
from immich_usb_backup.web.app import make_app
from immich_usb_backup.web.pages import root_warning

log = logging.getLogger(__name__)


class WebError(Exception):
    """The web UI cannot start; the message says how to fix it."""


def check(config: Config) -> tuple[str, int]:
    """Where to listen; raise WebError when the web UI must not start."""
    if not config.web.listen:
        raise WebError('the web UI is off: set [web] listen (e.g. "127.0.0.1:8429") in '
                       f"{config.source or 'the configuration'}")
    where = parse_listen(config.web.listen)
    if where is None:  # pragma: no cover - load_config refuses it first
        raise WebError(f"web.listen: not HOST:PORT: {config.web.listen}")
    try:
        security.read_password_file(config.web.password_file)
    except security.PasswordError as exc:
        raise WebError(str(exc)) from None
    return where


def serve(config: Config) -> None:
    """Serve the web UI until SIGTERM or SIGINT. Raise WebError (before listening)."""
    host, port = check(config)
    warning = root_warning()
    if warning:
        log.warning("%s", warning)
    asyncio.run(_serve(config, host, port))


async def _serve(config: Config, host: str, port: int) -> None:
    runner = web.AppRunner(make_app(config), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, shutdown_timeout=2.0)
        try:
            await site.start()
        except OSError as exc:
            raise WebError(f"cannot listen on {config.web.listen}: {exc.strerror or exc}"
                           ) from None
        log.info("web UI on http://%s/ (pid %d)", config.web.listen, os.getpid())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping the web UI")
    finally:
        await runner.cleanup()
