"""``streamrec simulate``: post a RecordingStatusCallback signed as Twilio signs it.

Signs with the configured auth token over ``STREAMREC_PUBLIC_URL`` + path +
query, exactly what the webhook verifies, so it works against a local run and
against a real deployment (``--url`` posts somewhere else, e.g. straight to a
container behind the proxy, while the signature stays over the public URL).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp
from twilio.request_validator import RequestValidator

from streamrec.producer import WEBHOOK_PATH


@dataclass(frozen=True, slots=True)
class Posted:
    """One simulated callback and the webhook's answer."""

    recording_sid: str
    status: int
    body: str


def callback_params(account_sid: str, *, status: str, recording_sid: str | None) -> dict[str, str]:
    """The form fields of a RecordingStatusCallback for a made-up call."""
    sid = recording_sid or "RE" + secrets.token_hex(16)
    return {
        "AccountSid": account_sid,
        "CallSid": "CA" + secrets.token_hex(16),
        "RecordingSid": sid,
        "RecordingStatus": status,
        "RecordingDuration": "7",
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
) -> list[Posted]:
    """Post ``count`` signed callbacks; returns what the webhook answered to each."""
    path = f"{WEBHOOK_PATH}?{urlencode({'business_id': business_id})}"
    validator = RequestValidator(auth_token)
    answers = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(count):
            params = callback_params(account_sid, status=status, recording_sid=recording_sid)
            signature = validator.compute_signature(public_url + path, params)
            async with session.post(
                (post_to or public_url).rstrip("/") + path,
                data=params,
                headers={"X-Twilio-Signature": signature},
            ) as response:
                answers.append(
                    Posted(params["RecordingSid"], response.status, await response.text())
                )
    return answers
