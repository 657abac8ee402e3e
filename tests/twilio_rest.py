"""Twilio's Recordings list and Calls resource, as the media stand-in serves them.

``GET /2010-04-01/Accounts/{AccountSid}/Recordings.json`` answers Twilio's list
JSON: newest first, filtered by whole GMT days (``DateCreated>=`` and
``DateCreated<=``, which reach the server as the parameters ``DateCreated>``
and ``DateCreated<``), ``PageSize`` up to 1000, and each page naming the next in
``next_page_uri`` with a ``Page`` and a ``PageToken`` (the position after the
page's last recording, so recordings created meanwhile shift nothing).
``GET .../Calls/{CallSid}.json`` answers a call's JSON. Both take HTTP Basic
auth, answer errors in Twilio's JSON (``code``, ``message``, ``status``), and
can be told to fail (429, 5xx) or wait.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

DAY_MS = 86_400_000
RFC2822 = "%a, %d %b %Y %H:%M:%S +0000"
MESSAGES = {
    401: "Authenticate",
    404: "The requested resource was not found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

Key = tuple[int, str]
"""A recording's place in the list: (minus its creation time in ms, its sid)."""


def twilio_error(status: int) -> web.Response:
    """An error as Twilio's REST API answers it."""
    code = {401: 20003, 404: 20404, 429: 20429}.get(status, 20500)
    body = {"code": code, "message": MESSAGES.get(status, "error"), "status": status,
            "more_info": f"https://www.twilio.com/docs/errors/{code}"}  # fmt: skip
    return web.json_response(body, status=status)


def _ms(day: str) -> int:
    """Midnight GMT of ``day`` (YYYY-MM-DD), in ms."""
    return (
        int(datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC).timestamp()) * 1000
    )


class RestResources:
    """The account's recordings and calls, and the two read routes over them."""

    def __init__(self, *, account_sid: str, authorization: str, deleted: set[str]) -> None:
        self._account = account_sid
        self._authorization = authorization
        self.deleted = deleted
        """Recordings deleted from Twilio: left out of the listing."""
        self.recordings: dict[str, dict[str, Any]] = {}
        """RecordingSid to its JSON as the list shows it."""
        self.created_ms: dict[str, int] = {}
        self.calls: dict[str, dict[str, Any]] = {}
        """CallSid to its JSON."""
        self.list_requests: list[tuple[float, dict[str, str]]] = []
        """Each list request answered: when (``time.monotonic``) and its query."""
        self.list_failures: dict[int, list[int]] = {}
        """Page number to the statuses its next requests get instead of the page, in order."""
        self.list_gate: asyncio.Event | None = None
        """When set to an unset event, list requests wait for it (a run held mid-listing)."""
        self.call_requests: Counter[str] = Counter()
        self.call_failures: list[int] = []
        """Statuses the next call lookups get instead of the call, in order."""
        self.delay_s = 0.0
        """Simulated time Twilio takes to answer a list page or a call."""
        self._order: list[Key] = []

    def route(self, app: web.Application) -> None:
        """Add the list and call routes to ``app``."""
        app.router.add_get("/2010-04-01/Accounts/{account}/Recordings.json", self._list)
        app.router.add_get("/2010-04-01/Accounts/{account}/Calls/{name}", self._call)

    def add(
        self,
        sid: str,
        call_sid: str,
        *,
        status: str = "completed",
        created: datetime | None = None,
        to: str = "+15550100000",
        from_: str = "+15550199999",
        direction: str = "inbound",
    ) -> None:
        """A recording of call ``call_sid`` (created now unless ``created``), and the call."""
        when = created or datetime.now(UTC)
        stamp = when.strftime(RFC2822)
        base = f"/2010-04-01/Accounts/{self._account}"
        self.recordings[sid] = {
            "account_sid": self._account, "api_version": "2010-04-01", "call_sid": call_sid,
            "conference_sid": None, "channels": 1, "date_created": stamp, "date_updated": stamp,
            "start_time": stamp, "duration": "42", "sid": sid, "price": "-0.0025",
            "price_unit": "USD", "status": status, "source": "RecordVerb", "error_code": None,
            "encryption_details": None, "uri": f"{base}/Recordings/{sid}.json",
            "media_url": f"https://api.twilio.com{base}/Recordings/{sid}",
            "subresource_uris": {"transcriptions": f"{base}/Recordings/{sid}/Transcriptions.json"},
        }  # fmt: skip
        self.created_ms[sid] = int(when.timestamp() * 1000)
        self.calls.setdefault(call_sid, {
            "sid": call_sid, "account_sid": self._account, "to": to, "from": from_,
            "direction": direction, "status": "completed", "date_created": stamp,
            "uri": f"{base}/Calls/{call_sid}.json",
        })  # fmt: skip

    def _authorized(self, request: web.Request) -> bool:
        return (
            request.headers.get("Authorization") == self._authorization
            and request.match_info["account"] == self._account
        )

    async def _list(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return twilio_error(401)
        query = dict(request.query)
        self.list_requests.append((time.monotonic(), query))
        page = int(query.get("Page", "0"))
        if self.list_failures.get(page):
            return twilio_error(self.list_failures[page].pop(0))
        if self.list_gate is not None:
            await self.list_gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # Twilio's own time, not a wait for state
        size = min(int(query.get("PageSize", "50")), 1000)
        chosen, more = self._page(query, size)
        return web.json_response(self._body(query, page, size, chosen, more))

    def _page(self, query: dict[str, str], size: int) -> tuple[list[Key], bool]:
        """Up to ``size`` recordings from the query's position, and whether more follow."""
        order = self._ordered()
        lo = bisect_left(order, (1 - _ms(query["DateCreated<"]) - DAY_MS, "")) \
            if "DateCreated<" in query else 0  # fmt: skip
        hi = bisect_right(order, (-_ms(query["DateCreated>"]), "\uffff")) \
            if "DateCreated>" in query else len(order)  # fmt: skip
        if query.get("PageToken"):
            ms, _, sid = query["PageToken"].removeprefix("PA").partition("-")
            lo = max(lo, bisect_right(order, (-int(ms), sid)))
        chosen: list[Key] = []
        for key in self._present(order, lo, hi):
            if len(chosen) == size:
                return chosen, True
            chosen.append(key)
        return chosen, False

    def _present(self, order: list[Key], lo: int, hi: int) -> Iterator[Key]:
        for index in range(lo, hi):
            if order[index][1] not in self.deleted:
                yield order[index]

    def _ordered(self) -> list[Key]:
        """The recordings newest first (sorted again only when recordings were added)."""
        if len(self._order) != len(self.created_ms):
            self._order = sorted((-ms, sid) for sid, ms in self.created_ms.items())
        return self._order

    def _body(
        self, query: dict[str, str], page: int, size: int, chosen: list[Key], more: bool
    ) -> dict[str, Any]:
        path = f"/2010-04-01/Accounts/{self._account}/Recordings.json"
        filters = {k: v for k, v in query.items() if k.startswith("DateCreated")}
        first = f"{path}?{urlencode({**filters, 'PageSize': size, 'Page': 0})}"
        following = None
        if more:
            ms, sid = chosen[-1]
            after = {**filters, "PageSize": size, "Page": page + 1, "PageToken": f"PA{-ms}-{sid}"}
            following = f"{path}?{urlencode(after)}"
        return {
            "recordings": [self.recordings[sid] for _, sid in chosen],
            "page": page, "page_size": size, "start": page * size,
            "end": page * size + max(len(chosen) - 1, 0),
            "uri": f"{path}?{urlencode(query)}", "first_page_uri": first,
            "next_page_uri": following, "previous_page_uri": None,
        }  # fmt: skip

    async def _call(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return twilio_error(401)
        sid, _, ext = request.match_info["name"].partition(".")
        self.call_requests[sid] += 1
        if self.call_failures:
            return twilio_error(self.call_failures.pop(0))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # Twilio's own time, not a wait for state
        if ext != "json" or sid not in self.calls:
            return twilio_error(404)
        return web.json_response(self.calls[sid])


def days_ago(days: float) -> datetime:
    """A creation time ``days`` before now."""
    return datetime.now(UTC) - timedelta(days=days)
