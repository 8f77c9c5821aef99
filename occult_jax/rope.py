"""Rotary position embeddings: frequencies (plain or YaRN-extended) and their application.

Two layouts of the rotated pairs: "halves" (dimension i pairs with i + dim/2; Llama, OLMoE,
Qwen) and "interleaved" (dimension 2i pairs with 2i + 1; DeepSeek-V2's complex-number form).
YaRN follows Hugging Face `transformers` (`_compute_yarn_parameters`), so imported checkpoints
that were trained with it keep their logits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_SCALINGS = ("none", "yarn")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 · mscale · ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inverse_frequencies(dim: int, theta: float, factor: float, original_max_len: int,
                             beta_fast: float = 32.0, beta_slow: float = 1.0,
                             truncate: bool = True) -> np.ndarray:
    """[dim/2] float32 inverse frequencies: interpolated (÷ factor) for the low-frequency
    dimensions, unchanged for the high-frequency ones, a linear ramp in between."""

    def correction_dim(rotations: float) -> float:
        turns = original_max_len / (rotations * 2 * math.pi)
        return (dim * math.log(turns)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                   / np.float32(high - low), 0, 1).astype(np.float32)
    keep = np.float32(1.0) - ramp
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def inverse_frequencies(dim: int, theta: float, scaling: str = "none", *, factor: float = 1.0,
                        original_max_len: int = 0, beta_fast: float = 32.0,
                        beta_slow: float = 1.0, truncate: bool = True) -> jax.Array:
    """[dim/2] float32 inverse frequencies theta^(-2i/dim), or their YaRN extension."""
    if scaling == "yarn":
        return jnp.asarray(yarn_inverse_frequencies(dim, theta, factor, original_max_len,
                                                    beta_fast, beta_slow, truncate))
    if scaling != "none":
        raise ValueError(f"rope scaling {scaling!r} is unknown; use one of {ROPE_SCALINGS}.")
    return theta ** (-jnp.arange(0, dim // 2, dtype=jnp.float32) / (dim // 2))


def apply_rope(x: jax.Array, inv_freq: jax.Array, *, interleaved: bool = False,
               attention_factor: float = 1.0) -> jax.Array:
    """Rotates x [batch, seq, heads, dim] by position · inv_freq; positions are 0..seq-1.

    attention_factor multiplies cos and sin (YaRN's magnitude correction; 1 otherwise).
    """
    seq = x.shape[1]
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [seq, dim/2]
    sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
    if attention_factor != 1.0:
        sin, cos = sin * attention_factor, cos * attention_factor
    x32 = x.astype(jnp.float32)
    if interleaved:
        pairs = x32.reshape(*x.shape[:-1], -1, 2)
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        x1, x2 = jnp.split(x32, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
