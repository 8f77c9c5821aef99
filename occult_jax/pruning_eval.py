"""The pruning quality comparison: held-out loss of original, pruned, and fine-tuned models.

  python -m occult_jax.pruning_eval --config=configs/default.py --workdir=runs/pruning \
      --base_steps=300 --finetune_steps=100 --cap=1 --rule=similarity

Trains (or resumes) a base model, fine-tunes it twice for the same steps from the same
checkpoint — once with collaboration pruning (`moe.max_devices_per_token=cap`,
`moe.prune_rule=rule`), once without — and prints validation loss, perplexity and C_T per MoE
layer for: the original, pruned without fine-tuning, pruned after fine-tuning, and standard
fine-tuning. Each fine-tune is `train.py --config.init_from=BASE` with those overrides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from typing import Any

import jax
import numpy as np
from flax import nnx

from occult_jax import calibration, frontends, train_lib
from occult_jax import data as data_lib
from occult_jax.host_devices import request_cpu_devices
from occult_jax.model import batch_sharding


def variant(config: Any, workdir: str, steps: int, init_from: str = "", cap: int | None = None,
            rule: str = "score", lr: float | None = None) -> Any:
    config = config.copy_and_resolve_references()
    config.workdir, config.steps, config.init_from = workdir, steps, init_from
    config.moe.max_devices_per_token, config.moe.prune_rule = cap, rule
    if lr is not None:
        config.optim.lr = lr
        config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 10)
    return config


def evaluate(config: Any, params_from: str) -> dict[str, Any]:
    """Validation loss and per-layer C_T of params loaded from `params_from` under `config`."""
    with tempfile.TemporaryDirectory() as scratch:
        run = train_lib.setup(variant(config, scratch, 1, params_from, cap_of(config),
                                      config.moe.prune_rule), scratch)
        run.checkpointer.close()
    model = nnx.merge(run.model_def, run.params)
    shard = batch_sharding(run.mesh)
    corpus, seq_len = run.corpus, config.seq_len

    def batches(tokens, offsets_list):
        return [train_lib.global_batch(tokens, o, seq_len, shard, model.cfg.vocab_size)
                for o in offsets_list]

    if cap_of(config) and config.moe.prune_rule == "similarity" and not \
            calibration.is_calibrated(model):
        offsets = [data_lib.batch_offsets(len(corpus.train), config.seed, i, config.batch_size,
                                          seq_len) for i in range(config.calibration_batches)]
        calibration.calibrate(model, [b[:, :-1] for b in batches(corpus.train, offsets)])
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, b: train_lib.loss_fn(nnx.merge(graphdef, s), b)[1])
    losses, cts = [], []
    val = data_lib.eval_offsets(len(corpus.validation), config.eval_batches, config.batch_size,
                                seq_len)
    for batch in batches(corpus.validation, val):
        ce, stats = jax.device_get(step(state, batch))
        losses.append(float(ce))
        cts.append(np.asarray(stats["ct"]))
    loss = float(np.mean(losses))
    return {"val_loss": loss, "perplexity": math.exp(loss),
            "ct_per_layer": np.mean(np.asarray(cts, np.float64), axis=0).round(3).tolist()}


def cap_of(config: Any) -> int | None:
    return config.moe.get("max_devices_per_token")


# the checkout's configs/default.py (configs/ is not installed as a package: use the checkout,
# as the README's `pip install -e .` does, or pass --config)
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "default.py")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="an ml_collections .py or .gin config (default: the checkout's "
                        "configs/default.py)")
    p.add_argument("--workdir", default="runs/pruning")
    p.add_argument("--base_steps", type=int, default=300)
    p.add_argument("--finetune_steps", type=int, default=100)
    p.add_argument("--finetune_lr", type=float, default=1e-3)
    p.add_argument("--cap", type=int, default=1)
    p.add_argument("--rule", default="similarity", choices=["score", "group_score", "similarity"])
    p.add_argument("--eval_batches", type=int, default=8)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if not os.path.exists(args.config):
        raise SystemExit(f"error: --config={args.config} does not exist; pass the path of a "
                         "config file (configs/default.py in the repository).")
    config = frontends.load_config(args.config)
    config.eval_batches, config.eval_every, config.checkpoint_every = args.eval_batches, 0, 0
    base = os.path.join(args.workdir, "base")
    train_lib.train_and_evaluate(variant(config, base, args.base_steps), progress=False)
    pruned = os.path.join(args.workdir, f"pruned_cap{args.cap}_{args.rule}")
    standard = os.path.join(args.workdir, "standard_ft")
    for workdir, (cap, rule) in {pruned: (args.cap, args.rule), standard: (None, "score")}.items():
        train_lib.train_and_evaluate(variant(config, workdir, args.finetune_steps, base, cap, rule,
                                             args.finetune_lr), progress=False)
    rows = {
        "original": evaluate(variant(config, "", 1), base),
        f"pruned (cap {args.cap}, {args.rule}), no fine-tuning": evaluate(
            variant(config, "", 1, cap=args.cap, rule=args.rule), base),
        f"pruned (cap {args.cap}, {args.rule}), fine-tuned {args.finetune_steps} steps": evaluate(
            variant(config, "", 1, cap=args.cap, rule=args.rule), pruned),
        f"standard fine-tuning {args.finetune_steps} steps": evaluate(
            variant(config, "", 1), standard),
    }
    print(f"\n{'model':52} {'val loss':>9} {'ppl':>8}  C_T per MoE layer")
    for name, r in rows.items():
        print(f"{name:52} {r['val_loss']:9.4f} {r['perplexity']:8.3f}  {r['ct_per_layer']}")
    with open(os.path.join(args.workdir, f"pruning_eval_cap{args.cap}_{args.rule}.json"),
              "w") as fh:
        json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    request_cpu_devices(8)
    main()
