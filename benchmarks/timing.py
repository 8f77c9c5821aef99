"""Host-timed medians, the measurement every layer-level benchmark here reports, and the raw
results file the benchmarks write."""

from __future__ import annotations

import json
import time

import numpy as np


def median_ms(fn, *args, iters: int = 10, warmup: int = 2) -> float:
    """Median wall time of `iters` synchronised calls of fn(*args) after `warmup` calls, in ms."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def write_results(path: str, rows: list, **extra) -> None:
    """Write ``{"jax", "device", **extra, "rows"}`` as JSON to ``path`` (a benchmark's --out)."""
    import jax

    with open(path, "w") as fh:
        json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, **extra,
                   "rows": rows}, fh, indent=1)
