"""Side-by-side timing for the benchmarks: interleaved repeats, so drift of the machine hits every run alike."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run, `repeats` times, in the order a, b, c, a, b, c, ... (warm up before calling)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times
