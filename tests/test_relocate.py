"""apply_placement: experts move between devices, the model function and training continue."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mesh_or_skip
from flax import nnx

import occult_jax as oj


class TwoLayers(nnx.Module):
    def __init__(self, cfg, mesh, seed):
        self.first = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(seed))
        self.second = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(seed + 1))

    def __call__(self, x):
        h, s1 = self.first(x)
        y, s2 = self.second(x + h)
        return y, s1["aux_loss"] + s2["aux_loss"]


def random_slots(rng, num_experts):
    return rng.permutation(num_experts).astype(np.int32)


@pytest.mark.parametrize("dispatch", ["standard", "occult"])
def test_outputs_unchanged_and_weights_moved(dispatch):
    mesh = mesh_or_skip(4, 2)
    cfg = oj.MoEConfig(num_experts=16, top_k=4, d_model=16, d_ff=8, dispatch=dispatch)
    model = TwoLayers(cfg, mesh, 0)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 32, 16)), jnp.float32)
    y_before, _ = model(x)
    graphdef, state = nnx.split(model)
    paths = oj.moe_layer_paths(model)
    assert sorted(paths) == [("first",), ("second",)]
    new = {path: random_slots(rng, 16) for path in paths}
    (moved,) = oj.apply_placement(state, new)
    after = nnx.merge(graphdef, moved)
    y_after, _ = after(x)
    np.testing.assert_allclose(np.asarray(y_after), np.asarray(y_before), rtol=1e-5, atol=1e-6)
    for path in paths:
        old_layer = getattr(model, path[0])
        new_layer = getattr(after, path[0])
        np.testing.assert_array_equal(np.asarray(new_layer.placement[...]), new[path])
        old_w = np.asarray(old_layer.w_gate[...])[np.asarray(old_layer.placement[...])]
        new_w = np.asarray(new_layer.w_gate[...])[new[path]]
        np.testing.assert_array_equal(new_w, old_w)  # logical expert e keeps its weights
        assert new_layer.w_down[...].sharding == old_layer.w_down[...].sharding


class Nested(nnx.Module):
    """MoE layers at ("moe",) and ("sub", "moe"): the first path is a suffix of the second."""

    def __init__(self, cfg, mesh):
        self.moe = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(0))
        self.sub = nnx.Module()
        self.sub.moe = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(1))

    def __call__(self, x):
        h, _ = self.moe(x)
        y, _ = self.sub.moe(x + h)
        return y, h


@pytest.mark.parametrize("replaced", [("moe",), ("sub", "moe")])
def test_replacing_one_layer_leaves_a_suffix_named_layer_alone(replaced):
    """Re-placing ("moe",) must not move ("sub", "moe")'s weights or Adam moments (their paths
    end with "moe", w_gate too), and vice versa; the model function is unchanged."""
    mesh = mesh_or_skip(4, 2)
    cfg = oj.MoEConfig(num_experts=8, top_k=2, d_model=8, d_ff=4, dispatch="occult")
    model = Nested(cfg, mesh)
    assert sorted(oj.moe_layer_paths(model)) == [("moe",), ("sub", "moe")]
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 16, 8)), jnp.float32)
    t = jnp.asarray(rng.standard_normal((2, 16, 8)), jnp.float32)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.mean((m(x)[0] - t) ** 2))(model)
    optimizer.update(model, grads)  # non-zero, distinct moments per layer
    (y_before, h_before), model_def = model(x), nnx.graphdef(model)
    opt_def, opt_state = nnx.split(optimizer)
    state = nnx.state(model)
    new = random_slots(rng, 8)
    moved, moved_opt = oj.apply_placement(state, {replaced: new}, opt_state)
    after = nnx.merge(model_def, moved)
    y_after, h_after = after(x)
    np.testing.assert_allclose(np.asarray(y_after), np.asarray(y_before), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(h_after), np.asarray(h_before), rtol=1e-5, atol=1e-6)
    other = next(p for p in oj.moe_layer_paths(model) if p != replaced)

    def layer(m, path):
        for name in path:
            m = getattr(m, name)
        return m

    def moments(opt, path):
        return [layer(getattr(opt.opt_state[0], kind), path) for kind in ("mu", "nu")]

    opt_before, opt_after = optimizer, nnx.merge(opt_def, moved_opt)
    # the other layer: map, weights and moments untouched
    np.testing.assert_array_equal(np.asarray(layer(after, other).placement[...]), np.arange(8))
    for name in ("w_gate", "w_up", "w_down"):
        np.testing.assert_array_equal(np.asarray(getattr(layer(after, other), name)[...]),
                                      np.asarray(getattr(layer(model, other), name)[...]))
        for b, a in zip(moments(opt_before, other), moments(opt_after, other), strict=True):
            assert np.any(np.asarray(getattr(b, name)[...]) != 0)
            np.testing.assert_array_equal(np.asarray(getattr(a, name)[...]),
                                          np.asarray(getattr(b, name)[...]))
    # the re-placed layer: map rewritten, logical expert e keeps its weights and moments
    np.testing.assert_array_equal(np.asarray(layer(after, replaced).placement[...]), new)
    for name in ("w_gate", "w_up", "w_down"):
        old_w = np.asarray(getattr(layer(model, replaced), name)[...])
        new_w = np.asarray(getattr(layer(after, replaced), name)[...])
        np.testing.assert_array_equal(new_w[new], old_w)
        for b, a in zip(moments(opt_before, replaced), moments(opt_after, replaced),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(getattr(a, name)[...])[new],
                                          np.asarray(getattr(b, name)[...]))


def test_shared_experts_stay_put_and_on_the_mesh():
    """A bare layer with shared experts: only the routed experts move; the shared SwiGLU's
    [d, f] weights are neither permuted nor left off the mesh (sub-mesh of the host's devices)."""
    mesh = mesh_or_skip(4)
    cfg = oj.MoEConfig(num_experts=16, top_k=4, d_model=16, d_ff=8, num_shared_experts=2,
                       shared_d_ff=16, dispatch="occult")
    layer = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 16, 16)), jnp.float32)
    y_before, _ = layer(x)
    shared_before = {n: np.asarray(getattr(layer.shared, n)[...]) for n in ("w_gate", "w_up",
                                                                          "w_down")}
    for name in shared_before:
        assert getattr(layer.shared, name)[...].sharding.device_set == set(mesh.devices.flat)
    (moved,) = oj.apply_placement(nnx.state(layer), {(): random_slots(rng, 16)})
    nnx.update(layer, moved)
    y_after, _ = layer(x)
    np.testing.assert_allclose(np.asarray(y_after), np.asarray(y_before), rtol=1e-5, atol=1e-6)
    for name, before in shared_before.items():
        np.testing.assert_array_equal(np.asarray(getattr(layer.shared, name)[...]), before)


def test_training_continues_on_the_same_loss_curve():
    mesh = mesh_or_skip(4, 2)
    cfg = oj.MoEConfig(num_experts=16, top_k=4, d_model=16, d_ff=8, dispatch="occult")
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 32, 16)), jnp.float32)
    t = jnp.asarray(rng.standard_normal((2, 32, 16)), jnp.float32)
    batches, targets = [x] * 6, [t] * 6  # one batch, fitted: the loss must fall

    def run(replace_at):
        model = TwoLayers(cfg, mesh, 5)
        optimizer = nnx.Optimizer(model, optax.adamw(3e-2), wrt=nnx.Param)
        model_def, model_state = nnx.split(model)
        opt_def, opt_state = nnx.split(optimizer)

        @jax.jit
        def step(model_state, opt_state, x, t):
            model, optimizer = nnx.merge(model_def, model_state), nnx.merge(opt_def, opt_state)

            def loss_fn(model):
                y, aux = model(x)
                return jnp.mean((y - t) ** 2) + 0.01 * aux

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return nnx.state(model), nnx.state(optimizer), loss

        losses = []
        for i, (x, t) in enumerate(zip(batches, targets, strict=True)):
            if i == replace_at:
                layout = {path: random_slots(np.random.default_rng(9), 16)
                          for path in [("first",), ("second",)]}
                model_state, opt_state = oj.apply_placement(model_state, layout, opt_state)
            model_state, opt_state, loss = step(model_state, opt_state, x, t)
            losses.append(float(loss))
        return losses

    straight, replaced = run(replace_at=None), run(replace_at=3)
    np.testing.assert_allclose(replaced, straight, rtol=2e-5)
    assert straight[-1] < straight[0]


def test_bad_placements():
    mesh = mesh_or_skip(2)
    model = TwoLayers(oj.MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=4), mesh, 0)
    _, state = nnx.split(model)
    with pytest.raises(ValueError, match="no MoE layer at path"):
        oj.apply_placement(state, {("third",): np.arange(4)})
    with pytest.raises(ValueError, match="must be a permutation"):
        oj.apply_placement(state, {("first",): np.array([0, 0, 1, 2])})
    with pytest.raises(ValueError, match="pass the whole nnx"):  # Params only
        oj.apply_placement(nnx.state(model, nnx.Param), {("first",): np.arange(4)})
    with pytest.raises(ValueError, match="every device must hold 2 experts"):
        oj.slots_from_devices([0, 0, 0, 1], 2)


@pytest.mark.parametrize("call,match", [
    (lambda: oj.slots_from_devices([0, -1, 1, 0], 2), r"lie in 0\.\.1; got -1\.\.1"),
    (lambda: oj.slots_from_devices([0, 2, 1, 0], 2), r"lie in 0\.\.1; got 0\.\.2"),
    (lambda: oj.slots_from_devices(np.array([0.0, 1.0, 1.0, 0.0]), 2), "array of integers"),
    (lambda: oj.slots_from_devices([[0, 1], [1, 0]], 2), "1-D array of integers"),
    (lambda: oj.slots_from_devices([], 2), "is empty"),
    (lambda: oj.slots_from_devices([0, 1, 2, 3, 0, 1], 4), "num_devices=4 must divide"),
    (lambda: oj.slots_from_devices([0, 1, 1, 0], 0), "positive int"),
    (lambda: oj.slots_from_devices([0, 1, 1, 0], 2, [0, 1, 2]), "current_slots must be a perm"),
    (lambda: oj.slots_from_devices([0, 1, 1, 0], 2, [0, 0, 1, 1]), "current_slots must be a perm"),
    (lambda: oj.slots_from_devices([0, 1, 1, 0], 2, [0, 1, 2, 7]), "current_slots must be a perm"),
    (lambda: oj.slots_from_devices([0, 1, 1, 0], 2, [0.0, 1.0, 2.0, 3.0]), "array of integers"),
])
def test_slots_from_devices_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_slots_from_devices():
    slots = oj.slots_from_devices([1, 0, 1, 0, 2, 2], 3)
    assert sorted(slots.tolist()) == list(range(6))
    np.testing.assert_array_equal(slots // 2, [1, 0, 1, 0, 2, 2])


@pytest.mark.parametrize("devices,per_device", [(4, 3), (16, 2)])  # 16: the greedy relabel
def test_relabelling_moves_only_what_must_move(devices, per_device):
    rng = np.random.default_rng(3)
    experts = devices * per_device
    current = rng.permutation(experts).astype(np.int32)
    current_device = current // per_device
    shuffle = rng.permutation(devices)  # the same groups under other labels
    np.testing.assert_array_equal(
        oj.slots_from_devices(shuffle[current_device], devices, current), current)
    moved = current_device.copy()
    a, b = np.nonzero(moved == 0)[0][0], np.nonzero(moved == 1)[0][0]
    moved[a], moved[b] = 1, 0  # one swap between two devices
    slots = oj.slots_from_devices(shuffle[moved], devices, current)
    assert np.sum(slots != current) == 2
    assert sorted(slots.tolist()) == list(range(experts))
