"""Occult's fused expert FFN (kernels/fused_experts.py, kernels/gather_matmul.py) against float64
NumPy and `jax.grad` of a dense float32 reference: in the Pallas interpreter on CPU, the
compiled Triton kernels on a GPU (run this file there).

Plans are fresh random draws each run: rows with padding pairs, an expert nobody chose, all
items on one expert, an empty buffer. The interpreter fills unwritten output with NaN, so an
output element a kernel forgot fails the comparison.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cuda_module_text, mesh_or_skip
from flax import nnx

import occult_jax as oj
from kernels import gather_matmul as gm
from kernels.fused_experts import default_tiling, fused_swiglu_combine
from occult_jax.plan import make_expert_plan

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TILING = gm.GatherTiling(block_m=16, block_n=16, block_k=16)
ON_CPU = jax.default_backend() == "cpu"
TOL = 1e-5 if ON_CPU else 5e-3  # GPU: float32 products may run as TF32


def random_slots(rng, rows, pairs, experts, case):
    """Received (row, pair) → local expert: distinct experts per row, -1 for empty pairs."""
    slot = np.stack([rng.permutation(experts)[:pairs] for _ in range(rows)])
    if case == "random":
        slot[slot == experts - 1] = -1  # one expert never chosen
        slot[rng.random((rows, pairs)) < 0.3] = -1
    elif case == "one_expert":
        slot[:] = -1
        slot[:, 0] = 1
    elif case == "empty":
        slot[:] = -1
    return slot.astype(np.int32)


def plan_arrays(slot, experts, block):
    plan = make_expert_plan(jnp.asarray(slot), experts, block, block)
    item_row = np.asarray(plan.item_row)
    group = np.repeat(np.asarray(plan.block_group), block)
    group = np.where(np.arange(item_row.shape[0]) < int(plan.used_blocks) * block, group, -1)
    return plan, item_row, group


CASES = ["random", "one_expert", "empty"]


@pytest.mark.parametrize("case", CASES)
def test_gather_swiglu_grad(case):
    """The backward kernel: g_i = d_out[row_i] @ w_down[e]ᵀ and, from it, the SwiGLU and
    routing-weight gradients, against float64 NumPy."""
    rng = np.random.default_rng()
    rows, pairs, experts, d, f = 35, 3, 4, 32, 48
    slot = random_slots(rng, rows, pairs, experts, case)
    plan, item_row, group = plan_arrays(slot, experts, TILING.block_m)
    m = item_row.shape[0]
    valid = item_row >= 0
    d_out = rng.standard_normal((rows, d)).astype(np.float32)
    w_down = rng.standard_normal((experts, f, d)).astype(np.float32)
    gate, up = (np.where(valid[:, None], rng.standard_normal((m, f)), 0).astype(np.float32)
                for _ in range(2))
    weight = np.where(valid, rng.standard_normal(m), 0).astype(np.float32)
    got = [np.asarray(a) for a in gm.gather_swiglu_grad(
        jnp.asarray(d_out), jnp.asarray(w_down), jnp.asarray(gate), jnp.asarray(up),
        jnp.asarray(weight), plan.item_row, plan.block_group, plan.used_blocks, tiling=TILING,
        interpret=ON_CPU)]
    g = np.zeros((m, f))
    for i in np.nonzero(valid)[0]:
        g[i] = d_out[item_row[i]].astype(np.float64) @ w_down[group[i]].T
    sig = 1.0 / (1.0 + np.exp(-gate.astype(np.float64)))
    silu = gate * sig
    hidden = silu * up
    d_hidden = g * weight[:, None]
    want = [d_hidden * up * sig * (1 + gate * (1 - sig)), d_hidden * silu, hidden,
            np.sum(g * hidden, axis=1)]
    for name, a, b in zip(["d_gate", "d_up", "hidden", "d_weight"], got, want, strict=True):
        assert not np.isnan(a).any(), name
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL * max(1.0, np.abs(b).max()),
                                   err_msg=name)


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_gather_matmul(case, transpose_w):
    """out[i] = x[row_i] @ w[e_i] (w read as [N, K] when transposed), float32, zeros for
    padding items, against float64 NumPy."""
    rng = np.random.default_rng()
    rows, pairs, experts, k, n = 29, 3, 4, 48, 32
    slot = random_slots(rng, rows, pairs, experts, case)
    plan, item_row, group = plan_arrays(slot, experts, TILING.block_m)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((experts, k, n)).astype(np.float64)
    w_arg = np.swapaxes(w, 1, 2) if transpose_w else w
    got = np.asarray(gm.gather_matmul(jnp.asarray(x), jnp.asarray(w_arg, jnp.float32),
                                      plan.item_row, plan.block_group, plan.used_blocks,
                                      transpose_w=transpose_w, tiling=TILING,
                                      interpret=ON_CPU))
    want = np.zeros((item_row.shape[0], n))
    for i in np.nonzero(item_row >= 0)[0]:
        want[i] = x[item_row[i]] @ w[group[i]]
    assert got.dtype == np.float32 and not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("case", CASES)
def test_gather_swiglu(case):
    rng = np.random.default_rng()
    rows, pairs, experts, k, n = 33, 2, 4, 32, 48
    slot = random_slots(rng, rows, pairs, experts, case)
    plan, item_row, group = plan_arrays(slot, experts, TILING.block_m)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w_gate, w_up = (rng.standard_normal((experts, k, n)).astype(np.float32) for _ in range(2))
    hidden, gate, up = map(np.asarray, gm.gather_swiglu(
        jnp.asarray(x), jnp.asarray(w_gate), jnp.asarray(w_up), plan.item_row, plan.block_group,
        plan.used_blocks, save_preactivations=True, tiling=TILING, interpret=ON_CPU))
    (only_hidden,) = gm.gather_swiglu(jnp.asarray(x), jnp.asarray(w_gate), jnp.asarray(w_up),
                                      plan.item_row, plan.block_group, plan.used_blocks,
                                      tiling=TILING, interpret=ON_CPU)
    want_gate, want_up = np.zeros((2, item_row.shape[0], n))
    for i in np.nonzero(item_row >= 0)[0]:
        want_gate[i] = x[item_row[i]].astype(np.float64) @ w_gate[group[i]]
        want_up[i] = x[item_row[i]].astype(np.float64) @ w_up[group[i]]
    want_hidden = want_gate / (1.0 + np.exp(-want_gate)) * want_up
    for got, want in [(gate, want_gate), (up, want_up), (hidden, want_hidden),
                      (np.asarray(only_hidden), want_hidden)]:
        assert not np.isnan(got).any(), "unwritten output rows"
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("terms", [1, 2])
def test_matmul_scatter_add(case, transpose_w, terms):
    rng = np.random.default_rng()
    rows, pairs, experts, k, n = 37, 2, 3, 48, 32
    slot = random_slots(rng, rows, pairs, experts, case)
    plan, item_row, group = plan_arrays(slot, experts, TILING.block_m)
    m = item_row.shape[0]
    hs = [rng.standard_normal((m, k)).astype(np.float32) for _ in range(terms)]
    ws = [rng.standard_normal((experts, k, n)).astype(np.float32) for _ in range(terms)]
    scale = rng.standard_normal(m).astype(np.float32)
    w_args = [np.swapaxes(w, 1, 2).copy() if transpose_w else w for w in ws]
    got = np.asarray(gm.matmul_scatter_add(
        [jnp.asarray(h) for h in hs], [jnp.asarray(w) for w in w_args], plan.item_row,
        plan.block_group, plan.used_blocks, rows, scale=jnp.asarray(scale),
        transpose_w=transpose_w, tiling=TILING, interpret=ON_CPU))
    want = np.zeros((rows, n))
    for i in np.nonzero(item_row >= 0)[0]:
        for h, w in zip(hs, ws, strict=True):
            want[item_row[i]] += scale[i] * (h[i].astype(np.float64) @ w[group[i]])
    assert got.shape == (rows, n)
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("gather", ["a", "b"])
def test_gather_tmatmul(case, gather):
    rng = np.random.default_rng()
    rows, pairs, experts, k, n = 29, 3, 4, 32, 16
    slot = random_slots(rng, rows, pairs, experts, case)
    plan, item_row, group = plan_arrays(slot, experts, TILING.block_m)
    m = item_row.shape[0]
    a = rng.standard_normal((rows if gather == "a" else m, k)).astype(np.float32)
    b = rng.standard_normal((rows if gather == "b" else m, n)).astype(np.float32)
    scale = rng.standard_normal(m).astype(np.float32)
    got = np.asarray(gm.gather_tmatmul(
        jnp.asarray(a), jnp.asarray(b), plan.item_row, plan.group_sizes,
        gather_a=gather == "a", gather_b=gather == "b", b_scale=jnp.asarray(scale),
        tiling=TILING, interpret=ON_CPU))
    want = np.zeros((experts, k, n))
    for i in np.nonzero(item_row >= 0)[0]:
        a_i = a[item_row[i]] if gather == "a" else a[i]
        b_i = b[item_row[i]] if gather == "b" else b[i]
        want[group[i]] += np.outer(a_i.astype(np.float64), scale[i] * b_i)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def dense_reference(rows, slot, slot_weight, w_gate, w_up, w_down):
    """Every (row, pair) through its expert, weighted and summed; float32 at HIGHEST."""
    with jax.default_matmul_precision("highest"):
        e = jnp.maximum(slot, 0)
        gate = jnp.einsum("rd,rpdf->rpf", rows, w_gate[e])
        up = jnp.einsum("rd,rpdf->rpf", rows, w_up[e])
        out = jnp.einsum("rpf,rpfd->rpd", jax.nn.silu(gate) * up, w_down[e])
        weight = jnp.where(slot >= 0, slot_weight, 0.0)
        return jnp.einsum("rp,rpd->rd", weight, out)


@pytest.mark.parametrize("case", CASES)
def test_fused_swiglu_combine_values_and_gradients(case):
    rng = np.random.default_rng()
    rows, pairs, experts, d, f = 45, 3, 4, 32, 48
    slot = random_slots(rng, rows, pairs, experts, case)
    tiling = default_tiling(interpret=ON_CPU)
    plan = make_expert_plan(jnp.asarray(slot), experts, tiling.block_m, tiling.block_m)
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) * scale for s, scale in [
        ((rows, d), 1.0), ((rows, pairs), 1.0), ((experts, d, f), d ** -0.5),
        ((experts, d, f), d ** -0.5), ((experts, f, d), f ** -0.5)]]
    cot = jnp.asarray(rng.standard_normal((rows, d)), jnp.float32)
    item_pair = plan.item_pair

    def fused(x, slot_weight, w_gate, w_up, w_down):
        w_items = jnp.where(item_pair >= 0,
                            jnp.take(slot_weight.reshape(-1), jnp.maximum(item_pair, 0)), 0.0)
        return fused_swiglu_combine(x, w_gate, w_up, w_down, w_items, plan.item_row,
                                    plan.block_group, plan.used_blocks, plan.group_sizes,
                                    interpret=ON_CPU)

    def reference(*a):
        return dense_reference(a[0], jnp.asarray(slot), *a[1:])

    got, got_vjp = jax.vjp(jax.jit(fused), *args)
    want, want_vjp = jax.vjp(reference, *args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    names = ["rows", "weights", "w_gate", "w_up", "w_down"]
    for name, g, w in zip(names, got_vjp(cot), want_vjp(cot), strict=True):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4,
                                   atol=1e-5 * max(1.0, float(np.abs(w).max())), err_msg=name)
    if case != "random":
        return
    never = experts - 1  # the expert nobody chose gets exactly zero weight gradient
    for g in got_vjp(cot)[2:]:
        assert np.all(np.asarray(g)[never] == 0.0)


@pytest.mark.parametrize("dispatch", ["standard", "occult"])
def test_layer_fused_matches_reference(dispatch):
    """expert_matmul='fused' on a 4 × 2 CPU mesh (1–2 GPUs on a GPU host): the reference
    layer's outputs and gradients."""
    mesh = mesh_or_skip(4, 2) if ON_CPU else mesh_or_skip(min(jax.device_count(), 2))
    cfg = oj.MoEConfig(num_experts=16, top_k=4, d_model=32, d_ff=48, dispatch=dispatch,
                       expert_matmul="fused")
    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((2, 32, 32)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    fused = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(7))
    reference = oj.MoELayer(cfg.replace(dispatch="reference"), mesh=mesh, rngs=nnx.Rngs(7))

    def loss(layer, x):
        y, stats = layer(x)
        return jnp.sum(y * cot) + 0.1 * stats["aux_loss"]

    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(fused(x)[0]), np.asarray(reference(x)[0]),
                                   rtol=1e-4, atol=1e-5)
        g_fused = nnx.grad(loss, argnums=(0, 1))(fused, x)
        g_ref = nnx.grad(loss, argnums=(0, 1))(reference, x)
    for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_ref), strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4,
                                   atol=1e-5 * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("dispatch", ["standard", "occult"])
def test_layer_fused_all_experts_on_one_device(dispatch):
    """Adversarial routing: every token's experts on one device (one hot expert group gets all
    rows, the other devices none); fused matches the reference, outputs and gradients."""
    from test_moe_layer import D_MODEL, adversarial_layer, assert_trees_close, grads, make_input

    mesh = mesh_or_skip(4, 2) if ON_CPU else mesh_or_skip(min(jax.device_count(), 2))
    n = dict(mesh.shape)["expert"]
    cfg = oj.MoEConfig(num_experts=4 * n, top_k=4, d_model=D_MODEL, d_ff=16, dispatch=dispatch,
                       expert_matmul="fused")
    layer, direction = adversarial_layer(cfg, mesh, 3, target_device=n - 1)
    reference, _ = adversarial_layer(cfg.replace(dispatch="reference"), mesh, 3, n - 1)
    x = make_input(mesh.size, 4, direction)
    (y, stats), (y_ref, _) = layer(x), reference(x)
    assert float(stats["ct"]) == 1.0, "the routing is meant to put every token on one device"
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-4, atol=1e-5)
    cotangent = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)
    assert_trees_close(grads(layer, x, cotangent), grads(reference, x, cotangent))


def test_layer_fused_bfloat16_close_to_float32():
    """bfloat16 compute (float32 params, cast per call): the fused kernels stay within bf16
    error of the float32 reference layer, forward and input gradient."""
    mesh = mesh_or_skip(2) if ON_CPU else mesh_or_skip(min(jax.device_count(), 2))
    cfg = oj.MoEConfig(num_experts=8, top_k=2, d_model=32, d_ff=48, dispatch="occult")
    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
    reference = oj.MoELayer(cfg.replace(dispatch="reference"), mesh=mesh, rngs=nnx.Rngs(3))
    fused = oj.MoELayer(cfg.replace(expert_matmul="fused", dtype="bfloat16"), mesh=mesh,
                        rngs=nnx.Rngs(3))

    def input_grad(layer):
        return jax.grad(lambda x: jnp.sum(layer(x)[0] ** 2))(x)

    # The bfloat16 layer routes the bfloat16-rounded tokens: where two router scores nearly
    # tie, a token may pick another expert than in float32 — a different, not a wrong, output.
    # Compare the tokens whose experts agree (all but a few).
    x2d, router = x.reshape(-1, cfg.d_model), reference.router[...]
    experts16, experts32 = (np.sort(np.asarray(oj.routing.route(t, router, cfg).expert_ids), -1)
                            for t in (x2d.astype(jnp.bfloat16), x2d))
    same = np.all(experts16 == experts32, axis=-1).reshape(x.shape[:-1])
    assert same.mean() > 0.75, same.mean()
    y16, y32 = fused(x)[0], reference(x)[0]
    assert y16.dtype == x.dtype
    scale = float(np.abs(np.asarray(y32)).max())
    np.testing.assert_allclose(np.asarray(y16)[same], np.asarray(y32)[same], atol=3e-2 * scale)
    g16, g32 = np.asarray(input_grad(fused)), np.asarray(input_grad(reference))
    np.testing.assert_allclose(g16[same], g32[same], atol=3e-2 * float(np.abs(g32).max()))


def test_fused_argument_errors():
    with pytest.raises(ValueError, match="power of two"):
        gm.GatherTiling(block_n=96)
    x = jnp.ones((4, 32), jnp.bfloat16)
    w = jnp.ones((2, 32, 32), jnp.float32)
    with pytest.raises(ValueError, match="share one dtype"):
        fused_swiglu_combine(x, w, w, w, jnp.ones(16), jnp.zeros(16, jnp.int32),
                             jnp.zeros(1, jnp.int32), jnp.ones((), jnp.int32),
                             jnp.asarray([16, 0]), interpret=True)
    x = jnp.ones((4, 64), jnp.float32)  # d = 64, but the weights' d is 32
    with pytest.raises(ValueError, match=r"wants rows \[R, d\].*rows \(4, 64\), w_gate "
                       r"\(2, 32, 32\)"):
        fused_swiglu_combine(x, w, w, w, jnp.ones(16), jnp.zeros(16, jnp.int32),
                             jnp.zeros(1, jnp.int32), jnp.ones((), jnp.int32),
                             jnp.asarray([16, 0]), interpret=True)


def test_fused_kernels_lower_to_triton_for_cuda():
    """The compiled (not interpreted) path lowers to Triton IR on any machine: the forward is
    two Triton kernels, the gradient six (the forward's unused output kernel is dropped; one
    scatter kernel sums both input-gradient terms)."""
    rows, pairs, experts, d, f = 256, 4, 8, 256, 512
    slot = jnp.asarray(random_slots(np.random.default_rng(), rows, pairs, experts, "random"))
    tiling = gm.GatherTiling()

    def forward(x, w_gate, w_up, w_down, slot_weight):
        plan = make_expert_plan(slot, experts, tiling.block_m, tiling.block_m)
        w_items = jnp.where(plan.item_pair >= 0, jnp.take(
            slot_weight.reshape(-1), jnp.maximum(plan.item_pair, 0)), 0.0)
        return fused_swiglu_combine(x, w_gate, w_up, w_down, w_items, plan.item_row,
                                    plan.block_group, plan.used_blocks, plan.group_sizes,
                                    tiling=tiling, interpret=False)

    def loss(*args):
        return jnp.sum(forward(*args).astype(jnp.float32))

    bf16 = jnp.bfloat16
    args = [jax.ShapeDtypeStruct(s, t) for s, t in [
        ((rows, d), bf16), ((experts, d, f), bf16), ((experts, d, f), bf16),
        ((experts, f, d), bf16), ((rows, pairs), jnp.float32)]]
    target = "__gpu$xla.gpu.triton"
    for fn, kernels in [(forward, 2), (jax.grad(loss, argnums=(0, 1, 2, 3, 4)), 6)]:
        assert cuda_module_text(fn, args, [target]).count(f"@{target}(") == kernels

    # Inside shard_map with variance checks on (as the layer runs on GPUs): kernel operands
    # and outputs must carry consistent mesh-axis variance, forward and backward.
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = mesh_or_skip(2)
    spec = P("expert")
    sharded = jax.shard_map(forward, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)

    def sharded_loss(*args):
        return jnp.sum(sharded(*args).astype(jnp.float32))

    global_args = [jax.ShapeDtypeStruct((2 * a.shape[0], *a.shape[1:]), a.dtype,
                                        sharding=NamedSharding(mesh, spec)) for a in args]
    for fn, kernels in [(sharded, 2), (jax.grad(sharded_loss, argnums=(0, 1, 2, 3, 4)), 6)]:
        assert cuda_module_text(fn, global_args, [target]).count(f"@{target}(") == kernels


def test_float32_tiles_get_fewer_pipeline_stages():
    """Default tiles hold 3 pipeline stages in shared memory for 16-bit operands; float32
    operands of the two-weight SwiGLU kernel would overflow it (3 × 96 KiB), so it gets 2 —
    visible in the Triton kernel's parameters when lowered for CUDA."""
    t = gm.GatherTiling()
    swiglu_stage = (t.block_m + 2 * t.block_n) * t.block_k
    assert gm.fit_stages(t, 2 * swiglu_stage).num_stages == t.num_stages == 3
    assert gm.fit_stages(t, 4 * swiglu_stage).num_stages == 2

    rows, experts, d, f = 128, 4, 128, 256
    slot = jnp.asarray(random_slots(np.random.default_rng(), rows, 2, experts, "random"))

    def forward(x, w_gate, w_up):
        plan = make_expert_plan(slot, experts, t.block_m, t.block_m)
        return gm.gather_swiglu(x, w_gate, w_up, plan.item_row, plan.block_group,
                                plan.used_blocks, tiling=t, interpret=False)[0]

    for dtype, stages in [(jnp.bfloat16, 3), (jnp.float32, 2)]:
        args = [jax.ShapeDtypeStruct(s, dtype) for s in [(rows, d), (experts, d, f),
                                                           (experts, d, f)]]
        text = cuda_module_text(forward, args, ["__gpu$xla.gpu.triton"])
        assert re.findall(r"num_stages = (\d+)", text) == [str(stages)]
