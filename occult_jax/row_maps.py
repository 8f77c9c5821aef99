"""Gather-only row maps between a source array and a buffer, each the other's transpose.

A map links source rows a ∈ [A] to buffer rows b ∈ [B]: `b_src[b]` is the source row of
buffer row b (or -1: empty), and `a_dst[a, :]` lists the buffer rows fed by source row a (-1 pads).
The two must describe the same links. Then

  expand_rows(a, b_src, a_dst)[b]          = a[b_src[b]]                      (0 if empty)
  reduce_rows(b, a_dst, b_src, w)[a]       = Σ_j w[a_dst[a,j]] · b[a_dst[a,j]]

and each one's backward is the other one: a gather, never a scatter-add. So the dispatch's
backward is a combine and the combine's backward a dispatch — deterministic and atomics-free
on GPUs. Sums accumulate in float32, in link order.

On GPUs the copies and sums run as Pallas kernels (kernels/row_gather.py) that skip empty
links; elsewhere as XLA gathers. ``use_kernels`` overrides the choice (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from kernels import platform as kernel_platform

_FORCE_KERNELS: bool | None = None


@contextlib.contextmanager
def use_kernels(enabled: bool | None):
    """Row maps called within the block run on the Pallas kernels (True; interpreted off GPU),
    on XLA gathers (False), or on whichever suits the platform (None, the default). The choice
    is made when a map is traced and holds for its gradient too. It is not part of jit's cache
    key: a function already traced keeps its choice, so trace a fresh function in the block."""
    global _FORCE_KERNELS
    saved, _FORCE_KERNELS = _FORCE_KERNELS, enabled
    try:
        yield
    finally:
        _FORCE_KERNELS = saved


KERNEL_MIN_WIDTH = 64  # narrower rows (e.g. per-slot weights) stay on XLA gathers


def _kernels(x: jax.Array) -> bool:
    if x.ndim != 2:  # the kernels move [rows, width] tiles
        return False
    if _FORCE_KERNELS is not None:
        return _FORCE_KERNELS
    return kernel_platform.backend() == "gpu" and x.shape[1] >= KERNEL_MIN_WIDTH


def _take(x: jax.Array, index: jax.Array, kernels: bool, fill_empty: bool = True) -> jax.Array:
    """x[index] along axis 0 with zeros where index < 0 (undefined on the kernels without
    fill_empty)."""
    if kernels:
        from kernels.row_gather import gather_rows

        return gather_rows(x, index, fill_empty=fill_empty)
    safe = jnp.where(index < 0, x.shape[0], index)
    return jnp.take(x, safe, axis=0, mode="fill", fill_value=0)


def _sum_links(b: jax.Array, a_dst: jax.Array, b_weight: jax.Array | None, out_dtype,
               kernels: bool) -> jax.Array:
    if kernels:
        from kernels.row_gather import sum_rows

        return sum_rows(b, a_dst, weight=b_weight, out_dtype=out_dtype)
    total = jnp.zeros((a_dst.shape[0], *b.shape[1:]), jnp.float32)
    for j in range(a_dst.shape[1]):  # in link order, as the kernel sums
        term = _take(b, a_dst[:, j], False).astype(jnp.float32)
        if b_weight is not None:
            term = term * _take(b_weight.astype(jnp.float32), a_dst[:, j], False)[:, None]
        total = total + term
    return total.astype(out_dtype)


def expand_rows(a: jax.Array, b_src: jax.Array, a_dst: jax.Array, *,
                fill_empty: bool = True) -> jax.Array:
    """Buffer rows copied from source rows: out[b] = a[b_src[b]], zeros where b_src[b] < 0 —
    or, with ``fill_empty=False``, undefined there on the kernels (for callers that never read
    empty rows: a worst-case-sized buffer is mostly empty)."""
    return _expand(a, b_src, a_dst, _kernels(a), fill_empty)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _expand(a, b_src, a_dst, kernels, fill_empty):
    return _take(a, b_src, kernels, fill_empty)


def _expand_fwd(a, b_src, a_dst, kernels, fill_empty):
    return _take(a, b_src, kernels, fill_empty), (b_src, a_dst)


def _expand_bwd(kernels, fill_empty, residuals, g_b):
    _, a_dst = residuals
    return _sum_links(g_b, a_dst, None, g_b.dtype, kernels), None, None


_expand.defvjp(_expand_fwd, _expand_bwd)


def reduce_rows(b: jax.Array, a_dst: jax.Array, b_src: jax.Array,
                b_weight: jax.Array | None = None, *, fill_empty: bool = True) -> jax.Array:
    """Source rows summed from their buffer rows, optionally weighted per buffer row. Empty
    buffer rows get zero gradient, or undefined with ``fill_empty=False`` (see expand_rows)."""
    return _reduce(b, a_dst, b_src, b_weight, _kernels(b), fill_empty)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _reduce(b, a_dst, b_src, b_weight, kernels, fill_empty):
    return _sum_links(b, a_dst, b_weight, b.dtype, kernels)


def _reduce_fwd(b, a_dst, b_src, b_weight, kernels, fill_empty):
    out = _sum_links(b, a_dst, b_weight, b.dtype, kernels)
    saved_b = None if b_weight is None else b  # b is only needed for the weight gradient
    return out, (saved_b, b_src, b_weight, jnp.zeros((), b.dtype))


def _reduce_bwd(kernels, fill_empty, residuals, g_a):
    b, b_src, b_weight, dtype_of_b = residuals
    if kernels:
        from kernels.row_gather import gather_rows

        if b_weight is None:
            return gather_rows(g_a, b_src, out_dtype=dtype_of_b.dtype,
                               fill_empty=fill_empty), None, None, None
        g_b, g_weight = gather_rows(g_a, b_src, scale=b_weight, dot_with=b,
                                    out_dtype=dtype_of_b.dtype, fill_empty=fill_empty)
        return g_b, None, None, g_weight.astype(b_weight.dtype)
    g_per_b = _take(g_a, b_src, False).astype(jnp.float32)  # [B, d]
    g_weight = None
    if b_weight is None:
        g_b = g_per_b
    else:
        g_b = g_per_b * b_weight.astype(jnp.float32)[:, None]
        linked = (b_src >= 0)[:, None]  # empty rows of b may be undefined (NaN · 0 = NaN)
        g_weight = jnp.sum(jnp.where(linked, g_per_b * b.astype(jnp.float32), 0.0),
                           axis=-1).astype(b_weight.dtype)
    return g_b.astype(dtype_of_b.dtype), None, None, g_weight


_reduce.defvjp(_reduce_fwd, _reduce_bwd)
