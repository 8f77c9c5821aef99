"""Occult's expert compute on one device: the fused kernels vs gather + grouped matmuls +
weighted segment-sum done separately, forward and forward+backward.

  python benchmarks/fused_experts.py --shapes olmoe,deepseek --devices 2,4 --tokens 16384

The input is one device's deduplicated receive buffer in an N-device layer: N blocks of
`--tokens` rows, each token routed top-k uniformly over E experts; a row exists for every token
with a chosen expert on this device and lists those experts (min(k, E/N) pairs). Variants share
inputs and must agree:

  fused            kernels/fused_experts.py (rows read through the item index, pre-combine in
                   the down matmul's epilogue); --sweep tries a few tilings, the best counts
  <expert_matmul>  dispatch.compute_experts with that backend: expand_rows → 3 grouped matmuls
                   → reduce_rows (e.g. blocked, ragged_dot); for pallas the gate and up
                   products read the rows through the item index (gather_gmm) instead
  pallas-copy      the pallas path as it was before gather_gmm: expand_rows → 3 gmm →
                   reduce_rows
  pallas-split     the pallas path with gate and up as two gather_gmm calls (not one)
  pallas-epilogue  the pallas path with Occult's pre-combine in the down projection's
                   epilogue (gmm_combine; weights applied in the SwiGLU kernel) instead of
                   the weighted gather-sum row kernel
  pallas-copy-cat  pallas-copy with gate and up as one gmm on concatenated weights (one
                   item-gradient array in the backward, no sum of two)
  <variant>@xla    that variant with the row copies and sums on XLA gathers instead of the
                   row kernels (kernels/row_gather.py, the default on GPU)
  <variant>@cooperative  that variant with gmm and tgmm on the cooperative column-split
                   schedule everywhere (the defaults before 2026-11-24: no ping-pong, no
                   streamed gmm, no row-split tgmm)
  <variant>@gridrows  that variant with row tiles on the tile grid and tgmm's tiles in group
                   order (as before session 13, 2026-11-24; ping-pong at N <= 1024 kept).
  <variant>@copytrain  that variant with the rows copied into item order under
                   differentiation (as before session 14, 2026-11-24: tgmm read the copy;
                   now gather_tgmm gathers them).
  <variant>@coopshort  that variant with gmm of contraction <= 1024 (the down projection at
                   d_ff <= 1024) on the cooperative kernel, not ping-pong (as before session
                   15). Suffixes combine: pallas@gridrows@xla.

Times are wall-clock medians of --iters synchronised calls after two warm-ups; fwd+bwd is the
gradient of sum(out² · cot), which needs the forward's value (before 2026-11-24 it was a loss
linear in out, which let XLA drop forward work the gradient does not need). --smoke runs a
tiny shape (works on CPU: the fused kernels run in the Pallas interpreter there).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

import numpy as np
from previous_paths import PREVIOUS, previous_schedules

SHAPES = {"olmoe": (64, 8, 2048, 1024), "qwen": (60, 4, 2048, 1408),
          "deepseek": (64, 6, 2048, 1408), "tiny": (8, 2, 64, 32)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="olmoe,deepseek")
    p.add_argument("--devices", default="2,4", help="expert-parallel sizes N to simulate")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per source device")
    p.add_argument("--separate", default="pallas,blocked",
                   help="expert_matmul backends for the unfused path")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="try a few fused tilings")
    p.add_argument("--tilings", default="",
                   help="fused tilings to try, e.g. 128x128x64w8s3,64x256x64w8s3 (bm x bn x bk, "
                        "warps, stages)")
    p.add_argument("--only", default="", help="with --breakdown: these kernels only")
    p.add_argument("--breakdown", action="store_true",
                   help="time each fused kernel alone (forward 2, backward 5) per tiling")
    p.add_argument("--profile", action="store_true",
                   help="print each variant's top GPU ops of a forward+backward step")
    p.add_argument("--no-fused", action="store_true", help="time the separate variants only")
    p.add_argument("--smoke", action="store_true", help="tiny shape, 2 iterations (CPU check)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def receive_buffer(rng, experts, top_k, devices, tokens):
    """slot_expert [N·tokens, pairs] of device 0 (-1 = empty) and the mean C_T."""
    local = experts // devices
    pairs = min(top_k, local)
    chosen = np.argsort(rng.random((devices * tokens, experts)), axis=1)[:, :top_k]
    mine = np.sort(np.where(chosen < local, chosen, experts), axis=1)[:, :pairs]
    slot = np.where(mine < experts, mine, -1).astype(np.int32)
    ct = np.mean([len(set(row // local)) for row in chosen[:4096]])
    return slot, float(ct)


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    from kernels.fused_experts import default_tiling
    from kernels.gather_matmul import GatherTiling

    if args.smoke:
        args.shapes, args.devices, args.tokens, args.iters = "tiny", "2", 64, 2
        args.separate = "ragged_dot"
    on_cpu = jax.default_backend() == "cpu"

    from timing import median_ms

    def timed(fn, *a):
        return median_ms(fn, *a, iters=args.iters)

    tilings = [] if args.no_fused else [default_tiling()]
    if args.sweep and not on_cpu:
        tilings += [GatherTiling(bm, bn, 64, w, 3) for bm, bn, w in itertools.product(
            (64, 128), (64, 128), (4, 8))]  # 8 tilings: keeps one device call under 10 min
    for spec in filter(None, args.tilings.split(",")):
        sizes, rest = spec.split("w")
        warps, stages = rest.split("s")
        tilings.append(GatherTiling(*map(int, sizes.split("x")), int(warps), int(stages)))
    tilings = list(dict.fromkeys(tilings))

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.dtype}", flush=True)
    rows, every_row = [], []  # the best per implementation (table); every timed variant (--out)
    for shape, n in itertools.product(args.shapes.split(","), map(int, args.devices.split(","))):
        if args.breakdown:
            breakdown(shape, n, tilings, timed, args)
            continue
        rows.extend(bench_case(shape, n, tilings, timed, args, every_row))
    if args.breakdown:
        return

    print(f"\n{'shape':9} {'N':>2} {'C_T':>5} {'items':>8} {'impl':11} {'fwd ms':>8} "
          f"{'fwd+bwd ms':>10} {'fwd TFLOP/s':>11} {'temp GB':>7} {'fused ×':>8}  config")
    for r in rows:
        fused_row = next((o for o in rows if o["shape"] == r["shape"]
                          and o["devices"] == r["devices"] and o["impl"] == "fused"), None)
        speed = (f"{r['fwd_bwd_ms'] / fused_row['fwd_bwd_ms']:8.2f}" if fused_row
                 else f"{'-':>8}")
        print(f"{r['shape']:9} {r['devices']:2d} {r['ct']:5.2f} {r['items']:8d} {r['impl']:11} "
              f"{r['fwd_ms']:8.2f} {r['fwd_bwd_ms']:10.2f} {r['fwd_tflops']:11.0f} "
              f"{r['fwd_bwd_temp_gb'] or float('nan'):7.2f} {speed}  "
              f"{r['config']}")
    print("fused × = this row's fwd+bwd time / fused's (> 1: fused is faster)")
    if args.out:
        from timing import write_results

        write_results(args.out, every_row)


def bench_case(shape: str, n: int, tilings, timed, args, every_row: list) -> list[dict]:
    """Every variant at one (shape, N), each appended to every_row; returns the best row of
    each implementation."""
    import jax
    import jax.numpy as jnp

    from kernels.fused_experts import fused_swiglu_combine
    from kernels.grouped_matmul import gmm
    from kernels.occult_matmul import gather_gmm
    from occult_jax.dispatch import ExpertWeights, compute_experts
    from occult_jax.experts import _pallas_swiglu_combine, grouped_swiglu, row_layout
    from occult_jax.plan import item_weights, make_expert_plan
    from occult_jax.row_maps import expand_rows, reduce_rows, use_kernels

    dtype = jnp.dtype(args.dtype)
    e, k, d, f = SHAPES[shape]
    rng = np.random.default_rng(0)
    slot_np, ct = receive_buffer(rng, e, k, n, args.tokens)
    local = e // n
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (slot_np.shape[0], d), dtype)
    slot = jnp.asarray(slot_np)
    slot_weight = jax.random.uniform(keys[1], slot.shape, jnp.float32)
    shapes = [(local, d, f), (local, d, f), (local, f, d)]
    w = [(jax.random.normal(kk, s, jnp.float32) * s[1] ** -0.5).astype(dtype)
         for kk, s in zip(keys[2:5], shapes, strict=True)]
    weights = ExpertWeights(jnp.zeros((d, e)), *w, jnp.zeros((e, e)))
    cot = jax.random.normal(keys[5], x.shape, dtype)
    items = int((slot_np >= 0).sum())
    flops = 3 * 2 * items * d * f  # three matmuls over the (row, expert) items

    def separate(backend):
        for suffix in PREVIOUS:  # the schedules are patched in while jit traces
            if backend.endswith(suffix):
                return separate(backend[:-len(suffix)])
        if backend.endswith("@xla"):
            inner = separate(backend[:-len("@xla")])

            def on_xla_gathers(*a):
                with use_kernels(False):
                    return inner(*a)
            return on_xla_gathers
        if backend == "pallas-copy":
            return on_pallas_plan(copy_then_gmm)
        if backend == "pallas-copy-cat":
            return on_pallas_plan(copy_then_concatenated_gmm)
        if backend == "pallas-split":
            return on_pallas_plan(split_gather)
        if backend == "pallas-epilogue":
            return pallas_epilogue
        return lambda x, sw, ws: compute_experts(x, slot, sw, ws, backend)

    def on_pallas_plan(item_outputs):
        """A variant from its item-order SwiGLU item_outputs(x, plan, ws): the pallas plan
        before it, the weighted reduce to rows after it."""
        def fn(x, sw, ws):
            plan = make_expert_plan(slot, local, *row_layout("pallas"))
            y_items = item_outputs(x, plan, ws)
            return reduce_rows(y_items, plan.row_items, plan.item_row, item_weights(plan, sw))
        return fn

    def pallas_epilogue(x, sw, ws):
        plan = make_expert_plan(slot, local, *row_layout("pallas"))
        return _pallas_swiglu_combine(x, plan, item_weights(plan, sw), ws.w_gate, ws.w_up,
                                      ws.w_down, precombine="epilogue")

    def split_gather(x, plan, ws):
        gate, up = (gather_gmm(x, plan.item_row, w, plan.group_sizes, row_items=plan.row_items)
                    for w in (ws.w_gate, ws.w_up))
        return gmm(jax.nn.silu(gate) * up, ws.w_down, plan.group_sizes)

    def copy_then_concatenated_gmm(x, plan, ws):
        x_items = expand_rows(x, plan.item_row, plan.row_items)
        gate_up = gmm(x_items, jnp.concatenate([ws.w_gate, ws.w_up], axis=2), plan.group_sizes)
        gate, up = jnp.split(gate_up, 2, axis=1)
        return gmm(jax.nn.silu(gate) * up, ws.w_down, plan.group_sizes)

    def copy_then_gmm(x, plan, ws):
        x_items = expand_rows(x, plan.item_row, plan.row_items)
        return grouped_swiglu(x_items, plan, ws.w_gate, ws.w_up, ws.w_down, "pallas")

    def fused(tiling):
        def fn(x, sw, ws):
            plan = make_expert_plan(slot, local, tiling.block_m, tiling.block_m)
            w_items = item_weights(plan, sw)
            return fused_swiglu_combine(x, ws.w_gate, ws.w_up, ws.w_down, w_items,
                                        plan.item_row, plan.block_group, plan.used_blocks,
                                        plan.group_sizes, tiling=tiling)
        return fn

    def loss(fn, x, sw, ws):  # needs the forward's value (a linear loss would let XLA drop it)
        return jnp.sum(jnp.square(fn(x, sw, ws).astype(jnp.float32)) * cot)

    variants = [(b, "", separate(b)) for b in args.separate.split(",")]
    variants += [("fused", f"bm{t.block_m} bn{t.block_n} bk{t.block_k} w{t.num_warps} "
                  f"s{t.num_stages}", fused(t)) for t in tilings]
    want, best = None, {}
    for name, label, fn in variants:
        fwd = jax.jit(fn)
        step = jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2)))
        try:
            with previous_schedules(name):  # traced here, on the first call and the lowering
                y = np.asarray(fwd(x, slot_weight, weights), np.float32)
                step = step.lower(x, slot_weight, weights).compile()  # compiled once
            fwd_ms = timed(fwd, x, slot_weight, weights)
            bwd_ms = timed(step, x, slot_weight, weights)
        except Exception as err:  # a tiling may not compile: report it, keep going
            print(f"  {shape} N={n} {name} {label}: {type(err).__name__}: {str(err)[:160]}",
                  file=sys.stderr)
            continue
        if args.profile:
            from profile_ops import top_ops

            print(f"\n{shape} N={n} {name} {label}: top GPU ops of a forward+backward step")
            for _, op, ms in top_ops(step, x, slot_weight, weights, top=14):
                print(f"  {ms:7.3f} ms  {op[:100]}")
        want = y if want is None else want
        diff = float(np.abs(y - want).max() / max(np.abs(want).max(), 1e-9))
        row = {"shape": shape, "devices": n, "ct": ct, "rows": int(x.shape[0]),
               "items": items, "impl": name, "config": label, "fwd_ms": fwd_ms,
               "fwd_bwd_ms": bwd_ms, "fwd_tflops": flops / fwd_ms / 1e9, "rel_diff": diff,
               "fwd_bwd_temp_gb": temp_gb(step)}
        print(json.dumps(row), file=sys.stderr, flush=True)
        every_row.append(row)
        if diff > 2e-2:
            print(f"  WRONG RESULT {shape} N={n} {name} {label}", file=sys.stderr)
            continue
        if name not in best or bwd_ms < best[name]["fwd_bwd_ms"]:
            best[name] = row
    return list(best.values())


def temp_gb(compiled) -> float | None:
    """XLA's scratch memory for one compiled fwd+bwd step (residuals included), in GB."""
    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
    return None if temp is None else temp / 1e9


def breakdown(shape: str, n: int, tilings, timed, args) -> None:
    """Each fused kernel timed alone on this case's plan: ms and TFLOP/s per tiling."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(args.dtype)
    e, k, d, f = SHAPES[shape]
    slot_np, _ = receive_buffer(np.random.default_rng(0), e, k, n, args.tokens)
    keys = jax.random.split(jax.random.key(1), 5)
    local = e // n
    x = jax.random.normal(keys[0], (slot_np.shape[0], d), dtype)
    w_in = jax.random.normal(keys[1], (local, d, f), dtype) * d ** -0.5
    w_out = jax.random.normal(keys[2], (local, f, d), dtype) * f ** -0.5
    items = int((slot_np >= 0).sum())
    print(f"\n{shape} N={n}: {items} items; kernel ms (TFLOP/s on real items)")
    for t in tilings:
        cells = []
        for name, (products, fn) in _kernel_cases(jnp.asarray(slot_np), x, w_in, w_out, keys[3:],
                                                  t).items():
            if args.only and name not in args.only.split(","):
                continue
            try:
                ms = timed(jax.jit(fn))
                cells.append(f"{name} {ms:.2f} ({products * 2 * items * d * f / ms / 1e9:.0f})")
            except Exception as err:  # a tiling may not compile: report it, keep going
                cells.append(f"{name} {type(err).__name__}")
                print(f"    {name}: {str(err)[:200]}", file=sys.stderr)
        print(f"  bm{t.block_m} bn{t.block_n} bk{t.block_k} w{t.num_warps} s{t.num_stages}: "
              + " | ".join(cells), flush=True)


def _kernel_cases(slot, x, w_in, w_out, keys, tiling) -> dict:
    """name → (matmuls per item, a no-argument function running that kernel once)."""
    import jax
    import jax.numpy as jnp

    from kernels import gather_matmul as gm
    from occult_jax.plan import make_expert_plan

    plan = make_expert_plan(slot, w_in.shape[0], tiling.block_m, tiling.block_m)
    m = plan.item_row.shape[0]
    act = jax.random.normal(keys[0], (m, w_in.shape[2]), x.dtype)
    weight = jax.random.uniform(keys[1], (m,), jnp.float32)
    interpret = jax.default_backend() == "cpu"
    common = dict(item_row=plan.item_row, block_group=plan.block_group,
                  used_blocks=plan.used_blocks, tiling=tiling, interpret=interpret)
    groups = dict(item_row=plan.item_row, group_sizes=plan.group_sizes, tiling=tiling,
                  interpret=interpret)
    rows = x.shape[0]
    return {
        "gather_swiglu": (2, lambda: gm.gather_swiglu(x, w_in, w_in, **common)),
        "scatter_add": (1, lambda: gm.matmul_scatter_add((act,), (w_out,), num_rows=rows,
                                                         scale=weight, **common)),
        "swiglu_grad": (1, lambda: gm.gather_swiglu_grad(x, w_out, act, act, weight, **common)),
        "tmatmul_down": (1, lambda: gm.gather_tmatmul(act, x, gather_a=False, gather_b=True,
                                                      b_scale=weight, **groups)),
        "scatter_add_2": (2, lambda: gm.matmul_scatter_add((act, act), (w_in, w_in),
                                                           num_rows=rows, transpose_w=True,
                                                           **common)),
        "tmatmul_in": (1, lambda: gm.gather_tmatmul(x, act, gather_a=True, gather_b=False,
                                                    **groups)),
    }


if __name__ == "__main__":
    main()
