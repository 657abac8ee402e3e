"""What a handler is given: one delivery of a stream entry."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

PRIOR = "prior_deliveries"
"""Field of a woken entry: the deliveries it had before it was parked (see semaphore)."""
WOKEN = "woken"
"""Field of a woken entry (``1``): it left the parked list with a slot reserved for it."""


class Lost(Exception):
    """This process no longer owns the entry: its claim or its slot lease was lost.

    Raised before a side-effecting stage; the entry's work is left to whoever
    owns it now.
    """


def _always_owned() -> None:
    return None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of a stream entry to a handler."""

    entry_id: str
    fields: dict[str, str]
    deliveries: int
    """How often the entry has been delivered, this delivery included."""
    woken: bool = False
    """The entry came back from its business's parked list (it keeps its place in line)."""
    reclaimed: bool = False
    """The entry was taken over from a consumer that stopped renewing it."""
    guard: Callable[[], None] = field(default=_always_owned, compare=False, repr=False)
    """Raises Lost once this process no longer owns the entry (see ``ensure_owned``)."""

    @property
    def before(self) -> int:
        """Deliveries that went before this one."""
        return self.deliveries - 1

    def guarded_by(self, guard: Callable[[], None]) -> Delivery:
        """This delivery with ``guard`` as its ownership check (built directly: this runs
        once per entry, and ``dataclasses.replace`` costs several times as much)."""
        return Delivery(
            self.entry_id, self.fields, self.deliveries, self.woken, self.reclaimed, guard
        )

    def ensure_owned(self) -> None:
        """Raise Lost if the claim or slot lease of the entry is gone.

        Handlers call it before each side-effecting stage, so work whose
        ownership lapsed (a Redis outage or a process pause longer than the
        claim time or lease) stops there and is left to the new owner.
        """
        self.guard()


Handler = Callable[[Delivery], Awaitable[None]]
"""Does the work of one entry. Returning means its result is committed."""

DeadHook = Callable[[Delivery, str], Awaitable[None]]
"""Told an entry's failure (and its delivery count) before it is dead-lettered."""


def delivered(
    entry_id: str, fields: dict[str, str], count: int, *, reclaimed: bool = False
) -> Delivery:
    """A Delivery of fields read from the stream (``count``: its delivery count in the PEL).

    The fields a wake added (``prior_deliveries``, ``woken``) are removed here:
    the deliveries made before the entry was parked are added to ``count``.
    """
    prior = fields.pop(PRIOR, "")
    woken = fields.pop(WOKEN, "") == "1"
    total = count + (int(prior) if prior.isdigit() else 0)
    return Delivery(entry_id, fields, total, woken=woken, reclaimed=reclaimed)
