"""Twilio's REST API as the reconciler reads it: the Recordings list and the Calls resource.

Calls go through the ``twilio`` package's own client, with its async HTTP client
and its API domain pointed at ``STREAMREC_TWILIO_API_BASE``. Twilio answers a
list page by page, each naming the next (``next_page_uri``); a page that fails
with 429, 5xx or a network error is fetched again with backoff, so a failure
costs that page, never the listing from its start.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any, TypeVar

import aiohttp
import structlog
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from streamrec.retry import RetryPolicy, describe

log = structlog.get_logger("streamrec.twilio_api")

T = TypeVar("T")

PAGE_SIZE = 1000
"""Recordings per page: Twilio's largest."""
PATIENCE = RetryPolicy(max_deliveries=8, base_s=0.5, max_s=30.0)
"""Attempts per request (a page or a call) and the backoff between them: about two
minutes of 429s or 5xx before the run gives up."""
CALL_LOOKUPS = 32
"""Calls fetched at once: well below what Twilio lets an account run at once, leaving
room for the account's other API users (a 429 would be retried anyway)."""


class TwilioApiError(Exception):
    """Twilio refused a request (4xx other than 429), or kept failing past the retries.

    ``status`` is the HTTP status of the last answer (None: no answer, a network failure).
    """

    def __init__(self, message: str, *, status: int | None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Listed:
    """One recording as the Recordings list shows it."""

    sid: str
    call_sid: str
    account_sid: str
    status: str
    duration: str
    channels: str
    source: str


@dataclass(frozen=True, slots=True)
class Call:
    """The parts of a call the reconciler needs to find its business."""

    sid: str
    to: str | None
    from_: str | None
    direction: str | None


class _HttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]
    """twilio's async HTTP client, sending Basic auth as a header: aiohttp deprecates ``auth=``."""

    async def request(self, method: str, url: str, **options: Any) -> Any:
        auth = options.pop("auth", None)
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            options["headers"] = {
                **(options.get("headers") or {}),
                "Authorization": f"Basic {token}",
            }
        return await super().request(method, url, **options)


@contextlib.asynccontextmanager
async def open_client(*, api_base: str, account_sid: str, auth_token: str) -> AsyncIterator[Any]:
    """A ``twilio.rest.Client`` on an async HTTP client, its API domain at ``api_base``."""
    http = _HttpClient()
    try:
        client = Client(account_sid, auth_token, http_client=http)
        # The client takes TWILIO_REGION / TWILIO_EDGE from the environment and
        # would rewrite the API host with them; only settings.py reads the environment.
        client.region = client.edge = None
        client.api.base_url = api_base
        yield client
    finally:
        await http.close()


class TwilioApi:
    """The account's recordings and calls, read with retries (see the module docstring)."""

    def __init__(
        self,
        client: Any,
        *,
        timeout_s: float = 60.0,
        patience: RetryPolicy = PATIENCE,
        call_lookups: int = CALL_LOOKUPS,
    ) -> None:
        self._account = client.api.v2010.account
        self._timeout_s = timeout_s
        self._patience = patience
        self._lookups = asyncio.Semaphore(call_lookups)

    async def recordings(
        self, *, first: date, last: date | None, page_size: int = PAGE_SIZE
    ) -> AsyncGenerator[list[Listed], None]:
        """The recordings created from GMT day ``first`` to ``last`` (inclusive), page by page.

        Twilio filters by whole GMT days (``DateCreated>=`` and ``DateCreated<=``)
        and lists the newest first. Raises TwilioApiError when a page fails for good.
        """
        filters: dict[str, Any] = {"date_created_after": first.isoformat(), "page_size": page_size}
        if last is not None:
            filters["date_created_before"] = last.isoformat()
        page = await self._patiently("recordings page", lambda: self._list(filters))
        following: asyncio.Task[Any] | None = None
        try:
            while True:
                # The next page loads while the caller works on this one.
                if page.next_page_url:
                    following = asyncio.create_task(
                        self._patiently("recordings page", page.next_page_async)
                    )
                yield [_listed(r) for r in page]
                if following is None:
                    return
                page, following = await following, None
        finally:
            if following is not None:
                following.cancel()

    async def _list(self, filters: dict[str, Any]) -> Any:
        # twilio-python names the filters DateCreated< and DateCreated>: the
        # documented DateCreated<=2026-11-01 is the parameter "DateCreated<" with
        # the value 2026-11-01 (its = is the one between name and value).
        return await self._account.recordings.page_async(**filters)

    async def calls(self, sids: Iterable[str]) -> dict[str, Call | None]:
        """Each call of ``sids`` (None for a call Twilio does not have), fetched in parallel.

        Raises TwilioApiError when a lookup fails for good.
        """
        unique = list(dict.fromkeys(sids))
        found = await asyncio.gather(*(self._call(sid) for sid in unique))
        return dict(zip(unique, found, strict=True))

    async def _call(self, sid: str) -> Call | None:
        async with self._lookups:
            try:
                call = await self._patiently("call", self._account.calls(sid).fetch_async)
            except TwilioApiError as exc:
                if exc.status == 404:
                    return None
                raise
        # twilio-python spells the "from" field _from, "from" being a Python keyword.
        return Call(sid=sid, to=call.to, from_=call._from, direction=call.direction)

    async def _patiently(self, what: str, request: Callable[[], Awaitable[T]]) -> T:
        """``request()``, again after 429, 5xx, network failures and timeouts, up to the patience.

        Each attempt has ``timeout_s``: the twilio client sets no timeout of its own.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                async with asyncio.timeout(self._timeout_s):
                    return await request()
            except (TwilioException, aiohttp.ClientError, TimeoutError) as exc:
                status = _status(exc)
                if status is not None and status != 429 and status < 500:
                    raise TwilioApiError(f"{what}: {describe(exc)}", status=status) from exc
                if self._patience.exhausted(attempt):
                    raise TwilioApiError(
                        f"{what}: gave up after {attempt} attempts: {describe(exc)}",
                        status=status,
                    ) from exc
                delay = self._patience.delay(attempt, exc)
                log.warning("twilio_api_retry", what=what, attempt=attempt,
                            status=status, delay_s=round(delay, 2))  # fmt: skip
                await asyncio.sleep(delay)  # the backoff Twilio's rate limit asks for


def _status(exc: BaseException) -> int | None:
    """The HTTP status a failed request got (None: no answer, a network failure)."""
    if isinstance(exc, TwilioRestException):
        return int(exc.status)
    if isinstance(exc, TwilioException) and len(exc.args) > 1:
        # A page that did not load: Page.process_response passes the response along.
        return int(getattr(exc.args[1], "status_code", 0)) or None
    return None


def _listed(record: Any) -> Listed:
    return Listed(
        sid=record.sid or "",
        call_sid=record.call_sid or "",
        account_sid=record.account_sid or "",
        status=record.status or "",
        duration=record.duration or "",
        channels="" if record.channels is None else str(record.channels),
        source=record.source or "",
    )
