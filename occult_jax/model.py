"""Decoder-only transformer with MoE feed-forward layers, in Flax NNX.

Token embedding → N × [RMSNorm → causal attention (RoPE) → RMSNorm → FFN] → RMSNorm → head.
The FFN is `oj.MoELayer` on MoE layers (every `moe_every`-th after `first_dense_layers`, except
`dense_layers`) and a dense SwiGLU elsewhere. Attention is multi-head (optionally grouped-query,
with q/k/v biases, OLMoE's q/k RMSNorm and q/k/v clipping) or DeepSeek-V2's multi-head latent
attention (`attention="mla"`). Parameters are float32 and replicated, except the expert weights,
which `MoELayer` shards over the mesh's expert axis; the batch is sharded over every mesh axis.
The architecture's fields are `ModelConfig`'s (model_config.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from occult_jax import mesh as mesh_lib
from occult_jax.config import MoEConfig
from occult_jax.experts import swiglu
from occult_jax.model_config import ModelConfig
from occult_jax.moe import MoELayer

__all__ = ["ModelConfig", "Transformer", "batch_sharding", "count_params"]

def _replicated(mesh: Mesh | None, value: jax.Array) -> jax.Array:
    if mesh is None:
        return value
    return jax.device_put(value, NamedSharding(mesh, PartitionSpec()))


def _init(rngs: nnx.Rngs, mesh: Mesh | None, shape: tuple[int, ...], fan_in: int,
          scale: float = 1.0) -> nnx.Param:
    """A float32, replicated, truncated-normal parameter with std scale/sqrt(fan_in)."""
    std = scale / math.sqrt(fan_in)
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(_replicated(mesh, value))


def _zeros(mesh: Mesh | None, shape: tuple[int, ...]) -> nnx.Param:
    return nnx.Param(_replicated(mesh, jnp.zeros(shape, jnp.float32)))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, mesh: Mesh | None):
        self.scale = nnx.Param(_replicated(mesh, jnp.ones((dim,), jnp.float32)))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def _project(x: jax.Array, w: nnx.Param, bias: nnx.Param | None = None) -> jax.Array:
    """x [b, t, d] · w [d, heads, dim] (+ bias [heads, dim]) → [b, t, heads, dim]."""
    y = jnp.einsum("btd,dhk->bthk", x, w[...].astype(x.dtype))
    return y if bias is None else y + bias[...].astype(x.dtype)


class Attention(nnx.Module):
    """Causal self-attention with RoPE on queries and keys: multi-head or grouped-query,
    optional q/k/v biases, q/k RMSNorm over all heads (OLMoE) and q/k/v clipping."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh | None, rngs: nnx.Rngs, out_scale: float):
        d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.resolved_head_dim
        self.wq = _init(rngs, mesh, (d, h, hd), d)
        self.wk = _init(rngs, mesh, (d, kv, hd), d)
        self.wv = _init(rngs, mesh, (d, kv, hd), d)
        self.wo = _init(rngs, mesh, (h, hd, d), h * hd, out_scale)
        if cfg.qkv_bias:
            self.bq, self.bk, self.bv = (_zeros(mesh, (n, hd)) for n in (h, kv, kv))
        else:
            self.bq = self.bk = self.bv = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h * hd, cfg.norm_eps, mesh)
            self.k_norm = RMSNorm(kv * hd, cfg.norm_eps, mesh)
        else:
            self.q_norm = self.k_norm = None
        self.cfg = cfg

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dtype = self.cfg, x.dtype
        q, k, v = (_project(x, w, b) for w, b in ((self.wq, self.bq), (self.wk, self.bk),
                                                   (self.wv, self.bv)))
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
            k = self.k_norm(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
        if cfg.qkv_clip:
            q, k, v = (jnp.clip(a, -cfg.qkv_clip, cfg.qkv_clip) for a in (q, k, v))
        q, k = cfg.rope(q), cfg.rope(k)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                           scale=cfg.attn_scale or None)
        return jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(dtype))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Softmax attention in float32 for q, k [b, t, h, dk] and v [b, t, h, dv] (dv may differ)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    seq = q.shape[1]
    causal = jnp.tril(jnp.ones((seq, seq), jnp.bool_))
    probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(q.dtype)


class LatentAttention(nnx.Module):
    """DeepSeek-V2 multi-head latent attention, in its plain (non-absorbed) form.

    q = [q_nope, q_rope] from x (or through a normed rank-`q_lora_rank` latent); keys and values
    come from a normed rank-`kv_lora_rank` latent c: k = [c·W_k, rope(x·W_kr)] (the rope part is
    one head shared by all), v = c·W_v.
    """

    def __init__(self, cfg: ModelConfig, mesh: Mesh | None, rngs: nnx.Rngs, out_scale: float):
        d, h = cfg.d_model, cfg.num_heads
        nope, rope_dim, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        rq, rkv = cfg.q_lora_rank, cfg.kv_lora_rank
        if rq:
            self.wq_a = _init(rngs, mesh, (d, rq), d)
            self.q_a_norm = RMSNorm(rq, cfg.latent_norm_eps, mesh)
            self.wq = _init(rngs, mesh, (rq, h, nope + rope_dim), rq)
        else:
            self.wq_a = self.q_a_norm = None
            self.wq = _init(rngs, mesh, (d, h, nope + rope_dim), d)
        self.wkv_a = _init(rngs, mesh, (d, rkv), d)
        self.wk_rope = _init(rngs, mesh, (d, rope_dim), d)
        self.kv_a_norm = RMSNorm(rkv, cfg.latent_norm_eps, mesh)
        self.wk_b = _init(rngs, mesh, (rkv, h, nope), rkv)
        self.wv_b = _init(rngs, mesh, (rkv, h, dv), rkv)
        self.wo = _init(rngs, mesh, (h, dv, d), h * dv, out_scale)
        self.cfg = cfg

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dtype = self.cfg, x.dtype
        if self.wq_a is not None:
            q = _project(self.q_a_norm(x @ self.wq_a[...].astype(dtype)), self.wq)
        else:
            q = _project(x, self.wq)
        q_nope, q_rope = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        latent = self.kv_a_norm(x @ self.wkv_a[...].astype(dtype))  # [b, t, rkv]
        k_rope = (x @ self.wk_rope[...].astype(dtype))[:, :, None, :]  # [b, t, 1, rope]
        q_rope, k_rope = cfg.rope(q_rope), cfg.rope(k_rope)
        k_nope = _project(latent, self.wk_b)
        v = _project(latent, self.wv_b)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:3],
                                                               cfg.qk_rope_head_dim))], axis=-1)
        out = causal_attention(q, k, v, cfg.softmax_scale)
        return jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(dtype))


class DenseFFN(nnx.Module):
    """SwiGLU feed-forward for the non-MoE layers."""

    def __init__(self, d: int, f: int, mesh: Mesh | None, rngs: nnx.Rngs, out_scale: float):
        self.w_gate = _init(rngs, mesh, (d, f), d)
        self.w_up = _init(rngs, mesh, (d, f), d)
        self.w_down = _init(rngs, mesh, (f, d), f, out_scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        return swiglu(x, self.w_gate[...].astype(dtype), self.w_up[...].astype(dtype),
                      self.w_down[...].astype(dtype))


class Block(nnx.Module):
    """Pre-norm residual block: attention, then a dense or MoE FFN."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig | None, mesh: Mesh | None,
                 rngs: nnx.Rngs):
        out_scale = 1.0 / math.sqrt(2 * cfg.num_layers)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, mesh)
        attention = LatentAttention if cfg.attention == "mla" else Attention
        self.attn = attention(cfg, mesh, rngs, out_scale)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, mesh)
        if moe is not None:
            self.ffn = MoELayer(moe, mesh=mesh, rngs=rngs)
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, mesh, rngs, out_scale)
        self.is_moe = moe is not None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict | None]:
        x = x + self.attn(self.attn_norm(x))
        if self.is_moe:
            y, stats = self.ffn(self.ffn_norm(x))
        else:
            y, stats = self.ffn(self.ffn_norm(x)), None
        return x + y, stats


class Transformer(nnx.Module):
    """`model(tokens)` with tokens int [batch, seq] → (logits float32 [batch, seq, vocab], stats).

    stats: the MoE layers' stats stacked along a leading [num_moe_layers] axis (empty dict when
    the model has no MoE layer). `moe` configures every MoE layer; its d_model and dtype are
    replaced by the model's (`cfg.d_model`, `cfg.dtype`).
    """

    def __init__(self, cfg: ModelConfig, moe: MoEConfig | None = None, *,
                 mesh: Mesh | None = None, rngs: nnx.Rngs):
        if cfg.moe_layers and moe is None:
            raise ValueError("the model has MoE layers but no MoEConfig; pass moe=MoEConfig(...) "
                             "or set moe_every=0.")
        if moe is not None:
            moe = moe.replace(d_model=cfg.d_model, dtype=cfg.dtype)
        self.cfg, self.moe_cfg, self.mesh = cfg, moe, mesh
        self.embed = _init(rngs, mesh, (cfg.vocab_size, cfg.d_model), cfg.d_model)
        self.blocks = nnx.List([Block(cfg, moe if cfg.is_moe(i) else None, mesh, rngs)
                                for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, mesh)
        self.head = None if cfg.tie_embeddings else _init(
            rngs, mesh, (cfg.d_model, cfg.vocab_size), cfg.d_model)

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, dict]:
        dtype = jnp.dtype(self.cfg.dtype)
        tokens = self._shard_batch(tokens)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        all_stats = []
        for block in self.blocks:
            x, stats = block(x)
            if stats is not None:
                all_stats.append(stats)
        x = self.final_norm(x)
        if self.head is None:
            logits = jnp.einsum("btd,vd->btv", x, self.embed[...].astype(dtype))
        else:
            logits = jnp.einsum("btd,dv->btv", x, self.head[...].astype(dtype))
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *all_stats) if all_stats else {}
        return self._shard_batch(logits.astype(jnp.float32)), stacked

    def _shard_batch(self, x: jax.Array) -> jax.Array:
        if self.mesh is None:
            return x
        spec = PartitionSpec(mesh_lib.token_spec(self.mesh)[0])
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [batch, ...] array: batch over every mesh axis, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(mesh_lib.token_spec(mesh)[0]))


def count_params(model: nnx.Module) -> dict[str, int]:
    """Parameter counts: total, the routed experts' share, and active per token."""
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    expert = 0
    active = total
    for block in getattr(model, "blocks", []):
        if block.is_moe:
            moe = block.ffn
            per_layer = sum(math.prod(w.shape) for w in (moe.w_gate, moe.w_up, moe.w_down))
            expert += per_layer
            active -= per_layer * (1 - moe.cfg.top_k / moe.cfg.num_experts)
    return {"total": int(total), "experts": int(expert), "active": int(active)}
