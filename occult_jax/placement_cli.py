"""`python -m occult_jax.placement STATS --devices N`: C_T of identity, greedy and best placements.

STATS is a .npy file: an [E, E] co-activation matrix, a per-layer stack [L, E, E], or a routing
trace [T, k]. For matrices the table's C_T is 1 + cut fraction, exact for top-2 routing (a proxy
for k > 2); for a trace it is the exact C_T over the whole trace. --out draws the co-activation
matrices (log scale) with experts reordered by the --method placement and device blocks outlined:
up to 8 layers, evenly spaced over the stack. --save writes the --method maps [L, E] as .npy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from occult_jax.placement import (
    METHODS,
    _resolve,
    collaboration_cost,
    lower_bound,
    pairwise_cost,
    place,
)

MAX_PLOTTED = 8


def main(argv: list[str] | None = None) -> int:
    """Parse argv, print the per-layer C_T table, optionally plot and save; returns 0."""
    parser = argparse.ArgumentParser(prog="python -m occult_jax.placement",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("stats", type=Path, help=".npy: [E, E], [L, E, E] or a trace [T, k]")
    parser.add_argument("--devices", type=int, required=True, help="devices N (must divide E)")
    parser.add_argument("--method", choices=METHODS, default="best",
                        help="placement to plot and save (the table shows all three)")
    parser.add_argument("--out", type=Path, help="heat-map PNG to write")
    parser.add_argument("--save", type=Path, help=".npy of expert→device maps [L, E]")
    parser.add_argument("--kind", choices=("matrix", "trace"),
                        help="force how a 2-D STATS is read (default: detect)")
    parser.add_argument("--num-experts", type=int, help="E for a trace (default: max id + 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = np.load(args.stats)
    if data.ndim not in (2, 3) or 0 in data.shape:
        parser.error(f"{args.stats} holds shape {data.shape}; expected [E, E], [L, E, E] or "
                     f"[T, k].")
    stack = data.ndim == 3
    if stack and args.kind == "trace":
        parser.error(f"--kind trace needs a 2-D [T, k] trace; {args.stats} holds a stack of "
                     f"shape {data.shape} (read as [L, E, E] matrices): drop --kind.")
    layers, kind = (list(data), "matrix") if stack else ([data], args.kind)
    try:
        rows, maps, mats = [], [], []
        for stats in layers:
            m, trace = _resolve(stats, kind, args.num_experts)
            placed = {meth: place(stats, args.devices, meth, seed=args.seed, kind=kind,
                                  num_experts=args.num_experts) for meth in METHODS}
            cost = ((lambda d, t=trace: collaboration_cost(t, d)) if trace is not None
                    else (lambda d, m=m: pairwise_cost(m, d)))
            rows.append([cost(placed[meth]) for meth in METHODS])
            maps.append(placed[args.method])
            mats.append(m)
    except ValueError as err:
        parser.error(str(err))

    e = mats[0].shape[0]
    print(f"C_T (mean distinct devices per token): {e} experts on {args.devices} devices, "
          f"{e // args.devices} each.")
    if trace is None:  # the matrix does not say the routing's k: no bound to print
        print("From co-activation matrices: C_T = 1 + cut fraction, exact for top-2 routing "
              "(a pairwise proxy for top-k > 2).")
    else:
        k = trace.shape[1]
        print(f"Exact C_T over all {trace.shape[0]} tokens of the trace (top-{k}); lower bound "
              f"ceil(k·N/E) = {lower_bound(e, k, args.devices)}.")
    print(f"{'layer':>6}" + "".join(f"{meth:>10}" for meth in METHODS))
    for i, row in enumerate(rows):
        print(f"{i:>6}" + "".join(f"{v:>10.4f}" for v in row))
    if len(rows) > 1:
        print(f"{'mean':>6}" + "".join(f"{v:>10.4f}" for v in np.mean(rows, axis=0)))
    if args.save:
        np.save(args.save, np.stack(maps) if stack else maps[0])
        print(f"wrote {args.method} placements to {args.save}")
    if args.out:
        _heatmap(args.out, mats, maps, rows, args.devices, args.method)
        print(f"wrote {args.out}")
    return 0


def _heatmap(out: Path, mats: list, maps: list, rows: list, n: int, method: str) -> None:
    """Grid of up to MAX_PLOTTED layers (evenly spaced), experts sorted by device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = np.unique(np.linspace(0, len(mats) - 1, min(len(mats), MAX_PLOTTED)).round())
    cols = min(4, len(chosen))
    grid_rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(3.2 * cols, 3.6 * grid_rows),
                             squeeze=False)
    col = METHODS.index(method)
    for ax, layer in zip(axes.flat, chosen.astype(int), strict=False):
        e = mats[layer].shape[0]
        order = np.argsort(maps[layer], kind="stable")
        ax.imshow(np.log1p(mats[layer][np.ix_(order, order)]), cmap="viridis")
        for b in range(1, n):
            ax.axhline(b * e // n - 0.5, color="white", lw=1)
            ax.axvline(b * e // n - 0.5, color="white", lw=1)
        if e <= 32:
            ax.set_xticks(range(e), order, fontsize=6)
            ax.set_yticks(range(e), order, fontsize=6)
        ax.set_title(f"layer {layer}: C_T {rows[layer][0]:.3f} → {rows[layer][col]:.3f}",
                     fontsize=8)
    for ax in axes.flat[len(chosen):]:
        ax.axis("off")
    fig.suptitle(f"log(1 + co-activation), experts ordered by the {method} placement "
                 f"({n} devices; C_T identity → {method})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
