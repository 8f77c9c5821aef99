"""Host-timed medians, the measurement every layer-level benchmark here reports."""

from __future__ import annotations

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
