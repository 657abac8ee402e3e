"""A benchmark pipeline consumer process: ``service.consume`` as ``python -m streamrec consume``
runs it (GC tuning, uvloop unless --asyncio), until nothing is left.

    python bench/pipeline.py SETTINGS_JSON [--asyncio] [--python-gc] [--profile FILE]

SETTINGS_JSON holds the ``Settings`` fields. Prints one JSON line: wall and CPU
seconds of the drain (from the consumer's start, imports and migrations
excluded), and each stage's time and call count from the consumer's metrics.
With --profile, cProfile's stats of the drain go to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamrec import logging as logs
from streamrec import schema, service
from streamrec.loops import loop_factory, tune_gc
from streamrec.metrics import Metrics
from streamrec.settings import Settings


async def drain(settings: Settings, profile: str | None) -> dict[str, Any]:
    await schema.migrate(settings.database_url)
    metrics = Metrics()
    profiler = cProfile.Profile() if profile else None
    cpu, wall = time.process_time(), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    await service.consume(settings, asyncio.Event(), until_idle=True, metrics=metrics)
    if profiler is not None and profile:
        profiler.disable()
        profiler.dump_stats(profile)
    result: dict[str, Any] = {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
    }
    for stage in ("download", "store"):
        labels = {"stage": stage}
        total = metrics.registry.get_sample_value("streamrec_stage_seconds_sum", labels)
        count = metrics.registry.get_sample_value("streamrec_stage_seconds_count", labels)
        result[f"{stage}_s"] = total or 0.0
        result[f"{stage}_calls"] = count or 0.0
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("settings")
    parser.add_argument("--asyncio", action="store_true", help="asyncio's own event loop")
    parser.add_argument("--python-gc", action="store_true", help="Python's GC thresholds")
    parser.add_argument("--profile", help="write cProfile stats of the drain here")
    args = parser.parse_args()
    logs.configure(fmt="json", level="warning")
    settings = Settings(**json.loads(args.settings), _env_file=None)
    if not args.python_gc:
        tune_gc()  # as python -m streamrec does
    with asyncio.Runner(loop_factory=loop_factory(not args.asyncio)) as runner:
        result = runner.run(drain(settings, args.profile))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
