"""The TPU path without a TPU: ``kernels.platform.emulate("tpu")`` makes the library choose its
kernels as on a TPU (JAX's megablox grouped matmuls, XLA row maps and SwiGLU) and runs them in
Pallas' interpreter on CPU; with ``interpret=False`` the compiled Mosaic TPU kernels are traced
and exported for TPU from this machine."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mesh_or_skip
from test_kernels import f64, np_gmm, np_tgmm, random_sizes
from test_moe_layer import assert_matches_jax_reference, assert_trees_close, grads, make_layer

import occult_jax as oj
from kernels import grouped_matmul as gm
from kernels import platform

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="emulates a TPU on CPU only")


@pytest.mark.parametrize("sizes_kind", ["random", "one_group", "tail"])
def test_megablox_gmm_and_gradients_against_numpy(sizes_kind):
    """gmm on the emulated TPU (megablox): per-group products, zeros past the groups even where
    those lhs rows hold NaN, and both gradients (d lhs = gmm of the cotangent with the weights
    transposed, d rhs = tgmm, which must not see the NaN rows) against float64 NumPy. M is not
    a multiple of the 128-row tile; one group is empty."""
    rng = np.random.default_rng()
    m, k, n, g = 300, 256, 128, 5
    if sizes_kind == "one_group":  # every row in one group, the others empty
        sizes = np.zeros(g, np.int32)
        sizes[rng.integers(g)] = m
    else:
        sizes = random_sizes(rng, m, g, tail=37 if sizes_kind == "tail" else 0)
    used = np.arange(m) < sizes.sum()
    lhs = rng.standard_normal((m, k))
    lhs[~used] = np.nan
    rhs = rng.standard_normal((g, k, n))
    cot = rng.standard_normal((m, n))
    lhs32, rhs32 = jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32)

    def loss(a, b):
        out = gm.gmm(a, b, jnp.asarray(sizes))
        return jnp.sum(out * cot), out

    with platform.emulate("tpu"):
        (_, out), (d_lhs, d_rhs) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            lhs32, rhs32)
    clean = np.where(used[:, None], f64(lhs32), 0.0)
    w = f64(rhs32)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out), np_gmm(clean, w, sizes), **tol)
    assert not np.asarray(out)[~used].any(), "rows past the groups must be zero"
    want_lhs = np.where(used[:, None], np_gmm(cot, w, sizes, transpose=True), 0.0)
    assert np.isfinite(np.asarray(d_rhs)).all(), "NaN rows past the groups reached d rhs"
    np.testing.assert_allclose(np.asarray(d_lhs), want_lhs, **tol)
    np.testing.assert_allclose(np.asarray(d_rhs), np_tgmm(clean, cot, sizes), **tol)


def test_megablox_is_the_kernel_the_tpu_path_lowers():
    """Exported for TPU from this CPU: gmm's forward and backward are three Mosaic TPU calls
    (megablox gmm, its transposed gmm, tgmm), and no Mosaic GPU kernel appears."""
    args = [jax.ShapeDtypeStruct((384, 256), jnp.bfloat16),
            jax.ShapeDtypeStruct((4, 256, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((4,), jnp.int32)]

    def loss(lhs, rhs, sizes):
        return jnp.sum(gm.gmm(lhs, rhs, sizes).astype(jnp.float32) ** 2)

    with platform.emulate("tpu", interpret=False):
        exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1))),
                                     platforms=["tpu"])(*args)
    calls = re.findall(r"custom_call @(\w+)\(", exported.mlir_module())
    assert calls == ["tpu_custom_call"] * 3, calls


def test_a_pullback_taken_under_emulate_runs_after_it():
    """The kernel choice is part of the op when it is traced: a vjp taken inside emulate
    still runs megablox, interpreted, when its pullback is called outside."""
    rng = np.random.default_rng()
    sizes = random_sizes(rng, 256, 3)
    lhs = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((3, 128, 128)), jnp.float32)
    cot = rng.standard_normal((256, 128))
    with platform.emulate("tpu"):
        _, pullback = jax.vjp(lambda a, b: gm.gmm(a, b, jnp.asarray(sizes)), lhs, rhs)
    d_lhs, d_rhs = pullback(jnp.asarray(cot, jnp.float32))
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(d_lhs), np_gmm(cot, f64(rhs), sizes, transpose=True),
                               **tol)
    np.testing.assert_allclose(np.asarray(d_rhs), np_tgmm(f64(lhs), cot, sizes), **tol)


def test_pallas_on_a_mesh_of_other_devices_is_refused(monkeypatch):
    """The kernels run on the process's default devices: a Pallas layer on a mesh of another
    platform is a one-line error, not a kernel compiled for the wrong device."""
    from occult_jax import moe

    mesh = mesh_or_skip(2, 1)
    cfg = oj.MoEConfig(num_experts=4, top_k=2, d_model=128, d_ff=128, expert_matmul="pallas")
    layer, _ = make_layer(cfg, mesh, 1)
    monkeypatch.setattr(moe.kernel_platform, "backend", lambda: "gpu")
    with pytest.raises(ValueError, match="default devices \\(gpu\\), but the mesh is on cpu"):
        layer.layout(64)


def test_emulate_is_scoped_and_refuses_other_platforms():
    before = platform.backend()
    with platform.emulate("tpu"):
        assert platform.backend() == "tpu" and platform.emulated()
    assert platform.backend() == before and not platform.emulated()
    with pytest.raises(ValueError, match="TPU kernels on CPU only"):
        with platform.emulate("gpu"):
            pass


@pytest.mark.parametrize("dispatch,precombine", [("standard", "rows"), ("occult", "rows"),
                                                ("occult", "epilogue")])
def test_moe_layer_on_the_emulated_tpu(dispatch, precombine):
    """expert_matmul="auto" picks the Pallas path on a TPU (megablox), and the layer's outputs
    and gradients equal the XLA ragged_dot layer's and the plain-JAX dense MoE's, with skewed
    routing on a 4-device expert axis; "auto" takes the Pallas path's precombine option."""
    mesh = mesh_or_skip(4, 1)
    cfg = oj.MoEConfig(num_experts=8, top_k=2, d_model=128, d_ff=128, dispatch=dispatch,
                       precombine=precombine)
    rng = np.random.default_rng()
    placement = rng.permutation(cfg.num_experts)
    hot = rng.choice(cfg.num_experts, size=2, replace=False)
    x = jnp.asarray(rng.standard_normal((2, 32, cfg.d_model)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    xla, _ = make_layer(cfg.replace(expert_matmul="ragged_dot", precombine="rows"), mesh, 5,
                        placement, hot)
    y_xla, _ = xla(x)
    g_xla = grads(xla, x, cotangent)
    with platform.emulate("tpu"):
        layer, _ = make_layer(cfg, mesh, 5, placement, hot)
        assert layer.layout(x.shape[0] * x.shape[1]).backend == "pallas"
        y, stats = layer(x)
        layer_grads = grads(layer, x, cotangent)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_xla), rtol=1e-4, atol=1e-5)
    assert_trees_close(layer_grads, g_xla)
    assert_matches_jax_reference(layer, x, cotangent, cfg, stats, layer_grads=layer_grads)
