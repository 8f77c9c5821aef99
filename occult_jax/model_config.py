"""ModelConfig: the shape of the transformer around its MoE layers (the layers take a
`MoEConfig`), with one-line validation errors and the RoPE it implies. Every field that the
imported architectures need (`oj.hf`) defaults to off."""

from __future__ import annotations

import dataclasses
import math

import jax

from occult_jax import rope as rope_lib
from occult_jax.config import DTYPES, _is_int, _is_real

ATTENTIONS = ("mha", "mla")
# float fields that must be > 0 (the others, attn_scale and qkv_clip, are >= 0; 0: default/off)
_POSITIVE_REALS = ("rope_theta", "norm_eps", "latent_norm_eps", "rope_factor", "rope_beta_fast",
                   "rope_beta_slow", "rope_attention_factor")


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
    dense_layers: tuple[int, ...] = ()  # further layers forced dense (Qwen2-MoE mlp_only_layers)
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype; parameters stay float32
    # attention variants (all off by default)
    attention: str = "mha"  # "mha" | "mla" (DeepSeek-V2 multi-head latent attention)
    num_kv_heads: int = 0  # mha: key/value heads (grouped-query attention); 0: num_heads
    qkv_bias: bool = False  # mha: biases on the q, k and v projections (Qwen)
    qk_norm: bool = False  # mha: RMSNorm over the whole projected q and k (OLMoE)
    qkv_clip: float = 0.0  # mha: clip q, k, v to [-c, c] after the norm (OLMoE clip_qkv); 0: off
    attn_scale: float = 0.0  # softmax scale; 0: 1/sqrt(query-key head dim)
    q_lora_rank: int = 0  # mla: query down-projection rank; 0: a direct query projection
    kv_lora_rank: int = 0  # mla: rank of the compressed key/value latent
    qk_nope_head_dim: int = 0  # mla: per-head query/key dims without RoPE
    qk_rope_head_dim: int = 0  # mla: per-head query/key dims with RoPE (the key part is shared)
    v_head_dim: int = 0  # mla: per-head value dim
    latent_norm_eps: float = 1e-6  # mla: eps of the RMSNorms on the q and kv latents
    # rotary embedding variants
    rope_interleaved: bool = False  # rotate pairs (2i, 2i+1) (DeepSeek) instead of halves
    rope_scaling: str = "none"  # "none" | "yarn"
    rope_factor: float = 1.0  # yarn: context extension factor
    rope_original_max_len: int = 0  # yarn: pre-training context length
    rope_beta_fast: float = 32.0  # yarn: ramp bounds, in rotations
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True  # yarn: round the ramp bounds to whole dimensions
    rope_attention_factor: float = 1.0  # multiplies cos and sin (YaRN's attention_factor)

    def __post_init__(self):
        self._validate_types()
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "d_ff"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"model.{name}={value!r} must be a positive integer.")
        if self.moe_every < 0 or self.first_dense_layers < 0:
            raise ValueError("model.moe_every and model.first_dense_layers must be >= 0.")
        bad = [i for i in self.dense_layers if not (_is_int(i) and 0 <= i < self.num_layers)]
        if bad:
            raise ValueError(f"model.dense_layers holds {bad!r}; give layer indices in "
                             f"[0, num_layers={self.num_layers}).")
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is unknown; use one of {DTYPES}.")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"model.attention={self.attention!r} is unknown; use one of "
                             f"{ATTENTIONS}.")
        if self.attention == "mha":
            self._validate_mha()
        else:
            self._validate_mla()
        if self.rope_dim % 2:
            raise ValueError(f"RoPE dim {self.rope_dim} must be even.")
        if self.rope_scaling not in rope_lib.ROPE_SCALINGS:
            raise ValueError(f"model.rope_scaling={self.rope_scaling!r} is unknown; use one of "
                             f"{rope_lib.ROPE_SCALINGS}.")
        for name in _POSITIVE_REALS:
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"model.{name}={value!r} must be a finite number > 0.")
        for name in ("attn_scale", "qkv_clip"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"model.{name}={value!r} must be >= 0 (0: default/off).")
        if self.rope_scaling == "yarn" and self.rope_original_max_len < 1:
            raise ValueError("model.rope_scaling='yarn' needs rope_factor > 0 and "
                             "rope_original_max_len >= 1.")
        if self.rope_scaling == "yarn" and self.rope_theta <= 1:
            raise ValueError(f"model.rope_theta={self.rope_theta!r} must be > 1 with "
                             "rope_scaling='yarn' (its ramp divides by log(rope_theta)).")
        if self.moe_every and not self.moe_layers:
            raise ValueError(f"model.first_dense_layers={self.first_dense_layers} and "
                             f"dense_layers={list(self.dense_layers)} leave no MoE layer among "
                             f"num_layers={self.num_layers}; lower them, or set moe_every=0 "
                             "for a dense model.")

    def _validate_types(self) -> None:
        """int fields hold integers (not bools), float fields finite numbers, bool fields
        bools: a wrong type fails here, not as a TypeError or NaN at the first forward."""
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), field.type
            if kind == "int" and not _is_int(value):
                raise ValueError(f"model.{field.name}={value!r} must be an integer.")
            if kind == "float" and not (_is_real(value) and math.isfinite(value)):
                raise ValueError(f"model.{field.name}={value!r} must be a finite number.")
            if kind == "bool" and not isinstance(value, bool):
                raise ValueError(f"model.{field.name}={value!r} must be True or False.")
        if not isinstance(self.dense_layers, (tuple, list)):
            raise ValueError(f"model.dense_layers={self.dense_layers!r} must be a tuple of "
                             "layer indices.")

    def _validate_mha(self) -> None:
        if self.head_dim < 0:
            raise ValueError(f"model.head_dim={self.head_dim} must be >= 0 (0: d_model // "
                             "num_heads).")
        if self.head_dim == 0 and self.d_model % self.num_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by "
                             f"model.num_heads={self.num_heads}; set model.head_dim or change "
                             "the head count.")
        if self.num_kv_heads < 0 or self.num_heads % self.kv_heads:
            raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads} (0: num_heads).")

    def _validate_mla(self) -> None:
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.attention='mla' needs model.{name} >= 1.")
        if self.q_lora_rank < 0 or self.qk_nope_head_dim < 0:
            raise ValueError("model.q_lora_rank and model.qk_nope_head_dim must be >= 0.")
        for name in ("num_kv_heads", "qkv_bias", "qk_norm", "qkv_clip"):
            if getattr(self, name):
                raise ValueError(f"model.{name} applies to attention='mha' only; unset it for "
                                 "'mla'.")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of queries and keys (what the softmax scale defaults to)."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.resolved_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else self.resolved_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.qk_head_dim)

    def is_moe(self, layer: int) -> bool:
        i = layer - self.first_dense_layers
        return (self.moe_every > 0 and i >= 0 and i % self.moe_every == 0
                and layer not in self.dense_layers)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe(i)]

    def inverse_frequencies(self) -> jax.Array:
        return rope_lib.inverse_frequencies(
            self.rope_dim, self.rope_theta, self.rope_scaling, factor=self.rope_factor,
            original_max_len=self.rope_original_max_len, beta_fast=self.rope_beta_fast,
            beta_slow=self.rope_beta_slow, truncate=self.rope_truncate)

    def rope(self, x: jax.Array) -> jax.Array:
        return rope_lib.apply_rope(x, self.inverse_frequencies(),
                                   interleaved=self.rope_interleaved,
                                   attention_factor=self.rope_attention_factor)
