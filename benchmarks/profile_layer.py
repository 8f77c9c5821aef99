"""Profile one MoE layer step and sum GPU time by kernel family.

  python benchmarks/profile_layer.py --shape olmoe --modes standard,occult --out DIR

Runs forward+backward under `jax.profiler.trace` (Perfetto JSON), then totals device-side kernel
time per step into families (matmul, NCCL collective, sort, gather/scatter, other fusion) so the
table says where a step's time goes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

FAMILIES = [  # first match wins
    ("nccl / collective", re.compile(r"nccl|all_to_all|alltoall|all-to-all|ragged", re.I)),
    ("matmul (gemm)", re.compile(r"gemm|cutlass|cublas|matmul|dot|sm90_xmma|wgmma|nvjet", re.I)),
    ("sort", re.compile(r"sort|radix|cub::", re.I)),
    ("gather / scatter", re.compile(r"gather|scatter|dynamic.update|dynamic.slice", re.I)),
    ("other fusion / copy", re.compile(r".")),
]


def family(name: str) -> str:
    return next(f for f, pattern in FAMILIES if pattern.search(name))


def summarize(trace_path: str, steps: int) -> dict[str, float]:
    """ms per step of device kernels, by family, from a Perfetto/Chrome JSON trace."""
    with gzip.open(trace_path, "rt") as fh:
        trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pids = {e["pid"]: e.get("args", {}).get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu_pids = {p for p, name in pids.items() if re.search(r"/device:GPU:0|GPU 0|stream", name)}
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e:
            totals[family(e.get("name", ""))] += e["dur"] / 1e3 / steps
    return dict(totals)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="olmoe")
    p.add_argument("--modes", default="standard,occult")
    p.add_argument("--transport", default="dense")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--summarize-only", action="store_true", help="read traces already in --out")
    args = p.parse_args(argv)
    if not args.summarize_only:
        record(args)
    for mode in args.modes.split(","):
        paths = glob.glob(os.path.join(args.out, mode, "**", "*.json.gz"), recursive=True)
        if not paths:
            print(f"{mode}: no trace found under {args.out}/{mode}")
            continue
        totals = summarize(sorted(paths)[-1], args.steps)
        print(f"\n{args.shape} {mode} {args.transport}: GPU 0 kernel time per fwd+bwd step")
        for name, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"  {name:24s} {ms:8.2f} ms")
        print(f"  {'total':24s} {sum(totals.values()):8.2f} ms")


def record(args):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from moe_layer import SHAPES

    import occult_jax as oj

    e, k, d, f, shared, shared_f = SHAPES[args.shape]
    mesh = oj.make_mesh(expert=jax.device_count(), data=1)
    n = mesh.size
    x = jax.random.normal(jax.random.key(1), (n * args.tokens, d), jnp.bfloat16)
    x = jax.device_put(x, oj.mesh.sharding(mesh, oj.mesh.token_spec(mesh)))
    for mode in args.modes.split(","):
        cfg = oj.MoEConfig(num_experts=e, top_k=k, d_model=d, d_ff=f, dispatch=mode,
                           transport=args.transport, num_shared_experts=shared,
                           shared_d_ff=shared_f or None, dtype="bfloat16")
        layer = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

        def loss(p, x, graphdef=graphdef, rest=rest):
            y, _ = nnx.merge(graphdef, p, rest)(x)
            return jnp.sum(y.astype(jnp.float32))

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        jax.block_until_ready(step(params, x))
        with jax.profiler.trace(os.path.join(args.out, mode), create_perfetto_trace=True):
            for _ in range(args.steps):
                jax.block_until_ready(step(params, x))


if __name__ == "__main__":
    main()
