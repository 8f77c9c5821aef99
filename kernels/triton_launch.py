"""Small pieces shared by the memory-bound Pallas kernels lowered through Triton on GPUs
(row_gather, swiglu, gather_matmul): tile choice, the launch, and a masked row gather."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


def pow2_tile(dim: int, preferred: int) -> int:
    """Largest power of two ≤ preferred dividing dim (1 at worst): tiles that never overhang,
    so no access needs a bounds mask."""
    tile = preferred
    while dim % tile:
        tile //= 2
    return tile


def call(kernel, grid, out_shape, *, num_warps: int, interpret: bool):
    """pallas_call on the Triton lowering (one pipeline stage: nothing to pipeline), or in the
    interpreter."""
    params = None if interpret else plt.CompilerParams(num_warps=num_warps, num_stages=1)
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, interpret=interpret,
                          compiler_params=params)


def load_rows(ref, rows, valid, cols):
    """ref[rows[:, None], cols[None, :]], zeros where ~valid (full index arrays: interpretable);
    masked-off rows move no memory."""
    r = jnp.broadcast_to(jnp.where(valid, rows, 0)[:, None], (rows.shape[0], cols.shape[0]))
    c = jnp.broadcast_to(cols[None, :], r.shape)
    return plt.load(ref.at[r, c], mask=jnp.broadcast_to(valid[:, None], r.shape),
                    other=jnp.zeros((), ref.dtype))
