"""Occult's sparse expert matmuls: grouped matmuls over items (a received row and one of its
local experts, sorted by expert) that never materialise the item-order copy of the rows.

* ``gather_gmm``: ``gmm(x[rows], w)`` — the first expert matmul reads the deduplicated receive
  buffer through the item → row index (``gather_gmm_mgpu``: cp.async gathers into swizzled
  tiles). Its backward sums each row's item gradients (``row_items``) and gets the weight
  gradient from ``gather_tgmm``, so training does not copy the rows into item order either.
* ``gather_tgmm``: ``tgmm(x[rows], dy)``, with the rows gathered inside the kernel.
* ``gmm_combine``: the last expert matmul adds ``item × weight`` products straight into their
  received rows in float32 (``gmm_combine_mgpu``).

On GPUs the kernels are Mosaic GPU (Hopper, 16-bit operands); elsewhere each op runs its
fallback: an XLA gather or segment-sum around the interpreted (CPU) or megablox (TPU) kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import grouped_matmul as gm
from kernels import platform, schedule
from kernels.grouped_matmul import (
    GmmTiling,
    _check,
    _gmm_kernel,
    _gmm_raw,
    _mode,
    _pad_rows,
    _row_padding,
    _tgmm_raw,
)
from kernels.row_gather import gather_rows, sum_rows


def _gathers_on_gpu(mode: str, x: jax.Array, width: int) -> bool:
    """Whether the Mosaic GPU gathering kernels take these operands."""
    return mode == "gpu" and x.dtype.itemsize == 2 and width % 64 == 0


def gather_gmm_tiling(k: int, n: int, itemsize: int = 2, out_itemsize: int = 2):
    """Tiles of ``gather_gmm``'s kernel (its own cross-tile pipeline: cooperative tiles)."""
    return gm.gmm_tiling(k, n, itemsize, out_itemsize)


def gather_tgmm_tiling(k: int, n: int, itemsize: int = 2, out_itemsize: int = 2):
    """``tgmm_tiling`` for a gathered lhs: the warpgroups split a tile's columns wherever they
    can (256-wide tiles sharing one gathered block of x). Split rows, tgmm's default on given
    rows, let a gathered block serve 128 output columns, so x is gathered N/128 times instead
    of N/256 — the OLMoE expert compute's fwd+bwd ran 1.13-1.19x slower that way on an H200
    (docs/benchmarks.md, session 17)."""
    columns = {} if n % 256 else {"split_k": False}
    return gm.tgmm_tiling(k, n, itemsize, out_itemsize, **columns)


def _gather_tgmm_raw(x, rows, rhs, group_sizes, out_dtype, mode: str, tiling=None):
    if rows.shape[0] != rhs.shape[0]:
        raise ValueError(f"gather_tgmm wants rows [M] and rhs [M, N]; got {rows.shape}, "
                         f"{rhs.shape}")
    if not _gathers_on_gpu(mode, x, x.shape[1]) or rhs.dtype != x.dtype:
        return _tgmm_raw(x[rows], rhs, group_sizes, out_dtype, mode, tiling)
    from kernels.tgmm_mgpu import tgmm_call

    tiling = tiling or gather_tgmm_tiling(x.shape[1], rhs.shape[1], x.dtype.itemsize,
                                          jnp.dtype(out_dtype).itemsize)
    rows_p = jnp.pad(rows, (0, _row_padding(rows.shape[0])))
    blocks = schedule.group_blocks(group_sizes, rows_p.shape[0], tiling.tile_m,
                                   tiling.group_aligned)
    out = tgmm_call(x, _pad_rows(rhs), blocks, group_sizes.shape[0], out_dtype=out_dtype,
                    tiling=tiling, interpret=False, lhs_rows=rows_p)
    return platform.vary_like(out, x, rows, rhs, group_sizes)


def _clamped(rows: jax.Array, num_rows: int) -> jax.Array:
    # a bad index never reads (gathers) or writes (combines) wild
    return jnp.clip(rows.astype(jnp.int32), 0, num_rows - 1)


def gather_tgmm(x: jax.Array, rows: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                preferred_element_type=None, interpret: bool | None = None) -> jax.Array:
    """``tgmm(x[rows], rhs, group_sizes)`` without materialising ``x[rows]`` on GPU: x [T, K],
    rows [M] (items sorted by group; clamped into [0, T)), rhs [M, N] → [G, K, N]."""
    if rows.ndim != 1 or x.ndim != 2 or rhs.ndim != 2:
        raise ValueError(f"gather_tgmm wants x [T, K], rows [M] and rhs [M, N]; got {x.shape}, "
                         f"{rows.shape}, {rhs.shape}")
    out_dtype = jnp.dtype(preferred_element_type or x.dtype)
    return _gather_tgmm_raw(x, _clamped(rows, x.shape[0]), rhs, group_sizes.astype(jnp.int32),
                            out_dtype, _mode(interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _gather_gmm(x, rows, row_items, rhs, group_sizes, out_dtype, mode, fill_tail):
    if not _gathers_on_gpu(mode, x, rhs.shape[1]):
        return _gmm_raw(x[rows], rhs, group_sizes, out_dtype, False, mode, fill_tail=fill_tail)
    from kernels.gather_gmm_mgpu import gather_gmm_call

    _check(x, rhs, group_sizes, False)
    m = rows.shape[0]
    tiling = gather_gmm_tiling(x.shape[1], rhs.shape[2], x.dtype.itemsize,
                               jnp.dtype(out_dtype).itemsize)
    rows_p = jnp.pad(rows, (0, _row_padding(m)))
    tiles = schedule.row_tiles(group_sizes, rows_p.shape[0], tiling.tile_m,
                               tiling.group_aligned)
    out = gather_gmm_call(x, rows_p, rhs, tiles, out_dtype=out_dtype, tiling=tiling,
                          fill_tail=fill_tail)
    return platform.vary_like(out[:m], x, rows, rhs, group_sizes)


def _gather_gmm_fwd(x, rows, row_items, rhs, group_sizes, out_dtype, mode, fill_tail):
    out = _gather_gmm(x, rows, row_items, rhs, group_sizes, out_dtype, mode, fill_tail)
    return out, (x, rows, row_items, rhs, group_sizes)


def _gather_gmm_bwd(out_dtype, mode, fill_tail, residuals, d_out):
    x, rows, row_items, rhs, group_sizes = residuals
    d_out = d_out.astype(x.dtype)
    # zero past the groups, or with row_items (which link used items only) left unwritten
    d_items = _gmm_raw(d_out, rhs, group_sizes, x.dtype, True, mode,
                       fill_tail=fill_tail or row_items is None)
    if row_items is None:
        d_x = jnp.zeros(x.shape, jnp.float32).at[rows].add(d_items.astype(jnp.float32))
    elif mode == "gpu":  # one pass over the used items (kernels/row_gather.py)
        d_x = sum_rows(d_items, row_items, out_dtype=x.dtype)
    else:  # a gather-sum over each row's items: no scatter (slow on GPU with repeats)
        picked = jnp.take(d_items, jnp.maximum(row_items, 0), axis=0).astype(jnp.float32)
        d_x = jnp.sum(jnp.where((row_items >= 0)[..., None], picked, 0.0), axis=1)
    d_rhs = _gather_tgmm_raw(x, rows, d_out, group_sizes, rhs.dtype, mode)
    return d_x.astype(x.dtype), None, None, d_rhs, None


_gather_gmm.defvjp(_gather_gmm_fwd, _gather_gmm_bwd)


def gather_gmm(x: jax.Array, rows: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
               row_items: jax.Array | None = None, preferred_element_type=None,
               interpret: bool | None = None, fill_tail: bool = True) -> jax.Array:
    """``gmm(x[rows], rhs, group_sizes)`` without materialising ``x[rows]`` on GPU: x [T, K],
    rows [M] (items sorted by group), rhs [G, K, N] → [M, N]. Rows are clamped into [0, T).

    ``row_items`` [T, P] (optional): the items that read each row, -1 for none; with it, the
    x gradient is a gather-sum over them instead of a scatter-add into ``rows``. The rhs
    gradient is ``gather_tgmm`` (rows gathered in the kernel on GPU). ``fill_tail=False``:
    outputs past the groups are left undefined on GPU and TPU (as for ``gmm``).
    """
    if rows.ndim != 1 or x.ndim != 2:
        raise ValueError(f"gather_gmm wants x [T, K] and rows [M]; got {x.shape}, {rows.shape}")
    if row_items is not None and (row_items.ndim != 2 or row_items.shape[0] != x.shape[0]):
        raise ValueError(f"gather_gmm: row_items must be [T, P] with T={x.shape[0]}; got "
                         f"{row_items.shape}")
    out_dtype = jnp.dtype(preferred_element_type or x.dtype)
    rhs = platform.vary_like(rhs, x)
    return _gather_gmm(x, _clamped(rows, x.shape[0]), row_items, rhs,
                       group_sizes.astype(jnp.int32), out_dtype, _mode(interpret), fill_tail)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _gmm_combine(lhs, rhs, group_sizes, dest, num_rows, mode, fill_tail, tiling=None):
    _check(lhs, rhs, group_sizes, False)
    m, n = lhs.shape[0], rhs.shape[2]
    if mode != "gpu" or lhs.dtype.itemsize != 2:  # gmm, then a segment-sum of the used rows
        # rows past the groups: undefined (fill_tail=False), masked out of the sum here
        items = _gmm_raw(lhs, rhs, group_sizes, jnp.float32, False, mode, fill_tail=False)
        used = jnp.arange(m) < jnp.sum(group_sizes)
        return jax.ops.segment_sum(jnp.where(used[:, None], items, 0.0),
                                   jnp.where(used, dest, num_rows), num_segments=num_rows)
    tiling = tiling or gm.gmm_tiling(lhs.shape[1], n, lhs.dtype.itemsize, combine=True)
    lhs_p = _pad_rows(lhs)
    dest_p = jnp.pad(dest, (0, lhs_p.shape[0] - m))
    tiles = schedule.row_tiles(group_sizes, lhs_p.shape[0], tiling.tile_m,
                               tiling.group_aligned)
    out = jax.new_ref(platform.vary_like(jnp.zeros((num_rows, n), jnp.float32), lhs, dest))
    _gmm_kernel(tiling)(lhs_p, rhs, tiles, out_dtype=jnp.float32, tiling=tiling,
                        transpose_rhs=False, interpret=False, combine=(dest_p, out))
    return platform.vary_like(out[...], lhs, rhs, group_sizes, dest)


def _gmm_combine_fwd(lhs, rhs, group_sizes, dest, num_rows, mode, fill_tail, tiling):
    out = _gmm_combine(lhs, rhs, group_sizes, dest, num_rows, mode, fill_tail, tiling)
    return out, (lhs, rhs, group_sizes, dest)


def _gmm_combine_bwd(num_rows, mode, fill_tail, tiling, residuals, d_out):
    lhs, rhs, group_sizes, dest = residuals
    d_out = d_out.astype(lhs.dtype)
    used = jnp.arange(dest.shape[0]) < jnp.sum(group_sizes)
    if mode == "gpu":  # rows past the groups: never read below (gmm / tgmm mask them)
        d_items = gather_rows(d_out, jnp.where(used, dest, -1), fill_empty=fill_tail)
    else:
        d_items = jnp.where(used[:, None], d_out[dest], 0).astype(lhs.dtype)
    d_lhs = _gmm_raw(d_items, rhs, group_sizes, lhs.dtype, True, mode, fill_tail=fill_tail)
    d_rhs = _tgmm_raw(lhs, d_items, group_sizes, rhs.dtype, mode)
    return d_lhs, d_rhs, None, None


_gmm_combine.defvjp(_gmm_combine_fwd, _gmm_combine_bwd)


def gmm_combine(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, dest: jax.Array,
                num_rows: int, *, interpret: bool | None = None,
                fill_tail: bool = True, tiling: GmmTiling | None = None) -> jax.Array:
    """``out[r] = Σ_{i in a group, dest[i] = r} lhs[i] @ rhs[g(i)]`` in float32: lhs [M, K] rows
    grouped by expert, dest [M] (clamped into [0, num_rows)) → [num_rows, N] float32.

    Occult's expert-side pre-combine in the last expert matmul's epilogue: on Hopper GPUs the
    kernel adds each product row into its destination row (``gmm_combine_mgpu``; the order in
    which a row's items are added is not fixed), so the item-order product is never stored.
    Elsewhere (and for float32 operands): ``gmm`` and a segment-sum. Gradients: d lhs is the
    transposed ``gmm`` of ``d_out[dest]``, d rhs ``tgmm``; with ``fill_tail=False`` d lhs is
    undefined past the groups (as for ``gmm``). ``tiling``: the kernel's tiles and schedule
    (``gmm_tiling(..., combine=True)``; benchmarks compare schedules with it).
    """
    if dest.shape != lhs.shape[:1]:
        raise ValueError(f"gmm_combine: dest must be [{lhs.shape[0]}] (one row per lhs row); "
                         f"got {dest.shape}")
    if num_rows < 1:
        raise ValueError(f"gmm_combine: num_rows must be positive; got {num_rows}")
    dest = _clamped(dest, num_rows)
    rhs = platform.vary_like(rhs, lhs)
    return _gmm_combine(lhs, rhs, group_sizes.astype(jnp.int32), dest, num_rows,
                        _mode(interpret), fill_tail, tiling)
