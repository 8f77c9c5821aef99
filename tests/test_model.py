"""The transformer: MoE dispatch modes agree (logits, and losses over a few training steps)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mesh_or_skip
from flax import nnx

import occult_jax as oj
from occult_jax import model as model_lib
from occult_jax import train_lib

DISPATCHES = ("reference", "standard", "occult")


def tiny(moe_every: int = 1, tie: bool = True, shared: int = 0, layers: int = 2):
    cfg = model_lib.ModelConfig(vocab_size=64, num_layers=layers, d_model=32, num_heads=4, d_ff=48,
                                moe_every=moe_every, tie_embeddings=tie)
    moe = oj.MoEConfig(num_experts=8, top_k=2, d_model=32, d_ff=16, num_shared_experts=shared,
                       shared_expert_gate=shared > 0)
    return cfg, moe


def forward(cfg, moe, mesh, tokens):
    model = model_lib.Transformer(cfg, moe, mesh=mesh, rngs=nnx.Rngs(0))
    return nnx.jit(lambda m, t: m(t))(model, tokens)


@pytest.mark.parametrize("moe_every,tie,shared,layers", [(1, True, 0, 1), (2, False, 1, 2)])
def test_dispatch_modes_agree(moe_every, tie, shared, layers):
    mesh = mesh_or_skip(expert=4, data=2)
    cfg, moe = tiny(moe_every, tie, shared, layers)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 16)))
    out = {d: forward(cfg, moe.replace(dispatch=d), mesh, tokens) for d in DISPATCHES}
    logits_ref, stats_ref = out["reference"]
    assert logits_ref.shape == (8, 16, cfg.vocab_size)
    assert logits_ref.dtype == jnp.float32
    assert stats_ref["aux_loss"].shape == (len(cfg.moe_layers),)
    for d in ("standard", "occult"):
        logits, stats = out[d]
        np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5, err_msg=d)
        np.testing.assert_allclose(stats["ct"], stats_ref["ct"], rtol=1e-6, err_msg=d)
        np.testing.assert_allclose(stats["aux_loss"], stats_ref["aux_loss"], rtol=1e-5)
    # occult sends at most one row per (token, device): fewer wire rows than standard
    assert np.all(out["occult"][1]["wire_rows"] <= out["standard"][1]["wire_rows"])


def test_batch_is_sharded_over_all_axes():
    mesh = mesh_or_skip(expert=4, data=2)
    cfg, moe = tiny(layers=1)
    tokens = jnp.zeros((8, 16), jnp.int32)
    logits, _ = forward(cfg, moe.replace(dispatch="occult"), mesh, tokens)
    assert logits.sharding.spec[0] == ("data", "expert")
    model = model_lib.Transformer(cfg, moe, mesh=mesh, rngs=nnx.Rngs(0))
    assert model.blocks[0].attn.wq[...].sharding.is_fully_replicated
    assert model.blocks[0].ffn.w_gate[...].sharding.spec[0] == "expert"


def test_dense_model_without_moe():
    cfg = model_lib.ModelConfig(vocab_size=32, num_layers=1, d_model=16, num_heads=2, d_ff=32,
                                moe_every=0)
    model = model_lib.Transformer(cfg, None, rngs=nnx.Rngs(0))
    logits, stats = model(jnp.zeros((2, 8), jnp.int32))
    assert logits.shape == (2, 8, 32) and stats == {}


def test_causal():
    cfg, moe = tiny(layers=1)
    model = model_lib.Transformer(cfg, moe.replace(dispatch="reference"), rngs=nnx.Rngs(0))
    a = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 12)))
    b = a.at[0, 8:].set((a[0, 8:] + 1) % 64)
    la, _ = model(a)
    lb, _ = model(b)
    np.testing.assert_allclose(la[0, :8], lb[0, :8], rtol=1e-5, atol=1e-6)
    assert not np.allclose(la[0, 8:], lb[0, 8:])


def test_train_steps_agree_across_dispatch():
    """A few optimizer steps give the same losses whichever dispatch runs the MoE layers."""
    mesh = mesh_or_skip(expert=4, data=2)
    cfg, moe = tiny(layers=1)
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 17)), jnp.int32)
               for _ in range(3)]
    losses = {}
    for d in DISPATCHES:
        model = model_lib.Transformer(cfg, moe.replace(dispatch=d), mesh=mesh, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, batch):
            (_, (ce, _)), grads = nnx.value_and_grad(train_lib.loss_fn, has_aux=True)(
                model, batch)
            optimizer.update(model, grads)
            return ce

        losses[d] = [float(step(model, optimizer, b)) for b in batches]
    assert losses["reference"][-1] < losses["reference"][0]
    for d in ("standard", "occult"):
        np.testing.assert_allclose(losses[d], losses["reference"], rtol=2e-5, err_msg=d)
