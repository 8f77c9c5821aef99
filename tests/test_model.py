"""The transformer: MoE dispatch modes agree (logits, and losses over a few training steps)."""

from __future__ import annotations

import dataclasses

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


def _numpy_moe_losses(x: np.ndarray, router: np.ndarray, top_k: int) -> tuple[float, float]:
    """(Switch aux loss E·Σ f_e·P_e, z-loss mean(logsumexp²)) of one softmax router, float64."""
    logits = x.reshape(-1, x.shape[-1]) @ router
    peak = logits.max(-1, keepdims=True)
    lse = peak[:, 0] + np.log(np.exp(logits - peak).sum(-1))
    probs = np.exp(logits - lse[:, None])
    ids = np.argsort(-probs, axis=-1)[:, :top_k]
    experts = router.shape[1]
    fraction = np.bincount(ids.reshape(-1), minlength=experts) / ids.size
    return experts * float(fraction @ probs.mean(0)), float(np.mean(lse ** 2))


def test_total_loss_weights_the_moe_losses(monkeypatch):
    """loss_fn's total = ce + aux_loss_weight·Σ_layers aux + z_loss_weight·Σ_layers z, every
    term recomputed in float64 from the logits and each MoE layer's input and router."""
    cfg = model_lib.ModelConfig(vocab_size=64, num_layers=3, d_model=32, num_heads=4, d_ff=48)
    aux_w, z_w = 0.37, 0.053
    moe = oj.MoEConfig(num_experts=8, top_k=2, d_ff=16, dispatch="reference",
                       aux_loss_weight=aux_w, z_loss_weight=z_w)
    model = model_lib.Transformer(cfg, moe, rngs=nnx.Rngs(3))
    batch = jnp.asarray(np.random.default_rng(5).integers(0, 64, (4, 17)), jnp.int32)
    seen = []
    call = oj.MoELayer.__call__

    def recording(layer, x):
        seen.append((np.asarray(x, np.float64), np.asarray(layer.router[...], np.float64)))
        return call(layer, x)

    monkeypatch.setattr(oj.MoELayer, "__call__", recording)
    total, (ce, stats) = train_lib.loss_fn(model, batch)
    monkeypatch.undo()
    logits = np.asarray(model(batch[:, :-1])[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ce64 = -np.mean(np.take_along_axis(logp, np.asarray(batch[:, 1:])[..., None], -1))
    aux, z = np.asarray([_numpy_moe_losses(x, router, moe.top_k) for x, router in seen]).T
    assert len(seen) == len(cfg.moe_layers) == 3
    np.testing.assert_allclose(float(ce), ce64, rtol=1e-5)
    np.testing.assert_allclose(stats["aux_loss"], aux, rtol=1e-5)
    np.testing.assert_allclose(stats["z_loss"], z, rtol=1e-5)
    np.testing.assert_allclose(float(total), ce64 + aux_w * aux.sum() + z_w * z.sum(), rtol=1e-5)
    dense = model_lib.Transformer(dataclasses.replace(cfg, moe_every=0), None, rngs=nnx.Rngs(3))
    total, (ce, stats) = train_lib.loss_fn(dense, batch)
    assert stats == {} and float(total) == float(ce)


BF16_ATTENTIONS = {"mha": {}, "mla": dict(attention="mla", kv_lora_rank=32, qk_nope_head_dim=32,
                                         qk_rope_head_dim=16, v_head_dim=32)}


@pytest.mark.parametrize("attention", list(BF16_ATTENTIONS))
def test_bfloat16_model_tracks_float32(attention):
    """dtype="bfloat16" (parameters stay float32) against the float32 model of the same
    parameters. The final RMSNorm sets each position's scale, so the bf16 logits' norm per
    position stays within ~0.2% of float32's (<= 0.21% over 32 seeds measured); norms computing
    their mean square and rsqrt in bf16 (no float32 upcast) move it by 0.42-0.52%."""
    base = dict(vocab_size=256, num_layers=2, d_model=128, num_heads=4, d_ff=256, moe_every=0,
                **BF16_ATTENTIONS[attention])
    forward_fn = nnx.jit(lambda m, t: m(t)[0])
    for seed in range(3):
        tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 256, (2, 256)), jnp.int32)
        out = {}
        for dtype in ("float32", "bfloat16"):
            model = model_lib.Transformer(model_lib.ModelConfig(**base, dtype=dtype), None,
                                          rngs=nnx.Rngs(seed))
            model.embed[...] = model.embed[...] * 30  # a trained model's residual-stream scale
            out[dtype] = forward_fn(model, tokens)
        assert out["bfloat16"].dtype == jnp.float32
        ours, ref = (np.asarray(out[d], np.float64) for d in ("bfloat16", "float32"))
        assert np.isfinite(ours).all()
        assert np.linalg.norm(ours - ref) <= 6e-3 * np.linalg.norm(ref)  # measured 0.39%
        scale_error = np.abs(np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1) - 1)
        assert scale_error.max() < 3e-3, (seed, scale_error.max())


def test_bfloat16_norm_and_latent_attention_round_once():
    """On bf16 inputs, RMSNorm and MLA's softmax attention compute in float32 and round only
    their output: within bf16's unit roundoff 2^-8 of float64 NumPy. Without the float32
    upcasts the norm is off by ~3 units and the attention (logits ~20) by ~1.5% of its range."""
    u, rng = 2.0 ** -8, np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((4, 64, 128)) * 30, jnp.bfloat16)
    norm = model_lib.RMSNorm(128, 1e-6, None)
    norm.scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(128), jnp.float32)
    y = norm(x)
    x64 = np.asarray(x, np.float64)
    ref = (x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + 1e-6)
           * np.asarray(norm.scale[...], np.float64))
    assert y.dtype == jnp.bfloat16
    rounding = np.max(np.abs(np.asarray(y, np.float64) - ref) / np.abs(ref)) / u
    assert rounding <= 1 + 1e-3, rounding  # in units of 2^-8; measured 0.99

    b, t, h, dk, dv = 2, 64, 4, 24, 16  # q/k: nope + rope dims, v narrower as in MLA
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
               for shape in ((b, t, h, dk), (b, t, h, dk), (b, t, h, dv)))
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q64, k64)  # scale 1: logits up to ~20
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    ref = np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v64)
    out = model_lib.causal_attention(q, k, v, 1.0)
    assert out.dtype == jnp.bfloat16
    excess = np.max(np.abs(np.asarray(out, np.float64) - ref) - u * np.abs(ref))
    assert excess <= 1e-5 * np.abs(ref).max(), excess
