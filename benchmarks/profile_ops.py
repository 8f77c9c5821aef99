"""Device-side time per GPU op from a JAX profiler trace (what a wall clock cannot split).

    rows = top_ops(jitted_fn, *args, repeats=3)   # [(thread, op name, ms per call), ...]

Runs ``fn`` under ``jax.profiler.trace`` with a Perfetto trace, reads the trace's complete
events on the first GPU and sums their durations by name, divided by ``repeats``.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile


def top_ops(fn, *args, repeats: int = 3, top: int = 12,
            device: str = "/device:GPU:0") -> list[tuple[str, str, float]]:
    import jax

    jax.block_until_ready(fn(*args))  # compile outside the trace
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(repeats):
                jax.block_until_ready(fn(*args))
        paths = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
        if not paths:
            raise RuntimeError(f"no Perfetto trace written under {logdir}")
        with gzip.open(paths[0]) as fh:
            events = json.load(fh)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    total: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and procs.get(e["pid"], "").startswith(device):
            key = (threads.get((e["pid"], e["tid"]), "?"), e["name"][:60])
            total[key] += e.get("dur", 0) / 1e3 / repeats
    return [(thread, name, ms) for (thread, name), ms in total.most_common(top)]


def print_ops(title: str, rows) -> None:
    print(f"  device ops, {title}:")
    for thread, name, ms in rows:
        print(f"    {ms:8.3f} ms  {thread[:24]:24} {name}")
