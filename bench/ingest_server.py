"""The server under test of bench/ingest.py, in a process of its own.

    .venv/bin/python bench/ingest_server.py --mode streamrec|bare [--port 0] \
        [--redis-url URL] [--namespace bench-ingest] [--public-url URL] [--replica-acks N]

``streamrec`` serves the real webhook app (``create_app``) with logging at
WARNING, verifying signatures over ``--public-url`` (default: its own
address) and, with ``--replica-acks``, answering only after WAIT N; ``bare``
serves the reference: one POST route at the same path that
reads the form and answers a small JSON 200. Both listen on 127.0.0.1 only,
without an access log. The Twilio credentials come from the environment
(INGEST_ACCOUNT_SID, INGEST_AUTH_TOKEN), not the command line.

Once listening it prints ``listening <port>`` on stdout (``--port 0`` picks a
free port); SIGTERM or SIGINT stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web

from streamrec.keys import Keys
from streamrec.logging import configure
from streamrec.loops import loop_factory, tune_gc
from streamrec.producer import WEBHOOK_PATH, WebhookConfig, create_app
from streamrec.service import redis_client


async def bare_callback(request: web.Request) -> web.Response:
    """The reference handler: parse the form, answer 200 with a small JSON body."""
    form = await request.post()
    return web.json_response({"status": "ok", "fields": str(len(form))})


def bare_app() -> web.Application:
    """One POST route at the webhook's path, nothing else."""
    app = web.Application()
    app.router.add_post(WEBHOOK_PATH, bare_callback)
    return app


def listen(port: int) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:port (0: a free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(args: argparse.Namespace) -> None:
    sock = listen(args.port)
    port = int(sock.getsockname()[1])
    redis = None
    if args.mode == "streamrec":
        configure(fmt="json", level="warning")
        redis = redis_client(args.redis_url)
        config = WebhookConfig(
            account_sid=os.environ["INGEST_ACCOUNT_SID"],
            auth_token=os.environ["INGEST_AUTH_TOKEN"],
            public_url=args.public_url or f"http://127.0.0.1:{port}",
            keys=Keys(args.namespace),
            replica_acks=args.replica_acks,
        )
        app = create_app(redis, config)
    else:
        app = bare_app()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        print(f"listening {port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        if redis is not None:
            await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("streamrec", "bare"), required=True)
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--namespace", default="bench-ingest")
    parser.add_argument("--public-url", help="the URL signatures are computed over")
    parser.add_argument("--replica-acks", type=int, default=0, help="WAIT for N replicas")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    parser.add_argument("--profile", help="write cProfile's stats of the run here on stop")
    args = parser.parse_args()
    if args.mode == "streamrec" and not {"INGEST_ACCOUNT_SID", "INGEST_AUTH_TOKEN"} <= set(
        os.environ
    ):
        parser.error("streamrec mode needs INGEST_ACCOUNT_SID and INGEST_AUTH_TOKEN set")
    tune_gc()  # as python -m streamrec does
    profiler = cProfile.Profile() if args.profile else None
    with asyncio.Runner(loop_factory=loop_factory(args.uvloop)) as runner:
        if profiler is not None:
            profiler.enable()
        runner.run(serve(args))
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)


if __name__ == "__main__":
    main()
