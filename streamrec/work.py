"""One entry in work in this process: its task, claim, slot lease and ownership deadline.

Everything the consumer must keep in step for an entry lives here, so it
changes together: the delivery, the task running it, the delivery count its
claim carries in the PEL, the slot it holds, and until when this process may
still be sure it owns the entry.

Ownership is a pair of leases kept in Redis: the claim (others may XAUTOCLAIM
the entry once it has been idle for the claim time) and, with slots on, the
slot lease. Each is renewed by the consumer's renew loop; a renewal sent at
time t keeps the lease at least until t + its length, whatever Redis answers
late. When that deadline passes without a renewal (Redis unreachable, this
process paused), or a renewal says the lease is gone, the work is stopped:
its task is cancelled while the handler runs, and ``guard`` (the delivery's
``ensure_owned``) raises ``Lost`` before the handler's next stage.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from streamrec.delivery import Delivery, Lost
from streamrec.semaphore import Held

INFINITY = float("inf")


@dataclass(eq=False, slots=True)
class Work:
    """An entry this process works on; ``claimed`` is its delivery count in the PEL."""

    delivery: Delivery
    claimed: int
    claim_until: float
    held: Held | None = None
    slot_until: float = INFINITY
    task: asyncio.Task[None] | None = None
    running: bool = True
    """The handler may still run (it counts against concurrency and may be stopped)."""
    stopped: str | None = None
    """Why this process gave the entry up, once it has."""
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.delivery = self.delivery.guarded_by(self.guard)

    @property
    def entry_id(self) -> str:
        """The stream entry id."""
        return self.delivery.entry_id

    @property
    def owned_until(self) -> float:
        """Monotonic time until which both the claim and the slot lease surely hold."""
        return min(self.claim_until, self.slot_until)

    def guard(self) -> None:
        """Raise Lost if the entry was given up or its leases may have lapsed."""
        if self.stopped is None and time.monotonic() >= self.owned_until:
            self.stop("no renewal within the claim time or slot lease")
        if self.stopped is not None:
            raise Lost(self.stopped)

    def renewed(self, *, claim_until: float | None = None, slot_until: float | None = None) -> None:
        """Record a successful renewal and move the deadline on."""
        if claim_until is not None:
            self.claim_until = max(self.claim_until, claim_until)
        if slot_until is not None:
            self.slot_until = max(self.slot_until, slot_until)
        self.arm()

    def arm(self) -> None:
        """(Re)start the timer that stops the work when its ownership deadline passes."""
        if self._timer is not None:
            self._timer.cancel()
        if self.running and self.stopped is None:
            delay = max(self.owned_until - time.monotonic(), 0.0)
            self._timer = asyncio.get_running_loop().call_later(
                delay, self.stop, "no renewal within the claim time or slot lease"
            )

    def stop(self, reason: str) -> None:
        """Give the entry up: cancel the handler if it still runs (its result is not ours)."""
        if self.stopped is not None or not self.running:
            return
        self.stopped = reason
        task = self.task
        # From within its own task the caller raises Lost instead.
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    def finish_running(self) -> bool:
        """The handler is over (returned or failed); True the first time only."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        was, self.running = self.running, False
        return was
