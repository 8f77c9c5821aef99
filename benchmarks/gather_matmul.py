"""The fused FFN's first product on one GPU, and its weight gradient: rows gathered inside the
kernel (cp.async) against a gather followed by our grouped matmul, in ms and TFLOP/s
(device-side time).

  python benchmarks/gather_matmul.py --shapes 65536x2048x1024x16x2 --passes fwd,dw

fwd: XLA gather + gmm / gmm on given rows / gather_gmm. dw (x[rows].T @ dy per group): row
kernel gather + tgmm / tgmm on given rows / gather_tgmm.

Shapes are TxKxNxGxC: T receive rows of width K, each listed for C of the G local experts on
average (items sorted by expert, ascending rows within an expert, as the Occult plan builds them).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import sys

import numpy as np


def items(t: int, g: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows [M], group_sizes [G]): each row picks c distinct experts at random."""
    rng = np.random.default_rng(seed)
    experts = np.argsort(rng.random((t, g)), axis=1)[:, :c]
    order = np.lexsort((np.repeat(np.arange(t), c), experts.ravel()))
    rows = np.repeat(np.arange(t), c)[order].astype(np.int32)
    sizes = np.bincount(experts.ravel(), minlength=g).astype(np.int32)
    return rows, sizes


def pass_variants(pass_: str):
    """name → (jitted fn(x, rows, w_or_dy, sizes), whether it takes the gathered rows); the
    first is the reference layout the ratios divide by."""
    import jax

    from kernels import grouped_matmul as gm
    from kernels import occult_matmul as om
    from kernels.row_gather import gather_rows

    if pass_ == "fwd":
        return {
            "xla gather + gmm": (jax.jit(lambda x, r, w, s: gm.gmm(x[r], w, s)), False),
            "gmm only (rows given)": (jax.jit(lambda x, r, w, s: gm.gmm(x, w, s)), True),
            "gather_gmm (cp.async)": (jax.jit(lambda x, r, w, s: om.gather_gmm(x, r, w, s)),
                                      False),
        }
    return {  # dw: the weight gradient
        "row kernel gather + tgmm": (
            jax.jit(lambda x, r, dy, s: gm.tgmm(gather_rows(x, r), dy, s)), False),
        "tgmm only (rows given)": (jax.jit(lambda x, r, dy, s: gm.tgmm(x, dy, s)), True),
        "gather_tgmm (cp.async)": (
            jax.jit(lambda x, r, dy, s: om.gather_tgmm(x, r, dy, s)), False),
    }


def reference(pass_: str, x, rows, operand, sizes):
    """float32 ragged_dot of the gathered rows (fwd) or its weight gradient (dw)."""
    import jax
    import jax.numpy as jnp

    if pass_ == "fwd":
        return jax.lax.ragged_dot(x[rows], operand, sizes, preferred_element_type=jnp.float32)
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(x[rows], operand, sizes, dims,
                                      preferred_element_type=jnp.float32)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="65536x2048x1024x16x2,65536x2048x2048x16x2,"
                   "65536x2048x1408x16x2,32768x2048x1024x16x4")
    p.add_argument("--passes", default="fwd",
                   help="fwd (the product) and/or dw (its weight gradient, tgmm)")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    from jax.experimental.mosaic.gpu import profiler

    table = []
    for spec, pass_ in itertools.product(args.shapes.split(","), args.passes.split(",")):
        t, k, n, g, c = map(int, spec.split("x"))
        rows_np, sizes_np = items(t, g, c)
        keys = jax.random.split(jax.random.key(0), 2)
        x = jax.random.normal(keys[0], (t, k), jnp.bfloat16)
        if pass_ == "fwd":
            operand = (jax.random.normal(keys[1], (g, k, n), jnp.float32) * 0.03).astype(
                jnp.bfloat16)
        else:
            operand = jax.random.normal(keys[1], (rows_np.size, n), jnp.bfloat16)
        rows, sizes = jnp.asarray(rows_np), jnp.asarray(sizes_np)
        want = np.asarray(jax.jit(functools.partial(reference, pass_))(x, rows, operand, sizes))
        scale = np.abs(want).max()
        flops = 2 * rows_np.size * k * n
        gathered = x[rows]
        for name, (fn, given) in pass_variants(pass_).items():
            out, times = profiler.measure(fn, iterations=args.iters)(
                gathered if given else x, rows, operand, sizes)
            ms = statistics.median(times)
            err = float(np.abs(np.asarray(out, np.float32) - want).max() / scale)
            nan = bool(np.isnan(np.asarray(out, np.float32)).any())
            table.append((spec, pass_, name, ms, flops / ms / 1e9, err, nan))
            print(f"  {spec} {pass_} {name}: {ms:.3f} ms err {err:.1e} nan {nan}",
                  file=sys.stderr)
    print(f"\n{'shape':24s} {'pass':4s} {'variant':26s} {'ms':>7s} {'TFLOP/s':>8s} "
          f"{'rel err':>8s}")
    for spec, pass_, name, ms, tf, err, nan in table:
        print(f"{spec:24s} {pass_:4s} {name:26s} {ms:7.3f} {tf:8.0f} {err:8.1e}"
              f"{'  NaN!' if nan else ''}")
    for spec, pass_ in dict.fromkeys(r[:2] for r in table):
        ms = [r[3] for r in table if r[:2] == (spec, pass_)]  # copy, given, gathered
        print(f"{spec} {pass_}: gathered in the kernel / (copy + kernel) speed "
              f"{ms[0] / ms[2]:.2f}x, / kernel on given rows {ms[1] / ms[2]:.2f}x")


if __name__ == "__main__":
    main()
