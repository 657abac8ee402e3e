"""The chaos run, long form: prints what was lost, duplicated, redone and left pending.

    .venv/bin/python bench/chaos.py [--recordings 2000] [--json]

2,000 signed callbacks (a quarter sent twice), sent as Twilio sends them (one
retry when the connection fails, then given up), through 3 consumer processes
while a random consumer is SIGKILLed every 3 s and replaced, Redis (AOF on) is
SIGKILLed once and restarted, PostgreSQL is stopped for 10 s and the webhook
for 5 s; the consumers' scheduled reconciler (every 2 s) brings in the
recordings whose callbacks were lost at the edge. Exits 1 if a recording was
lost or enqueued twice, downloaded or transcribed more often than the consumer
kills that caught it in work explain, anything was left pending or parked, or a
business ever had more recordings in work than its slot limit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamrec import logging as logs
from tests.chaos import ChaosConfig, run
from tests.chaos_report import as_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recordings", type=int, default=2_000)
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--postgres-down-s", type=float, default=10.0)
    parser.add_argument("--webhook-outage-s", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logs.configure(fmt="json", level="warning")
    # A killed consumer's half-finished requests make the stand-ins' servers log
    # "connection lost" tracebacks; they are the point of the exercise.
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)
    config = ChaosConfig(
        recordings=args.recordings,
        consumers=args.consumers,
        postgres_down_s=args.postgres_down_s,
        webhook_outage_s=args.webhook_outage_s,
    )
    report = asyncio.run(run(config))
    print(
        as_json(report)
        if args.json
        else f"chaos run ({args.recordings} recordings)\n" + report.render()
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
