"""The last expert matmul with Occult's pre-combine: in its epilogue (``gmm_combine``) against
the down ``gmm`` into item order followed by the gather-sum row kernel, forward and
forward+backward, at one device's receive buffer of an N-device layer.

  python benchmarks/gmm_combine.py --shapes olmoe,deepseek --devices 4

Variants (same inputs h, already scaled by the routing weights as the SwiGLU kernel leaves
them; outputs must agree):
  gmm+sum   gmm(h) into item order → the gather-sum row kernel over each row's items
            (``precombine="rows"``)
  combine   gmm_combine(h): rows added into their received row in float32 in the matmul's
            epilogue, then cast to bf16 (``precombine="epilogue"``)
  combine-pingpong   the same with the ping-pong kernel: one warpgroup's reductions overlap
            the other's k-steps
Times are wall-clock medians of --iters synchronised calls after two warm-ups; --profile
prints the top GPU ops of each forward and forward+backward step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="olmoe,deepseek")
    p.add_argument("--devices", default="4", help="expert-parallel sizes N to simulate")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per source device")
    p.add_argument("--variants", default="gmm+sum,combine,combine-pingpong")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(here))
    import jax

    if jax.default_backend() != "gpu":
        raise SystemExit("gmm_combine.py times the Hopper kernels: run it on a GPU")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    results = []
    for shape in args.shapes.split(","):
        for n in map(int, args.devices.split(",")):
            results += bench_case(shape, n, args)

    print(f"\n{'shape':9} {'N':>2} {'items':>7} {'variant':15} {'fwd ms':>7} {'fwd+bwd ms':>10} "
          f"{'× gmm+sum (fwd / fwd+bwd)':>26} {'rel diff':>8}")
    for row in results:
        base = next(o for o in results if o["shape"] == row["shape"]
                    and o["devices"] == row["devices"] and o["variant"] == results[0]["variant"])
        fwd_x, step_x = base["fwd_ms"] / row["fwd_ms"], base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        ratios = f"{fwd_x:.2f} / {step_x:.2f}"
        print(f"{row['shape']:9} {row['devices']:2d} {row['items']:7d} {row['variant']:15} "
              f"{row['fwd_ms']:7.3f} {row['fwd_bwd_ms']:10.3f} {ratios:>26} {row['rel_diff']:8.4f}")
    if args.out:
        from timing import write_results

        write_results(args.out, results)


def bench_case(shape: str, n: int, args) -> list[dict]:
    """Every variant at one (shape, N)."""
    import jax
    import jax.numpy as jnp
    from fused_experts import SHAPES, receive_buffer
    from timing import median_ms

    from kernels.grouped_matmul import gmm, gmm_tiling
    from kernels.occult_matmul import gmm_combine
    from occult_jax.experts import row_layout
    from occult_jax.plan import item_weights, make_expert_plan
    from occult_jax.row_maps import reduce_rows

    e, k, d, f = SHAPES[shape]
    slot_np, ct = receive_buffer(np.random.default_rng(0), e, k, n, args.tokens)
    slot = jnp.asarray(slot_np)
    plan = make_expert_plan(slot, e // n, *row_layout("pallas"))
    keys = jax.random.split(jax.random.key(0), 4)
    m, r = plan.item_row.shape[0], slot.shape[0]
    h = jax.random.normal(keys[0], (m, f), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (e // n, f, d)) * f ** -0.5).astype(jnp.bfloat16)
    h = (h.astype(jnp.float32) * item_weights(plan, jax.random.uniform(keys[2], slot.shape))[
        :, None]).astype(h.dtype)  # the SwiGLU kernel's scaled output
    cot = jax.random.normal(keys[3], (r, d), jnp.bfloat16)
    items = int((slot_np >= 0).sum())

    def separate(h, w, plan):
        y = gmm(h, w, plan.group_sizes, fill_tail=False)
        return reduce_rows(y, plan.row_items, plan.item_row, fill_empty=False)

    def combined(h, w, plan, tiling=None):
        out = gmm_combine(h, w, plan.group_sizes, plan.item_row, r, fill_tail=False,
                          tiling=tiling)
        return out.astype(h.dtype)

    pingpong = functools.partial(combined, tiling=gmm_tiling(f, d, combine=True, pingpong=True))

    def loss(fn, h, w, plan, cot):  # needs the forward's value (a linear loss would not)
        return jnp.sum(jnp.square(fn(h, w, plan).astype(jnp.float32)) * cot)

    rows, want = [], None
    for name in args.variants.split(","):
        fn = {"gmm+sum": separate, "combine": combined, "combine-pingpong": pingpong}[name]
        fwd = jax.jit(fn)
        step = jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1)))
        y = np.asarray(fwd(h, w, plan), np.float32)
        fwd_ms = median_ms(fwd, h, w, plan, iters=args.iters)
        bwd_ms = median_ms(step, h, w, plan, cot, iters=args.iters)
        want = y if want is None else want
        row = {"shape": shape, "devices": n, "ct": ct, "rows": r, "items": items,
               "variant": name, "fwd_ms": fwd_ms, "fwd_bwd_ms": bwd_ms,
               "rel_diff": float(np.abs(y - want).max() / np.abs(want).max())}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.profile:
            from profile_ops import print_ops, top_ops

            print_ops(f"{shape} N={n} {name} forward", top_ops(fwd, h, w, plan, top=5))
            print_ops(f"{shape} N={n} {name} fwd+bwd", top_ops(step, h, w, plan, cot, top=6))
    return rows


if __name__ == "__main__":
    main()
