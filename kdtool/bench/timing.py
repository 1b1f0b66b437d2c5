"""The timing harness and its statistics.

`measure` times one synchronous call per iteration with `time.perf_counter_ns`, cycling over
inputs staged beforehand, so the loop adds only a clock read and a list append per call.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np


def latency_stats(durations_ns: Sequence[int], batch_size: int) -> dict:
    """min/mean/p50/p90/p99 latency in ms (linear-interpolated percentiles) and images per second."""
    if len(durations_ns) == 0:
        raise ValueError("no timings")
    ms = np.asarray(durations_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return {
        "iterations": len(ms),
        "latency_ms": {"min": float(ms.min()), "mean": mean, "p50": float(p50), "p90": float(p90), "p99": float(p99)},
        "throughput_ips": batch_size * 1e3 / mean,
    }


def measure(run: Callable[[object], object], staged: Sequence[object], *, warmup: int,
            iters: int | None = None, duration: float | None = None) -> list[int]:
    """Per-call durations (ns) of `run` over `staged` inputs in turn: `iters` calls, or calls for `duration` s.

    `run` must return only when the work is done (GPU runners synchronise inside it).
    """
    if (iters is None) == (duration is None):
        raise ValueError("give exactly one of iters and duration")
    count = len(staged)
    for index in range(warmup):
        run(staged[index % count])
    clock = time.perf_counter_ns
    durations: list[int] = []
    record = durations.append
    if iters is not None:
        for index in range(iters):
            batch = staged[index % count]
            start = clock()
            run(batch)
            record(clock() - start)
        return durations
    deadline = clock() + int(duration * 1e9)
    index, end = 0, 0
    while end < deadline:
        batch = staged[index % count]
        start = clock()
        run(batch)
        end = clock()
        record(end - start)
        index += 1
    return durations
