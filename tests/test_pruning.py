"""Collaboration pruning: device-limited routing rules against plain NumPy statements of them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mesh_or_skip
from flax import nnx
from moe_reference import np_devices_per_token

import occult_jax as oj
from occult_jax.pruning import limited_top_k, similarity_from_logits, similarity_from_router


def np_walk_devices(scores, device, cap):
    """Walk experts in score order collecting devices until `cap` are found (the paper's rule)."""
    kept = []
    for e in np.argsort(-scores, kind="stable"):
        if device[e] not in kept:
            kept.append(device[e])
        if len(kept) == cap:
            break
    return set(kept)


def np_group_devices(scores, device, num_devices, cap, k):
    take = -(-k // cap)
    rank = [np.sort(scores[device == n])[::-1][:take].sum() for n in range(num_devices)]
    return set(np.argsort(-np.asarray(rank), kind="stable")[:cap])


def np_limited(scores, device, num_devices, cap, k, rule, similarity):
    ids = np.zeros((scores.shape[0], k), int)
    for t, row in enumerate(scores):
        if rule == "group_score":
            devices = np_group_devices(row, device, num_devices, cap, k)
        else:
            devices = np_walk_devices(row, device, cap)
        allowed = np.array([device[e] in devices for e in range(len(row))])
        if rule != "similarity":
            ids[t] = np.argsort(-np.where(allowed, row, -np.inf), kind="stable")[:k]
            continue
        original = np.argsort(-row, kind="stable")[:k]
        chosen = {e for e in original if allowed[e]}
        for j, e in enumerate(original):
            if allowed[e]:
                ids[t, j] = e
            else:
                cands = [c for c in range(len(row)) if allowed[c] and c not in chosen]
                ids[t, j] = max(cands, key=lambda c, e=e: (similarity[e, c], -c))
                chosen.add(ids[t, j])
    return ids


@pytest.mark.parametrize("rule", ["score", "group_score", "similarity"])
@pytest.mark.parametrize("num_experts,num_devices,k,cap", [(16, 4, 4, 2), (64, 8, 8, 2),
                                                          (8, 2, 2, 1), (64, 8, 6, 3)])
def test_rules_match_numpy(rule, num_experts, num_devices, k, cap):
    rng = np.random.default_rng(num_experts + k + cap)
    scores = rng.random((50, num_experts)).astype(np.float32)
    placement = rng.permutation(num_experts)
    device = placement // (num_experts // num_devices)
    router = jnp.asarray(rng.standard_normal((8, num_experts)))
    similarity = np.asarray(similarity_from_router(router))
    vals, ids = limited_top_k(jnp.asarray(scores), jnp.asarray(device), num_devices, rule, k,
                              cap, jnp.asarray(similarity))
    ids = np.asarray(ids)
    want = np_limited(scores, device, num_devices, cap, k, rule, similarity)
    if rule == "similarity":
        np.testing.assert_array_equal(ids, want)
        original = np.sort(scores, axis=1)[:, ::-1][:, :k]
        np.testing.assert_allclose(np.asarray(vals), original, rtol=1e-6)  # weights inherited
    else:
        np.testing.assert_array_equal(np.sort(ids, 1), np.sort(want, 1))
        np.testing.assert_allclose(np.asarray(vals), np.take_along_axis(scores, ids, 1))
    assert np.all(np_devices_per_token(ids, placement, num_experts // num_devices) <= cap)
    assert all(len(set(row)) == k for row in ids)  # distinct experts


def test_similarity_from_logits_is_cosine():
    logits = np.random.default_rng(0).standard_normal((100, 6))
    centred = logits - logits.mean(0)
    want = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in centred.T]
                     for a in centred.T])
    np.testing.assert_allclose(np.asarray(similarity_from_logits(jnp.asarray(logits))), want,
                               rtol=1e-4, atol=1e-5)


def make_pair(cfg, mesh, seed):
    layer = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(seed))
    reference = oj.MoELayer(cfg.replace(dispatch="reference"), mesh=mesh, rngs=nnx.Rngs(seed))
    placement = jnp.asarray(np.random.default_rng(seed).permutation(cfg.num_experts), jnp.int32)
    layer.placement[...] = placement
    reference.placement[...] = placement
    return layer, reference


@pytest.mark.parametrize("rule", ["score", "group_score", "similarity"])
@pytest.mark.parametrize("cap", [1, 2])
def test_layer_respects_cap_and_matches_reference(rule, cap):
    mesh = mesh_or_skip(4, 2)
    cfg = oj.MoEConfig(num_experts=16, top_k=4, d_model=16, d_ff=8, dispatch="occult",
                       max_devices_per_token=cap, prune_rule=rule)
    layer, reference = make_pair(cfg, mesh, 3 + cap)
    rng = np.random.default_rng(cap)
    x = jnp.asarray(rng.standard_normal((2, 64, 16)), jnp.float32)
    if rule == "similarity":
        for m in (layer, reference):
            m.calibrate_similarity(x)
    cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    (y, stats), (y_ref, stats_ref) = layer(x), reference(x)
    assert float(stats["ct"]) <= cap
    assert float(stats_ref["ct"]) <= cap
    if cap == 1:
        assert float(stats["ct"]) == 1.0
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-4, atol=1e-5)

    def loss(m, x):
        y, s = m(x)
        return jnp.sum(y * cot) + 0.1 * s["aux_loss"]

    g, g_ref = nnx.grad(loss, argnums=(0, 1))(layer, x), nnx.grad(loss, argnums=(0, 1))(
        reference, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_cap_too_small_for_top_k():
    mesh = mesh_or_skip(4)
    cfg = oj.MoEConfig(num_experts=8, top_k=4, max_devices_per_token=1)  # 1 device holds 2
    with pytest.raises(ValueError, match="raise the cap or lower top_k"):
        oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(0))


def test_unknown_prune_rule():
    with pytest.raises(ValueError, match="prune_rule='random' is unknown"):
        oj.MoEConfig(prune_rule="random")
