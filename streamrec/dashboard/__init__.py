"""The dashboard: what an on-call engineer opens first, served under /ui/ by the webhook.

``mount`` adds it to the webhook's app when STREAMREC_UI_TOKEN is set; without
the token nothing is mounted and every /ui/ path is the webhook's plain 404.
Pages are server-rendered; ``static/app.js`` refreshes the overview and a
recording's status from the JSON document (``data.document``) every 2 s.
Security (session cookie, CSRF, Content-Security-Policy): ``auth``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
import redis.asyncio as aioredis
from aiohttp import web

from streamrec.dashboard import auth, views
from streamrec.dashboard.data import BACKEND_KEY, Backend
from streamrec.settings import Settings

PREFIX = "/ui/"
STATIC = Path(__file__).with_name("static")


def create(backend: Backend, *, token: str, secure: bool) -> web.Application:
    """The dashboard as an aiohttp app, to mount under PREFIX (``mount`` does).

    ``token`` is STREAMREC_UI_TOKEN; ``secure`` marks the session cookie Secure.
    """
    app = web.Application(middlewares=[auth.headers, views.errors, auth.gate])
    app[BACKEND_KEY] = backend
    app[auth.GUARD_KEY] = auth.Guard.of(token, secure=secure)
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("streamrec.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        filters=views.FILTERS,
        default_helpers=False,
    )
    env.globals.update(views.GLOBALS)
    app.router.add_routes(views.routes)
    app.router.add_static("/static", STATIC, name="static")
    return app


def mount(app: web.Application, settings: Settings, redis: aioredis.Redis, pool: Any) -> bool:
    """Add the dashboard to the webhook's ``app`` if STREAMREC_UI_TOKEN is set; True if so.

    It reads and writes through ``redis`` and ``pool`` (both owned by the caller).
    """
    if not settings.ui_enabled or settings.ui_token is None:
        return False
    backend = Backend(
        redis=redis,
        layout=settings.layout,
        pool=pool,
        media_dir=settings.media_dir,
        default_slots=settings.business_slots,
        lease_ms=settings.lease_ms,
    )
    secure = settings.public_url.startswith("https://")
    token = settings.ui_token.get_secret_value()
    app.add_subapp(PREFIX, create(backend, token=token, secure=secure))
    return True
