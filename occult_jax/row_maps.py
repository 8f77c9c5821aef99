"""Gather-only row maps between a source array and a buffer, each the other's transpose.

A map links source rows a ∈ [A] to buffer rows b ∈ [B]: `b_src[b]` is the source row of
buffer row b (or -1: empty), and `a_dst[a, :]` lists the buffer rows fed by source row a (-1 pads).
The two must describe the same links. Then

  expand_rows(a, b_src, a_dst)[b]          = a[b_src[b]]                      (0 if empty)
  reduce_rows(b, a_dst, b_src, w)[a]       = Σ_j w[a_dst[a,j]] · b[a_dst[a,j]]

and each one's backward is the other one: a gather, never a scatter-add. So the dispatch's
backward is a combine and the combine's backward a dispatch — deterministic and atomics-free
on GPUs. Sums accumulate in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[index] along axis 0 with zeros where index < 0."""
    safe = jnp.where(index < 0, x.shape[0], index)
    return jnp.take(x, safe, axis=0, mode="fill", fill_value=0)


def _sum_links(b: jax.Array, a_dst: jax.Array, b_weight: jax.Array | None) -> jax.Array:
    gathered = _take(b, a_dst).astype(jnp.float32)  # [A, m, d]
    if b_weight is not None:
        gathered = gathered * _take(b_weight.astype(jnp.float32), a_dst)[..., None]
    return jnp.sum(gathered, axis=1)


@jax.custom_vjp
def expand_rows(a: jax.Array, b_src: jax.Array, a_dst: jax.Array) -> jax.Array:
    """Buffer rows copied from source rows: out[b] = a[b_src[b]], zeros where b_src[b] < 0."""
    return _take(a, b_src)


def _expand_fwd(a, b_src, a_dst):
    return _take(a, b_src), (b_src, a_dst)


def _expand_bwd(residuals, g_b):
    _, a_dst = residuals
    return _sum_links(g_b, a_dst, None).astype(g_b.dtype), None, None


expand_rows.defvjp(_expand_fwd, _expand_bwd)


@jax.custom_vjp
def reduce_rows(b: jax.Array, a_dst: jax.Array, b_src: jax.Array,
                b_weight: jax.Array | None = None) -> jax.Array:
    """Source rows summed from their buffer rows, optionally weighted per buffer row."""
    return _sum_links(b, a_dst, b_weight).astype(b.dtype)


def _reduce_fwd(b, a_dst, b_src, b_weight=None):
    out = _sum_links(b, a_dst, b_weight).astype(b.dtype)
    saved_b = None if b_weight is None else b  # b is only needed for the weight gradient
    return out, (saved_b, b_src, b_weight, jnp.zeros((), b.dtype))


def _reduce_bwd(residuals, g_a):
    b, b_src, b_weight, dtype_of_b = residuals
    g_per_b = _take(g_a, b_src).astype(jnp.float32)  # [B, d]
    g_weight = None
    if b_weight is None:
        g_b = g_per_b
    else:
        g_b = g_per_b * b_weight.astype(jnp.float32)[:, None]
        g_weight = jnp.sum(g_per_b * b.astype(jnp.float32), axis=-1).astype(b_weight.dtype)
    return g_b.astype(dtype_of_b.dtype), None, None, g_weight


reduce_rows.defvjp(_reduce_fwd, _reduce_bwd)
