"""Secrets never reach a log, the history, a message or the disk (safety rule 9).

``mask`` hides the password of any ``scheme://user:password@host`` and every secret
registered so far (``register_secrets``): the parts of notification URLs that Apprise
itself treats as private (``secrets_in``), the API key. ``execute`` masks what it logs
of a command line with it, ``notify`` what it logs and records of a sending.
"""

from __future__ import annotations

import base64
import re
import threading
from urllib.parse import quote, unquote

_SECRET_IN_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@", re.I)


def mask_url_passwords(text: str) -> str:
    """Hide passwords in URLs (``scheme://user:secret@host`` -> ``scheme://user:***@host``)."""
    return _SECRET_IN_URL.sub(r"\g<scheme>\g<user>:***@", text)


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
    text = mask_url_passwords(text)
    pattern = _secrets.pattern
    return pattern.sub("***", text) if pattern is not None else text
