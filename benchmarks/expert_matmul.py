"""Grouped matmul speed on one GPU: our Pallas kernels vs XLA ragged_dot, JAX's ragged_dot_mgpu
and an equal-group dense einsum, for the forward product, dX and dW, in TFLOP/s.

  python benchmarks/expert_matmul.py --shapes 32768x2048x1024x32,65536x2048x1408x64

Shapes are MxKxNxG; group sizes are skewed (Dirichlet(2), seed 0), or M / G each with
``--sizes equal``. Times are device-side (CUPTI, sum of the kernels a call launches, median of
--iters). ragged_dot_mgpu and our kernel each take
the best of a small tiling sweep. Every variant is checked against float32 ragged_dot first.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import sys

import numpy as np

DEFAULT_SHAPES = ("16384x2048x1024x64,32768x2048x1024x32,32768x2048x2048x16,"
                  "65536x2048x1408x64,32768x2048x1408x8,65536x2048x2048x32")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES)
    p.add_argument("--passes", default="fwd,dx,dw")
    p.add_argument("--impls", default="pallas,mgpu,ragged_dot,einsum")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--sweep", choices=("none", "small", "pipeline", "schedule", "rows",
                                       "wgsplit", "tall"),
                   default="small",
                   help="tiling sweep for pallas and mgpu (none: defaults only; pipeline: our "
                        "default tiles with each pipelining option; schedule: cooperative vs "
                        "ping-pong warpgroups; rows: row tiles from each group's start vs on "
                        "the tile grid, dW tiles longest first vs in group order; wgsplit: "
                        "forward/dX warpgroups splitting a tile's columns (two m64n128 wgmmas "
                        "per k-step) vs its rows (one m64n256); tall: forward/dX 256 x 128 "
                        "tiles, 128 x 128 per warpgroup (cuBLAS's shape; session 19, dropped); "
                        "the last five report every variant side by side)")
    p.add_argument("--sizes", choices=("skewed", "equal"), default="skewed",
                   help="group sizes: Dirichlet-skewed, or M / G each (the einsum's own "
                        "problem: separates our per-row speed from the row work of skew)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def group_sizes(m: int, g: int, seed: int = 0, kind: str = "skewed") -> np.ndarray:
    if kind == "equal":
        if m % g:
            raise ValueError(f"--sizes equal needs M divisible by G; got M={m}, G={g}")
        return np.full(g, m // g, np.int32)
    p = np.random.default_rng(seed).dirichlet(np.ones(g) * 2.0)
    sizes = np.floor(p * m).astype(np.int32)
    sizes[-1] += m - sizes.sum()
    return sizes


def row_work(sizes: np.ndarray, tile_m: int) -> float:
    """Rows our kernels multiply per row of the problem: each group's ``tile_m``-row tiles
    from its first row (``schedule.group_blocks``). Ours / equal-group einsum cannot exceed
    1 / row_work at the einsum's speed per multiplied row."""
    from kernels import schedule

    m = int(sizes.sum())
    blocks = schedule.group_blocks(np.asarray(sizes), m, tile_m)
    return float(np.sum(blocks.num_blocks)) * tile_m / m


def _tall(gm, contraction: int, width: int, stream: bool):
    t = dataclasses.replace(gm.gmm_tiling(contraction, width, stream=stream), tile_m=256,
                            tile_n=64, split_rows=True)
    t = dataclasses.replace(t, stages=gm.gmm_stages(t))
    return t if stream else dataclasses.replace(t, chain=(contraction // t.tile_k) % t.stages == 0)


def our_tilings(gm, pass_: str, k: int, n: int, sweep: str) -> list:
    """Our kernel's tilings to time: the default first, then the sweep's variants."""
    if pass_ == "dw":
        base = gm.tgmm_tiling(k, n)
        if sweep == "wgsplit":  # 256 x 128 tiles (128 x 128 per wg) vs 128 x 256 (64 x 256)
            other = gm.tgmm_tiling(k, n, split_k=not base.split_k)
            wide = dataclasses.replace(base, tile_k=64, tile_n=256, split_k=True)
            return [base, other] + ([wide] if n % 256 == 0 and k % 128 == 0 else [])
        if sweep in ("pipeline", "tall"):
            return [base]
        if sweep == "schedule":  # the warpgroups split the tile's columns or its rows
            return [base, gm.tgmm_tiling(k, n, split_k=not base.split_k)]
        if sweep == "rows":  # and longest tiles first (balance) vs group order
            return [base, dataclasses.replace(base, balance=False),
                    dataclasses.replace(base, balance=False, group_aligned=False)]
        grid = itertools.product((64, 128), (64, 128), (3, 4)) if sweep == "small" else ()
        return [base] + [dataclasses.replace(base, tile_m=tm, tile_n=tn, stages=st)
                         for tm, tn, st in grid
                         if n % dataclasses.replace(base, tile_n=tn).block_n == 0]
    contraction, width = (n, k) if pass_ == "dx" else (k, n)
    base = gm.default_gmm_tiling(contraction, width)
    if sweep == "wgsplit":
        pingpong = gm.gmm_tiling(contraction, width, pingpong=True)
        wide = dataclasses.replace(pingpong, tile_m=64, tile_n=256)  # one 64 x 256 per wg
        wide = dataclasses.replace(wide, stages=gm.gmm_stages(wide))
        return [base, pingpong] + [gm.gmm_tiling(contraction, width, **o) for o in (
            dict(split_rows=False), dict(), dict(stream=True, split_rows=False),
            dict(stream=True)
        )] + ([wide] if width % 256 == 0 else [])
    if sweep == "tall":  # 256 x 128 tiles, each warpgroup 128 x 128 rows-split (cuBLAS's)
        return [base, gm.gmm_tiling(contraction, width)] + [
            _tall(gm, contraction, width, stream) for stream in (False, True)]
    if sweep == "schedule":
        return [base] + [gm.gmm_tiling(contraction, width, **o)
                         for o in (dict(), dict(stream=True), dict(pingpong=True))]
    if sweep == "rows":
        pingpong = gm.gmm_tiling(contraction, width, pingpong=True)
        return [base, dataclasses.replace(base, group_aligned=False), pingpong,
                dataclasses.replace(pingpong, group_aligned=False)]
    if sweep == "pipeline":
        options = (dict(chain=False), dict(epi_tile=0), dict(epi_tile=0, chain=False))
        return [base] + [gm.gmm_tiling(contraction, width, **o) for o in options]
    grid = itertools.product((64, 128), (64, 128), (3, 4), (8, 16)) if sweep == "small" else ()
    return [base] + [dataclasses.replace(base, tile_m=tm, tile_n=tn, stages=st,
                                         grid_tile_width=gw,
                                         split_rows=base.split_rows and tm % 128 == 0)
                     for tm, tn, st, gw in grid if width % (2 * tn) == 0]


def bench_shape(spec: str, args) -> list[dict]:
    """Every implementation of every pass at one MxKxNxG shape; the best config of each."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.mosaic.gpu import profiler
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    from kernels import grouped_matmul as gm

    def device_ms(f, *xs):
        out, times = profiler.measure(f, iterations=args.iters)(*xs)
        return out, statistics.median(times)

    rows, timed_variants = [], []
    m, k, n, g = map(int, spec.split("x"))
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (g, k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    dy = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    gs_np = group_sizes(m, g, kind=args.sizes)
    gs = jnp.asarray(gs_np)
    dw_dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())),
        lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    # Each candidate: (config label, jitted function, its array arguments); arrays are passed as
    # arguments so that none is baked into the program as a constant.
    f32 = jnp.float32
    ref = {
        "fwd": (jax.jit(lambda a, b, c: jax.lax.ragged_dot(a, b, c, preferred_element_type=f32)),
                (x, w, gs)),
        "dx": (jax.jit(lambda a, b, c: jax.lax.ragged_dot(
            a, jnp.swapaxes(b, 1, 2), c, preferred_element_type=f32)), (dy, w, gs)),
        "dw": (jax.jit(lambda a, b, c: jax.lax.ragged_dot_general(
            a, b, c, dw_dims, preferred_element_type=f32)), (x, dy, gs)),
    }
    operands = {"fwd": (x, w, gs), "dx": (dy, w, gs), "dw": (x, dy, gs)}
    mg = m // g

    def candidates(pass_):
        """impl → list of (config label, jitted fn of the pass's operands)."""
        c = {}
        if "ragged_dot" in args.impls:
            c["ragged_dot"] = [("", jax.jit({
                "fwd": lambda a, b, c: jax.lax.ragged_dot(a, b, c),
                "dx": lambda a, b, c: jax.lax.ragged_dot(a, jnp.swapaxes(b, 1, 2), c),
                "dw": lambda a, b, c: jax.lax.ragged_dot_general(a, b, c, dw_dims),
            }[pass_]))]
        if "einsum" in args.impls:
            eq = lambda a: a[: mg * g].reshape(g, mg, a.shape[-1])
            c["einsum"] = [("equal groups", jax.jit({
                "fwd": lambda a, b, c: jnp.einsum("gtk,gkn->gtn", eq(a), b),
                "dx": lambda a, b, c: jnp.einsum("gtn,gkn->gtk", eq(a), b),
                "dw": lambda a, b, c: jnp.einsum("gtk,gtn->gkn", eq(a), eq(b)),
            }[pass_]))]
        if "mgpu" in args.impls:
            cfgs = list(itertools.product((64, 128), (128, 256) if args.sweep == "small"
                                          else (128,), (4,), (1, 4)))
            lst = []
            for bm, bn, steps, gbn in cfgs:
                width = k if pass_ == "dx" else n
                if width % (bn * gbn) or (pass_ == "dw" and (k % bm or n % bn)):
                    continue
                label = f"bm{bm} bn{bn} s{steps} g{gbn}"
                tile = dict(block_m=bm, block_n=bn, block_k=64, max_concurrent_steps=steps,
                            grid_block_n=gbn)
                if pass_ == "dw":
                    fn = lambda a, b, c, t=tile: transposed_ragged_dot_mgpu.transposed_ragged_dot(
                        a, b, group_sizes=c, **t)
                else:
                    fn = lambda a, b, c, t=tile, tr=pass_ == "dx": ragged_dot_mgpu.ragged_dot(
                        a, b, group_sizes=c, transpose_rhs=tr, **t)
                lst.append((label, jax.jit(fn)))
            c["mgpu"] = lst
        if "pallas" in args.impls:
            lst = []
            for t in dict.fromkeys(our_tilings(gm, pass_, k, n, args.sweep)):
                if pass_ == "dw":
                    fn = lambda a, b, c, t=t: gm._tgmm_raw(a, b, c, jnp.bfloat16, "gpu", t)
                else:
                    fn = lambda a, b, c, t=t, tr=pass_ == "dx": gm._gmm_raw(
                        a, b, c, jnp.bfloat16, tr, "gpu", t)
                lst.append((str(t)[str(t).index("(") + 1:-1], jax.jit(fn)))
            c["pallas"] = lst
        return c

    for pass_ in args.passes.split(","):
        ref_fn, ref_args = ref[pass_]
        want = np.asarray(ref_fn(*ref_args))
        scale = float(np.abs(want).max())
        flops = 2 * m * k * n
        for impl, cfgs in candidates(pass_).items():
            best = None
            for label, fn in cfgs:
                try:
                    out, ms = device_ms(fn, *operands[pass_])
                except Exception as e:  # a config may not fit in shared memory: report it
                    print(f"  {spec} {pass_} {impl} {label}: {type(e).__name__}: "
                          f"{str(e)[:160]}", file=sys.stderr)
                    continue
                if impl == "einsum":
                    err = float("nan")
                else:
                    got = np.asarray(out, np.float32)
                    err = float(np.abs(got - want).max() / scale)
                print(f"  {spec} {pass_} {impl} {label}: {ms:.3f} ms err {err:.1e}",
                      file=sys.stderr)
                if err > 2e-2:  # wrong results never count as the best config
                    print(f"  WRONG RESULT {spec} {pass_} {impl} {label}", file=sys.stderr)
                    continue
                if args.sweep not in ("none", "small") and impl == "pallas":
                    timed_variants.append({"shape": spec, "pass": pass_, "config": label,
                                           "ms": ms, "tflops": flops / ms / 1e9})
                if best is None or ms < best[1]:
                    best = (label, ms, err)
            if best is None:
                continue
            rows.append({"shape": spec, "pass": pass_, "impl": impl, "config": best[0],
                         "ms": best[1], "tflops": flops / best[1] / 1e9, "max_rel_err": best[2]})

    return rows + [dict(v, impl="pallas variant") for v in timed_variants]


def ratio(got: dict, a: str, b: str) -> str:
    if a in got and b in got:
        return f"{got[a]['tflops'] / got[b]['tflops']:11.2f}"
    return f"{'-':>11s}"


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    rows = [r for spec in args.shapes.split(",") for r in bench_shape(spec, args)]
    print(f"\n{'shape':22s} {'pass':4s} " + " ".join(f"{i:>10s}" for i in args.impls.split(","))
          + "   ours/mgpu  ours/einsum  row work   (TFLOP/s)")
    for spec in args.shapes.split(","):
        m, _, _, g = map(int, spec.split("x"))
        for pass_ in args.passes.split(","):
            got = {r["impl"]: r for r in rows if r["shape"] == spec and r["pass"] == pass_}
            cells = " ".join(f"{got[i]['tflops']:10.0f}" if i in got else f"{'-':>10s}"
                             for i in args.impls.split(","))
            work = row_work(group_sizes(m, g, kind=args.sizes), 64 if pass_ == "dw" else 128)
            print(f"{spec:22s} {pass_:4s} {cells}  {ratio(got, 'pallas', 'mgpu')}  "
                  f"{ratio(got, 'pallas', 'einsum')}  {work:8.3f}")
    print("row work: rows our default tiles multiply per row (1/row work bounds ours/einsum "
          "at the einsum's speed per multiplied row)")
    variants = [r for r in rows if r["impl"] == "pallas variant"]
    if variants:
        print("\nour kernel's pipelining options (x: speed against the default tiling)")
        for spec in args.shapes.split(","):
            for pass_ in args.passes.split(","):
                same = [r for r in variants if r["shape"] == spec and r["pass"] == pass_]
                for r in same:
                    print(f"{spec:22s} {pass_:4s} {r['tflops']:6.0f} TFLOP/s "
                          f"x{same[0]['ms'] / r['ms']:5.2f}  {r['config']}")
    if args.out:
        from timing import write_results

        write_results(args.out, rows)


if __name__ == "__main__":
    main()
