"""What a handler is given: one delivery of a stream entry."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

PRIOR = "prior_deliveries"
"""Field carrying the deliveries an entry had before it was parked (see semaphore)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of a stream entry to a handler."""

    entry_id: str
    fields: dict[str, str]
    deliveries: int
    """How often the entry has been delivered, this delivery included."""


Handler = Callable[[Delivery], Awaitable[None]]
"""Does the work of one entry. Returning means its result is committed."""

DeadHook = Callable[[Delivery, str], Awaitable[None]]
"""Told an entry's failure (and its delivery count) before it is dead-lettered."""


def delivered(entry_id: str, fields: dict[str, str], count: int) -> Delivery:
    """A Delivery of fields read from the stream; deliveries made before the entry was
    parked (its ``prior_deliveries`` field, removed here) are added to ``count``."""
    prior = fields.pop(PRIOR, "")
    return Delivery(entry_id, fields, count + (int(prior) if prior.isdigit() else 0))
