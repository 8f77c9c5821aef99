"""MoELayer: standard and occult dispatch equal the reference (outputs, gradients, stats)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mesh_or_skip
from flax import nnx
from moe_reference import np_devices_per_token, np_moe, np_plan_drops, np_route
from moe_reference_jax import moe_grads

import occult_jax as oj
from occult_jax import transport

D_MODEL, D_FF, TOKENS_PER_DEVICE = 16, 8, 16


def make_layer(cfg, mesh, seed, placement=None, hot=None, hot_strength=3.0):
    """A layer with fresh random weights; `hot` experts get a router bias along one direction."""
    layer = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 1000)
    if placement is not None:
        layer.placement[...] = jnp.asarray(placement, jnp.int32)
    if hot is not None:
        direction = rng.standard_normal(cfg.d_model)
        direction /= np.linalg.norm(direction)
        router = np.asarray(layer.router[...]).copy()
        router[:, hot] += hot_strength * direction[:, None]
        layer.router[...] = jnp.asarray(router, jnp.float32)
        return layer, direction
    return layer, None


def make_input(mesh_size, seed, direction=None, batch=2):
    rng = np.random.default_rng(seed)
    tokens = TOKENS_PER_DEVICE * mesh_size
    x = rng.standard_normal((batch, tokens // batch, D_MODEL)).astype(np.float32)
    if direction is not None:
        x += 2.0 * direction.astype(np.float32) * np.sqrt(D_MODEL)
    return jnp.asarray(x)


def loss_fn(layer, x, cotangent):
    y, stats = layer(x)
    return jnp.sum(y * cotangent) + 0.1 * stats["aux_loss"] + 0.01 * stats["z_loss"]


def grads(layer, x, cotangent):
    return nnx.grad(loss_fn, argnums=(0, 1))(layer, x, cotangent)


def assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        u, v = np.asarray(u), np.asarray(v)
        scale = max(1.0, float(np.abs(v).max()))
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol * scale,
                                   err_msg=jax.tree_util.keystr(path))


def assert_matches_jax_reference(layer, x, cotangent, cfg, stats, keep=None, layer_grads=None):
    """aux/z losses and the gradients of loss_fn (router, expert weights, input; `layer_grads`
    when already computed) against the plain-JAX dense MoE of moe_reference_jax, which shares
    no code with the library."""
    (_, (_, aux, z)), want = moe_grads(layer, x, cotangent, top_k=cfg.top_k,
                                       score_fn=cfg.score_fn, renormalize=cfg.renormalize,
                                       keep=None if keep is None else jnp.asarray(keep))
    np.testing.assert_allclose(float(stats["aux_loss"]), float(aux), rtol=1e-5)
    np.testing.assert_allclose(float(stats["z_loss"]), float(z), rtol=1e-5)
    g, g_x = layer_grads or grads(layer, x, cotangent)
    got = {name: g[name][...] for name in ("router", "w_gate", "w_up", "w_down")}
    assert_trees_close({**got, "x": g_x}, want)


def numpy_expectations(layer, x, cfg, n_expert, mesh_size, capacity=None):
    """Routing-derived quantities recomputed in NumPy: output, C_T, drops, wire rows, load."""
    x2 = np.asarray(x).reshape(-1, cfg.d_model)
    ids, w = np_route(x2, np.asarray(layer.router[...]), cfg.top_k, cfg.score_fn,
                      cfg.renormalize)
    placement = np.asarray(layer.placement[...])
    per_dev = cfg.num_experts // n_expert
    t_local = x2.shape[0] // mesh_size
    keep = None
    if capacity is not None:
        keep = np_plan_drops(ids, placement, per_dev, n_expert, t_local, capacity,
                             dedup=cfg.dispatch == "occult")
    y = np_moe(x2, ids, w, np.asarray(layer.w_gate[...]), np.asarray(layer.w_up[...]),
               np.asarray(layer.w_down[...]), placement, keep)
    keep = np.ones(ids.shape, bool) if keep is None else keep
    wire = 0
    for t in range(ids.shape[0]):
        src = (t // t_local) % n_expert  # tokens shard over (data, expert), expert inner
        rows = set()
        for j, e in enumerate(ids[t]):
            dev = placement[e] // per_dev
            if keep[t, j] and dev != src:
                rows.add(dev if cfg.dispatch == "occult" else (dev, j))
        wire += len(rows)
    return {
        "y": y.reshape(x.shape),
        "ct": np_devices_per_token(ids, placement, per_dev).mean(),
        "dropped": int((~keep).sum()),
        "wire_rows": wire,
        "expert_load": np.bincount(ids.reshape(-1), minlength=cfg.num_experts),
        "coactivation": np_coactivation(ids, cfg.num_experts),
        "keep": keep,
    }


def np_coactivation(ids, num_experts):
    counts = np.zeros((num_experts, num_experts), int)
    for row in ids:
        for a in row:
            for b in row:
                if a != b:
                    counts[a, b] += 1
    return counts


# (num_experts, top_k, expert axis, data axis, skewed): covers every E, k and mesh size pairwise.
GRID = [
    (8, 1, 1, 1, False), (8, 2, 2, 1, True), (8, 8, 4, 2, False), (8, 4, 8, 1, True),
    (16, 1, 4, 1, True), (16, 4, 2, 2, False), (16, 8, 8, 1, False), (16, 2, 1, 2, True),
    (64, 8, 4, 2, True), (64, 2, 8, 1, False), (64, 4, 2, 4, True), (64, 1, 2, 1, False),
]


@pytest.mark.parametrize("dispatch", ["standard", "occult"])
@pytest.mark.parametrize("num_experts,top_k,n_expert,n_data,skewed", GRID)
def test_matches_reference(dispatch, num_experts, top_k, n_expert, n_data, skewed):
    mesh = mesh_or_skip(n_expert, n_data)
    seed = num_experts * 100 + top_k * 10 + n_expert + n_data
    cfg = oj.MoEConfig(num_experts=num_experts, top_k=top_k, d_model=D_MODEL, d_ff=D_FF,
                       dispatch=dispatch)
    rng = np.random.default_rng(seed)
    placement = rng.permutation(num_experts)  # experts of a device are not contiguous ids
    hot = rng.choice(num_experts, size=max(1, num_experts // 8), replace=False) if skewed else None
    layer, direction = make_layer(cfg, mesh, seed, placement, hot)
    reference, _ = make_layer(cfg.replace(dispatch="reference"), mesh, seed, placement, hot)
    x = make_input(mesh.size, seed, direction)
    cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    y, stats = layer(x)
    y_ref, stats_ref = reference(x)
    expected = numpy_expectations(layer, x, cfg, n_expert, mesh.size)
    np.testing.assert_allclose(np.asarray(y), expected["y"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-4, atol=1e-5)
    assert int(stats["dropped"]) == 0
    assert int(stats["wire_rows"]) == expected["wire_rows"]
    np.testing.assert_allclose(float(stats["ct"]), expected["ct"], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats["expert_load"]), expected["expert_load"])
    np.testing.assert_array_equal(np.asarray(stats["coactivation"]), expected["coactivation"])
    np.testing.assert_array_equal(np.asarray(stats_ref["coactivation"]), expected["coactivation"])
    for key in ("aux_loss", "z_loss"):
        np.testing.assert_allclose(float(stats[key]), float(stats_ref[key]), rtol=1e-5)

    layer_grads = grads(layer, x, cotangent)
    assert_trees_close(layer_grads, grads(reference, x, cotangent))
    assert_matches_jax_reference(layer, x, cotangent, cfg, stats, layer_grads=layer_grads)


@pytest.mark.parametrize("dispatch", ["standard", "occult"])
@pytest.mark.parametrize("num_experts,top_k,n_expert,n_data", [(16, 4, 4, 2), (64, 8, 8, 1),
                                                               (8, 6, 2, 1)])  # k > E/N
def test_ragged_transport_matches_dense(dispatch, num_experts, top_k, n_expert, n_data):
    """The ragged transport (CPU: emulated primitive) gives the dense transport's results."""
    mesh = mesh_or_skip(n_expert, n_data)
    cfg = oj.MoEConfig(num_experts=num_experts, top_k=top_k, d_model=D_MODEL, d_ff=D_FF,
                       dispatch=dispatch)
    placement = np.random.default_rng(7).permutation(num_experts)
    dense, _ = make_layer(cfg, mesh, 7, placement)
    ragged, _ = make_layer(cfg.replace(transport="ragged"), mesh, 7, placement)
    x = make_input(mesh.size, 8)
    cotangent = jnp.asarray(np.random.default_rng(9).standard_normal(x.shape), jnp.float32)
    (y_d, s_d), (y_r, s_r) = dense(x), ragged(x)
    np.testing.assert_allclose(np.asarray(y_r), np.asarray(y_d), rtol=1e-5, atol=1e-6)
    assert int(s_r["wire_rows"]) == int(s_d["wire_rows"])
    # dense moves whole blocks, ragged only the real rows: both at the same bytes per row
    capacity = oj.config.peer_capacity(cfg, TOKENS_PER_DEVICE, n_expert)
    per_row = float(s_d["wire_bytes"]) / (mesh.size * (n_expert - 1) * capacity)
    # a row goes out as the token (float32) with its expert slots' weights and ids (one slot
    # per row in the standard layout, min(k, E/N) in the occult one) and comes back as the
    # output row
    slots = 1 if dispatch == "standard" else min(top_k, num_experts // n_expert)
    assert per_row == 4 * (D_MODEL + 2 * slots + D_MODEL)
    assert float(s_r["wire_bytes"]) == pytest.approx(int(s_r["wire_rows"]) * per_row)
    assert float(s_r["wire_bytes"]) <= float(s_d["wire_bytes"])
    assert_trees_close(grads(ragged, x, cotangent), grads(dense, x, cotangent))


def adversarial_layer(cfg, mesh, seed, target_device):
    """Every token's k experts all live on `target_device` (k ≤ E/N)."""
    n = dict(mesh.shape)["expert"]
    per_dev = cfg.num_experts // n
    placement = np.random.default_rng(seed).permutation(cfg.num_experts)
    on_target = [e for e in range(cfg.num_experts) if placement[e] // per_dev == target_device]
    return make_layer(cfg, mesh, seed, placement, hot=on_target[: cfg.top_k], hot_strength=8.0)


@pytest.mark.parametrize("transport", ["dense", "ragged"])
@pytest.mark.parametrize("dispatch", ["standard", "occult"])
def test_all_experts_on_one_device(dispatch, transport):
    mesh = mesh_or_skip(4, 2)
    cfg = oj.MoEConfig(num_experts=16, top_k=4, d_model=D_MODEL, d_ff=D_FF, dispatch=dispatch,
                       transport=transport)
    layer, direction = adversarial_layer(cfg, mesh, 3, target_device=1)
    x = make_input(mesh.size, 4, direction)
    y, stats = layer(x)
    expected = numpy_expectations(layer, x, cfg, 4, mesh.size)
    assert expected["ct"] == 1.0, "the routing is meant to put every token on one device"
    assert float(stats["ct"]) == 1.0
    assert int(stats["dropped"]) == 0
    assert int(stats["wire_rows"]) == expected["wire_rows"]
    np.testing.assert_allclose(np.asarray(y), expected["y"], rtol=1e-4, atol=1e-5)
    reference, _ = adversarial_layer(cfg.replace(dispatch="reference"), mesh, 3, 1)
    cotangent = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)
    assert_trees_close(grads(layer, x, cotangent), grads(reference, x, cotangent))


@pytest.mark.parametrize("transport", ["dense", "ragged"])
@pytest.mark.parametrize("dispatch", ["standard", "occult"])
def test_capacity_drops_are_counted_and_exact(dispatch, transport):
    mesh = mesh_or_skip(4, 2)
    cfg = oj.MoEConfig(num_experts=16, top_k=4, d_model=D_MODEL, d_ff=D_FF, dispatch=dispatch,
                       transport=transport, capacity_factor=0.5)
    layer, direction = adversarial_layer(cfg, mesh, 11, target_device=2)
    x = make_input(mesh.size, 12, direction)
    capacity = oj.config.peer_capacity(cfg, TOKENS_PER_DEVICE, 4)
    y, stats = layer(x)
    expected = numpy_expectations(layer, x, cfg, 4, mesh.size, capacity=capacity)
    assert expected["dropped"] > 0, "the capacity is meant to overflow"
    assert int(stats["dropped"]) == expected["dropped"]
    assert int(stats["wire_rows"]) == expected["wire_rows"]
    np.testing.assert_allclose(np.asarray(y), expected["y"], rtol=1e-4, atol=1e-5)
    # dropped assignments carry no gradient, to the router or the experts
    cotangent = jnp.asarray(np.random.default_rng(13).standard_normal(x.shape), jnp.float32)
    assert_matches_jax_reference(layer, x, cotangent, cfg, stats, keep=expected["keep"])


def test_every_device_hit():
    """k = N experts on N different devices: C_T = N, the two layouts send equal rows, and
    both match the references (outputs, losses, gradients)."""
    mesh = mesh_or_skip(4, 1)
    cfg = oj.MoEConfig(num_experts=8, top_k=4, d_model=D_MODEL, d_ff=D_FF, dispatch="occult")
    placement = np.arange(8)
    hot = [0, 2, 4, 6]  # one per device
    occult, direction = make_layer(cfg, mesh, 21, placement, hot, hot_strength=8.0)
    standard, _ = make_layer(cfg.replace(dispatch="standard"), mesh, 21, placement, hot, 8.0)
    x = make_input(mesh.size, 22, direction)
    (y_o, s_o), (y_s, s_s) = occult(x), standard(x)
    assert float(s_o["ct"]) == 4.0
    assert int(s_o["wire_rows"]) == int(s_s["wire_rows"])
    np.testing.assert_allclose(np.asarray(y_o), np.asarray(y_s), rtol=1e-5, atol=1e-6)
    expected = numpy_expectations(occult, x, cfg, 4, mesh.size)
    assert expected["ct"] == 4.0, "the routing is meant to hit every device"
    np.testing.assert_allclose(np.asarray(y_o), expected["y"], rtol=1e-4, atol=1e-5)
    cotangent = jnp.asarray(np.random.default_rng(23).standard_normal(x.shape), jnp.float32)
    for layer, stats in ((occult, s_o), (standard, s_s)):
        assert_matches_jax_reference(layer, x, cotangent, layer.cfg, stats)


def test_dense_buffers_shrink_with_dedup():
    cfg = oj.MoEConfig(num_experts=64, top_k=8, d_model=D_MODEL, d_ff=D_FF)
    assert oj.config.peer_capacity(cfg, 1024, 2) == 1024 * 8
    assert oj.config.peer_capacity(cfg.replace(dispatch="occult"), 1024, 2) == 1024


@pytest.mark.parametrize("dispatch", ["standard", "occult"])
@pytest.mark.parametrize("d_model,forward_a2a,step_a2a", [(D_MODEL, 2, 3), (128, 3, 5)])
def test_collectives_in_compiled_step(dispatch, d_model, forward_a2a, step_a2a):
    """Dense transport, forward: narrow rows share one all-to-all with their (expert, weight)
    metadata, wide rows (≥ transport.WIDE_WORDS words) travel alone beside it; the combine is
    one more. A gradient step drops the combine's forward (the gradients do not need y) and
    sends back the combine's and the dispatch's cotangents (rows and weights: one message when
    narrow, two when wide). No all-gather of activations."""
    assert d_model == D_MODEL or d_model >= transport.WIDE_WORDS
    mesh = mesh_or_skip(4, 2)
    cfg = oj.MoEConfig(num_experts=16, top_k=4, d_model=d_model, d_ff=D_FF, dispatch=dispatch)
    layer = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(2)
    x, cot = (jnp.asarray(rng.standard_normal((2, 8 * mesh.size, d_model)), jnp.float32)
              for _ in range(2))  # distinct: with cot = x, XLA merges identical all-to-alls
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def forward(p, x):
        return nnx.merge(graphdef, p, rest)(x)[0]

    def step(p, x):
        return jax.grad(lambda p, x: loss_fn(nnx.merge(graphdef, p, rest), x, cot), (0, 1))(p, x)

    forward_hlo = jax.jit(forward).lower(params, x).compile().as_text()
    hlo = jax.jit(step).lower(params, x).compile().as_text()
    assert forward_hlo.count(" all-to-all(") == forward_a2a
    assert hlo.count(" all-to-all(") == step_a2a
    assert " all-gather(" not in hlo and " all-gather-start(" not in hlo


def test_shared_experts_and_sigmoid_router():
    mesh = mesh_or_skip(2, 2)
    cfg = oj.MoEConfig(num_experts=8, top_k=2, d_model=D_MODEL, d_ff=D_FF, dispatch="occult",
                       num_shared_experts=2, shared_expert_gate=True, score_fn="sigmoid")
    layer, _ = make_layer(cfg, mesh, 31)
    reference, _ = make_layer(cfg.replace(dispatch="reference"), mesh, 31)
    x = make_input(mesh.size, 32)
    routed = numpy_expectations(layer, x, cfg, 2, mesh.size)["y"].reshape(-1, D_MODEL)
    x2 = np.asarray(x, np.float64).reshape(-1, D_MODEL)
    sh = layer.shared
    g = x2 @ np.asarray(sh.w_gate[...], np.float64)
    shared = ((g / (1 + np.exp(-g))) * (x2 @ np.asarray(sh.w_up[...], np.float64))) @ np.asarray(
        sh.w_down[...], np.float64)
    shared = shared / (1 + np.exp(-(x2 @ np.asarray(sh.gate[...], np.float64))))
    y, _ = layer(x)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D_MODEL), routed + shared, rtol=1e-4,
                               atol=1e-5)
    cotangent = jnp.asarray(np.random.default_rng(33).standard_normal(x.shape), jnp.float32)
    assert_trees_close(grads(layer, x, cotangent), grads(reference, x, cotangent))


@pytest.mark.parametrize("dispatch", ["standard", "occult"])
def test_sigmoid_router_gradients_match_jax_reference(dispatch):
    # The router's gradient through sigmoid scores (and their renormalised top-k), against the
    # plain-JAX MoE that shares no code with the library.
    mesh = mesh_or_skip(4, 2)
    cfg = oj.MoEConfig(num_experts=8, top_k=3, d_model=D_MODEL, d_ff=D_FF, dispatch=dispatch,
                       score_fn="sigmoid")
    layer, _ = make_layer(cfg, mesh, 43)
    x = make_input(mesh.size, 44)
    cotangent = jnp.asarray(np.random.default_rng(45).standard_normal(x.shape), jnp.float32)
    y, stats = layer(x)
    np.testing.assert_allclose(np.asarray(y), numpy_expectations(layer, x, cfg, 4, mesh.size)["y"],
                               rtol=1e-4, atol=1e-5)
    assert_matches_jax_reference(layer, x, cotangent, cfg, stats)


def test_sigmoid_router_with_underflowing_scores_gives_no_nan():
    # Logits near -120 make every sigmoid score 0 in float32: renormalising must not divide 0/0.
    rng = np.random.default_rng(41)
    cfg = oj.MoEConfig(num_experts=8, top_k=2, d_model=D_MODEL, score_fn="sigmoid")
    x = jnp.asarray(rng.standard_normal((16, D_MODEL)), jnp.float32)
    router = jnp.asarray(rng.standard_normal((D_MODEL, 8)) * 0.01, jnp.float32)
    x = x.at[:, 0].set(1.0)
    shift = jnp.zeros((D_MODEL, 8)).at[0].set(-200.0)  # every logit ≈ -200
    routing = oj.routing.route(x, router + shift, cfg)
    assert float(jnp.max(jax.nn.sigmoid(routing.logits))) == 0.0  # the case is really hit
    assert np.all(np.isfinite(routing.weights)) and np.all(np.isfinite(routing.scores))
    grad = jax.grad(lambda r: oj.routing.route(x, r, cfg).weights.sum())(router + shift)
    assert np.all(np.isfinite(grad))
    # Sums of normal size are unchanged: the same tokens unshifted renormalise to exactly 1.
    normal = oj.routing.route(x, router, cfg)
    np.testing.assert_allclose(np.asarray(normal.weights).sum(-1), 1.0, rtol=1e-6)


def test_bfloat16_compute_close_to_float32():
    mesh = mesh_or_skip(2, 1)
    cfg = oj.MoEConfig(num_experts=8, top_k=2, d_model=D_MODEL, d_ff=D_FF, dispatch="occult")
    f32, _ = make_layer(cfg, mesh, 41)
    bf16, _ = make_layer(cfg.replace(dtype="bfloat16"), mesh, 41)
    x = make_input(mesh.size, 42)
    y32, _ = f32(x)
    y16, _ = bf16(x)
    assert y16.dtype == x.dtype
    # bfloat16 keeps 8 bits: a few roundings of ~0.4% each, against the output's scale
    y32 = np.asarray(y32)
    np.testing.assert_allclose(np.asarray(y16), y32, rtol=0, atol=1.5e-2 * np.abs(y32).max())
