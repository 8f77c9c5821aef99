"""Training throughput: tokens/s of one config under each dispatch mode, side by side.

  python benchmarks/train_step.py --config=configs/olmoe_1b7b.py:small --modes standard,occult

Each mode trains `--steps` steps from the same seed (no evaluation; one final checkpoint in a
temporary workdir); the rate is the mean over the logged windows after the first (compilation
and warm-up excluded). Prints one table and writes the rows as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/olmoe_1b7b.py:small")
    p.add_argument("--modes", default="standard,occult")
    p.add_argument("--transports", default="dense")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    from occult_jax.host_devices import request_cpu_devices

    request_cpu_devices(8)  # 8 fake devices when JAX runs on the CPU
    import jax

    from occult_jax import frontends, train_lib

    rows = []
    for mode in args.modes.split(","):
        for transport in args.transports.split(","):
            config = frontends.load_config(os.path.join(root, args.config))
            config.moe.dispatch, config.moe.transport = mode, transport
            config.steps, config.log_every = args.steps, args.log_every
            config.eval_every, config.checkpoint_every = 0, 0
            workdir = tempfile.mkdtemp(prefix="train_step_")
            try:
                train_lib.train_and_evaluate(config, workdir, progress=False)
                with open(os.path.join(workdir, "metrics.jsonl")) as fh:
                    logs = [json.loads(line) for line in fh]
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            steady = [r for r in logs if r["step"] > args.log_every]
            rate = sum(r["tokens_per_s"] for r in steady) / len(steady)
            step_ms = 1e3 * sum(r["step_time_s"] for r in steady) / len(steady)
            rows.append({"mode": mode, "transport": transport, "tokens_per_s": rate,
                         "step_ms": step_ms, "final_loss": logs[-1]["loss"],
                         "ct": _mean_ct(logs[-1])})
            print(json.dumps(rows[-1]), flush=True)

    print(f"\n{args.config} on {jax.device_count()} × {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}, {args.steps} steps")
    print(f"{'mode':9} {'transport':9} {'tokens/s':>10} {'step ms':>8} {'×':>5} {'C_T':>5} "
          f"{'loss@end':>9}")
    base = rows[0]["tokens_per_s"]
    for r in rows:
        print(f"{r['mode']:9} {r['transport']:9} {r['tokens_per_s']:10.0f} {r['step_ms']:8.1f} "
              f"{r['tokens_per_s'] / base:5.2f} {r['ct']:5.2f} {r['final_loss']:9.4f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


def _mean_ct(log: dict) -> float:
    values = [v for k, v in log.items() if k.startswith("ct")]
    flat = [x for v in values for x in (v if isinstance(v, list) else [v])]
    return sum(flat) / len(flat) if flat else float("nan")


if __name__ == "__main__":
    main()
