"""Collaboration pruning: device-limited routing rules against plain NumPy statements of them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mesh_or_skip
from flax import nnx
from moe_reference import np_devices_per_token

import occult_jax as oj
from occult_jax import pruning, routing
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


def dense_device_scores(scores, expert_device, num_devices, rule, top_k, max_devices):
    """The former device ranking: a [T, N, E] masked copy of the scores (any expert→device map)."""
    on_device = expert_device[None, :] == jnp.arange(num_devices)[:, None]  # [N, E]
    per_device = jnp.where(on_device[None], scores[:, None, :], pruning.NEG)  # [T, N, E]
    if rule == "group_score":
        best, _ = jax.lax.top_k(per_device, -(-top_k // max_devices))
        return jnp.sum(jnp.where(best > pruning.NEG / 2, best, 0.0), axis=-1)
    return jnp.max(per_device, axis=-1)


@pytest.mark.parametrize("rule", ["score", "group_score", "similarity"])
@pytest.mark.parametrize("num_experts,num_devices,k,cap", [(16, 4, 4, 2), (64, 8, 8, 2),
                                                          (8, 2, 2, 1), (64, 8, 6, 3),
                                                          (32, 16, 4, 2)])
@pytest.mark.parametrize("ties", [False, True])
def test_device_order_ranking_equals_the_dense_mask(monkeypatch, rule, num_experts,
                                                     num_devices, k, cap, ties):
    """The [T, N, E/N] device-order ranking gives the same ids, values and gradients as the
    former [T, N, E] masked one, bit for bit, on permuted placements and with tied scores."""
    rng = np.random.default_rng(num_experts * 7 + k + cap + ties)
    scores = rng.random((64, num_experts))
    if ties:
        scores = np.round(scores * 4) / 4  # many equal scores within and across devices
    scores = jnp.asarray(scores, jnp.float32)
    device = jnp.asarray(rng.permutation(num_experts) // (num_experts // num_devices))
    similarity = similarity_from_router(jnp.asarray(rng.standard_normal((8, num_experts))))
    cot = jnp.asarray(rng.standard_normal((64, k)), jnp.float32)

    def run(s):
        vals, ids = limited_top_k(s, device, num_devices, rule, k, cap, similarity)
        return jnp.sum(vals * cot), (vals, ids)

    (_, (vals, ids)), grad = jax.value_and_grad(run, has_aux=True)(scores)
    with monkeypatch.context() as patch:
        patch.setattr(pruning, "device_scores", dense_device_scores)
        (_, (vals_ref, ids_ref)), grad_ref = jax.value_and_grad(run, has_aux=True)(scores)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_ref))
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(vals_ref))
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad_ref))
    for r in ("score", "group_score"):
        np.testing.assert_array_equal(
            np.asarray(pruning.device_scores(scores, device, num_devices, r, k, cap)),
            np.asarray(dense_device_scores(scores, device, num_devices, r, k, cap)))


def test_device_ranking_memory_is_linear_in_experts():
    """No [T, N, E] temporary: XLA's temp buffers stay within a few copies of the [T, E] scores
    (the dense mask needed N copies: 32 MiB here)."""
    tokens, experts, devices = 512, 256, 64
    scores = jax.ShapeDtypeStruct((tokens, experts), jnp.float32)
    device = jnp.asarray(np.random.default_rng(0).permutation(experts) // (experts // devices))
    for rule in ("score", "group_score"):
        compiled = jax.jit(lambda s, r=rule: limited_top_k(s, device, devices, r, 8, 4, None)
                           ).lower(scores).compile()
        memory = compiled.memory_analysis()
        if memory is None:
            pytest.skip("this backend gives no memory analysis")
        assert memory.temp_size_in_bytes <= 4 * tokens * experts * 4, rule


def test_unbalanced_expert_device_map_is_refused():
    scores = jnp.asarray(np.random.default_rng(1).random((4, 8)), jnp.float32)
    with pytest.raises(ValueError, match=r"2 experts on each of devices 0\.\.3; got counts"):
        limited_top_k(scores, jnp.asarray([0, 0, 0, 1, 1, 2, 2, 3]), 4, "score", 2, 2, None)
    with pytest.raises(ValueError, match="must divide the 8 experts"):
        limited_top_k(scores, jnp.arange(8) // 3, 3, "score", 2, 2, None)


def np_route(x, w, device, num_devices, cap, k, rule, similarity, score_fn, renormalize,
             fixed=None):
    """Float64 NumPy routing weights [T, k] and ids; `fixed` (ids, originals) holds the choice."""
    logits = x @ w
    if score_fn == "softmax":
        raw = np.exp(logits - logits.max(1, keepdims=True))
        raw /= raw.sum(1, keepdims=True)
    else:
        raw = 1.0 / (1.0 + np.exp(-logits))
    if fixed is None:
        ids = np_limited(raw, device, num_devices, cap, k, rule, similarity)
        fixed = ids, np.argsort(-raw, axis=1, kind="stable")[:, :k]
    ids, originals = fixed
    vals = np.take_along_axis(raw, originals if rule == "similarity" else ids, axis=1)
    if renormalize:
        vals = vals / (vals.sum(1, keepdims=True) + routing.RENORM_EPS)
    return vals, fixed


@pytest.mark.parametrize("rule", ["score", "group_score", "similarity"])
@pytest.mark.parametrize("score_fn,renormalize", [("softmax", False), ("softmax", True),
                                                  ("sigmoid", True)])
def test_pruned_weight_gradients_match_finite_differences(rule, score_fn, renormalize):
    """d(Σ cot · routing weights)/d(router kernel) through the device-limited top-k, against
    central differences of a float64 NumPy statement with the choice held fixed."""
    rng = np.random.default_rng(11)
    tokens, d, e, n, k, cap = 24, 6, 16, 4, 4, 2
    x = rng.standard_normal((tokens, d)).astype(np.float32).astype(np.float64)
    w = rng.standard_normal((d, e)).astype(np.float32).astype(np.float64)
    device = rng.permutation(e) // (e // n)
    similarity = np.asarray(similarity_from_router(jnp.asarray(rng.standard_normal((8, e)))),
                            np.float64)
    cot = rng.standard_normal((tokens, k))
    cfg = oj.MoEConfig(num_experts=e, top_k=k, max_devices_per_token=cap, prune_rule=rule,
                       score_fn=score_fn, renormalize=renormalize)
    args = (jnp.asarray(device), n, jnp.asarray(similarity, jnp.float32))

    def loss(w):
        out = routing.route(jnp.asarray(x, jnp.float32), w, cfg, *args)
        return jnp.sum(out.weights * jnp.asarray(cot, jnp.float32)), out

    (_, out), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(w, jnp.float32))
    want, fixed = np_route(x, w, device, n, cap, k, rule, similarity, score_fn, renormalize)
    np.testing.assert_array_equal(np.asarray(out.expert_ids), fixed[0])
    np.testing.assert_allclose(np.asarray(out.weights), want, rtol=1e-5, atol=1e-7)
    assert np.any(np.asarray(out.expert_ids) != fixed[1])  # the cap binds
    eps, numeric = 1e-6, np.zeros_like(w)
    for i, j in np.ndindex(*w.shape):
        step = np.zeros_like(w)
        step[i, j] = eps
        up, _ = np_route(x, w + step, device, n, cap, k, rule, similarity, score_fn,
                         renormalize, fixed)
        down, _ = np_route(x, w - step, device, n, cap, k, rule, similarity, score_fn,
                           renormalize, fixed)
        numeric[i, j] = np.sum((up - down) * cot) / (2 * eps)
    assert np.abs(numeric).max() > 1e-2
    np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-4, atol=2e-6)


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


def np_cosine(columns):
    unit = columns / np.linalg.norm(columns, axis=0)
    return unit.T @ unit


def np_counts(ids, num_experts):
    chosen = np.zeros((len(ids), num_experts))
    chosen[np.arange(len(ids))[:, None], ids] = 1
    coact = chosen.T @ chosen
    return chosen.sum(0), coact - np.diag(np.diagonal(coact))


@pytest.mark.parametrize("how", ["set_similarity", "calibrate_similarity"])
def test_similarity_rule_follows_the_calibrated_matrix(how):
    """Once calibrated, the layer replaces pruned experts by the calibrated similarity, not by
    the router-column cosine of the uncalibrated fallback (the two choose differently here)."""
    mesh = mesh_or_skip(4, 2)
    e, n, k = 16, 4, 4
    cfg = oj.MoEConfig(num_experts=e, top_k=k, d_model=16, d_ff=8, dispatch="occult",
                       max_devices_per_token=1, prune_rule="similarity")
    layer = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(12)
    placement = rng.permutation(e)
    layer.placement[...] = jnp.asarray(placement, jnp.int32)
    router = np.asarray(layer.router[...], np.float64)
    if how == "set_similarity":
        a = rng.standard_normal((e, e))
        layer.set_similarity(jnp.asarray(np.corrcoef(a), jnp.float32))
    else:  # anisotropic tokens: the logit-column cosine is not the router-column cosine
        calib = rng.standard_normal((256, 16)) @ (rng.standard_normal((16, 16)) * 3)
        layer.calibrate_similarity(jnp.asarray(calib, jnp.float32))
        logits = np.asarray(calib, np.float32).astype(np.float64) @ router
        np.testing.assert_allclose(np.asarray(layer.similarity[...]),
                                   np_cosine(logits - logits.mean(0)), atol=2e-4)
    similarity = np.asarray(layer.similarity[...], np.float64)
    x = rng.standard_normal((2, 32, 16)).astype(np.float32)
    logits = x.reshape(-1, 16).astype(np.float64) @ router
    raw = np.exp(logits - logits.max(1, keepdims=True))
    raw /= raw.sum(1, keepdims=True)
    device = placement // (e // n)
    want = np_limited(raw, device, n, 1, k, "similarity", similarity)
    fallback = np_limited(raw, device, n, 1, k, "similarity", np_cosine(router))
    assert np.mean(np.any(want != fallback, axis=1)) > 0.2  # the test can tell them apart
    weights = layer.expert_weights()
    got = routing.route(jnp.asarray(x.reshape(-1, 16)), weights.router, cfg,
                        jnp.asarray(device), n, weights.similarity)
    np.testing.assert_array_equal(np.asarray(got.expert_ids), want)
    _, stats = layer(jnp.asarray(x))  # the layer's own routing: its counts follow `want`
    load, coact = np_counts(want, e)
    np.testing.assert_array_equal(np.asarray(stats["expert_load"]), load)
    np.testing.assert_array_equal(np.asarray(stats["coactivation"]), coact)


def test_cap_too_small_for_top_k():
    mesh = mesh_or_skip(4)
    cfg = oj.MoEConfig(num_experts=8, top_k=4, max_devices_per_token=1)  # 1 device holds 2
    with pytest.raises(ValueError, match="raise the cap or lower top_k"):
        oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(0))


def test_unknown_prune_rule():
    with pytest.raises(ValueError, match="prune_rule='random' is unknown"):
        oj.MoEConfig(prune_rule="random")
