"""The web UI's routes: the pages, the forms behind their buttons, and the JSON API.

Pages (``GET``): ``/`` the backup page, ``/history`` the history and schedule,
``/approve?disk=UUID`` the confirmation before approving, ``/login``. Forms (``POST``,
field ``csrf``; they answer with a redirect, so the pages work without JavaScript):
``/login``, ``/logout``, ``/action/{backup,approve,verify,drill,cancel}``. The JSON API
(header ``X-CSRF-Token`` on every ``POST`` but the login): ``/api/login``,
``/api/logout``, ``/api/status``, ``/api/disks``, ``/api/history?last=N``,
``/api/events`` (server-sent events), ``/api/backup``, ``/api/approve``,
``/api/verify``, ``/api/drill``, ``/api/cancel``. ``/static/`` holds the style sheet and
the one script.
Every route but the login and the static files needs a session (middleware below).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from immich_usb_backup import report
from immich_usb_backup.config import MODES, Config
from immich_usb_backup.control import ControlClient, ControlError, ControlUnavailable
from immich_usb_backup.web import pages
from immich_usb_backup.web import security as sec
from immich_usb_backup.web.live import Live

log = logging.getLogger(__name__)

PUBLIC = ("/login", "/api/login", "/favicon.ico")
MAX_BODY = 64 * 1024
HTTP_STATUS = {"bad-request": 400, "not-found": 404, "busy": 409, "refused": 422,
               "failed": 500}

CONFIG = web.AppKey("config", Config)
LIVE = web.AppKey("live", Live)
SESSIONS = sec.SESSIONS
THROTTLE = web.AppKey("throttle", sec.Throttle)
STATIC = web.AppKey("static", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(config: Config, client: ControlClient | None = None) -> web.Application:
    """The web UI for ``config`` (``client``: the daemon's control socket)."""
    app = web.Application(middlewares=[headers, guard], client_max_size=MAX_BODY)
    app[CONFIG] = config
    app[LIVE] = Live(config, client)
    app[SESSIONS] = sec.Sessions()
    app[THROTTLE] = sec.Throttle()
    app[STATIC] = _static_files()
    app.router.add_get("/", page_backup)
    app.router.add_get("/history", page_history)
    app.router.add_get("/approve", page_approve)
    app.router.add_get("/login", page_login)
    app.router.add_post("/login", form_login)
    app.router.add_post("/logout", form_logout)
    app.router.add_post("/action/{name}", form_action)
    app.router.add_post("/api/login", api_login)
    app.router.add_post("/api/logout", api_logout)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/api/disks", api_disks)
    app.router.add_get("/api/history", api_history)
    app.router.add_get("/api/events", api_events)
    app.router.add_post("/api/{name}", api_action)
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/favicon.ico", no_icon)
    app.on_startup.append(_compile_templates)
    return app


async def _compile_templates(app: web.Application) -> None:
    """Before the first request: the templates compiled, the history read."""
    await asyncio.to_thread(pages.load_templates)
    await asyncio.to_thread(app[LIVE].disk_summaries)


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The style sheet (the history page's, and the web UI's own) and the script."""
    here = resources.files("immich_usb_backup.web") / "static"
    style = report.css() + "\n" + (here / "web.css").read_text(encoding="utf-8")
    return {"style.css": (style.encode(), "text/css"),
            "app.js": ((here / "app.js").read_bytes(), "text/javascript")}


# Middleware ---------------------------------------------------------------------------------

@web.middleware
async def headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The security headers on every answer, errors included; nothing cached."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # redirects and errors: raised, with the headers
        exc.headers.update(sec.HEADERS)
        exc.headers.setdefault("Cache-Control", "no-store")
        raise
    response.headers.update(sec.HEADERS)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A session for everything but the login and the static files; for every POST an
    Origin of this site, and (but for the logins) the session's CSRF token."""
    config = request.app[CONFIG]
    path = request.path
    api = path.startswith("/api/")
    if request.method == "POST" and not sec.origin_ok(request, config.web.trusted_proxies):
        return _refuse(api, 403, "forbidden", "the request came from another site (Origin)")
    if path in PUBLIC or path.startswith("/static/"):
        return await handler(request)
    session = sec.session_of(request)
    if session is None:
        if api:
            return _refuse(True, 401, "unauthorized", "log in first (POST /api/login)")
        raise web.HTTPSeeOther("/login")
    if request.method == "POST":
        if api:
            given = request.headers.get("X-CSRF-Token")
        else:
            form = await request.post()
            given = str(form.get("csrf", ""))
        if not sec.csrf_ok(session, given):
            return _refuse(api, 403, "forbidden", "the CSRF token is missing or wrong")
    return await handler(request)


def _refuse(api: bool, status: int, code: str, message: str) -> web.Response:
    if api:
        return web.json_response({"error": code, "message": message}, status=status)
    return web.Response(status=status, text=f"{status}: {message}\n")


# Logging in and out -------------------------------------------------------------------------

async def _login(request: web.Request, password: object) -> tuple[int, str]:
    """Check ``password`` for this client: (200, session token), or (status, why).
    Failures are answered after :data:`security.LOGIN_DELAY_S`, one at a time per
    address, and an address with too many is refused for a while."""
    config = request.app[CONFIG]
    throttle = request.app[THROTTLE]
    address = sec.client_address(request, config.web.trusted_proxies)
    async with throttle.lock(address):
        wait = throttle.retry_after(address)
        if wait > 0:
            log.warning("web: login from %s refused: too many failed attempts", address)
            await asyncio.sleep(sec.LOGIN_DELAY_S)
            return 429, f"too many failed logins; try again in {int(wait) + 1} s"
        try:
            stored = await asyncio.to_thread(sec.read_password_file,
                                             config.web.password_file)
            ok = isinstance(password, str) and 0 < len(password) <= 1024 and (
                await asyncio.to_thread(sec.check_password, password, stored))
        except sec.PasswordError as exc:
            log.error("web: %s", exc)
            return 503, str(exc)
        if not ok:
            throttle.failed(address)
            log.warning("web: failed login from %s", address)
            await asyncio.sleep(sec.LOGIN_DELAY_S)
            return 401, "wrong password"
        throttle.passed(address)
    return 200, request.app[SESSIONS].new().token


async def api_login(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return _refuse(True, 400, "bad-request", 'send {"password": "..."}')
    status, result = await _login(request, body.get("password"))
    if status != 200:
        headers = {"Retry-After": "60"} if status == 429 else None
        return web.json_response({"error": "unauthorized" if status == 401 else
                                  "too-many" if status == 429 else "unavailable",
                                  "message": result}, status=status, headers=headers)
    session = request.app[SESSIONS].items[result]
    response = web.json_response({"csrf": session.csrf})
    sec.set_session_cookie(response, result, _tls(request))
    return response


async def form_login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    status, result = await _login(request, form.get("password"))
    if status != 200:
        return await pages.render(request, "web/login.html", status=status, error=result)
    response = _redirect("/")
    sec.set_session_cookie(response, result, _tls(request))
    return response


async def api_logout(request: web.Request) -> web.StreamResponse:
    request.app[SESSIONS].end(request.cookies.get(sec.COOKIE))
    response = web.json_response({"ok": True})
    sec.clear_session_cookie(response, _tls(request))
    return response


async def form_logout(request: web.Request) -> web.StreamResponse:
    request.app[SESSIONS].end(request.cookies.get(sec.COOKIE))
    response = _redirect("/login")
    sec.clear_session_cookie(response, _tls(request))
    return response


def _redirect(location: str) -> web.Response:
    """A 303 that carries a cookie (an HTTPException should be raised, not returned)."""
    return web.Response(status=303, headers={"Location": location})


def _tls(request: web.Request) -> bool:
    return sec.is_tls(request, request.app[CONFIG].web.trusted_proxies)


# Pages ----------------------------------------------------------------------------------------

async def page_login(request: web.Request) -> web.StreamResponse:
    if sec.session_of(request) is not None:
        raise web.HTTPSeeOther("/")
    return await pages.render(request, "web/login.html")


async def page_backup(request: web.Request) -> web.StreamResponse:
    return await pages.backup(request, request.app[LIVE], request.app[CONFIG])


async def page_history(request: web.Request) -> web.StreamResponse:
    return await pages.history_page(request, request.app[LIVE], request.app[CONFIG])


async def page_approve(request: web.Request) -> web.StreamResponse:
    return await pages.approve(request, request.app[LIVE], request.query.get("disk", ""))


async def no_icon(request: web.Request) -> web.StreamResponse:
    """No icon (a browser asks for one on every page)."""
    return web.Response(status=204)


async def static_file(request: web.Request) -> web.StreamResponse:
    found = request.app[STATIC].get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    body, kind = found
    return web.Response(body=body, content_type=kind, charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


# The API ----------------------------------------------------------------------------------------

async def api_status(request: web.Request) -> web.StreamResponse:
    return web.json_response(await request.app[LIVE].status())


async def api_disks(request: web.Request) -> web.StreamResponse:
    live = request.app[LIVE]
    disks = await live.disks()
    if disks is None:
        return web.json_response({"error": "daemon-unavailable",
                                  "message": live.why_unavailable()},
                                 status=503)
    return web.json_response(disks)


async def api_history(request: web.Request) -> web.StreamResponse:
    raw = request.query.get("last")
    last: int | None = None
    if raw is not None:
        if not raw.isdigit() or int(raw) < 1:
            return _refuse(True, 400, "bad-request", "last must be a whole number, 1 or more")
        last = int(raw)
    return web.json_response(await request.app[LIVE].history(last))


async def api_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``status`` (the ``/api/status`` object) at once, then every
    0.4 s while a run is on and at each change otherwise."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    response.headers.update(sec.HEADERS)
    await response.prepare(request)
    await response.write(b"retry: 3000\n\n")
    events = request.app[LIVE].subscribe()
    try:
        async for event in events:
            data = json.dumps(event.get("status", {}), ensure_ascii=False)
            await response.write(f"event: status\ndata: {data}\n\n".encode())
    except (ConnectionError, RuntimeError):  # the page went away
        pass
    finally:
        await events.aclose()
    return response


async def _act(request: web.Request, name: str, body: dict[str, Any]) -> tuple[int, dict[str,
                                                                                    Any]]:
    """Do ``name`` through the daemon: (HTTP status, the answer's JSON)."""
    live = request.app[LIVE]
    args: dict[str, Any] = {}
    op = name
    if name in ("backup", "approve", "verify", "drill"):
        disk = body.get("disk")
        if not isinstance(disk, str) or not disk:
            return 400, {"error": "bad-request", "message": "which disk? (its UUID)"}
        args["disk"] = disk
    if name == "backup":
        mode = body.get("mode")
        if mode not in (None, "", *MODES):
            return 400, {"error": "bad-request",
                         "message": f"mode must be one of {', '.join(MODES)}"}
        args["mode"] = mode or None
    elif name == "approve":
        args["create_marker"] = body.get("create_marker") in (True, "on", "true", "1")
    elif name == "verify" and body.get("restore_drill") in (True, "on", "true", "1"):
        op = "drill"
    elif name not in ("verify", "drill", "cancel"):
        return 404, {"error": "not-found", "message": f"no action {name}"}
    try:
        answer = await live.call(op, **args)
    except ControlUnavailable as exc:
        return 503, {"error": "daemon-unavailable", "message": str(exc)}
    except ControlError as exc:
        return HTTP_STATUS.get(exc.code, 500), {"error": exc.code, "message": exc.message,
                                                **exc.extra}
    answer.pop("ok", None)
    log.info("web: %s %s", op, args.get("disk", ""))
    return (202 if "started" in answer else 200), answer


async def api_action(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return _refuse(True, 400, "bad-request", "the body must be a JSON object")
    status, answer = await _act(request, request.match_info["name"], body)
    return web.json_response(answer, status=status)


async def form_action(request: web.Request) -> web.StreamResponse:
    """A button of a page: the action, then back to the page with what happened."""
    form = await request.post()
    status, answer = await _act(request, request.match_info["name"],
                                {k: str(v) for k, v in form.items()})
    session = sec.session_of(request)
    assert session is not None  # the guard let it in
    session.flash = pages.outcome_text(request.match_info["name"], status, answer)
    back = "/history" if request.match_info["name"] in ("verify", "drill") else "/"
    raise web.HTTPSeeOther(back)

