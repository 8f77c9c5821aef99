"""The fused FFN's first product on one GPU: rows gathered inside the kernel (cp.async) against
an XLA gather followed by our grouped matmul, in ms and TFLOP/s (device-side time).

  python benchmarks/gather_matmul.py --shapes 65536x2048x1024x16x2

Shapes are TxKxNxGxC: T receive rows of width K, each listed for C of the G local experts on
average (items sorted by expert, ascending rows within an expert, as the Occult plan builds them).
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="65536x2048x1024x16x2,65536x2048x2048x16x2,"
                   "65536x2048x1408x16x2,32768x2048x1024x16x4")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    from jax.experimental.mosaic.gpu import profiler

    from kernels import grouped_matmul as gm

    table = []
    for spec in args.shapes.split(","):
        t, k, n, g, c = map(int, spec.split("x"))
        rows_np, sizes_np = items(t, g, c)
        keys = jax.random.split(jax.random.key(0), 2)
        x = jax.random.normal(keys[0], (t, k), jnp.bfloat16)
        w = (jax.random.normal(keys[1], (g, k, n), jnp.float32) * 0.03).astype(jnp.bfloat16)
        rows, sizes = jnp.asarray(rows_np), jnp.asarray(sizes_np)
        variants = {
            "xla gather + gmm": jax.jit(lambda x, r, w, s: gm.gmm(x[r], w, s)),
            "gmm only (rows given)": jax.jit(lambda x, r, w, s: gm.gmm(x, w, s)),
            "gather_gmm (cp.async)": jax.jit(lambda x, r, w, s: gm.gather_gmm(x, r, w, s)),
        }
        want = np.asarray(jax.jit(lambda x, r, w, s: jax.lax.ragged_dot(
            x[r], w, s, preferred_element_type=jnp.float32))(x, rows, w, sizes))
        scale = np.abs(want).max()
        flops = 2 * rows_np.size * k * n
        gathered = x[rows]
        for name, fn in variants.items():
            operand = gathered if name.startswith("gmm only") else x
            out, times = profiler.measure(fn, iterations=args.iters)(operand, rows, w, sizes)
            ms = statistics.median(times)
            err = float(np.abs(np.asarray(out, np.float32) - want).max() / scale)
            nan = bool(np.isnan(np.asarray(out, np.float32)).any())
            table.append((spec, name, ms, flops / ms / 1e9, err, nan))
            print(f"  {spec} {name}: {ms:.3f} ms err {err:.1e} nan {nan}", file=sys.stderr)
    print(f"\n{'shape':24s} {'variant':24s} {'ms':>7s} {'TFLOP/s':>8s} {'rel err':>8s}")
    for spec, name, ms, tf, err, nan in table:
        print(f"{spec:24s} {name:24s} {ms:7.3f} {tf:8.0f} {err:8.1e}{'  NaN!' if nan else ''}")
    for spec in dict.fromkeys(r[0] for r in table):
        ms = {r[1]: r[2] for r in table if r[0] == spec}
        print(f"{spec}: gather_gmm / (xla gather + gmm) speed "
              f"{ms['xla gather + gmm'] / ms['gather_gmm (cp.async)']:.2f}x, / gmm only "
              f"{ms['gmm only (rows given)'] / ms['gather_gmm (cp.async)']:.2f}x")


if __name__ == "__main__":
    main()
