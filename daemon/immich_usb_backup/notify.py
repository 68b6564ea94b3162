"""Sending the messages through Apprise: the only module that imports ``apprise``.

``Notifier`` sends a ``messages.Message`` to every configured URL (``[notify] urls``,
``urls_file``, ``$IMMICH_USB_BACKUP_NOTIFY_URLS``), bounded by ``[notify] timeout_s``,
and keeps each outcome for the run's history record; a message that cannot be sent
never fails a backup. What Apprise treats as private in each URL is registered with
``masking``, also for Apprise's and urllib3's own log lines. docs/design.md says why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from immich_usb_backup.config import Event, NotifyConfig
from immich_usb_backup.masking import mask, register_secrets, secrets_in
from immich_usb_backup.messages import TITLE, Kind, Message
from immich_usb_backup.text import plural

if TYPE_CHECKING:
    import apprise

log = logging.getLogger(__name__)

ENV_URLS = "IMMICH_USB_BACKUP_NOTIFY_URLS"
GUARD_S = 5.0  # past the timeout Apprise is given, we stop waiting for it ourselves
SOCKET_GRACE_S = 1.0  # sockets give up this long after Apprise reported the timeout


@dataclass(frozen=True)
class Source:
    """One configured URL and where it came from (the origin names it in logs, not the URL)."""

    origin: str
    url: str


def split_urls(text: str) -> list[str]:
    """URLs separated by whitespace or commas (a comma inside a URL, as in ``to=a,b``,
    is kept: only a comma followed by ``scheme://`` separates)."""
    parts = re.split(r"\s+|,(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)", text)
    return [p.strip().strip(",") for p in parts if p.strip().strip(",")]


def read_urls_file(path: Path) -> list[str]:
    """The URLs in ``path``: one a line; blank lines and lines starting with ``#`` skipped.

    Raise OSError when it cannot be read.
    """
    urls = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            urls.append(stripped)
    return urls


def collect_urls(config: NotifyConfig,
                 environ: Mapping[str, str] | None = None) -> tuple[list[Source], list[str]]:
    """Every URL from the config, the urls_file and the environment, and the problems
    found reading them (secret-free: a URL is named by its origin, never shown)."""
    environ = os.environ if environ is None else environ
    sources = [Source(f"notify.urls #{i}", u.strip()) for i, u in enumerate(config.urls, 1)]
    problems: list[str] = []
    if config.urls_file is not None:
        try:
            lines = read_urls_file(config.urls_file)
        except OSError as exc:
            problems.append(f"notify.urls_file {config.urls_file}: cannot read: "
                            f"{exc.strerror or exc}")
        else:
            sources += [Source(f"{config.urls_file} #{i}", u) for i, u in enumerate(lines, 1)]
    env = environ.get(ENV_URLS, "")
    sources += [Source(f"${ENV_URLS} #{i}", u) for i, u in enumerate(split_urls(env), 1)]
    return sources, problems


# Apprise's log lines, masked ---------------------------------------------------------

class _MaskingHandler(logging.Handler):
    """Takes over the log records of Apprise and urllib3 (which can show URLs, tokens in
    paths and payloads), masks them and passes them on under their own logger name."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # their INFO lines are chatter ("Notifying 1 service(s)."): ours say what was sent
            level = logging.DEBUG if record.levelno == logging.INFO else record.levelno
            target = logging.getLogger(f"{__name__}.{record.name}")
            if not target.isEnabledFor(level):
                return
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            clean = logging.makeLogRecord(dict(
                record.__dict__, msg=mask(text), args=None, exc_info=None, exc_text=None,
                levelno=level, levelname=logging.getLevelName(level)))
            target.handle(clean)
        except Exception:  # logging must never break a backup
            self.handleError(record)


def guard_library_logs() -> None:
    """Route Apprise's and urllib3's logging through the masking handler (once)."""
    for name in ("apprise", "urllib3", "requests"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _MaskingHandler) for h in logger.handlers):
            logger.addHandler(_MaskingHandler())
            logger.propagate = False


# Sending ------------------------------------------------------------------------------

def _notify_type(kind: Kind) -> apprise.NotifyType:
    import apprise  # noqa: PLC0415 - imported when a message is sent, not at start-up

    return {
        "info": apprise.NotifyType.INFO,
        "success": apprise.NotifyType.SUCCESS,
        "warning": apprise.NotifyType.WARNING,
        "failure": apprise.NotifyType.FAILURE,
    }[kind]


@dataclass
class _Target:
    name: str  # "JSON (notify.urls #1)": what logs and the history call it
    apobj: apprise.Apprise


@dataclass
class Notifier:
    """The notifications of one run (or one plug): sent to every configured URL, each
    outcome kept in ``outcomes`` for the history record. Sending never raises, except
    cancellation."""

    config: NotifyConfig
    environ: Mapping[str, str] | None = None
    outcomes: list[dict[str, Any]] = field(default_factory=list, init=False)
    _targets: tuple[list[_Target], list[str]] | None = field(default=None, init=False)
    _pending: list[asyncio.Task[None]] = field(default_factory=list, init=False)

    def wants(self, event: Event) -> bool:
        return event in self.config.events

    def send_soon(self, message: Message) -> None:
        """Start sending ``message`` in the background; the run goes on meanwhile."""
        if self.wants(message.event):
            self._pending.append(asyncio.create_task(self._deliver(message)))

    async def send(self, message: Message) -> None:
        """Send ``message``, after any still in flight (so messages arrive in order)."""
        await self.drain()
        if self.wants(message.event):
            await self._deliver(message)

    async def drain(self) -> None:
        """Wait for the messages sent in the background (each bounded by the timeout)."""
        while self._pending:
            await self._pending.pop(0)

    async def _deliver(self, message: Message) -> None:
        if self._targets is None:
            try:
                self._targets = await asyncio.to_thread(self._load)
            except Exception as exc:  # a bug in Apprise (or here) must not break a backup
                log.debug("preparing the notifications failed", exc_info=True)
                self._record(message.event, [f"cannot prepare the notifications: {exc!r}"])
                return
        targets, problems = self._targets
        if not targets and not problems:
            return  # no URL configured: notifications are off
        errors = list(problems)
        timeout = self.config.timeout_s
        tasks = {asyncio.create_task(_send_one(t, message, timeout)): t for t in targets}
        try:
            if tasks:
                done, pending = await asyncio.wait(tasks, timeout=timeout + GUARD_S)
                for task in pending:
                    task.cancel()
                    errors.append(f"{tasks[task].name}: timed out after {timeout:g} s")
                errors += [f"{tasks[t].name}: {t.result()}" for t in tasks
                           if t in done and t.result() is not None]
        except asyncio.CancelledError:
            self._record(message.event, ["stopped while sending: the backup was stopped"])
            raise
        finally:
            for task in tasks:
                task.cancel()
        self._record(message.event, errors, sent=len(targets) - len(errors) + len(problems))

    def _record(self, event: Event, errors: list[str], sent: int = 0) -> None:
        errors = [mask(e) for e in errors]
        outcome: dict[str, Any] = {"event": event.value, "ok": not errors}
        if errors:
            outcome["error"] = "; ".join(errors)
            log.warning("notification %s: %d sent, not sent: %s", event, sent,
                        outcome["error"])
        else:
            log.info("notification %s sent to %s", event, plural(sent, "service"))
        self.outcomes.append(outcome)

    def _load(self) -> tuple[list[_Target], list[str]]:
        """In a thread: read the URLs, let Apprise parse them, note their secrets.
        Apprise is imported here, only when there is a URL to send to."""
        sources, problems = collect_urls(self.config, self.environ)
        if not sources:
            return [], problems
        import apprise  # noqa: PLC0415 - its import costs a start-up without messages
        guard_library_logs()
        for s in sources:  # masked before Apprise sees (and may log) any of them
            register_secrets(secrets_in(s.url))
        asset = apprise.AppriseAsset(storage_mode="memory",
                                     service_timeout=self.config.timeout_s)
        targets = []
        for s in sources:
            plugin = apprise.Apprise.instantiate(s.url, asset=asset)
            if not plugin:
                scheme = s.url.split("://", 1)[0] if "://" in s.url else "?"
                problems.append(f"{s.origin}: not a URL Apprise understands (scheme "
                                f"{scheme!r})")
                continue
            register_secrets(secrets_in(s.url, _url_of(plugin, privacy=True),
                                        _url_of(plugin, privacy=False)))
            # Apprise stops waiting at the timeout; these make its worker threads (and
            # so the process) stop soon after, not at the sockets' own later timeouts.
            limit = self.config.timeout_s + SOCKET_GRACE_S
            plugin.socket_connect_timeout = min(plugin.socket_connect_timeout, limit)
            plugin.socket_read_timeout = min(plugin.socket_read_timeout, limit)
            apobj = apprise.Apprise(asset=asset)
            apobj.add(plugin)
            targets.append(_Target(f"{plugin.service_name} ({s.origin})", apobj))
        return targets, problems


async def send_test(config: NotifyConfig) -> list[tuple[str, str | None]]:
    """``check --send-test``: one test message to every configured URL. Return each
    service by its name (never the URL) with None when it took the message, else why
    not; a URL that cannot be used is listed with its problem."""
    notifier = Notifier(config)
    targets, problems = await asyncio.to_thread(notifier._load)
    message = Message(Event.FINISHED, f"{TITLE}: test message",
                      f"A test message from immich-usb-backup on {socket.gethostname()}: "
                      "notifications work.", "info")
    answers = await asyncio.gather(*(_send_one(t, message, config.timeout_s)
                                     for t in targets))
    return [*((t.name, mask(a) if a else None) for t, a in zip(targets, answers, strict=True)),
            *((mask(p), "cannot be used") for p in problems)]


def url_problems(config: NotifyConfig) -> list[str]:
    """For ``check``: every configured URL that cannot be read or that Apprise does not
    understand, named by where it came from (never shown: it may hold a secret)."""
    return Notifier(config)._load()[1]


def _url_of(plugin: Any, *, privacy: bool) -> str:
    return str(plugin.url(privacy=privacy))


async def _send_one(target: _Target, message: Message, limit_s: float) -> str | None:
    """Send to one service, giving up after ``limit_s``; return None when delivered, else
    why not."""
    import apprise  # noqa: PLC0415 - already loaded by Notifier._load

    try:
        result = await target.apobj.async_notify(
            body=message.body, title=message.title,
            notify_type=_notify_type(message.kind),
            body_format=apprise.NotifyFormat.TEXT, timeout=limit_s)
    except Exception as exc:  # a broken plugin must not break a backup
        return f"{type(exc).__name__}: {exc}"
    if result:
        return None
    if result.status == apprise.AppriseResultStatus.TIMEOUT:
        return f"timed out after {limit_s:g} s"
    why = [e.message for e in result.logs() if e.level in ("WARNING", "ERROR", "CRITICAL")]
    return " ".join(why[-2:]) or f"not delivered ({result.status.name.lower()})"
