"""The layer's row copies and sums — dispatch into send slots, copy into item order, weighted
pre-combine of items, combine of returned slots — on XLA gathers against the Pallas row kernels
(kernels/row_gather.py), forward and forward+backward, in ms and GB/s (device-side time on GPU).

  python benchmarks/row_maps.py --shapes olmoe,deepseek --devices 4 --tokens 16384

Maps (per device of an N-device Occult layer; --tokens tokens per device, top-k uniform):
  dispatch   tokens [T, d] → send slots [N·T, d] (expand_rows; its gradient sums each token's
             slots) and back: returned slots → tokens (reduce_rows, unweighted)
  items      receive rows [N·T, d] → items in expert order (expand_rows) and the weighted
             pre-combine of item outputs back to rows (reduce_rows with weights; its gradient
             gathers and dots for the weight gradient)
GB/s counts the rows actually read and written (empty links move nothing). "expand bwd" and
"reduce bwd" time the gradient alone (the forward's value is not needed for it); the weighted
reduce's gradient also reads the buffer for the weight gradient.

--sweep also times the kernels at other tile sizes (rows × columns per program, warps).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

import numpy as np

SHAPES = {"olmoe": (64, 8, 2048), "deepseek": (64, 6, 2048), "tiny": (8, 2, 64)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="olmoe,deepseek")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="try other kernel tile sizes")
    p.add_argument("--smoke", action="store_true", help="tiny shape, 2 iterations (CPU check)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.smoke:
        args.shapes, args.devices, args.tokens, args.iters = "tiny", 2, 64, 2
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        rows.extend(bench_shape(shape, args))
    print(f"\n{'shape':9} {'map':9} {'pass':8} {'xla ms':>8} {'kernel ms':>9} {'xla GB/s':>8} "
          f"{'kern GB/s':>9} {'speed-up':>8} {'max diff':>8}")
    for r in rows:
        print(f"{r['shape']:9} {r['map']:9} {r['pass']:8} {r['xla_ms']:8.3f} "
              f"{r['kernels_ms']:9.3f} {r['xla_gbs']:8.0f} {r['kernels_gbs']:9.0f} "
              f"{r['xla_ms'] / r['kernels_ms']:8.2f} {r['max_diff']:8.1e}"
              + "".join(f" {k} {v:.3f}" for k, v in r["sweep"].items()))
    if args.out:
        from timing import write_results

        write_results(args.out, rows)


def timer(iters: int):
    """f(*xs) → (out, ms): device-side median on GPU, host-timed median elsewhere."""
    import jax

    if jax.default_backend() == "gpu":
        from jax.experimental.mosaic.gpu import profiler

        def device_ms(f, *xs):
            out, times = profiler.measure(f, iterations=iters)(*xs)
            return out, statistics.median(times)
        return device_ms

    from timing import median_ms

    def host_ms(f, *xs):
        return f(*xs), median_ms(f, *xs, iters=iters)
    return host_ms


def bench_shape(shape: str, args) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from occult_jax.plan import item_weights, make_expert_plan, make_plan
    from occult_jax.row_maps import expand_rows, reduce_rows, use_kernels

    e, k, d = SHAPES[shape]
    n, t = args.devices, args.tokens
    local = e // n
    rng = np.random.default_rng(0)
    expert_ids = np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int32)
    plan = make_plan(jnp.asarray(expert_ids), jnp.ones((t, k), jnp.float32),
                     jnp.arange(e, dtype=jnp.int32), num_devices=n, experts_per_device=local,
                     capacity=t, dedup=True)
    # Device 0's receive buffer: every source device's rows for it (statistically alike).
    recv_expert = jnp.concatenate([plan.slot_expert[:t]] * n)
    items = make_expert_plan(recv_expert, local, 1, 128)
    keys = jax.random.split(jax.random.key(0), 4)
    bf16 = jnp.bfloat16
    x = jax.random.normal(keys[0], (t, d), bf16)
    recv = jax.random.normal(keys[1], (n * t, d), bf16)
    w_items = item_weights(items, jax.random.uniform(keys[2], recv_expert.shape))
    time = timer(args.iters)

    def live(index) -> int:
        return int(np.sum(np.asarray(index) >= 0))

    maps = {
        # name: (expand(a), reduce(b, w), a, the buffer's b_src, weight)
        "dispatch": (lambda a: expand_rows(a, plan.slot_token, plan.token_slot),
                     lambda b, w: reduce_rows(b, plan.token_slot, plan.slot_token, None),
                     x, plan.slot_token, None),
        "items": (lambda a: expand_rows(a, items.item_row, items.row_items),
                  lambda b, w: reduce_rows(b, items.row_items, items.item_row, w),
                  recv, items.item_row, w_items),
    }
    out = []
    for name, (expand, reduce, a, b_src, weight) in maps.items():
        b_rows = b_src.shape[0]
        b = jax.random.normal(keys[3], (b_rows, d), bf16)
        moved = {"expand": (live(b_src) + b_rows) * d * 2,
                 "reduce": (live(b_src) + a.shape[0]) * d * 2}
        moved["expand bwd"] = moved["reduce"]  # a sum of the buffer rows into the sources
        moved["reduce bwd"] = moved["expand"] * (2 if weight is not None else 1)  # + b for dw
        cot = jax.random.normal(keys[3], a.shape, bf16)

        cot_b = jax.random.normal(keys[2], b.shape, bf16)

        def expand_loss(a, cot, expand=expand):
            return jnp.sum(expand(a).astype(jnp.float32) * cot)

        def reduce_loss(b, w, cot, reduce=reduce):
            return jnp.sum(reduce(b, w).astype(jnp.float32) * cot)

        passes = {"expand": (lambda a, w, e=expand: e(a), (a, weight)),
                  "reduce": (reduce, (b, weight)),
                  "expand bwd": (jax.grad(expand_loss), (a, cot_b)),
                  "reduce bwd": (jax.grad(reduce_loss, (0, 1) if weight is not None else 0),
                                 (b, weight, cot))}
        for pass_name, (fn, xs) in passes.items():
            got = {}
            for impl in ("xla", "kernels"):
                with use_kernels(impl == "kernels"):  # a fresh function: traced in here
                    got[impl] = time(jax.jit(lambda *xs, fn=fn: fn(*xs)), *xs)
            diff = max(float(np.max(np.abs(np.asarray(p, np.float32) - np.asarray(q, np.float32))))
                       for p, q in zip(jax.tree.leaves(got["xla"][0]),
                                       jax.tree.leaves(got["kernels"][0]), strict=True))
            row = {"shape": shape, "map": name, "pass": pass_name, "xla_ms": got["xla"][1],
                   "kernels_ms": got["kernels"][1], "max_diff": diff,
                   "bytes": moved[pass_name], "sweep": {}}
            for tiles in SWEEP if args.sweep else ():
                with use_kernels(True), kernel_tiles(*tiles):
                    label = "r{}c{}w{}".format(*tiles)
                    row["sweep"][label] = time(jax.jit(lambda *xs, fn=fn: fn(*xs)), *xs)[1]
            row["xla_gbs"] = row["bytes"] / row["xla_ms"] / 1e6
            row["kernels_gbs"] = row["bytes"] / row["kernels_ms"] / 1e6
            print(f"  {row}", file=sys.stderr, flush=True)
            out.append(row)
    return out


SWEEP = [(8, 512, 4), (16, 512, 4), (32, 256, 4), (16, 256, 8), (8, 256, 4)]


@contextlib.contextmanager
def kernel_tiles(rows: int, columns: int, warps: int):
    from kernels import row_gather

    saved = row_gather.ROWS, row_gather.COLUMNS, row_gather.NUM_WARPS
    row_gather.ROWS, row_gather.COLUMNS, row_gather.NUM_WARPS = rows, columns, warps
    try:
        yield
    finally:
        row_gather.ROWS, row_gather.COLUMNS, row_gather.NUM_WARPS = saved


if __name__ == "__main__":
    main()
