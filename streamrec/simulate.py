"""``streamrec simulate``: post a RecordingStatusCallback signed as Twilio signs it.

Signs with the configured auth token over ``STREAMREC_PUBLIC_URL`` + path +
query, exactly what the webhook verifies, so it works against a local run and
against a real deployment (``--url`` posts somewhere else, e.g. straight to a
container behind the proxy, while the signature stays over the public URL).
Each answer is reported as it arrives; when the webhook stops answering
mid-run, the answers before it are kept (``Interrupted``) for a summary.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp
from twilio.request_validator import RequestValidator

from streamrec.devrun import DEV_RECORDING_S
from streamrec.producer import WEBHOOK_PATH
from streamrec.retry import describe


@dataclass(frozen=True, slots=True)
class Posted:
    """One simulated callback and the webhook's answer."""

    recording_sid: str
    status: int
    body: str

    @property
    def accepted(self) -> bool:
        """The webhook answered 2xx: queued, duplicate or ignored."""
        return 200 <= self.status < 300

    @property
    def outcome(self) -> str:
        """The webhook's word for an accepted callback (queued, ...), else its HTTP status."""
        if not self.accepted:
            return str(self.status)
        try:
            return str(json.loads(self.body)["status"])
        except (ValueError, KeyError, TypeError):
            return str(self.status)


class Interrupted(Exception):
    """The webhook stopped answering mid-run (refused, reset, timed out)."""

    def __init__(self, posted: list[Posted], error: Exception) -> None:
        super().__init__(describe(error))
        self.posted = posted
        """The answers before the error, in order."""


def summary(posted: list[Posted], count: int) -> str:
    """One line: how many of ``count`` callbacks were answered, accepted and refused."""
    accepted = Counter(p.outcome for p in posted if p.accepted)
    refused = Counter(p.outcome for p in posted if not p.accepted)
    line = f"{len(posted)} of {count} answered: {accepted.total()} accepted"
    line += f" ({_counts(accepted)})" if accepted else ""
    line += f", {refused.total()} refused ({_counts(refused)})" if refused else ""
    return line


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{word} {n}" for word, n in counter.items())


def callback_params(account_sid: str, *, status: str, recording_sid: str | None) -> dict[str, str]:
    """The form fields of a RecordingStatusCallback for a made-up call, as long as a
    recording of the development account (whose media ``dev`` serves)."""
    sid = recording_sid or "RE" + secrets.token_hex(16)
    return {
        "AccountSid": account_sid,
        "CallSid": "CA" + secrets.token_hex(16),
        "RecordingSid": sid,
        "RecordingStatus": status,
        "RecordingDuration": str(DEV_RECORDING_S),
        "RecordingChannels": "1",
        "RecordingSource": "RecordVerb",
    }


async def post_callbacks(
    *,
    account_sid: str,
    auth_token: str,
    public_url: str,
    post_to: str | None,
    business_id: str,
    status: str = "completed",
    count: int = 1,
    recording_sid: str | None = None,
    on_answer: Callable[[Posted], None] | None = None,
) -> list[Posted]:
    """Post ``count`` signed callbacks one after another; returns what the webhook answered.

    ``on_answer`` is called with each answer as it arrives. Raises Interrupted,
    holding the answers so far, when a post gets no answer (the server went
    away, refused the connection or timed out).
    """
    path = f"{WEBHOOK_PATH}?{urlencode({'business_id': business_id})}"
    validator = RequestValidator(auth_token)
    answers: list[Posted] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(count):
            params = callback_params(account_sid, status=status, recording_sid=recording_sid)
            signature = validator.compute_signature(public_url + path, params)
            try:
                async with session.post(
                    (post_to or public_url).rstrip("/") + path,
                    data=params,
                    headers={"X-Twilio-Signature": signature},
                ) as response:
                    answer = Posted(params["RecordingSid"], response.status, await response.text())
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise Interrupted(answers, exc) from exc
            answers.append(answer)
            if on_answer is not None:
                on_answer(answer)
    return answers
