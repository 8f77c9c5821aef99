"""Grouped matmul in plain XLA over expert-aligned row blocks, skipping unused blocks.

Rows are laid out group after group, each group padded to a multiple of `block` rows (see
plan.make_expert_plan), so every block belongs to one group. A while loop visits chunks of
`chunk` blocks — one batched [chunk, block, K] × [chunk, K, N] product each — until the *used*
blocks are covered: the work follows the real row count, not the static buffer bound (dropless
buffers are sized for the worst case and mostly empty). The backward is the same loop (dX) and
per-block xᵀ·dy products added into their expert's weight gradient in float32.

XLA's own `ragged_dot` computes over every row on GPU, and its weight gradient materialises a
[G, M, K] intermediate there; this is the fallback until the Pallas kernels take over.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.platform import vary_like


def _loop_chunks(num_used, block, chunk, body, init):
    """Run body(first_block, first_row, carry) over chunks of `chunk` blocks until the used
    blocks are covered: a dynamic trip count, so empty buffer space costs nothing."""
    num_chunks = (num_used + chunk - 1) // chunk
    return jax.lax.fori_loop(
        0, num_chunks, lambda c, acc: body(c * chunk, c * chunk * block, acc), init)


def _slice_chunk(a, start_row, block, chunk):
    rows = jax.lax.dynamic_slice_in_dim(a, start_row, block * chunk, axis=0)
    return rows.reshape(chunk, block, a.shape[1])


def _matmul_blocks(x, w, block_group, num_used, block, chunk, transpose_w):
    rows, _ = x.shape
    n = w.shape[1] if transpose_w else w.shape[2]

    def body(first_block, start, out):
        xb = _slice_chunk(x, start, block, chunk)  # [chunk, block, K]
        wb = w[jax.lax.dynamic_slice_in_dim(block_group, first_block, chunk)]  # [chunk, K, N]
        spec = "sbk,snk->sbn" if transpose_w else "sbk,skn->sbn"
        yb = jnp.einsum(spec, xb, wb, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(
            out, yb.reshape(block * chunk, n).astype(out.dtype), start, axis=0)

    init = vary_like(jnp.zeros((rows, n), x.dtype), x, w, block_group)
    return _loop_chunks(num_used, block, chunk, body, init)


def _weight_grad(x, dy, block_group, num_used, block, chunk, groups):
    def body(first_block, start, dw):
        xb = _slice_chunk(x, start, block, chunk)
        gb = _slice_chunk(dy, start, block, chunk)
        parts = jnp.einsum("sbk,sbn->skn", xb, gb, preferred_element_type=jnp.float32)
        return dw.at[jax.lax.dynamic_slice_in_dim(block_group, first_block, chunk)].add(parts)

    init = vary_like(jnp.zeros((groups, x.shape[1], dy.shape[1]), jnp.float32), x, dy,
                     block_group)
    return _loop_chunks(num_used, block, chunk, body, init)


def blocked_gmm(x: jax.Array, w: jax.Array, block_group: jax.Array, num_used: jax.Array,
                block: int, chunk: int) -> jax.Array:
    """x [M, K], w [G, K, N] → [M, N]; M a multiple of block·chunk, block b has expert
    block_group[b], and rows past the first `num_used` blocks come out as zeros."""
    # Inside shard_map the weights may vary over fewer mesh axes than the rows; widening them
    # here (outside the custom VJP) lets autodiff insert the psum their gradient needs.
    return _blocked_gmm(x, vary_like(w, x), block_group, num_used, block, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked_gmm(x, w, block_group, num_used, block, chunk):
    return _matmul_blocks(x, w, block_group, num_used, block, chunk, transpose_w=False)


def _fwd(x, w, block_group, num_used, block, chunk):
    out = _blocked_gmm(x, w, block_group, num_used, block, chunk)
    return out, (x, w, block_group, num_used)


def _bwd(block, chunk, residuals, dy):
    x, w, block_group, num_used = residuals
    dx = _matmul_blocks(dy, w, block_group, num_used, block, chunk, transpose_w=True)
    dw = _weight_grad(x, dy, block_group, num_used, block, chunk, w.shape[0])
    return dx, dw.astype(w.dtype), None, None


_blocked_gmm.defvjp(_fwd, _bwd)
