"""The dashboard's pages and actions, under /ui/ (the README lists the routes).

Pages are rendered on the server (Jinja2, autoescaped); ``app.js`` only
refreshes what the JSON document says. A GET never changes anything; each
action is a POST (its CSRF token checked by ``auth.gate``) answered with a 303
back to a page. An error is a page (or, for JSON and audio, a JSON body) with
its status, carrying the same headers as every other answer.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
import asyncpg
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from streamrec import deadletters
from streamrec.dashboard import auth, data
from streamrec.dashboard.auth import GUARD_KEY, Handler
from streamrec.dashboard.data import BACKEND_KEY
from streamrec.events import is_business_id
from streamrec.retry import describe
from streamrec.semaphore import Slots

log = structlog.get_logger("streamrec.dashboard")

routes = web.RouteTableDef()
DEAD_SHOWN = 200
"""Dead letters listed on the page, newest first."""
NOTHING = "\u2013"
"""What a value that is not known shows (an en dash, as app.js writes it)."""


def page(
    request: web.Request, template: str, context: dict[str, Any], *, status: int = 200
) -> web.Response:
    """``template`` rendered with ``context``, the session's CSRF token and the nav state."""
    csrf = auth.csrf_of(request)
    full = {"csrf": csrf, "signed_in": bool(csrf), "page": template.removesuffix(".html")}
    return aiohttp_jinja2.render_template(template, request, {**full, **context}, status=status)


def _see(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


@routes.get("/login", name="login_form")
async def login_form(request: web.Request) -> web.Response:
    """The login form (or, with a session already, the overview)."""
    if auth.session(request):
        return _see("/ui/")
    return page(request, "login.html", {"failed": False})


@routes.post("/login", name="login")
async def login(request: web.Request) -> web.Response:
    """The right token: a session cookie and 303 to the overview; else 401, no cookie."""
    token = (await request.post()).get("token")
    guard = request.app[GUARD_KEY]
    if not isinstance(token, str) or not token or not guard.admits(token):
        log.warning("dashboard_login_refused", remote=request.remote)
        return page(request, "login.html", {"failed": True}, status=401)
    response = _see("/ui/")
    guard.sign_in(response)
    log.info("dashboard_logged_in", remote=request.remote)
    return response


@routes.post("/logout", name="logout")
async def logout(request: web.Request) -> web.Response:
    """Clear the session cookie; 303 to the login form."""
    response = _see("/ui/login")
    request.app[GUARD_KEY].sign_out(response)
    return response


@routes.get("/", name="overview")
async def overview(request: web.Request) -> web.Response:
    """Health, figures, flow chart and consumers; app.js refreshes them."""
    doc = await data.document(request.app[BACKEND_KEY])
    return page(request, "overview.html", overview_context(doc))


def overview_context(doc: dict[str, Any]) -> dict[str, Any]:
    """What the overview shows of the document, as app.js shows it after a refresh."""
    hour = (doc.get("throughput") or {}).get("last_hour") or {}
    waiting = doc.get("oldest_waiting")
    series = doc.get("series") or {}
    figures = {
        "updated": datetime.now(UTC).strftime("%H:%M:%S UTC"),
        **{name: _shown(doc.get(name)) for name in ("length", "lag", "pending", "dead_letters")},
        "oldest_waiting": age(waiting["age_ms"]) if waiting else "none",
        "parked": sum(b["parked"] for b in doc.get("businesses", [])),
        "reconcile": reconciled(doc.get("reconcile"), doc.get("collected_at_ms")),
    }
    for outcome in ("completed", "failed", "dead_lettered"):
        figures[f"{outcome}_hour"] = _shown(hour.get(outcome))
    return {
        "doc": doc,
        "figures": figures,
        "live": sum(1 for c in doc.get("consumers", []) if c.get("heartbeat")),
        "series": data.SERIES,
        "totals": {name: sum(series.get(name) or []) for name in data.SERIES},
    }


def _shown(value: object) -> str:
    return NOTHING if value is None else str(value)


def reconciled(last: dict[str, Any] | None, now_ms: int | None) -> str:
    """The last reconcile run in a line (as app.js writes it)."""
    if not last:
        return "no run yet"
    ago = age(max((now_ms or 0) - int(last.get("started_ms", 0)), 0))
    head = f"last run {ago} ago by {last.get('by')} over {last.get('window')}"
    if last.get("error"):
        return f"{head}: FAILED: {last['error']}"
    counts = ", ".join(
        f"{name} {last.get(name)}" for name in ("listed", "known", "enqueued", "unassigned")
    )
    return f"{head}: {counts}"


@routes.get("/api/status", name="api_status")
async def api_status(request: web.Request) -> web.Response:
    """The JSON document (``data.document``)."""
    return web.json_response(await data.document(request.app[BACKEND_KEY]))


@routes.get("/api/recordings/{sid}", name="api_recording")
async def api_recording(request: web.Request) -> web.Response:
    """A recording's status, error, attempts and last update, for its page to poll."""
    row = await data.recording(request.app[BACKEND_KEY].pool, request.match_info["sid"])
    if row is None:
        raise web.HTTPNotFound(text="no such recording")
    updated = row["updated_at"]
    return web.json_response(
        {
            "status": row["status"],
            "error": row["error"],
            "attempts": row["attempts"],
            "updated_at": updated.isoformat() if updated else None,
        }
    )


@routes.get("/businesses", name="businesses")
async def businesses(request: web.Request) -> web.Response:
    """Per business: slots in use / limit, parked, the last hour; limits editable."""
    backend = request.app[BACKEND_KEY]
    rows, errors = await data.businesses(backend)
    context = {"rows": rows, "errors": errors, "default_limit": backend.default_slots}
    return page(request, "businesses.html", context)


@routes.post("/businesses/{business_id}/limit", name="set_limit")
async def set_limit(request: web.Request) -> web.Response:
    """Field ``limit``: a business's own limit (at least 1), or empty for the default."""
    business = request.match_info["business_id"]
    if not is_business_id(business):
        raise web.HTTPNotFound(text="not a business id")
    raw = str((await request.post()).get("limit", "")).strip()
    if raw and (not raw.isdigit() or int(raw) < 1 or len(raw) > 6):
        raise web.HTTPBadRequest(text="a limit is a whole number, at least 1 (empty: the default)")
    backend = request.app[BACKEND_KEY]
    slots = Slots(
        backend.redis,
        backend.layout.of(business),  # a business's limit lives in its partition
        default_limit=backend.default_slots,
        lease_ms=backend.lease_ms,
    )
    await slots.set_limit(business, int(raw) if raw else None)
    log.info("dashboard_limit_set", business_id=business, limit=raw or "default")
    return _see("/ui/businesses")


@routes.get("/dead", name="dead")
async def dead(request: web.Request) -> web.Response:
    """The newest dead letters over every partition, to replay or purge."""
    backend = request.app[BACKEND_KEY]
    letters = await data.dead_letters(backend.redis, backend.layout, count=DEAD_SHOWN)
    total = await deadletters.total(backend.redis, backend.layout)
    done = {k: int(v) for k, v in request.query.items() if k in ("replayed", "purged", "missing")
            and v.isdigit() and len(v) < 10}  # fmt: skip
    context = {"letters": letters, "total": total, "done": done}
    return page(request, "dead.html", {**context, "partitioned": backend.layout.partitioned})


@routes.get("/dead/{entry_id}", name="dead_letter")
@routes.get("/dead/{partition:\\d+}/{entry_id}", name="partition_dead_letter")
async def dead_letter(request: web.Request) -> web.Response:
    """One dead letter, all its fields, with a Replay button (``<partition>/<id>`` names
    it in any partition; a bare id is looked up in every one)."""
    backend = request.app[BACKEND_KEY]
    ref = request.match_info["entry_id"]
    if "partition" in request.match_info:
        ref = deadletters.qualified(int(request.match_info["partition"]), ref)
    letter = await data.dead_letter(backend.redis, backend.layout, ref)
    if letter is None:
        raise web.HTTPNotFound(text="no such dead letter (replayed or purged already?)")
    context = {"letter": letter, "partitioned": backend.layout.partitioned}
    return page(request, "dead_letter.html", context)


async def _ids(request: web.Request) -> list[str]:
    """The form's ``id`` fields, each naming a dead letter (``[<partition>/]<id>``);
    400 if one does not."""
    ids = [str(v) for v in (await request.post()).getall("id", [])]
    if not all(deadletters.REF.fullmatch(i) for i in ids) or len(ids) > 10_000:
        raise web.HTTPBadRequest(text="an id is not a dead-letter id")
    return list(dict.fromkeys(ids))


@routes.post("/dead/replay", name="replay")
async def replay(request: web.Request) -> web.Response:
    """Put the dead letters ``id`` back on their streams; 303 to the list (400, nothing
    replayed, when a bare id is in more than one partition)."""
    ids = await _ids(request)
    if not ids:
        raise web.HTTPBadRequest(text="no dead letter selected")
    backend = request.app[BACKEND_KEY]
    try:
        moved = await deadletters.replay_refs(backend.redis, backend.layout, ids)
    except deadletters.Ambiguous as exc:
        raise web.HTTPBadRequest(text=str(exc)) from exc
    replayed = sum(1 for new in moved.values() if new)
    log.info("dashboard_replayed", replayed=replayed, asked=len(ids))
    return _see(f"/ui/dead?replayed={replayed}&missing={len(ids) - replayed}")


@routes.post("/dead/purge", name="purge")
async def purge(request: web.Request) -> web.Response:
    """Delete the dead letters ``id`` (or all, ``all=1``) once ``confirm=yes``; else 400."""
    form = await request.post()
    ids = await _ids(request)
    everything = form.get("all") == "1"
    if not ids and not everything:
        raise web.HTTPBadRequest(text="no dead letter selected")
    if form.get("confirm") != "yes":
        context = {"ids": ids, "everything": everything}
        return page(request, "confirm.html", context, status=400)
    backend = request.app[BACKEND_KEY]
    try:
        purged = await deadletters.purge(backend.redis, backend.layout, None if everything else ids)
    except deadletters.Ambiguous as exc:
        raise web.HTTPBadRequest(text=str(exc)) from exc
    log.info("dashboard_purged", purged=purged, everything=everything)
    return _see(f"/ui/dead?purged={purged}")


@routes.get("/recordings", name="recordings")
async def recordings(request: web.Request) -> web.Response:
    """Search by RecordingSid, CallSid or business_id (exact), newest first."""
    query = request.query.get("q", "").strip()[:100]
    rows = await data.search(request.app[BACKEND_KEY].pool, query) if query else []
    return page(request, "recordings.html", {"q": query, "rows": rows})


@routes.get("/recordings/{sid}", name="recording")
async def recording(request: web.Request) -> web.Response:
    """One recording: its row, its stages, its transcript and its audio."""
    row = await data.recording(request.app[BACKEND_KEY].pool, request.match_info["sid"])
    if row is None:
        raise web.HTTPNotFound(text="no such recording")
    return page(request, "recording.html", {"row": row, "lines": data.lines(row)})


@routes.get("/recordings/{sid}/audio", name="audio")
async def audio(request: web.Request) -> web.StreamResponse:
    """The stored file (ranges served); 404 unless it is a file in the media directory."""
    path = await data.audio_file(request.app[BACKEND_KEY], request.match_info["sid"])
    if path is None:
        raise web.HTTPNotFound(text="no stored audio")
    return web.FileResponse(path, headers={"Content-Type": "audio/mpeg"})


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn a failure into an answer of the dashboard: an error page, or JSON for the
    JSON and audio routes. A dependency that fails is a 503 naming it."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status == 404 and request.path == "/ui":
            return _see("/ui/")
        if exc.status < 400:
            return web.Response(status=exc.status, headers=exc.headers)
        return _error(request, exc.status, exc.text or exc.reason)
    except (
        RedisError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        OSError,
        TimeoutError,
    ) as exc:
        log.warning("dashboard_unavailable", path=request.path, error=describe(exc))
        return _error(request, 503, f"a dependency did not answer: {describe(exc)}")
    except Exception as exc:
        log.exception("dashboard_failed", path=request.path)
        return _error(request, 500, f"the dashboard failed: {describe(exc)}")


def _error(request: web.Request, status: int, message: str) -> web.Response:
    if request.match_info.route.name in auth.MACHINE:
        return web.json_response({"error": message}, status=status)
    return page(request, "error.html", {"status": status, "message": message}, status=status)


def age(ms: int | float | None) -> str:
    """A duration for a person: 850ms, 12.5s, 3.2m, 4.0h."""
    if ms is None:
        return NOTHING
    if ms < 1000:
        return f"{int(ms)}ms"
    if ms < 120_000:
        return f"{ms / 1000:.1f}s"
    if ms < 7_200_000:
        return f"{ms / 60_000:.1f}m"
    return f"{ms / 3_600_000:.1f}h"


def when(value: datetime | int | None) -> str:
    """A time (datetime, or ms since the epoch) in UTC to the second."""
    if value is None:
        return NOTHING
    if isinstance(value, int):
        value = datetime.fromtimestamp(value / 1000, UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def since(later: datetime | None, earlier: datetime | None) -> str:
    """How long after ``earlier`` ``later`` came ('' when either is missing)."""
    if later is None or earlier is None:
        return ""
    return "+" + age((later - earlier).total_seconds() * 1000)


FILTERS = {"age": age, "when": when}
GLOBALS = {"since": since}
