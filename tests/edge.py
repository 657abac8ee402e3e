"""The edge between Twilio and streamrec, for tests with real processes.

``Webhook`` runs ``python -m streamrec serve`` on a free port, and stops and
starts it. ``Callbacks`` completes recordings on the Twilio stand-in (each
joins the Recordings list, its call to its business's number) and sends their
status callbacks as Twilio does by default: one retry when the connection
fails, none after any answer, nothing after 15 s (``standins.post_like_twilio``).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import aiohttp

from streamrec.devservers import free_port
from streamrec.producer import WEBHOOK_PATH
from streamrec.settings import Settings
from tests.conftest import wait_for
from tests.processes import environment
from tests.standins import MediaStandIn, post_like_twilio


def number_of(business: str) -> str:
    """The phone number (E.164) of a test business: its calls are made to it."""
    return f"+1555{zlib.crc32(business.encode()) % 10**7:07d}"


class Webhook:
    """``python -m streamrec serve`` on a free port; its log is ``serve.log`` in ``directory``."""

    def __init__(self, settings: Settings, directory: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._env = environment(
            settings,
            STREAMREC_HTTP_HOST="127.0.0.1",
            STREAMREC_HTTP_PORT=str(self.port),
            STREAMREC_PUBLIC_URL=self.base,
        )
        self._directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, business: str) -> str:
        """Where Twilio posts the callbacks of ``business``."""
        return f"{self.base}{WEBHOOK_PATH}?business_id={business}"

    def _launch(self) -> None:
        log = (self._directory / "serve.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamrec", "serve"],
            env=self._env, cwd=self._directory, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def start(self) -> None:
        """Start serve and wait until it answers /healthz."""
        self._launch()
        async with aiohttp.ClientSession() as session:

            async def up() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.base + "/healthz") as response:
                        return response.status == 200
                return False

            await wait_for(up, timeout=30, what="serve to answer /healthz")

    async def stop(self) -> None:
        """SIGTERM serve (it answers the requests in flight) and wait for it to exit."""
        assert self.process is not None
        self.process.terminate()
        await asyncio.to_thread(self.process.wait, 30)

    def kill(self) -> None:
        """SIGKILL serve if it still runs (a test's cleanup)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Callbacks:
    """Recordings completing on the stand-in, their callbacks sent as Twilio sends them."""

    def __init__(
        self, webhook: Webhook, media: MediaStandIn, *, give_up_s: float, pause_s: float
    ) -> None:
        self._webhook = webhook
        self._media = media
        self._give_up_s = give_up_s
        self._pause_s = pause_s
        self.answered: Counter[str] = Counter()
        """Per RecordingSid, the callbacks answered 2xx (queued or duplicate)."""
        self.queued: Counter[str] = Counter()
        """Per RecordingSid, the callbacks answered "queued"."""
        self.given_up = 0
        """Callbacks Twilio would have given up on (no 2xx within its time)."""

    def complete(self, params: dict[str, str], business: str) -> None:
        """The recording of ``params`` completes: Twilio lists it from now on."""
        sid = params["RecordingSid"]
        if sid not in self._media.rest.recordings:
            self._media.rest.add(sid, params["CallSid"], to=number_of(business))

    async def send(
        self, session: aiohttp.ClientSession, params: dict[str, str], business: str
    ) -> str | None:
        """Complete the recording and send its callback; the webhook's status, or None."""
        self.complete(params, business)
        answer = await post_like_twilio(
            session, self._webhook.url(business), params,
            total_s=self._give_up_s, pause_s=self._pause_s,
        )  # fmt: skip
        if answer is None:
            self.given_up += 1
            return None
        sid = params["RecordingSid"]
        self.answered[sid] += 1
        self.queued[sid] += answer["status"] == "queued"
        return str(answer["status"])

    def lost_at_edge(self, sids: list[str]) -> int:
        """Recordings none of whose callbacks got a 2xx: without a reconciler, gone."""
        return sum(1 for sid in sids if not self.answered[sid])
