"""Differentiable grouped matmuls: ``gmm`` (rows grouped by expert times per-group weights) and
``tgmm`` (its weight gradient), on the best kernel for the platform.

* GPU (Hopper): our Mosaic GPU kernels (``gmm_mgpu``, ``tgmm_mgpu``).
* TPU: JAX's megablox kernels, behind the same interface (``platform.emulate("tpu")`` runs
  them in the Pallas interpreter on CPU, for tests).
* CPU: the Mosaic GPU kernels in the Pallas interpreter (``interpret=True``; slow, for tests).
* float32 operands on GPU: XLA's ``ragged_dot`` at full float32 precision. Hopper's tensor cores
  take float32 only as TF32 with both operands K-major in shared memory, which our N-major
  weight tiles are not (Mosaic refuses the lowering).

``gmm`` is a ``jax.custom_vjp``: d lhs = gmm(d out, rhs transposed), d rhs = tgmm(lhs, d out).
Rows past ``sum(group_sizes)`` give zero outputs and receive zero gradients (or are left
unwritten with ``fill_tail=False``). Occult's variants that read rows through an index or add
products into rows are in ``occult_matmul``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp

from kernels import platform, schedule
from kernels.gmm_mgpu import GmmTiling, gmm_call
from kernels.gmm_stream_mgpu import gmm_stream_call
from kernels.tgmm_mgpu import TgmmTiling, tgmm_call

ROW_MULTIPLE = 128  # M is padded to this (both kernels' row tiles divide it)
MAX_STAGES = 4
PINGPONG_MAX_CONTRACTION = 1024  # ping-pong by default up to this k (default_gmm_tiling)


def _stages(stage_bytes: int, out_bytes: int, most: int = MAX_STAGES) -> int:
    """Most pipeline stages (≤ most) whose buffers fit beside the output staging."""
    return max(2, min(most, (platform.SMEM_BYTES - out_bytes - 1024) // stage_bytes))


def _check(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, transpose_rhs: bool) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"gmm wants lhs [M, K], rhs [G, K, N] and group_sizes [G]; got "
                         f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
    k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k:
        raise ValueError(f"gmm: lhs has K={lhs.shape[1]} but rhs has K={k}")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"gmm: lhs is {lhs.dtype} but rhs is {rhs.dtype}; cast one of them")


def _columns(n: int, what: str, per_block: int = 2) -> int:
    """Per-warpgroup column tile for an output of width n (``per_block`` tiles per block)."""
    for tile in (128, 64):
        if n % (per_block * tile) == 0:
            return tile
    raise ValueError(f"the Pallas grouped matmul needs {what}={n} to be a multiple of "
                     f"{64 * per_block}; pad it or use expert_matmul='ragged_dot'")


def gmm_tiling(k: int, n: int, itemsize: int = 2, out_itemsize: int = 2, *,
               epi_tile: int = 64, chain: bool = True, combine: bool = False,
               stream: bool = False, pingpong: bool = False,
               split_rows: bool = True) -> GmmTiling:
    """Default tiles for a [*, k] @ [k, n] grouped matmul; as many stages as shared memory holds.

    Tiles are chained (``chain``) only where that stage count divides ``k / tile_k``: chaining
    with fewer stages was slower on H200 (docs/benchmarks.md). ``combine``: the output is
    staged as one float32 piece per warpgroup (``gmm_combine_mgpu``). ``stream`` /
    ``pingpong``: the kernel with its own ring across tiles (``gmm_stream_mgpu``; up to 8
    stages), cooperative or with each compute warpgroup owning whole tiles. ``split_rows``:
    the cooperative warpgroups split each tile's rows (one 64 x 2·tile_n accumulator each)
    instead of its columns: 1.002-1.019x on every cooperative pass measured on an H200,
    neutral in the MoE expert compute (docs/benchmarks.md, session 18).
    """
    if k % 64:
        raise ValueError(f"the Pallas grouped matmul needs the contraction size {k} to be a "
                         "multiple of 64; pad it or use expert_matmul='ragged_dot'")
    t = GmmTiling(tile_n=_columns(n, "the output width", 1 if pingpong else 2),
                  epi_tile=epi_tile, stream=stream, pingpong=pingpong,
                  split_rows=split_rows and not pingpong)
    stages = gmm_stages(t, itemsize, out_itemsize, combine=combine)
    if stream or pingpong:
        return dataclasses.replace(t, stages=stages)
    chain = chain and (k // t.tile_k) % stages == 0
    return dataclasses.replace(t, stages=stages, chain=chain)


def gmm_stages(t: GmmTiling, itemsize: int = 2, out_itemsize: int = 2, *,
               combine: bool = False) -> int:
    """Most pipeline stages of tiling ``t`` that fit in shared memory beside its output
    staging (float32 pieces with ``combine``): up to 8 for the kernels with their own ring
    (streamed, ping-pong), MAX_STAGES for JAX's pipeline."""
    stage = (t.tile_m * t.tile_k + t.tile_k * t.block_n) * itemsize
    out_bytes = 2 * t.out_slots * t.out_tile[0] * t.out_tile[1] * out_itemsize
    if combine:
        out_bytes = 2 * t.out_tile[0] * t.out_tile[1] * 4
    return _stages(stage, out_bytes, most=8 if t.stream or t.pingpong else MAX_STAGES)


def default_gmm_tiling(k: int, n: int, itemsize: int = 2, out_itemsize: int = 2) -> GmmTiling:
    """The schedule ``gmm`` runs by default, the fastest measured (docs/benchmarks.md): ping-pong
    where cooperative tiles could only be 128 x 128 (n an odd multiple of 128, e.g. 1408), on
    narrow outputs (n <= 1024: half-width tiles even out the last wave; H200 0.99-1.06x, H100
    0.98-1.04x the cooperative kernel) and on short contractions (k <=
    PINGPONG_MAX_CONTRACTION: one warpgroup's output write overlaps the other's few k-steps),
    the streamed cooperative kernel where chained tiles do not fit the stage count, else the
    cooperative kernel with chained tiles."""
    if n % 128 == 0 and (n % 256 or n <= 1024 or k <= PINGPONG_MAX_CONTRACTION):
        return gmm_tiling(k, n, itemsize, out_itemsize, pingpong=True)
    tiling = gmm_tiling(k, n, itemsize, out_itemsize)
    return tiling if tiling.chain else gmm_tiling(k, n, itemsize, out_itemsize, stream=True)


def tgmm_tiling(k: int, n: int, itemsize: int = 2, out_itemsize: int = 2, *,
                split_k: bool | None = None) -> TgmmTiling:
    """Default tiles for the [k, n] per-group outputs of tgmm: up to 128 x 128 per warpgroup
    (64 where k or n needs it), the warpgroups splitting the tile's rows (``split_k``, sharing
    the rhs block; the default where 256 x 128 tiles fit: it keeps 128-wide tiles at n = 1408,
    where splitting columns would not, and measured 1.01-1.02x the column split at n = 1024
    and 2048 on an H200) or its columns (sharing the lhs block)."""
    if split_k is None:
        split_k = n % 128 == 0 and k % 256 == 0
    if split_k:
        if n % 64 or k % 128:
            raise ValueError(f"tgmm with split rows needs k % 128 == 0 and n % 64 == 0; got "
                             f"k={k}, n={n}")
        t = TgmmTiling(tile_k=128 if k % 256 == 0 else 64, tile_n=128 if n % 128 == 0 else 64,
                       split_k=True)
    else:
        t = TgmmTiling(tile_k=128 if k % 128 == 0 else 64,
                       tile_n=_columns(n, "the output width"))
    stage = (t.tile_m * t.block_k + t.tile_m * t.block_n) * itemsize
    stages = _stages(stage, 2 * t.tile_k * t.tile_n * out_itemsize)
    return dataclasses.replace(t, stages=stages)


def _row_padding(m: int) -> int:
    """Rows to append so that the kernels' tiles fit: to a multiple of ROW_MULTIPLE, and at
    least one tile when there are no rows."""
    return -m % ROW_MULTIPLE if m else ROW_MULTIPLE


def _pad_rows(x: jax.Array) -> jax.Array:
    extra = _row_padding(x.shape[0])
    return jnp.pad(x, ((0, extra), (0, 0))) if extra else x


TPU_MODES = ("tpu", "tpu_interpret")  # megablox compiled, or in Pallas' interpreter (emulate)


def _mode(interpret: bool | None) -> str:
    """'gpu', 'tpu', 'interpret' (the Mosaic GPU kernels interpreted) or 'tpu_interpret'
    (megablox interpreted, under ``platform.emulate``), fixed when the op is traced."""
    if platform.emulated() and interpret is not False:
        return "tpu_interpret"
    if interpret:
        return "interpret"
    kind = platform.backend()
    if kind == "cpu" and interpret is None:
        return "interpret"
    if kind not in ("gpu", "tpu"):
        raise ValueError("the Pallas grouped matmul runs on GPU, TPU, or interpreted on CPU")
    return kind


def _gmm_kernel(tiling: GmmTiling):
    """The kernel a tiling is for: streamed (cooperative or ping-pong) or ``gmm_mgpu``'s."""
    return gmm_stream_call if tiling.stream or tiling.pingpong else gmm_call


def _gmm_raw(lhs, rhs, group_sizes, out_dtype, transpose_rhs: bool, mode: str,
             tiling: GmmTiling | None = None, fill_tail: bool = True) -> jax.Array:
    _check(lhs, rhs, group_sizes, transpose_rhs)
    if mode == "gpu" and lhs.dtype == jnp.float32:
        rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        return platform.vary_like(_xla_gmm(lhs, rhs, group_sizes, out_dtype), lhs, rhs, group_sizes)
    if mode in TPU_MODES:
        out = _megablox_gmm(lhs, rhs, group_sizes, out_dtype, transpose_rhs, fill_tail,
                            interpret=mode == "tpu_interpret")
        return platform.vary_like(out, lhs, rhs, group_sizes)
    m = lhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiling = tiling or default_gmm_tiling(lhs.shape[1], n, lhs.dtype.itemsize,
                                          jnp.dtype(out_dtype).itemsize)
    lhs = _pad_rows(lhs)
    tiles = schedule.row_tiles(group_sizes, lhs.shape[0], tiling.tile_m, tiling.group_aligned)
    out = _gmm_kernel(tiling)(lhs, rhs, tiles, out_dtype=out_dtype, tiling=tiling,
                              transpose_rhs=transpose_rhs, interpret=mode == "interpret",
                              fill_tail=fill_tail)
    return platform.vary_like(out[:m], lhs, rhs, group_sizes)


def _tgmm_raw(lhs, rhs, group_sizes, out_dtype, mode: str,
              tiling: TgmmTiling | None = None) -> jax.Array:
    if lhs.ndim != 2 or rhs.ndim != 2 or lhs.shape[0] != rhs.shape[0]:
        raise ValueError(f"tgmm wants lhs [M, K] and rhs [M, N]; got {lhs.shape}, {rhs.shape}")
    if mode == "gpu" and lhs.dtype == jnp.float32:
        weights = jnp.zeros((group_sizes.shape[0], lhs.shape[1], rhs.shape[1]), lhs.dtype)
        _, pullback = jax.vjp(lambda w: _xla_gmm(lhs, w, group_sizes, rhs.dtype), weights)
        return platform.vary_like(pullback(rhs)[0].astype(out_dtype), lhs, rhs, group_sizes)
    if mode in TPU_MODES:  # megablox masks each group's rows: rows past the groups never count
        out = _megablox().tgmm(_pad_rows(lhs).T, _pad_rows(rhs), group_sizes, out_dtype,
                               MEGABLOX_TILING, interpret=mode == "tpu_interpret")
        return platform.vary_like(out, lhs, rhs, group_sizes)
    tiling = tiling or tgmm_tiling(lhs.shape[1], rhs.shape[1], lhs.dtype.itemsize,
                                   jnp.dtype(out_dtype).itemsize)
    lhs, rhs = _pad_rows(lhs), _pad_rows(rhs)
    blocks = schedule.group_blocks(group_sizes, lhs.shape[0], tiling.tile_m,
                                   tiling.group_aligned)
    out = tgmm_call(lhs, rhs, blocks, group_sizes.shape[0], out_dtype=out_dtype, tiling=tiling,
                    interpret=mode == "interpret")
    return platform.vary_like(out, lhs, rhs, group_sizes)


# megablox's default tiles (rows, contraction, columns); its row tile must divide the padded M.
# Not tuned: no TPU has been available to measure on.
MEGABLOX_TILING = (ROW_MULTIPLE, 128, 128)


def _megablox():
    """JAX's TPU grouped-matmul kernels: the module (the package's ``gmm`` is a function)."""
    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _megablox_gmm(lhs, rhs, group_sizes, out_dtype, transpose_rhs: bool, fill_tail: bool, *,
                  interpret: bool):
    """megablox's gmm, which leaves rows past the groups unwritten: zeros there on request."""
    m = lhs.shape[0]
    out = _megablox().gmm(_pad_rows(lhs), rhs, group_sizes, out_dtype, MEGABLOX_TILING,
                          transpose_rhs=transpose_rhs, interpret=interpret)[:m]
    if not fill_tail:
        return out
    used = jnp.arange(m)[:, None] < jnp.sum(group_sizes)
    return jnp.where(used, out, jnp.zeros((), out.dtype))


def _xla_gmm(lhs, rhs, group_sizes, out_dtype) -> jax.Array:
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=jax.lax.Precision.HIGHEST,
                              preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, out_dtype, mode, fill_tail):
    return _gmm_raw(lhs, rhs, group_sizes, out_dtype, False, mode, fill_tail=fill_tail)


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype, mode, fill_tail):
    return _gmm(lhs, rhs, group_sizes, out_dtype, mode, fill_tail), (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, mode, fill_tail, residuals, d_out):
    lhs, rhs, group_sizes = residuals
    d_out = d_out.astype(lhs.dtype)
    try:
        d_lhs = _gmm_raw(d_out, rhs, group_sizes, lhs.dtype, True, mode, fill_tail=fill_tail)
    except ValueError as e:  # e.g. K = 64: fine as a contraction, not as an output width
        raise ValueError(f"gmm's gradient for lhs is a grouped matmul of output width "
                         f"K={lhs.shape[1]}: {e}") from None
    d_rhs = _tgmm_raw(lhs, d_out, group_sizes, rhs.dtype, mode)
    return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        preferred_element_type=None, interpret: bool | None = None,
        fill_tail: bool = True) -> jax.Array:
    """``out[rows of g] = lhs[rows of g] @ rhs[g]``: lhs [M, K], rhs [G, K, N] → [M, N].

    Negative group sizes count as 0. Rows past ``sum(group_sizes)`` are zeros, in the output
    and in lhs's gradient; with ``fill_tail=False`` the GPU and TPU kernels leave them
    unwritten (undefined) — for callers that never read them, which saves writing the padding
    of a worst-case-sized buffer.
    ``interpret``: None picks the compiled kernel on GPU/TPU and the interpreter on CPU.
    """
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    group_sizes = _checked_sizes(group_sizes, rhs.shape[0], "gmm")
    rhs = platform.vary_like(rhs, lhs)  # so autodiff inserts the psum rhs's gradient needs
    return _gmm(lhs, rhs, group_sizes, out_dtype, _mode(interpret), fill_tail)


def tgmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
         preferred_element_type=None, interpret: bool | None = None) -> jax.Array:
    """``out[g] = lhs[rows of g].T @ rhs[rows of g]``: lhs [M, K], rhs [M, N] → [G, K, N]."""
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"tgmm wants lhs and rhs of one dtype; got {lhs.dtype} and "
                         f"{rhs.dtype}. Cast one of them.")
    group_sizes = _checked_sizes(group_sizes, None, "tgmm")
    return _tgmm_raw(lhs, rhs, group_sizes, out_dtype, _mode(interpret))


def _checked_sizes(group_sizes: jax.Array, groups: int | None, name: str) -> jax.Array:
    """[G] int32 sizes, negative ones counted as 0 (they would move the groups' row offsets)."""
    if group_sizes.ndim != 1 or (groups is not None and group_sizes.shape[0] != groups):
        raise ValueError(f"{name} wants group_sizes [G]" + (f" with G={groups} (rhs's groups)"
                         if groups is not None else "") + f"; got shape {group_sizes.shape}.")
    return jnp.maximum(group_sizes.astype(jnp.int32), 0)


def flops(m: int, k: int, n: int) -> int:
    """Multiply-add FLOPs of a grouped matmul over m rows."""
    return 2 * m * k * n


