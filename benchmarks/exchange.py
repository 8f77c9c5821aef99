"""Exchange bandwidth across the GPUs of one host: dense all_to_all vs ragged_all_to_all vs our
Pallas NVLink kernel, in GB/s per GPU on the bytes that really cross (rows sent to peers).

  NCCL_NVLS_ENABLE=0 python benchmarks/exchange.py --rows 8192,16384,32768,65536 --fill 1,0.6

Each GPU holds ``rows`` rows of ``width`` bf16 (a [N*C, width/2] uint32 buffer, C = rows/N) and
sends the first ``fill × C`` rows of block p to device p. Dense moves whole blocks whatever the
fill; ragged and pallas move the counted rows. ``--steps`` exchanges run back to back inside one
program (each sends the previous result), timed by wall clock; the median of ``--iters``. The
wall clock includes what runs between the exchanges (the loop's copies, XLA's barrier before a
Mosaic kernel); ``--device-time`` adds the transfer kernels' own time from a profiler trace.
Every transport's result is checked against the dense one (rows past the counts excluded).
Link references: ``ppermute`` (NCCL send/recv of whole blocks, all pairs at once) and
``oneway`` (device 0 → 1 only; GB/s of the one sending GPU).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", default="8192,16384,32768,65536", help="rows per GPU")
    p.add_argument("--width", type=int, default=2048, help="bf16 elements per row")
    p.add_argument("--fill", default="1,0.6", help="fraction of each block's rows sent")
    p.add_argument("--transports", default="dense,ragged,pallas")
    p.add_argument("--blocks", default="auto",
                   help="pallas: thread blocks, 'auto' = one per SM (comma list sweeps)")
    p.add_argument("--stages", default="3", help="pallas: shared-memory ring depth (sweeps)")
    p.add_argument("--chunk-kb", default="32", help="pallas: KB per TMA copy (sweeps)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device-time", action="store_true",
                   help="also time the transfer kernels on the device (profiler trace of GPU 0: "
                        "the Mosaic kernel for pallas, NCCL kernels otherwise, per exchange; "
                        "the cross-GPU barrier XLA runs before a Mosaic kernel reported apart)")
    p.add_argument("--peer-copy", action="store_true",
                   help="also time jax.device_put from GPU 0 to GPU 1 (a copy-engine reference)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    flag = "--xla_gpu_unsupported_enable_ragged_all_to_all_decomposer=true"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import occult_jax as oj
    from kernels import nvlink_exchange
    from occult_jax.transport import _move_one

    n = jax.device_count()
    mesh = oj.make_mesh(expert=n)
    words_per_row = args.width // 2
    rows_out = []

    def program(kind, steps, tiling=None):
        def body(words, send, recv):
            def step(w, _):
                if kind in ("ppermute", "oneway"):
                    w = _permute(w, kind)
                elif kind == "pallas":
                    w = nvlink_exchange.exchange_rows(w, send[0], recv[0], axis_name="expert",
                                                      num_devices=n, tiling=tiling,
                                                      validate=False)  # the transport's call
                else:
                    w = _move_one(w, kind, "expert", send[0], recv[0])
                return w, None

            return jax.lax.scan(step, words, None, length=steps)[0]

        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("expert"),) * 3,
                                     out_specs=P("expert")))

    def _permute(w, kind):
        """Link references: NCCL send/recv of whole blocks (all pairs, or 0 → 1 only)."""
        cap = w.shape[0] // n
        blocks = w.reshape(n, cap, -1)
        if kind == "oneway":
            got = jax.lax.ppermute(blocks[1], "expert", perm=[(0, 1)])
            return blocks.at[0].set(got).reshape(w.shape)
        me = jax.lax.axis_index("expert")
        out = blocks
        for shift in range(1, n):
            got = jax.lax.ppermute(blocks[(me + shift) % n], "expert",
                                   perm=[(i, (i + shift) % n) for i in range(n)])
            out = out.at[(me - shift) % n].set(got)
        return out.reshape(w.shape)

    def wall_ms(f, *xs):
        jax.block_until_ready(f(*xs))
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            jax.block_until_ready(f(*xs))
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def device_ms(fn, kind, words, send):
        """Per exchange: the transfer kernels' device time on GPU 0, and XLA's barrier's."""
        from profile_ops import top_ops

        ops = top_ops(fn, words, send, send, repeats=2, top=100_000)
        moving = "mosaic_gpu" if kind == "pallas" else "nccl"
        moved = sum(ms for _, name, ms in ops if moving in name and "Barrier" not in name)
        barrier = sum(ms for _, name, ms in ops if "Barrier" in name)
        return {"device_ms": moved / args.steps, "barrier_ms": barrier / args.steps}

    put = functools.partial(jax.device_put, device=NamedSharding(mesh, P("expert")))
    for rows in map(int, args.rows.split(",")):
        cap = rows // n
        words = jax.random.bits(jax.random.key(0), (n * n * cap, words_per_row), jnp.uint32)
        words = put(words)
        for fill in map(float, args.fill.split(",")):
            k = round(fill * cap)
            send = put(jnp.full((n, n), k, jnp.int32))
            carried = (n - 1) * k * words_per_row * 4  # bytes one GPU sends to its peers
            want = np.asarray(program("dense", 1)(words, send, send)).reshape(n, n, cap, -1)
            variants = []
            for kind in args.transports.split(","):
                if kind == "pallas":
                    for b, st, kb in itertools.product(
                            [None if b == "auto" else int(b) for b in args.blocks.split(",")],
                            map(int, args.stages.split(",")),
                            map(int, args.chunk_kb.split(","))):
                        t = nvlink_exchange.exchange_tiling(words_per_row, blocks=b, stages=st,
                                                            chunk_bytes=kb * 1024)
                        variants.append((kind, f"b{t.blocks} s{t.stages} {kb}K", t))
                else:
                    variants.append((kind, "", None))
            for kind, label, tiling in variants:
                try:
                    got = np.asarray(program(kind, 1, tiling)(words, send, send))
                    got = got.reshape(n, n, cap, -1)
                    ok = bool(np.array_equal(got[:, :, :k], want[:, :, :k]))
                    if kind == "oneway":
                        ok = bool(np.array_equal(got[1, 0], want[1, 0]))
                    elif kind not in ("dense", "ppermute"):
                        ok = ok and not got[:, :, k:].any()
                    timed = program(kind, args.steps, tiling)  # compiled once, timed twice
                    ms = wall_ms(timed, words, send, send) / args.steps
                    device = device_ms(timed, kind, words, send) if args.device_time else {}
                except Exception as e:  # report and go on with the other variants
                    print(f"  {rows} {fill} {kind} {label}: {type(e).__name__}: {str(e)[:300]}",
                          file=sys.stderr)
                    continue
                gbs = carried / ms / 1e6
                if device:  # no GPU kernels (CPU): nan
                    device["device_GBps"] = (carried / device["device_ms"] / 1e6
                                             if device["device_ms"] else float("nan"))
                print(f"  rows {rows} fill {fill} {kind} {label}: {ms:.3f} ms {gbs:.1f} GB/s "
                      f"ok={ok} {device}", file=sys.stderr, flush=True)
                rows_out.append({"rows": rows, "fill": fill, "transport": kind, "config": label,
                                 "ms": ms, "GBps": gbs, "correct": ok, **device})

    if args.peer_copy and n > 1:
        rows = max(map(int, args.rows.split(",")))
        x = jax.device_put(jax.random.bits(jax.random.key(1), (rows, words_per_row), jnp.uint32),
                           jax.devices()[0])
        y = jax.device_put(x, jax.devices()[1])
        for label, fn in (("0→1", lambda: jax.device_put(x, jax.devices()[1])),
                          ("both ways", lambda: (jax.device_put(x, jax.devices()[1]),
                                                 jax.device_put(y, jax.devices()[0])))):
            ms = wall_ms(fn)
            gbs = x.nbytes / ms / 1e6
            print(f"  peer copy {label} {x.nbytes / 1e6:.0f} MB: {ms:.3f} ms {gbs:.1f} GB/s",
                  file=sys.stderr)
            rows_out.append({"rows": rows, "fill": 1.0, "transport": "device_put",
                             "config": label, "ms": ms, "GBps": gbs, "correct": True})

    print(f"\n{'rows/GPU':>9} {'fill':>5} {'transport':10} {'config':14} {'ms':>8} "
          f"{'GB/s':>7} {'vs dense':>8} ok  [device: transfer ms, GB/s, barrier ms]")
    for r in rows_out:
        dense = [d for d in rows_out if d["rows"] == r["rows"] and d["fill"] == r["fill"]
                 and d["transport"] == "dense"]
        ratio = dense[0]["ms"] / r["ms"] if dense else float("nan")
        print(f"{r['rows']:9d} {r['fill']:5.2f} {r['transport']:10} {r['config']:14} "
              f"{r['ms']:8.3f} {r['GBps']:7.1f} {ratio:8.2f} {r['correct']}"
              + (f"  [{r['device_ms']:.3f} {r['device_GBps']:.1f} {r['barrier_ms']:.3f}]"
                 if "device_ms" in r else ""))
    if args.out:
        from timing import write_results

        write_results(args.out, rows_out, num_devices=n)


if __name__ == "__main__":
    main()
