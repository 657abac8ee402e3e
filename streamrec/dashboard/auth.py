"""The dashboard's locks: the session cookie, the CSRF token and the response headers.

The dashboard exists only when STREAMREC_UI_TOKEN is set. A person types the
token once on the login page and gets a session cookie
``<expiry unix s>.<hex HMAC-SHA256(key, "session:" + expiry)>`` with key =
HMAC-SHA256(token, "streamrec-ui"): nothing is stored on the server, every
webhook replica accepts it, and a new token ends every session. The cookie is
HttpOnly, SameSite=Strict, limited to /ui/ and Secure when the public URL is
https.

Every state-changing request is a POST carrying the form field ``csrf``,
HMAC-SHA256(key, "csrf:" + cookie): the same for the whole session, readable
only by the dashboard's own pages. Without a session a page redirects to the
login page, and the JSON and audio answer 401. Every answer carries a
Content-Security-Policy that allows scripts, styles and media from the
dashboard itself only, so text from a recording can never run as code.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

COOKIE = "streamrec_ui"
PATH = "/ui/"
LIFETIME_S = 12 * 3600
CLOCK_SKEW_S = 300
"""How far ahead of this host's clock a replica that issued a session may be."""
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " media-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none';"
    " base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
PUBLIC = frozenset({"login_form", "login", "static"})
"""Routes open without a session (by route name)."""
MACHINE = frozenset({"api_status", "api_recording", "audio"})
"""Routes answered 401 without a session (a redirect to a form means nothing to them)."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _mac(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def derive(token: str) -> bytes:
    """The signing key of a token: HMAC-SHA256(token, "streamrec-ui")."""
    return hmac.new(token.encode(), b"streamrec-ui", hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class Guard:
    """Issues and checks sessions and CSRF tokens for one dashboard token."""

    key: bytes
    secure: bool = False
    """Mark the cookie Secure (the public URL is https)."""

    @classmethod
    def of(cls, token: str, *, secure: bool = False) -> Guard:
        """The guard of ``token``; only its derived key is kept."""
        return cls(derive(token), secure)

    def admits(self, token: str) -> bool:
        """True if ``token`` is the dashboard's (compared as derived keys, in constant time)."""
        return hmac.compare_digest(derive(token), self.key)

    def issue(self, now: float | None = None) -> str:
        """A session cookie's value, valid for LIFETIME_S from ``now``."""
        expiry = str(int(now if now is not None else time.time()) + LIFETIME_S)
        return f"{expiry}.{_mac(self.key, 'session:' + expiry)}"

    def valid(self, cookie: str | None, now: float | None = None) -> bool:
        """True if ``cookie`` is a session this key signed and it has not expired."""
        if not cookie:
            return False
        expiry, _, mac = cookie.partition(".")
        if not expiry.isdigit() or len(expiry) > 12:
            return False
        if not hmac.compare_digest(mac.encode(), _mac(self.key, "session:" + expiry).encode()):
            return False
        left = int(expiry) - (now if now is not None else time.time())
        return 0 < left <= LIFETIME_S + CLOCK_SKEW_S

    def csrf(self, cookie: str) -> str:
        """The CSRF token of a session: the same for every page of it."""
        return _mac(self.key, "csrf:" + cookie)

    def sign_in(self, response: web.StreamResponse) -> None:
        """Give ``response`` a new session cookie."""
        response.set_cookie(
            COOKIE,
            self.issue(),
            max_age=LIFETIME_S,
            path=PATH,
            httponly=True,
            samesite="Strict",
            secure=self.secure,
        )

    def sign_out(self, response: web.StreamResponse) -> None:
        """Make ``response`` clear the session cookie."""
        response.del_cookie(COOKIE, path=PATH, secure=self.secure, samesite="Strict")


GUARD_KEY: web.AppKey[Guard] = web.AppKey("guard", Guard)


def session(request: web.Request) -> str | None:
    """The request's session cookie if it is valid, else None."""
    cookie = request.cookies.get(COOKIE)
    return cookie if request.app[GUARD_KEY].valid(cookie) else None


def csrf_of(request: web.Request) -> str:
    """The CSRF token for forms on the page answering ``request`` ('' without a session)."""
    cookie = session(request)
    return request.app[GUARD_KEY].csrf(cookie) if cookie else ""


@web.middleware
async def headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Put the security headers on every answer; pages, JSON and audio are never stored
    by caches, the static files are revalidated."""
    response = await handler(request)
    response.headers.update(HEADERS)
    static = request.match_info.route.name == "static"
    response.headers.setdefault("Cache-Control", "no-cache" if static else "no-store")
    return response


@web.middleware
async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Let a request through only with a session (and, for a POST, its CSRF token).

    Without a session: 303 to the login page for a page, 401 for JSON and
    audio. A POST whose ``csrf`` field is missing or wrong: 403, nothing done.
    """
    name = request.match_info.route.name
    if name in PUBLIC or request.match_info.http_exception is not None:
        return await handler(request)
    cookie = session(request)
    if cookie is None:
        if name in MACHINE:
            return web.json_response({"error": "no session: log in at /ui/login"}, status=401)
        return web.Response(status=303, headers={"Location": "/ui/login"})
    if request.method == "POST":
        form = await request.post()
        given = form.get("csrf")
        expected = request.app[GUARD_KEY].csrf(cookie)
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected.encode()):
            raise web.HTTPForbidden(text="the form's CSRF token is missing or wrong")
    return await handler(request)
