"""Pruning flow: similarity calibration from logit moments, fine-tuning, the quality command."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from conftest import mesh_or_skip
from flax import nnx
from test_train import tiny_config

import occult_jax as oj
from occult_jax import calibration, pruning_eval, train_lib


class OneLayer(nnx.Module):
    """A model whose stats are stacked per MoE layer, as calibration expects."""

    def __init__(self, cfg, mesh):
        self.moe = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(0))

    def __call__(self, x):
        y, stats = self.moe(x)
        return y, jax.tree.map(lambda a: a[None], stats)


def logit_column_cosine(x, router) -> np.ndarray:
    """[E, E] cosine of the centred router-logit columns over tokens x, in float64."""
    logits = np.asarray(x, np.float64) @ np.asarray(router, np.float64)
    centred = logits - logits.mean(0)
    unit = centred / np.linalg.norm(centred, axis=0)
    return unit.T @ unit


def test_calibration_is_the_cosine_of_logit_columns():
    mesh = mesh_or_skip(4, 2)
    cfg = oj.MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=8, dispatch="occult")
    model = OneLayer(cfg, mesh)
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.standard_normal((2, 32, 16)), jnp.float32) for _ in range(3)]
    assert not calibration.is_calibrated(model)
    assert calibration.calibrate(model, batches) == 3 * 64
    assert calibration.is_calibrated(model)
    x = np.concatenate([np.asarray(b).reshape(-1, 16) for b in batches])
    np.testing.assert_allclose(np.asarray(model.moe.similarity[...]),
                               logit_column_cosine(x, model.moe.router[...]), atol=2e-4)


class TwoLayers(nnx.Module):
    """Two MoE layers in sequence, stats stacked per layer in `nnx.iter_modules` order."""

    def __init__(self, cfg, mesh):
        self.first = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(1))
        self.second = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(2))

    def __call__(self, x):
        h, s1 = self.first(x)
        y, s2 = self.second(x + h)
        return y, jax.tree.map(lambda a, b: jnp.stack([a, b]), s1, s2)


def test_calibration_gives_each_layer_its_own_similarity():
    """Layer i gets the cosine of its own logit columns (over its own inputs), not layer 0's."""
    mesh = mesh_or_skip(4, 2)
    cfg = oj.MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=8, dispatch="occult")
    model = TwoLayers(cfg, mesh)
    rng = np.random.default_rng(3)
    batches = [jnp.asarray(rng.standard_normal((2, 32, 16)), jnp.float32) for _ in range(2)]
    assert calibration.calibrate(model, batches) == 2 * 64
    inputs = {"first": [], "second": []}
    for b in batches:
        inputs["first"].append(np.asarray(b).reshape(-1, 16))
        inputs["second"].append(np.asarray(b + model.first(b)[0]).reshape(-1, 16))
    sims = {}
    for name, xs in inputs.items():
        layer = getattr(model, name)
        sims[name] = logit_column_cosine(np.concatenate(xs), layer.router[...])
        np.testing.assert_allclose(np.asarray(layer.similarity[...]), sims[name], atol=2e-4)
    assert np.abs(sims["first"] - sims["second"]).max() > 0.1  # the layers differ


def test_finetuning_with_similarity_rule_stores_calibration(tmp_path):
    mesh_or_skip(4, 2)
    base = tmp_path / "base"
    train_lib.train_and_evaluate(tiny_config(base, steps=2), progress=False)
    tuned = tmp_path / "tuned"
    config = tiny_config(tuned, steps=2, init_from=str(base), **{
        "moe.max_devices_per_token": 1, "moe.prune_rule": "similarity"})
    out = train_lib.train_and_evaluate(config, progress=False)
    assert max(out["ct"]) == 1.0
    run = train_lib.setup(config, str(tuned))  # resumes the fine-tuned checkpoint
    run.checkpointer.close()
    assert calibration.is_calibrated(nnx.merge(run.model_def, run.params))


def test_quality_command(tmp_path, monkeypatch):
    mesh_or_skip(4, 2)
    config = tiny_config(tmp_path / "unused")
    monkeypatch.setattr(pruning_eval.frontends, "load_config", lambda _: config)
    rows = pruning_eval.main(["--workdir", str(tmp_path), "--base_steps", "3",
                              "--finetune_steps", "2", "--cap", "1", "--eval_batches", "1"])
    names = list(rows)
    assert len(names) == 4
    assert all(ct == 1.0 for name in names[1:3] for ct in rows[name]["ct_per_layer"])
    assert all(ct > 1.0 for ct in rows[names[0]]["ct_per_layer"])
    for r in rows.values():
        assert np.isfinite(r["val_loss"]) and np.isclose(r["perplexity"], np.exp(r["val_loss"]))
    saved = json.loads((tmp_path / "pruning_eval_cap1_similarity.json").read_text())
    assert list(saved) == names


def test_pruning_eval_default_config_loads_from_any_directory(monkeypatch, tmp_path):
    """--config defaults to the repo's configs/default.py wherever the command runs."""
    monkeypatch.chdir(tmp_path)
    path = pruning_eval.parser().parse_args([]).config
    assert os.path.isabs(path)
    config = pruning_eval.frontends.load_config(path)
    assert config.moe.top_k >= 1 and config.workdir
