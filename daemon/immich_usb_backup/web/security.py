"""The web UI's locks: the password's scrypt hash, sessions, CSRF tokens, the login
throttle, the Origin check and the headers every answer carries.

The password file holds one line, ``scrypt$N$r$p$<salt>$<hash>`` (base64), written by
``immich-usb-backup web-password`` (``write_password``); the password itself is never
stored. A session is a random token in an ``HttpOnly``, ``SameSite=Strict`` cookie
(``Secure`` when the request came over TLS, directly or through a trusted proxy), held
in this process's memory only: a restart logs everyone out. Each session has its own
CSRF token, which every action must carry (header ``X-CSRF-Token``, or the form field
``csrf``). docs/web.md says why each rule is there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import grp
import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from immich_usb_backup.fsutil import replace_file

COOKIE = "iub_session"
SESSION_IDLE_S = 12 * 3600.0
MAX_SESSIONS = 64
LOGIN_DELAY_S = 1.0  # every failed login waits this long before its answer
MAX_FAILURES = 5  # failed logins per address ...
FAILURE_WINDOW_S = 15 * 60.0  # ... within this long; then 429 until the window passes
MIN_PASSWORD = 8

# scrypt: 2^15 x 8 x 128 bytes = 32 MiB and about 0.1 s a check on a small server
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class PasswordError(Exception):
    """The password file is missing or cannot be read or used."""


# The password ------------------------------------------------------------------------------

def hash_password(password: str, salt: bytes | None = None) -> str:
    """The line the password file holds for ``password``."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                            p=SCRYPT_P, maxmem=SCRYPT_MAXMEM, dklen=32)
    b64 = base64.b64encode
    return (f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}$"
            f"{b64(digest).decode()}")


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` (a password file's line) was made of.
    Blocking (about 0.1 s of CPU): call it in a thread. Raise PasswordError when
    ``stored`` is not such a line."""
    try:
        kind, n, r, p, salt, digest = stored.strip().split("$")
        if kind != "scrypt":
            raise ValueError(kind)
        expected = base64.b64decode(digest, validate=True)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt, validate=True),
                             n=int(n), r=int(r), p=int(p), maxmem=SCRYPT_MAXMEM,
                             dklen=len(expected))
    except (ValueError, TypeError) as exc:
        raise PasswordError(f"the password file is not one `web-password` wrote ({exc})"
                            ) from None
    return hmac.compare_digest(got, expected)


def read_password_file(path: Path) -> str:
    """The stored hash. Raise PasswordError saying how to make one."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise PasswordError(f"no web password is set ({path} does not exist): set one with "
                            "`sudo immich-usb-backup web-password`") from None
    except OSError as exc:
        raise PasswordError(f"cannot read the web password file {path}: "
                            f"{exc.strerror or exc}") from None
    if not text.startswith("scrypt$"):
        raise PasswordError(f"{path} holds no password hash: set one with "
                            "`sudo immich-usb-backup web-password`")
    return text


def write_password(path: Path, password: str, group: str) -> None:
    """Store ``password``'s hash in ``path`` (whole or not at all), mode 0640, owned by
    ``group`` when it exists (the web UI's service runs with it)."""
    if len(password) < MIN_PASSWORD:
        raise PasswordError(f"the password must have at least {MIN_PASSWORD} characters")
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, (hash_password(password) + "\n").encode(), 0o640)
    with contextlib.suppress(KeyError, PermissionError):
        os.chown(path, -1, grp.getgrnam(group).gr_gid)


# Sessions -----------------------------------------------------------------------------------

@dataclass
class Session:
    token: str
    csrf: str
    seen: float
    flash: str | None = None  # what the last button did, shown once on the next page


@dataclass
class Sessions:
    """The logged-in sessions of this process (at most :data:`MAX_SESSIONS`)."""

    items: dict[str, Session] = field(default_factory=dict)

    def new(self) -> Session:
        now = time.monotonic()
        self._expire(now)
        while len(self.items) >= MAX_SESSIONS:
            oldest = min(self.items.values(), key=lambda s: s.seen)
            del self.items[oldest.token]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now)
        self.items[session.token] = session
        return session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        now = time.monotonic()
        session = self.items.get(token)
        if session is None or now - session.seen > SESSION_IDLE_S:
            self.items.pop(token, None)
            return None
        session.seen = now
        return session

    def end(self, token: str | None) -> None:
        if token:
            self.items.pop(token, None)

    def _expire(self, now: float) -> None:
        for token in [t for t, s in self.items.items() if now - s.seen > SESSION_IDLE_S]:
            del self.items[token]


SESSIONS = web.AppKey("sessions", Sessions)


def session_of(request: web.Request) -> Session | None:
    """The request's session (its cookie's), or None."""
    return request.app[SESSIONS].get(request.cookies.get(COOKIE))


def csrf_ok(session: Session, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(session.csrf.encode(), str(given).encode())


# Failed logins -------------------------------------------------------------------------------

@dataclass
class Throttle:
    """Failed logins per client address: each failure is answered after
    :data:`LOGIN_DELAY_S`, and an address with :data:`MAX_FAILURES` failures within
    :data:`FAILURE_WINDOW_S` is refused until the oldest leaves the window. Attempts from
    one address are checked one at a time, so parallel guesses wait their turn."""

    failures: dict[str, list[float]] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock(self, address: str) -> asyncio.Lock:
        if len(self.locks) > 10_000:  # addresses come and go: forget the idle ones
            self.locks = {a: lk for a, lk in self.locks.items() if lk.locked()}
        return self.locks.setdefault(address, asyncio.Lock())

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: now)."""
        now = time.monotonic()
        recent = [t for t in self.failures.get(address, []) if now - t < FAILURE_WINDOW_S]
        if recent:
            self.failures[address] = recent
        else:
            self.failures.pop(address, None)
        if len(recent) < MAX_FAILURES:
            return 0.0
        return FAILURE_WINDOW_S - (now - recent[0])

    def failed(self, address: str) -> None:
        if len(self.failures) > 10_000:
            self.failures.clear()  # a flood from many addresses: start again, still slowed
        self.failures.setdefault(address, []).append(time.monotonic())

    def passed(self, address: str) -> None:
        self.failures.pop(address, None)


# Where a request came from -------------------------------------------------------------------

def _trusted(remote: str | None, proxies: Iterable[str]) -> bool:
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    for p in proxies:
        try:
            if address in ipaddress.ip_network(p, strict=False):
                return True
        except ValueError:
            continue
    return False


def client_address(request: web.Request, proxies: Iterable[str]) -> str:
    """The client's address: the peer's, or the last one a trusted proxy added to
    ``X-Forwarded-For``."""
    remote = request.remote or "?"
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded and _trusted(remote, proxies):
        last = forwarded.split(",")[-1].strip()
        if last:
            return last
    return remote


def is_tls(request: web.Request, proxies: Iterable[str]) -> bool:
    """Whether the browser's connection is TLS: ours, or a trusted proxy's
    ``X-Forwarded-Proto: https``."""
    if request.secure:
        return True
    proto = request.headers.get("X-Forwarded-Proto", "")
    return proto.split(",")[0].strip().lower() == "https" and _trusted(request.remote,
                                                                        proxies)


def origin_ok(request: web.Request, proxies: Iterable[str]) -> bool:
    """An ``Origin`` (or, without one, a ``Referer``) that is this site's own. A request
    with neither (a script, curl) passes here: it still needs the session cookie and the
    CSRF token, which a browser on another site cannot send."""
    origin = request.headers.get("Origin")
    if origin is None:
        referer = request.headers.get("Referer")
        if not referer:
            return True
        parts = referer.split("/", 3)
        origin = "/".join(parts[:3]) if len(parts) >= 3 else referer
    scheme = "https" if is_tls(request, proxies) else "http"
    return origin == f"{scheme}://{request.host}"


def set_session_cookie(response: web.StreamResponse, token: str, secure: bool) -> None:
    response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=secure,
                        path="/", max_age=int(SESSION_IDLE_S))


def clear_session_cookie(response: web.StreamResponse, secure: bool) -> None:
    response.set_cookie(COOKIE, "", httponly=True, samesite="Strict", secure=secure,
                        path="/", max_age=0)
