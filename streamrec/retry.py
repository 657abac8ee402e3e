"""How a failed attempt is classified and how long to wait before the next one.

Handlers raise PermanentError for failures another attempt cannot fix (a 4xx from
Twilio, undecodable audio, a 400 from OpenAI) and TransientError for those it may
(timeouts, 5xx, 429, Twilio's early 404). Any other exception counts as transient:
an unexpected error is retried up to the delivery cap, then dead-lettered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


class PermanentError(Exception):
    """Another attempt cannot succeed: dead-letter the entry at once."""


class TransientError(Exception):
    """Another attempt may succeed; ``retry_after`` (seconds) overrides the backoff."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(TransientError):
    """A service of our own (PostgreSQL) is down: not the entry's fault.

    Retried with backoff for as long as the outage lasts, without counting as a
    delivery, so an outage never dead-letters healthy work.
    """


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by a total number of deliveries."""

    max_deliveries: int = 5
    base_s: float = 1.0
    max_s: float = 60.0

    def delay(self, attempt: int, error: BaseException) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if isinstance(error, TransientError) and error.retry_after is not None:
            return min(max(error.retry_after, 0.0), self.max_s)
        ceiling: float = min(self.max_s, self.base_s * 2.0 ** max(attempt - 1, 0))
        # Half fixed, half random: keeps the exponential shape while spreading
        # the retries of entries that failed together.
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not crypto

    def exhausted(self, attempt: int) -> bool:
        """True when attempt number ``attempt`` was the last one allowed."""
        return attempt >= self.max_deliveries


def describe(error: BaseException) -> str:
    """A one-line reason for logs, the dead-letter stream and the row's error column."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    name = type(error).__name__
    return f"{name}: {text}"[:500] if text else name
