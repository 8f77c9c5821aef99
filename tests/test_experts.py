"""Grouped matmul backends agree with a float64 NumPy grouped matmul, values and gradients,
including empty experts and groups that are not a multiple of the block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mesh_or_skip
from flax import nnx

import occult_jax as oj
from occult_jax.experts import grouped_matmul, row_layout
from occult_jax.plan import make_expert_plan


def random_slots(rng, rows, pairs, experts, empty_expert):
    """Received (row, pair) → local expert, with padding pairs and one expert never chosen."""
    slot = rng.integers(0, experts, (rows, pairs))
    slot[slot == empty_expert] = (empty_expert + 1) % experts
    slot[rng.random((rows, pairs)) < 0.3] = -1
    return slot


@pytest.mark.parametrize("backend", ["ragged_dot", "blocked", "einsum"])
def test_grouped_matmul_matches_numpy(backend):
    rng = np.random.default_rng(0)
    rows, pairs, experts, k, n = 300, 3, 5, 8, 6
    slot = random_slots(rng, rows, pairs, experts, empty_expert=2)
    plan = make_expert_plan(jnp.asarray(slot, jnp.int32), experts, *row_layout(backend))
    length = plan.item_row.shape[0]
    x = rng.standard_normal((length, k)).astype(np.float32)
    x[np.asarray(plan.item_pair) < 0] = 0.0  # grouped_matmul's precondition on padding rows
    w = rng.standard_normal((experts, k, n)).astype(np.float32)
    dy = rng.standard_normal((length, n)).astype(np.float32)

    item_pair = np.asarray(plan.item_pair)
    expert = np.where(item_pair >= 0, slot.reshape(-1)[np.maximum(item_pair, 0)], -1)
    want = np.zeros((length, n))
    for i in np.nonzero(expert >= 0)[0]:
        want[i] = x[i].astype(np.float64) @ w[expert[i]]
    want_dx = np.zeros_like(x, np.float64)
    want_dw = np.zeros(w.shape)
    for i in np.nonzero(expert >= 0)[0]:
        want_dx[i] = dy[i] @ w[expert[i]].T
        want_dw[expert[i]] += np.outer(x[i], dy[i])

    fn = jax.jit(lambda x, w: grouped_matmul(x, w, plan, backend))
    y, vjp = jax.vjp(fn, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    valid = expert >= 0
    np.testing.assert_allclose(np.asarray(dx)[valid], want_dx[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(dw)[2] == 0.0)  # the empty expert gets no gradient


def test_block_layout_aligns_every_expert():
    rng = np.random.default_rng(1)
    slot = random_slots(rng, 200, 2, 4, empty_expert=1)
    block = 16
    plan = make_expert_plan(jnp.asarray(slot, jnp.int32), 4, block)
    item_pair = np.asarray(plan.item_pair)
    expert = np.where(item_pair >= 0, slot.reshape(-1)[np.maximum(item_pair, 0)], -1)
    groups = np.asarray(plan.block_group)
    for b in range(int(plan.used_blocks)):
        owners = set(expert[b * block:(b + 1) * block]) - {-1}
        assert owners <= {groups[b]}, (b, owners, groups[b])
    assert np.all(expert[int(plan.used_blocks) * block:] == -1)
    # every valid (row, pair) appears exactly once
    assert sorted(item_pair[item_pair >= 0]) == sorted(np.nonzero(slot.reshape(-1) >= 0)[0])


@pytest.mark.parametrize("backend", ["blocked", "einsum"])
def test_layer_results_do_not_depend_on_backend(backend):
    mesh = mesh_or_skip(4, 2)
    cfg = oj.MoEConfig(num_experts=16, top_k=4, d_model=16, d_ff=8, dispatch="occult")
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 64, 16)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    base = oj.MoELayer(cfg.replace(expert_matmul="ragged_dot"), mesh=mesh, rngs=nnx.Rngs(3))
    other = oj.MoELayer(cfg.replace(expert_matmul=backend), mesh=mesh, rngs=nnx.Rngs(3))

    def loss(layer, x):
        y, stats = layer(x)
        return jnp.sum(y * cot) + 0.1 * stats["aux_loss"]

    np.testing.assert_allclose(np.asarray(other(x)[0]), np.asarray(base(x)[0]), rtol=1e-5,
                               atol=1e-6)
    g_base = nnx.grad(loss, argnums=(0, 1))(base, x)
    g_other = nnx.grad(loss, argnums=(0, 1))(other, x)
    for a, b in zip(jax.tree.leaves(g_other), jax.tree.leaves(g_base), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dispatch,precombine", [("standard", "rows"), ("occult", "rows"),
                                                  ("occult", "epilogue")])
def test_layer_with_pallas_kernels_matches_ragged_dot(dispatch, precombine):
    """expert_matmul='pallas' (interpreted on CPU) gives the ragged_dot results and gradients,
    with each MoEConfig.precombine.

    One device: the Mosaic GPU interpreter keeps global state and cannot run several devices'
    kernels at once (a multi-device mesh hangs on CPU); on GPUs the kernels run per device.
    """
    mesh = mesh_or_skip(1) if jax.default_backend() == "cpu" else mesh_or_skip(2)
    cfg = oj.MoEConfig(num_experts=8, top_k=3, d_model=128, d_ff=128, dispatch=dispatch)
    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((2, 24, 128)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    base = oj.MoELayer(cfg.replace(expert_matmul="ragged_dot"), mesh=mesh, rngs=nnx.Rngs(4))
    other = oj.MoELayer(cfg.replace(expert_matmul="pallas", precombine=precombine), mesh=mesh,
                        rngs=nnx.Rngs(4))

    def loss(layer, x):
        return jnp.sum(layer(x)[0] * cot)

    np.testing.assert_allclose(np.asarray(other(x)[0]), np.asarray(base(x)[0]), rtol=1e-4,
                               atol=1e-5)
    g_base = nnx.grad(loss, argnums=(0, 1))(base, x)
    g_other = nnx.grad(loss, argnums=(0, 1))(other, x)
    for a, b in zip(jax.tree.leaves(g_other), jax.tree.leaves(g_base), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-4 * float(np.abs(np.asarray(b)).max()))


@pytest.mark.parametrize("platform,hopper,dtype,widths,want", [
    ("cpu", False, "bfloat16", (256, 128), "ragged_dot"),
    ("gpu", True, "bfloat16", (256, 128), "pallas"),
    ("gpu", True, "float32", (256, 128), "blocked"),   # f32 Pallas on GPU is XLA at HIGHEST
    ("gpu", True, "bfloat16", (256, 96), "blocked"),   # widths the kernels cannot tile
    ("gpu", False, "bfloat16", (256, 128), "blocked"),  # no wgmma before Hopper
    ("tpu", False, "float32", (256, 128), "pallas"),
])
def test_auto_backend_choice(monkeypatch, platform, hopper, dtype, widths, want):
    from occult_jax import experts as experts_lib

    monkeypatch.setattr(experts_lib, "_hopper_gpu", lambda: hopper)
    assert experts_lib.resolve_backend("auto", *widths, dtype, platform) == want
    assert experts_lib.resolve_backend("einsum", *widths, dtype, platform) == "einsum"
    if platform == "tpu" and jax.default_backend() == "cpu":  # default: where kernels run
        from kernels.platform import emulate

        with emulate("tpu"):
            assert experts_lib.resolve_backend("auto", *widths, dtype) == want


def test_pallas_gate_up_reads_rows_through_the_plan_forward_and_backward(monkeypatch):
    """The gate|up product reads the rows through the item index (gather_gmm), and its weight
    gradient gathers them again inside gather_tgmm: no item-order copy of the rows, served or
    differentiated. Values and gradients match jax.grad of the copied formulation with
    ragged_dot."""
    from kernels import occult_matmul as om
    from occult_jax import experts as experts_lib
    from occult_jax.experts import gate_up_items

    rng = np.random.default_rng()
    rows_n, pairs, experts, d, f = 40, 3, 4, 128, 256
    slot = jnp.asarray(random_slots(rng, rows_n, pairs, experts, rng.integers(experts)))
    plan = make_expert_plan(slot, experts, *row_layout("pallas"))
    rows = jnp.asarray(rng.standard_normal((rows_n, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((experts, d, 2 * f)) / np.sqrt(d), jnp.float32)
    calls = []
    for name in ("gather_gmm", "_gather_tgmm_raw"):
        real = getattr(om, name)
        monkeypatch.setattr(om, name, lambda *a, real=real, name=name, **k:
                            calls.append(name) or real(*a, **k))
    monkeypatch.setattr(experts_lib, "expand_rows", None)  # a copy would fail
    args = (plan.item_row, plan.row_items, plan.group_sizes)
    served = gate_up_items(rows, *args, w)
    assert calls == ["gather_gmm"]

    def ref(r, w):
        x_items = jnp.take(r, jnp.maximum(plan.item_row, 0), axis=0)
        return jax.lax.ragged_dot(x_items, w, plan.group_sizes)

    cot = jnp.asarray(rng.standard_normal(served.shape), jnp.float32)

    def loss(fn):
        return lambda *p: jnp.sum(fn(*p) * cot)

    grads = jax.grad(loss(lambda r, w: gate_up_items(r, *args, w)), (0, 1))(rows, w)
    assert calls == ["gather_gmm", "gather_gmm", "_gather_tgmm_raw"]
    want = ref(rows, w)
    used = np.arange(plan.item_row.shape[0]) < int(plan.group_sizes.sum())
    np.testing.assert_allclose(np.asarray(served)[used], np.asarray(want)[used], rtol=1e-4,
                               atol=1e-4)
    for a, b in zip(grads, jax.grad(loss(ref), (0, 1))(rows, w), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-4 * float(np.abs(np.asarray(b)).max()))


@pytest.mark.parametrize("precombine", ["rows", "epilogue"])
def test_pallas_expert_compute_on_interpreted_kernels_matches_ragged_dot(monkeypatch, precombine):
    """The combination the GPU runs, interpreted on CPU: row-map kernels, the SwiGLU kernel and
    gmm leaving the item buffer's padding unwritten (the interpreter fills it with NaN, so any
    read of it would show), with either pre-combine ("epilogue": routing weights scaled in the
    SwiGLU kernel, gmm_combine's CPU fallback). Values and gradients (rows, routing weights,
    the three expert weights) equal ragged_dot's with XLA row maps."""
    import functools

    from kernels import swiglu as swiglu_module
    from occult_jax.dispatch import ExpertWeights, compute_experts
    from occult_jax.row_maps import use_kernels

    monkeypatch.setattr(swiglu_module, "swiglu",
                        functools.partial(swiglu_module.swiglu, interpret=True))
    rng = np.random.default_rng()
    rows_n, pairs, experts, d, f = 40, 3, 4, 128, 128
    slot = jnp.asarray(random_slots(rng, rows_n, pairs, experts, rng.integers(experts)),
                       jnp.int32)
    args = [jnp.asarray(rng.standard_normal(s) * scale, jnp.float32) for s, scale in [
        ((rows_n, d), 1.0), ((rows_n, pairs), 1.0), ((experts, d, f), d ** -0.5),
        ((experts, d, f), d ** -0.5), ((experts, f, d), f ** -0.5)]]
    cot = jnp.asarray(rng.standard_normal((rows_n, d)), jnp.float32)

    def loss(backend, kernels):
        def fn(rows, slot_weight, w_gate, w_up, w_down):
            weights = ExpertWeights(jnp.zeros((d, 1)), w_gate, w_up, w_down, jnp.zeros((1, 1)))
            with use_kernels(kernels):
                out = compute_experts(rows, slot, slot_weight, weights, backend, precombine)
            return jnp.sum(out * cot), out
        return jax.value_and_grad(fn, argnums=tuple(range(5)), has_aux=True)

    (_, want), want_grads = loss("ragged_dot", False)(*args)
    (_, got), got_grads = loss("pallas", True)(*args)
    for a, b in zip((got, *got_grads), (want, *want_grads), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def test_pallas_expert_compute_rejects_an_unknown_precombine():
    from occult_jax.experts import _pallas_swiglu_combine

    with pytest.raises(ValueError, match="unknown precombine 'sum'"):
        _pallas_swiglu_combine(None, None, None, None, None, None, precombine="sum")
