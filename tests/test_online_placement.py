"""Online placement: re-placing mid-run follows the co-activation and training continues."""

from __future__ import annotations

import shutil

import numpy as np
import optax
from conftest import mesh_or_skip
from flax import nnx
from test_train import losses, tiny_config

import occult_jax as oj
from occult_jax import metrics, online_placement, placement, train_lib


def test_replace_experts_lowers_the_pairwise_cost():
    mesh = mesh_or_skip(4, 2)
    cfg = oj.MoEConfig(num_experts=8, top_k=2, d_model=8, d_ff=4, dispatch="occult")
    layer = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(layer, optax.adam(1e-3), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    pairs = rng.permutation(8).reshape(4, 2)  # hidden pairs, split by the identity placement
    counts = rng.integers(0, 3, (8, 8))
    for a, b in pairs:
        counts[a, b] += 100
    counts = np.triu(counts, 1) + np.triu(counts, 1).T
    before = placement.pairwise_cost(counts, np.arange(8) // 2)
    params, opt_state = nnx.state(layer), nnx.state(optimizer)
    params, opt_state, report = online_placement.replace_experts(
        params, opt_state, counts[None], [()], num_devices=4)
    after_devices = np.asarray(params["placement"][...]) // 2
    assert report[0][0] == before
    assert report[0][1] == placement.pairwise_cost(counts, after_devices) < before
    for a, b in pairs:  # each hidden pair now shares a device
        assert after_devices[a] == after_devices[b]


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def record_replacements(monkeypatch) -> list:
    """Patches replace_experts to record (counts, [new slots of each layer]) per call."""
    calls, replace = [], online_placement.replace_experts

    def spy(params, opt_state, counts, paths, num_devices, method):
        params, opt_state, report = replace(params, opt_state, counts, paths, num_devices,
                                            method)
        slots = [np.asarray(_at(params, (*path, "placement"))[...]) for path in paths]
        calls.append((np.array(counts), slots))
        return params, opt_state, report

    monkeypatch.setattr(online_placement, "replace_experts", spy)
    return calls


def test_training_with_online_placement(tmp_path, monkeypatch):
    mesh_or_skip(4, 2)
    calls = record_replacements(monkeypatch)
    straight = tmp_path / "straight"
    train_lib.train_and_evaluate(tiny_config(straight), progress=False)
    assert not calls
    placed = tmp_path / "placed"
    config = tiny_config(placed, **{"placement.every": 3})
    train_lib.train_and_evaluate(config, progress=False)
    # Re-placed after steps 3 and 6, each time from the counts of the 3 steps since the last:
    # every token adds k·(k-1) to its layer's (zero-diagonal) co-activation matrix.
    k, tokens = config.moe.top_k, config.batch_size * config.seq_len
    assert len(calls) == 2
    for counts, _ in calls:
        assert counts.shape[0] == config.model.num_layers
        np.testing.assert_array_equal(counts.sum(axis=(1, 2)), 3 * tokens * k * (k - 1))
    # The run continued with the new placement: the last checkpoint holds the second one.
    run = train_lib.setup(config, str(placed))
    run.checkpointer.close()
    stored = np.asarray(run.params["blocks"][0]["ffn"]["placement"][...])
    np.testing.assert_array_equal(stored, calls[-1][1][0])
    a, b = losses(straight), losses(placed)
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)],
                               rtol=1e-4)


def test_resumed_run_re_places_from_the_same_counts(tmp_path, monkeypatch):
    """Killed between re-placements, a run resumes with the counts of its checkpoint: same
    placements, same losses, and one record per step, as a run that never stopped. Logging
    every 3 steps neither shifts the 4-step windows of counts nor leaves counts out of a
    checkpoint."""
    mesh_or_skip(4, 2)
    calls = record_replacements(monkeypatch)
    # re-placed after steps 5 and 10, logged after 3, 6, 9, 10, checkpoints every 2 steps
    changes = {"placement.every": 5, "log_every": 3, "checkpoint_every": 2, "steps": 10}
    train_lib.train_and_evaluate(tiny_config(tmp_path / "straight", **changes), progress=False)
    straight, calls[:] = list(calls), []
    resumed = tiny_config(tmp_path / "resumed", **changes)
    train_lib.train_and_evaluate(resumed, stop_after=5, progress=False)
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "5")  # as if killed before saving it
    assert len(calls) == 1 and 5 in losses(tmp_path / "resumed")
    calls[:] = []
    train_lib.train_and_evaluate(resumed, progress=False)
    k, tokens = resumed.moe.top_k, resumed.batch_size * resumed.seq_len
    assert len(straight) == len(calls) == 2  # resumed from step 4
    for (counts_a, slots_a), (counts_b, slots_b) in zip(straight, calls, strict=True):
        np.testing.assert_array_equal(counts_a.sum(axis=(1, 2)), 5 * tokens * k * (k - 1))
        np.testing.assert_array_equal(counts_a, counts_b)
        np.testing.assert_array_equal(slots_a, slots_b)
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert all(a[s] == b[s] for s in a), (a, b)
    logged = [r["step"] for r in metrics.read_jsonl(tmp_path / "resumed" / "metrics.jsonl")]
    assert logged == sorted(a) and 5 in logged  # the killed run's step 5 only once
