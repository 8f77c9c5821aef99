"""Decoder-only transformer with MoE feed-forward layers, in Flax NNX.

Token embedding → N × [RMSNorm → causal attention (RoPE) → RMSNorm → FFN] → RMSNorm → head.
The FFN is `oj.MoELayer` on MoE layers (every `moe_every`-th after `first_dense_layers`) and a
dense SwiGLU elsewhere. Parameters are float32 and replicated, except the expert weights, which
`MoELayer` shards over the mesh's expert axis; the batch is sharded over every mesh axis.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from occult_jax import mesh as mesh_lib
from occult_jax.config import DTYPES, MoEConfig
from occult_jax.experts import swiglu
from occult_jax.moe import MoELayer


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the transformer around the MoE layers (the MoE layers take a `MoEConfig`)."""

    vocab_size: int = 256
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    head_dim: int = 0  # 0: d_model // num_heads
    d_ff: int = 256  # width of the dense SwiGLU layers
    moe_every: int = 1  # every n-th layer (from first_dense_layers on) is MoE; 0: no MoE
    first_dense_layers: int = 0  # DeepSeek-style dense layers before the first MoE layer
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype; parameters stay float32

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name}={value!r} must be a positive integer.")
        if self.head_dim == 0 and self.d_model % self.num_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by "
                             f"model.num_heads={self.num_heads}; set model.head_dim or change "
                             "the head count.")
        if self.resolved_head_dim % 2:
            raise ValueError(f"head dim {self.resolved_head_dim} must be even for RoPE.")
        if self.moe_every < 0 or self.first_dense_layers < 0:
            raise ValueError("model.moe_every and model.first_dense_layers must be >= 0.")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is unknown; use one of {DTYPES}.")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def is_moe(self, layer: int) -> bool:
        i = layer - self.first_dense_layers
        return self.moe_every > 0 and i >= 0 and i % self.moe_every == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe(i)]


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


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, mesh: Mesh | None):
        self.scale = nnx.Param(_replicated(mesh, jnp.ones((dim,), jnp.float32)))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def rope(x: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding on x [batch, seq, heads, head_dim] (halves rotated)."""
    seq, dim = x.shape[1], x.shape[-1]
    freqs = theta ** (-jnp.arange(0, dim // 2, dtype=jnp.float32) / (dim // 2))
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]  # [seq, dim/2]
    sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head causal self-attention with RoPE on queries and keys."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh | None, rngs: nnx.Rngs, out_scale: float):
        d, h, hd = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
        self.wq = _init(rngs, mesh, (d, h, hd), d)
        self.wk = _init(rngs, mesh, (d, h, hd), d)
        self.wv = _init(rngs, mesh, (d, h, hd), d)
        self.wo = _init(rngs, mesh, (h, hd, d), h * hd, out_scale)
        self.theta = cfg.rope_theta

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        q, k, v = (jnp.einsum("btd,dhk->bthk", x, w[...].astype(dtype))
                   for w in (self.wq, self.wk, self.wv))
        q, k = rope(q, self.theta), rope(k, self.theta)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
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
        self.attn = Attention(cfg, mesh, rngs, out_scale)
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
    the model has no MoE layer).
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
