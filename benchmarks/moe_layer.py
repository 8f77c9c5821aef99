"""MoE layer speed: dispatch modes × transports × shapes, forward and forward+backward.

  python benchmarks/moe_layer.py --shapes olmoe,qwen,deepseek --tokens 16384

Prints one table (ms, wire bytes, C_T, drops, max |y − y_first|) and writes it as JSON with --out.
All variants of a shape share the same weights and input, so their outputs must agree.
On GPUs, the ragged transport uses XLA's decomposer (see docs/benchmarks.md); pass
--no-ragged-decomposer to measure the default lowering.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import sys

import numpy as np

SHAPES = {  # name: (experts, top_k, d_model, d_ff, shared experts, shared width each)
    "olmoe": (64, 8, 2048, 1024, 0, 0),
    "qwen": (60, 4, 2048, 1408, 1, 5632),
    "deepseek": (64, 6, 2048, 1408, 2, 1408),
    "tiny": (16, 4, 64, 32, 0, 0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="olmoe,qwen,deepseek")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per device")
    p.add_argument("--modes", default="standard,occult")
    p.add_argument("--transports", default="dense,ragged",
                   help="comma list; pallas@perlaunch = one kernel per message (before session 19)")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="'' = no timing (C_T, wire bytes only)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--expert-matmul", default="auto",
                   help="comma list of MoEConfig.expert_matmul values (e.g. pallas,fused)")
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--devices", type=int, default=None, help="expert-axis size (default: all)")
    p.add_argument("--placements", default="identity",
                   help="comma list of identity, greedy, best (oj.placement.place on a trace)")
    p.add_argument("--caps", default="none",
                   help="comma list of max_devices_per_token values; 'none' = no pruning")
    p.add_argument("--planted", action="store_true",
                   help="router and tokens with hidden expert clusters (structured routing)")
    p.add_argument("--no-ragged-decomposer", action="store_true")
    p.add_argument("--blocked-rows", type=int, default=None,
                   help="override experts.BLOCKED_ROWS (rows per expert-aligned block)")
    p.add_argument("--blocked-chunk", type=int, default=None,
                   help="override experts.BLOCKED_CHUNK (blocks per loop step)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time each variant with identity experts (route + plan + exchange "
                        "only); the difference is the expert compute and its gathers")
    p.add_argument("--profile", action="store_true",
                   help="also print each variant's top GPU ops (device-side time per pass)")
    p.add_argument("--width", type=int, default=None,
                   help="override d_model and d_ff (fast C_T / wire-row counts on CPU meshes)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def setup_env(args):
    """XLA flags must be set before JAX initialises its backends."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
    if shutil.which("nvidia-smi") and not args.no_ragged_decomposer:
        flag = "--xla_gpu_unsupported_enable_ragged_all_to_all_decomposer=true"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def main(argv=None):
    args = parse_args(argv)
    setup_env(args)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import occult_jax as oj
    from occult_jax import experts

    experts.BLOCKED_ROWS = args.blocked_rows or experts.BLOCKED_ROWS
    experts.BLOCKED_CHUNK = args.blocked_chunk or experts.BLOCKED_CHUNK

    from previous_paths import previous_transport
    from timing import median_ms

    def timed(fn, *a):
        return median_ms(fn, *a, iters=args.iters)

    n = args.devices or jax.device_count()
    mesh = oj.make_mesh(expert=n, data=1)
    print(f"jax {jax.__version__} on {n} × {jax.devices()[0].device_kind}; "
          f"{args.tokens} tokens/device; blocked gmm {experts.BLOCKED_ROWS} rows × "
          f"{experts.BLOCKED_CHUNK}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        e, k, d, f, shared, shared_f = SHAPES[shape]
        if args.width:  # routing statistics only: C_T and wire rows do not depend on widths
            d, f, shared_f = args.width, args.width, args.width if shared_f else 0
        base_cfg = oj.MoEConfig(num_experts=e, top_k=k, d_model=d, d_ff=f,
                                num_shared_experts=shared, shared_d_ff=shared_f or None,
                                dtype=args.dtype, capacity_factor=args.capacity_factor)
        router = np.asarray(oj.MoELayer(base_cfg, mesh=mesh, rngs=nnx.Rngs(0)).router[...])
        x = np.random.default_rng(1).standard_normal((n * args.tokens, d)).astype(np.float32)
        if args.planted:
            router, x = plant_clusters(router, x, n, np.random.default_rng(2))
        x = jax.device_put(jnp.asarray(x, args.dtype),
                           oj.mesh.sharding(mesh, oj.mesh.token_spec(mesh)))
        cot = jax.random.normal(jax.random.key(2), x.shape, jnp.float32).astype(args.dtype)
        slot_maps = placements(oj, base_cfg, router, x, n, args.placements.split(","))
        first = {}  # per cap: outputs must agree across placements, modes and transports
        for placement, slots in slot_maps.items():
            for cap in args.caps.split(","):
                for mode, variant, matmul in itertools.product(
                        args.modes.split(","), args.transports.split(","),
                        args.expert_matmul.split(",")):
                    cfg = base_cfg.replace(
                        dispatch=mode, transport=variant.partition("@")[0],
                        expert_matmul=matmul,
                        max_devices_per_token=None if cap == "none" else int(cap))
                    layer = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(0))
                    layer.router[...] = jnp.asarray(router)
                    if slots is not None:
                        (state,) = oj.apply_placement(nnx.state(layer), {(): slots})
                        nnx.update(layer, state)
                    with previous_transport(variant):
                        row, y = measure(layer, x, cot, args, timed, mesh, variant)
                    first.setdefault(cap, y)
                    row.update(shape=shape, placement=placement, cap=cap,
                               max_diff=float(np.abs(y - first[cap]).max()))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print_table(rows, [p for p in args.passes.split(",") if p])
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


def plant_clusters(router, x, num_devices, rng, strength=4.0):
    """Routing with real structure: N hidden clusters of E/N experts (ids shuffled, so the
    identity placement splits them), and each token drawn towards one cluster."""
    d, e = router.shape
    cluster = rng.permutation(e) % num_devices
    directions = np.linalg.qr(rng.standard_normal((d, num_devices)))[0].T  # [N, d]
    router = router + strength / np.sqrt(d) * directions[cluster].T
    token_cluster = rng.integers(0, num_devices, x.shape[0])
    return router.astype(np.float32), x + 2.0 * np.sqrt(d) * directions[token_cluster]


def placements(oj, cfg, router, x, num_devices, methods):
    """{method: logical→slot map (None for identity)} from a 16k-token routing trace."""
    import jax.numpy as jnp

    out = {}
    sample = jnp.asarray(x[: 16384], jnp.float32)
    trace = np.asarray(oj.routing.route(sample, jnp.asarray(router), cfg).expert_ids)
    for method in methods:
        if method == "identity":
            out[method] = None
            continue
        from occult_jax import placement as placement_lib

        devices = placement_lib.place(trace, num_devices, method=method)
        out[method] = oj.slots_from_devices(devices, num_devices)
    return out


def measure(layer, x, cot, args, timed, mesh, variant):
    """One variant: stats, output, and the timings asked for."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import occult_jax as oj

    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def forward(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    def loss(p, x, cot):
        y, _ = forward(p, x)
        # Squared: the gradient needs y, so XLA cannot drop forward work (it may for a loss
        # linear in y; fwd+bwd times before 2026-11-24 were taken with one).
        return jnp.sum(jnp.square(y.astype(jnp.float32)) * cot.astype(jnp.float32))

    fwd = jax.jit(forward)
    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    y, stats = fwd(params, x)
    cfg = layer.cfg
    row = {"mode": cfg.dispatch, "transport": variant, "matmul": cfg.expert_matmul,
           "ct": float(stats["ct"]),
           "wire_MB": float(stats["wire_bytes"]) / 1e6, "dropped": int(stats["dropped"]),
           "wire_rows_per_token": float(stats["wire_rows"]) / x.shape[0]}
    for name in [p for p in args.passes.split(",") if p]:
        call = (fwd, params, x) if name == "fwd" else (step, params, x, cot)
        row[name + "_ms"] = timed(*call)
    if args.profile:
        from profile_ops import print_ops, top_ops

        print_ops(f"{cfg.dispatch} {variant} fwd", top_ops(fwd, params, x))
        print_ops(f"{cfg.dispatch} {variant} fwd+bwd", top_ops(step, params, x, cot))
    if args.breakdown:
        layout = dataclasses.replace(layer.layout(x.shape[0]), identity_experts=True)
        exchange_only = oj.moe.expert_parallel_fn(cfg, layout, mesh)
        row["exchange_only_fwd_ms"] = timed(exchange_only, x, layer.expert_weights(),
                                            layer.placement[...])
    return row, np.asarray(y.astype(jnp.float32))


def print_table(rows, passes):
    base = {}
    head = (f"{'shape':9} {'place':8} {'cap':4} {'mode':9} {'transport':9} {'matmul':10} "
            f"{'C_T':>5} "
            f"{'wire MB':>9} {'drop':>6} "
            f"{'max|Δy|':>8} " + " ".join(f"{p + ' ms':>11} {'×':>5}" for p in passes))
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        key = (r["shape"], r["transport"])
        base.setdefault(key, r)
        cells = " ".join(f"{r[p + '_ms']:11.2f} {base[key][p + '_ms'] / r[p + '_ms']:5.2f}"
                         for p in passes)
        print(f"{r['shape']:9} {r['placement']:8} {r['cap']:4} {r['mode']:9} "
              f"{r['transport']:9} {r.get('matmul', 'auto'):10} {r['ct']:5.2f} "
              f"{r['wire_MB']:9.1f} {r['dropped']:6d} "
              f"{r['max_diff']:8.1e} {cells}"
              + (f"  exchange-only fwd {r['exchange_only_fwd_ms']:.2f} ms"
                 if "exchange_only_fwd_ms" in r else ""))
    print("× = speed-up over the first row of the same shape and transport")


if __name__ == "__main__":
    main()
