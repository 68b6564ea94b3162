"""Notifications through Apprise: the only module that imports ``apprise``.

Four events, each a plain-text title and body (``started``, ``finished``, ``refused``,
``needs_approval``; see docs/notifications.md for what they look like). The messages are
built by plain functions of plain data; ``Notifier`` sends them to every configured URL
and keeps each outcome for the run's history record.

URLs come from ``[notify] urls``, the file ``[notify] urls_file`` (one a line, so that
passwords need not sit in a world-readable config) and the environment variable
``IMMICH_USB_BACKUP_NOTIFY_URLS``. A notification that cannot be sent never fails a
backup: it is logged and recorded, with secrets masked. Sending runs on the event loop
(``Apprise.async_notify``; Apprise does its blocking work in its own threads), bounded by
``[notify] timeout_s``. Secrets never reach a log, the history or the disk: what Apprise
considers private in each URL (passwords, tokens) is masked in everything we log or
record, including Apprise's and urllib3's own log lines.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, unquote

from immich_usb_backup.config import Event, NotifyConfig
from immich_usb_backup.execute import mask_secrets
from immich_usb_backup.record import DiskState, RunRecord
from immich_usb_backup.text import duration, human_bytes, plural

if TYPE_CHECKING:
    import apprise

log = logging.getLogger(__name__)

ENV_URLS = "IMMICH_USB_BACKUP_NOTIFY_URLS"
TITLE = "Immich backup"
PROBLEMS_SHOWN = 5
GUARD_S = 5.0  # past the timeout Apprise is given, we stop waiting for it ourselves
SOCKET_GRACE_S = 1.0  # sockets give up this long after Apprise reported the timeout

Kind = Literal["info", "success", "warning", "failure"]


# The messages: plain data in, title and body out -----------------------------------------

@dataclass(frozen=True)
class Message:
    event: Event
    title: str
    body: str
    kind: Kind = "info"


@dataclass(frozen=True)
class DiskEnd:
    """How a run left the disk, for its last message."""

    state: DiskState
    mount_point: str | None = None  # where it is still mounted ("left-mounted")
    wrote: bool = False  # the run wrote to the disk (its notes are written and synced)
    free_bytes: int | None = None
    size_bytes: int | None = None


def started(label: str | None, uuid: str | None, what: Sequence[str], files: int,
            nbytes: int) -> Message:
    """The backup passed its checks and starts writing: what it is about to copy."""
    disk = _disk_name(label, uuid)
    lines = [
        f"Backing up the Immich server {socket.gethostname()} to the disk "
        f"{_disk_full(label, uuid)}.",
        "",
        "What will be copied:",
        *(f"- {w}" for w in what),
        f"In all: about {plural(files, 'file')}, {human_bytes(nbytes)}.",
        "",
        "Do not unplug the disk until the message that the backup finished arrives.",
    ]
    return Message(Event.STARTED, f"{TITLE}: started on {disk}", "\n".join(lines), "info")


_STATUS_LINE = {
    "success": "",
    "partial": "Not everything could be copied: see the problems below. Everything else "
               "is backed up.",
    "failed": "The backup did not complete: see the problems below. What the disk held "
              "before is still readable.",
    "interrupted": "The backup was stopped before it finished (the disk was removed, or "
                   "the backup was stopped on the server).",
}
_KIND: dict[str, Kind] = {"success": "success", "partial": "warning", "failed": "failure",
                          "interrupted": "warning", "refused": "warning"}


def finished(record: RunRecord, end: DiskEnd) -> Message:
    """The run ended (success, partial, failed, interrupted): counts, space, problems,
    and whether the disk is safe to unplug."""
    status = record.status
    disk = _disk_full(record.disk.label, record.disk.uuid, record.target)
    lines = [
        f"The backup of {record.host or socket.gethostname()} to the disk {disk} ended: "
        f"{status}.",
    ]
    if record.verify_failed:
        lines.append("Everything was copied, but the check found copies on the disk that "
                     "differed from the server's files: see the problems below.")
    elif _STATUS_LINE.get(status):
        lines.append(_STATUS_LINE[status])
    lines += [
        "",
        f"Copied: {plural(record.files_transferred or 0, 'file')}, "
        f"{human_bytes(record.bytes_transferred or 0)}, in "
        f"{duration(record.duration_s or 0.0)}.",
        *record.finished_lines,
        *record.notes,
    ]
    if end.free_bytes is not None and end.size_bytes:
        lines.append(f"Free space left on the disk: {human_bytes(end.free_bytes)} of "
                     f"{human_bytes(end.size_bytes)}.")
    lines += _problem_lines(record.problems)
    lines += ["", _unplug_line(end)]
    name = _disk_name(record.disk.label, record.disk.uuid, record.target)
    return Message(Event.FINISHED, f"{TITLE}: {status} on {name}", "\n".join(lines),
                   _KIND.get(status, "failure"))


def refused(record: RunRecord, end: DiskEnd) -> Message:
    """A safety rule stopped the run: why, and what to do."""
    label, uuid, problems = record.disk.label, record.disk.uuid, record.problems
    lines = [
        f"The backup of {record.host or socket.gethostname()} to the disk "
        f"{_disk_full(label, uuid, record.target)} was refused"
        + ("." if end.wrote else ": nothing was copied or deleted."),
        "",
        f"Why: {problems[0] if problems else 'a safety rule stopped it'}",
        *(f"Also: {p}" for p in problems[1:PROBLEMS_SHOWN]),
        "",
        "What to do: follow the advice above, then plug the disk in again (or run "
        "`immich-usb-backup run` on the server).",
        "",
        _unplug_line(end),
    ]
    name = _disk_name(label, uuid, record.target)
    return Message(Event.REFUSED, f"{TITLE}: refused on {name}", "\n".join(lines), "warning")


def end_message(record: RunRecord, end: DiskEnd) -> Message:
    """The last message of a run: ``refused`` or ``finished``, by the record's status."""
    return refused(record, end) if record.status == "refused" else finished(record, end)


def needs_approval(label: str | None, uuid: str | None, device: str, command: str,
                   end: DiskEnd) -> Message:
    """A marked disk was plugged in that is not approved: the exact command to approve it."""
    lines = [
        f"The disk {_disk_full(label, uuid)} was plugged into {socket.gethostname()} "
        f"({device}). It has the immich-server-backups folder but is not approved, so "
        "nothing was written to it.",
        "",
        "To back up to this disk from now on, run on the server:",
        "",
        f"    {command}",
        "",
        "then unplug the disk and plug it in again.",
        "",
        _unplug_line(end),
    ]
    return Message(Event.NEEDS_APPROVAL, f"{TITLE}: disk {_disk_name(label, uuid, device)} "
                   "needs approval", "\n".join(lines), "warning")


def reminder(text: str, days: int) -> Message:
    """No backup for a while: which disk to plug in (``text`` from ``overview.text``)."""
    lines = [
        f"{text}.",
        "",
        f"The Immich server {socket.gethostname()} has not been backed up to a USB disk for "
        f"{plural(days, 'day')}. Plug in one of the disks above: the backup starts by "
        "itself, and a message says when it is done and the disk is safe to unplug.",
    ]
    return Message(Event.REMINDER, f"{TITLE}: no backup for {plural(days, 'day')}",
                   "\n".join(lines), "warning")


def state_damaged(text: str) -> Message:
    """A file of the state dir could not be read (``state.StateDamaged``): what was
    lost and what to do. Sent as a ``finished`` event: a run may depend on it."""
    lines = [
        f"On the Immich server {socket.gethostname()}, immich-usb-backup found {text}.",
        "",
        "Backups go on; the damaged file is kept for you to look at.",
    ]
    return Message(Event.FINISHED, f"{TITLE}: a state file was damaged", "\n".join(lines),
                   "failure")


def _unplug_line(end: DiskEnd) -> str:
    """Say "safe to unplug" only when it is true: the disk is unmounted (or was never
    mounted), or, on a disk someone else mounted, once they have ejected it."""
    if end.state == "powered-off":
        return "The disk was unmounted and powered off: it is safe to unplug."
    if end.state == "unmounted":
        return "The disk was unmounted: it is safe to unplug."
    if end.state == "not-mounted":
        return "The disk is not mounted: it is safe to unplug."
    if end.state == "gone":
        return "The disk was removed before the backup ended."
    if end.state == "busy":
        return ("The disk could not be unmounted (see the server's log): do not unplug "
                "it yet.")
    synced = "synced, and is " if end.wrote else ""
    return (f"The disk is {synced}still mounted at {end.mount_point}, as it was found: "
            "eject it there, then it is safe to unplug.")


def _problem_lines(problems: Sequence[Any]) -> list[str]:
    if not problems:
        return []
    lines = ["", f"Problems ({len(problems)}):"]
    lines += [f"- {p}" for p in problems[:PROBLEMS_SHOWN]]
    if len(problems) > PROBLEMS_SHOWN:
        lines.append(f"- ... and {len(problems) - PROBLEMS_SHOWN} more: run "
                     "`immich-usb-backup history` on the server")
    return lines


def _disk_name(label: Any, uuid: Any, fallback: Any = None) -> str:
    return str(label or uuid or fallback or "the disk")


def _disk_full(label: Any, uuid: Any, fallback: Any = None) -> str:
    name = _disk_name(label, uuid, fallback)
    return f"{name} (UUID {uuid})" if uuid and label else name


# Where the URLs come from -------------------------------------------------------------

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


# Masking ------------------------------------------------------------------------------

_TOKEN_SPLIT = re.compile(r"[/:@?&=#,;\s]+")
_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#\s]*)@")


def secrets_in(url: str, private_form: str = "", full_form: str = "") -> set[str]:
    """The secret parts of ``url``: its password, and every part that Apprise shows
    differently in its private form (``private_form``, from ``url(privacy=True)``) than in
    its full form (``full_form``, ``url(privacy=False)``): tokens, keys, passwords."""
    found: set[str] = set()
    m = _USERINFO.match(url)
    if m and ":" in m.group(1):
        user, password = m.group(1).split(":", 1)
        if password:
            found |= {password, unquote(password)}
            found.add(base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode())
                      .decode())
    if private_form and full_form:
        full = _TOKEN_SPLIT.split(full_form.split("://", 1)[-1])
        private = _TOKEN_SPLIT.split(private_form.split("://", 1)[-1])
        if len(full) == len(private):
            differing = {f for f, p in zip(full, private, strict=True) if f != p}
        else:
            differing = set(full) - set(private)
        for token in differing:
            plain = unquote(token)
            found |= {token, plain, quote(plain, safe="")}
            found |= {part for part in _TOKEN_SPLIT.split(plain) if len(part) >= 6}
    return {s for s in found if s}


class _Secrets:
    """The secrets of every URL loaded in this process, and one pattern matching them."""

    def __init__(self) -> None:
        self.known: set[str] = set()
        self.pattern: re.Pattern[str] | None = None
        self.lock = threading.Lock()

    def add(self, secrets: set[str]) -> None:
        with self.lock:
            if secrets <= self.known:
                return
            self.known |= secrets
            long = sorted((s for s in self.known if len(s) >= 4), key=len, reverse=True)
            short = sorted(s for s in self.known if len(s) < 4)  # only as whole words
            alternatives = [re.escape(s) for s in long]
            alternatives += [rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])"
                             for s in short]
            self.pattern = re.compile("|".join(alternatives))


_secrets = _Secrets()


def register_secrets(secrets: set[str]) -> None:
    """Mask these strings from now on, in our log lines, Apprise's and what we record."""
    _secrets.add(secrets)


def mask(text: str) -> str:
    """``text`` with passwords in URLs and every registered secret replaced by ``***``."""
    text = mask_secrets(text)
    pattern = _secrets.pattern
    return pattern.sub("***", text) if pattern is not None else text


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
