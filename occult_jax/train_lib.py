"""Training: config → mesh, data, model, AdamW; jitted train/eval steps; the loop.

`train_and_evaluate(config, workdir)` trains `config.steps` steps, logs every `log_every`
(console bar, `workdir/metrics.jsonl`, TensorBoard under `workdir/tb`), evaluates every
`eval_every`, checkpoints every `checkpoint_every` and on SIGTERM/SIGINT (keeping the last
`keep_checkpoints`), and resumes from the newest checkpoint in `workdir/checkpoints`. Batches are
a function of (seed, step), so a resumed run repeats the uninterrupted run bit for bit.

`config` is an ml_collections ConfigDict (see configs/default.py); this module reads it by
attribute only. Multi-host start-up and preemption: `occult_jax.job`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from occult_jax import calibration, online_placement, run_config
from occult_jax import checkpoint as ckpt_lib
from occult_jax import data as data_lib
from occult_jax import metrics as metrics_lib
from occult_jax.job import StopSignal, maybe_initialize_distributed
from occult_jax.mesh import compute_capability, make_mesh
from occult_jax.model import Transformer, batch_sharding, count_params
from occult_jax.run_config import ConfigError

DATA_ORDER_KEYS = ("seed", "batch_size", "seq_len")  # with the step, fix the batches


def make_optimizer(config: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (no decay on 1-D params: norms) with linear warmup, cosine decay, global clipping."""
    opt = config.optim
    warmup = min(opt.warmup_steps, config.steps)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1), end_value=opt.lr * opt.min_lr_ratio)
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                        weight_decay=opt.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    if opt.grad_clip:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw), schedule
    return adamw, schedule


# --------------------------------------------------------------------------- steps


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def loss_fn(model: Transformer, batch: jax.Array) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """(total loss, (cross-entropy, stacked MoE stats)); MoE losses weighted by MoEConfig."""
    logits, stats = model(batch[:, :-1])
    ce = cross_entropy(logits, batch[:, 1:])
    total = ce
    if stats:
        moe = model.moe_cfg
        total = (total + moe.aux_loss_weight * jnp.sum(stats["aux_loss"])
                 + moe.z_loss_weight * jnp.sum(stats["z_loss"]))
    return total, (ce, stats)


def make_steps(model_def: nnx.GraphDef, opt_def: nnx.GraphDef, state_shardings: Any,
               batch_shard: NamedSharding):
    """Jitted (train_step, eval_step) over pure states (model state, optimizer state)."""
    params_sh, opt_sh = state_shardings

    def train_step(params, opt_state, batch):
        model, optimizer = nnx.merge(model_def, params), nnx.merge(opt_def, opt_state)
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
        (total, (ce, stats)), grads = grad_fn(model, batch)
        optimizer.update(model, grads)
        metrics = {"loss": ce, "total_loss": total, "grad_norm": optax.tree.norm(grads),
                   "moe": stats}
        return nnx.state(model), nnx.state(optimizer), metrics

    def eval_step(params, batch):
        _, (ce, _) = loss_fn(nnx.merge(model_def, params), batch)
        return ce

    train = jax.jit(train_step, in_shardings=(params_sh, opt_sh, batch_shard),
                    out_shardings=(params_sh, opt_sh, None), donate_argnums=(0, 1))
    evaluate = jax.jit(eval_step, in_shardings=(params_sh, batch_shard))
    return train, evaluate


def _replicate_strays(state: nnx.State, mesh) -> nnx.State:
    """Puts arrays not yet on the mesh (e.g. the optimizer's step count) replicated onto it."""
    def put(x):
        if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
    return jax.tree.map(put, state)


# --------------------------------------------------------------------------- run setup


def global_batch(tokens: np.ndarray, offsets: np.ndarray, seq_len: int,
                 sharding: NamedSharding, vocab_size: int | None = None) -> jax.Array:
    """A [batch, seq_len + 1] array on `sharding`; each host reads only its own rows (and
    checks their ids against vocab_size)."""
    shape = (len(offsets), seq_len + 1)
    return jax.make_array_from_callback(
        shape, sharding,
        lambda index: data_lib.windows(tokens, offsets[index[0]], seq_len, vocab_size))


def _config_json(config: Any) -> str:
    to_json = getattr(config, "to_json_best_effort", None)
    return to_json(indent=2) if to_json else json.dumps(dict(config), indent=2, default=str)


@dataclasses.dataclass
class Run:
    """Everything a training run holds between steps."""

    config: Any
    workdir: str
    mesh: Any
    corpus: data_lib.Corpus
    model: Transformer
    schedule: optax.Schedule
    model_def: nnx.GraphDef
    opt_def: nnx.GraphDef
    params: nnx.State
    opt_state: nnx.State
    checkpointer: ckpt_lib.Checkpointer
    start: int
    notes: list[str]
    placement_counts: dict[str, np.ndarray]  # online placement's, from the checkpoint


def setup(config: Any, workdir: str) -> Run:
    """Validates the config, loads data, builds mesh, model and optimizer, restores a checkpoint.

    Config problems surface here as one-line `ConfigError`s, before anything is compiled.
    """
    devices = jax.devices()
    model_cfg, moe_cfg, (n_expert, n_data) = run_config.validate(
        config, len(devices), devices[0].platform, compute_capability(devices[0]))
    try:
        corpus = data_lib.load_corpus(config.data.path, config.data.max_bytes,
                                      config.data.val_fraction, config.data.bin_dtype)
        data_lib.check_fits(corpus, config.seq_len, model_cfg.vocab_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mesh = make_mesh(expert=n_expert, data=n_data, devices=devices)
    if model_cfg.moe_layers:
        run_config.validate_on_mesh(moe_cfg, mesh, config.batch_size * config.seq_len)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         keep=config.keep_checkpoints)
    start, notes, placement_counts = checkpointer.latest_step() or 0, [], {}
    moe = moe_cfg if model_cfg.moe_layers else None
    hf_dir = run_config.hf_checkpoint(config)
    if hf_dir and not start:  # params straight from the HF files, each device its own slice
        from occult_jax import hf

        try:
            model = hf.build(hf_dir, model_cfg, moe, mesh)
        except ValueError as e:
            checkpointer.close()
            raise ConfigError(str(e)) from None
        overrides = run_config.hf_overrides(config, model_cfg, moe_cfg)
        notes.append(f"initialised params from the Hugging Face checkpoint {hf_dir}; its "
                     "config.json set " + (", ".join(overrides) or "no differing field"))
    else:
        model = Transformer(model_cfg, moe, mesh=mesh, rngs=nnx.Rngs(config.seed))
    tx, schedule = make_optimizer(config)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    model_def, params = nnx.split(model)
    opt_def, opt_state = nnx.split(optimizer)
    params, opt_state = _replicate_strays(params, mesh), _replicate_strays(opt_state, mesh)

    if start:
        try:
            params, opt_state, meta, placement_counts = checkpointer.restore(
                start, params, opt_state)
        except (ValueError, KeyError, TypeError) as e:
            checkpointer.close()
            raise ConfigError(
                f"{checkpointer.directory} step {start} holds another model "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); resume with the config "
                f"it was trained with ({os.path.join(workdir, 'config.json')}) or set a new "
                "workdir.") from None
        notes.append(f"resumed from {checkpointer.directory} step {start}")
        changed = [f"{k}={getattr(config, k)} (was {meta[k]})" for k in DATA_ORDER_KEYS
                   if k in meta and meta[k] != getattr(config, k)]
        if changed:
            notes.append("note: " + ", ".join(changed) + " since the checkpoint: the batches "
                         "from here differ from an uninterrupted run's")
    elif config.init_from and not hf_dir:
        try:
            params, from_step = ckpt_lib.load_params(config.init_from, params)
        except ValueError as e:
            checkpointer.close()
            raise ConfigError(str(e)) from None
        notes.append(f"initialised params from {config.init_from} (step {from_step})")
    if moe is not None and moe.param_dtype != "float32":
        notes.append(f"note: moe.param_dtype={moe.param_dtype} keeps the expert weights, and "
                     "applies their updates, in that dtype (no float32 master copy): updates "
                     "below its precision are lost; train with float32 to avoid that")
    counts = count_params(model)
    notes.insert(0, f"devices={len(devices)} mesh=(data={n_data}, expert={n_expert}) "
                    f"params={counts['total']:,} (experts {counts['experts']:,}, active "
                    f"{counts['active']:,}) corpus={corpus.source} "
                    f"train={len(corpus.train):,} val={len(corpus.validation):,} tokens")
    return Run(config, workdir, mesh, corpus, model, schedule, model_def, opt_def, params,
               opt_state, checkpointer, start, notes, placement_counts)


def finished_step(config: Any, workdir: str) -> int | None:
    """The newest checkpoint's step when it is at or past `config.steps` (nothing to train),
    else None; checked before any data, model or checkpoint is loaded."""
    devices = jax.devices()
    run_config.validate(config, len(devices), devices[0].platform,
                        compute_capability(devices[0]))
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    checkpointer = ckpt_lib.Checkpointer(directory, keep=config.keep_checkpoints)
    try:
        step = checkpointer.latest_step()
    finally:
        checkpointer.close()
    return step if step is not None and step >= config.steps else None


def _needs_calibration(run: Run) -> bool:
    """A fresh run that prunes with the "similarity" rule and has no calibration yet."""
    moe = run.model.moe_cfg
    if run.start or moe is None or moe.max_devices_per_token is None:
        return False
    if moe.prune_rule != "similarity":
        return False
    return not calibration.is_calibrated(nnx.merge(run.model_def, run.params))


def _scalar_metrics(step_metrics: list[dict]) -> dict[str, Any]:
    """One logged record of a window of steps: loss, total_loss and grad_norm of its last
    step, loss_avg and the MoE values over all of them (`dropped` summed)."""
    last = step_metrics[-1]
    out = {"loss": float(last["loss"]), "total_loss": float(last["total_loss"]),
           "grad_norm": float(last["grad_norm"]),
           "loss_avg": float(np.mean([float(m["loss"]) for m in step_metrics]))}
    out.update(metrics_lib.summarize_moe([m["moe"] for m in step_metrics]))
    return out


# --------------------------------------------------------------------------- the loop


def train_and_evaluate(config: Any, workdir: str | None = None, *,
                       stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Trains (resuming from `workdir/checkpoints` when present); returns the last metrics.

    stop_after: behave as if SIGTERM arrived after this step (checkpoint, return); for tests.
    """
    maybe_initialize_distributed()
    if workdir:
        config = config.copy_and_resolve_references() if hasattr(
            config, "copy_and_resolve_references") else config
        config.workdir = workdir
    workdir = config.workdir
    is_main = jax.process_index() == 0
    done = finished_step(config, workdir)
    if done is not None:
        if is_main:
            print(f"{workdir} is at step {done}, steps={config.steps}: nothing to train "
                  "(raise steps to continue).")
        return {"step": done}
    run = setup(config, workdir)
    if is_main:  # config.json: the first run's; a resumed run's goes beside it
        os.makedirs(workdir, exist_ok=True)
        name = f"config.resumed_at_{run.start}.json" if run.start else "config.json"
        with open(os.path.join(workdir, name), "w") as f:
            f.write(_config_json(config))

    batch_shard = batch_sharding(run.mesh)
    shardings = jax.tree.map(lambda x: x.sharding, (run.params, run.opt_state))
    train_step, eval_step = make_steps(run.model_def, run.opt_def, shardings, batch_shard)
    moe_layers = run.model.cfg.moe_layers if run.model.moe_cfg is not None else []
    writer = metrics_lib.MetricWriter(workdir, config.steps, run.start, enabled=is_main,
                                      progress=progress, moe_layers=moe_layers)
    for note in run.notes:
        writer.print(note)

    corpus, seq_len = run.corpus, config.seq_len
    vocab = run.model.cfg.vocab_size
    val_batches = [global_batch(corpus.validation, offsets, seq_len, batch_shard, vocab)
                   for offsets in data_lib.eval_offsets(
                       len(corpus.validation), config.eval_batches if config.eval_every else 0,
                       config.batch_size, seq_len)]

    def batch(step: int) -> jax.Array:
        offsets = data_lib.batch_offsets(len(corpus.train), config.seed, step,
                                         config.batch_size, seq_len)
        return global_batch(corpus.train, offsets, seq_len, batch_shard, vocab)

    def evaluate(params) -> float:
        return float(np.mean([float(eval_step(params, b)) for b in val_batches]))

    tic = time.perf_counter()
    params, opt_state, step = run.params, run.opt_state, run.start
    if _needs_calibration(run):
        model = nnx.merge(run.model_def, params)
        seen = calibration.calibrate(
            model, [batch(i)[:, :-1] for i in range(config.calibration_batches)])
        params = _replicate_strays(nnx.state(model), run.mesh)
        writer.print(f"calibrated expert similarity for the 'similarity' prune rule on "
                     f"{seen:,} tokens")
    compiled = train_step.lower(params, opt_state, batch(step)).compile()
    writer.print(f"compiled the train step in {time.perf_counter() - tic:.1f}s")

    saved = run.start

    def save(step: int) -> None:
        nonlocal saved
        meta = {"step": step, **{k: getattr(config, k) for k in DATA_ORDER_KEYS}}
        counts = ({"coactivation": coactivation.total, "load": coactivation.load}
                  if coactivation.total is not None else None)
        run.checkpointer.save(step, params, opt_state, meta, counts)
        saved = step

    last: dict[str, Any] = {}
    pending: list[dict] = []
    replace_every = config.placement.every if moe_layers else 0
    coactivation = online_placement.CoactivationSum(**run.placement_counts)
    tokens_per_step = config.batch_size * seq_len
    with StopSignal() as stop:
        tic = time.perf_counter()
        while step < config.steps:
            params, opt_state, step_metrics = compiled(params, opt_state, batch(step))
            step += 1
            pending.append(step_metrics)
            if stop_after is not None and step >= stop_after:
                stop.requested = True
            evaluating = bool(config.eval_every) and (step % config.eval_every == 0
                                                      or step == config.steps)
            replacing = bool(replace_every) and step % replace_every == 0
            checkpointing = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
            # steps that need every pending step's metrics: their counts, or a checkpoint of them
            if (evaluating or replacing or checkpointing or stop.requested
                    or step % config.log_every == 0 or step in (run.start + 1, config.steps)):
                fetched = jax.device_get(pending)
                for metrics in fetched:
                    coactivation.add(metrics["moe"])
                last = _scalar_metrics(fetched)
                elapsed = time.perf_counter() - tic
                last.update(moe_layers=moe_layers, step_time_s=elapsed / len(pending),
                            tokens_per_s=tokens_per_step * len(pending) / elapsed,
                            lr=float(run.schedule(step - 1)))
                if evaluating:
                    last["val_loss"] = evaluate(params)
                    writer.print(f"step {step}: loss {last['loss']:.4f} "
                                 f"val_loss {last['val_loss']:.4f}")
                writer.write(step, last)
                writer.advance(len(pending))
                pending = []
                tic = time.perf_counter()
            if replacing and coactivation.total is not None:
                paths = [("blocks", i, "ffn") for i in moe_layers]
                params, opt_state, report = online_placement.replace_experts(
                    params, opt_state, coactivation.total, paths, run.mesh.shape["expert"],
                    config.placement.method)
                load = coactivation.load
                imbalance = load.max(axis=-1) / np.maximum(load.mean(axis=-1), 1e-9)
                coactivation.reset()
                writer.print(f"step {step}: re-placed experts; C_T (pairwise) per layer "
                             + ", ".join(f"{a:.3f}→{b:.3f}" for a, b in report)
                             + "; expert load max/mean since the last re-placement "
                             + ", ".join(f"{x:.2f}" for x in imbalance))
            if stop.should_stop(step, config.log_every):
                writer.print(f"stop requested: checkpointing step {step} and exiting")
                break
            if checkpointing:
                save(step)
        if saved != step:
            save(step)
    run.checkpointer.close()
    writer.close()
    return {"step": step, **last}
