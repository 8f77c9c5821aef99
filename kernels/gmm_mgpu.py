"""Grouped matmul on Hopper (Pallas Mosaic GPU): ``out[rows of g] = lhs[rows of g] @ rhs[g]``.

A persistent kernel: one block per SM walks the (row tile, column tile) grid of the schedule in
``schedule.row_tiles``. Each block runs a warp-specialised pipeline — one memory warpgroup
streams ``lhs`` and ``rhs`` tiles through TMA into a ring of shared-memory stages, two compute
warpgroups issue wgmma on their halves of the tile (its rows with ``split_rows``, else its
columns) and accumulate in float32 registers.
A tile writes back only the rows its group owns, with TMA stores of power-of-two row counts
(any count below ``2 * tile_m`` is a sum of those). Tiles whose group is empty are not visited;
rows past the last group are written as zeros, in a second loop after the real tiles (or left
unwritten: ``fill_tail=False``, for callers that never read them).

Two options hide the bubble between tiles: ``chain`` runs one block's consecutive tiles as a
pipeline of pipelines (the memory warpgroup loads the next tile while the compute warpgroups
write this one's output), and ``epi_tile`` writes the output in pieces through two staging slots,
which leaves shared memory for a fourth pipeline stage. (JAX's ``delay_release``, one wgmma left
in flight, is not usable here: a persistent kernel's next pipeline would refill the stage the
last wgmma still reads.)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import platform
from kernels.gmm_combine_mgpu import combine_owned_rows, staging
from kernels.schedule import RowTiles, first_row


@dataclasses.dataclass(frozen=True)
class GmmTiling:
    """Tile sizes: a block computes ``tile_m x 2*tile_n`` (two compute warpgroups, each half
    of its columns, or with ``split_rows`` half of its rows), or with ``pingpong`` each compute
    warpgroup its own ``tile_m x tile_n`` tiles."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 4
    grid_tile_width: int = 8
    chain: bool = False  # needs (K / tile_k) % stages == 0
    epi_tile: int = 0  # write the output in epi_tile² pieces through two slots (0: whole tile)
    stream: bool = False  # own ring across tiles, a wgmma in flight (gmm_stream_mgpu)
    pingpong: bool = False  # streamed; each warpgroup owns tile_m x tile_n tiles
    split_rows: bool = False  # cooperative: each warpgroup tile_m/2 rows x block_n columns
    group_aligned: bool = True  # row tiles start at their group's first row (schedule.py)
    # (grouped_matmul.gmm_tiling picks chain and 64² pieces where they fit; default_gmm_tiling
    # the schedule.)

    @property
    def wg_tile(self) -> tuple[int, int]:
        """Rows and columns of one compute warpgroup's accumulator. Split rows give each
        warpgroup 64 x 256 of a 128 x 256 tile: one m64n256 wgmma per k-step of 16, which reads
        a sixth fewer shared-memory bytes per product than two m64n128 (columns split)."""
        if self.split_rows:
            return self.tile_m // 2, 2 * self.tile_n
        return self.tile_m, self.tile_n

    @property
    def out_tile(self) -> tuple[int, int]:
        """Shape of one output staging slot."""
        return (self.epi_tile, self.epi_tile) if self.epi_tile else self.wg_tile

    @property
    def out_slots(self) -> int:
        """Output staging slots per compute warpgroup (two when written in pieces)."""
        return 2 if self.epi_tile else 1

    @property
    def block_n(self) -> int:
        """Columns of one tile (both warpgroups', or one's with ``pingpong``)."""
        return self.tile_n if self.pingpong else 2 * self.tile_n


def _smem_transforms(minor_elems: int, dtype) -> tuple:
    swizzle = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
    swizzle_elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(swizzle))


def mma(acc, a_smem, b_smem, *, transpose_a: bool, transpose_b: bool, scratch=None,
        wait: bool = True) -> None:
    """``acc += op(a) @ op(b)`` with wgmma on shared memory (16-bit operands); ``wait=False``
    leaves the wgmma in flight (the caller waits with ``plgpu.wgmma_wait``).

    The CPU interpreter has no transposed shared-memory views: interpreted kernels pass
    ``scratch`` (buffers shaped like the transposed operands), and a transposed operand is
    transposed in registers into it first.
    """
    if scratch is not None and (transpose_a or transpose_b):
        a_tmp, b_tmp = scratch
        a_tmp[...] = a_smem[...].T if transpose_a else a_smem[...]
        b_tmp[...] = b_smem[...].T if transpose_b else b_smem[...]
        a_smem, b_smem, transpose_a, transpose_b = a_tmp, b_tmp, False, False
    a = plgpu.transpose_ref(a_smem, (1, 0)) if transpose_a else a_smem
    b = plgpu.transpose_ref(b_smem, (1, 0)) if transpose_b else b_smem
    plgpu.wgmma(acc, a, b)
    if wait:
        plgpu.wgmma_wait(0)


def interpret_scratch(interpret: bool, a_shape, b_shape, dtype) -> dict:
    """Per-compute-warpgroup scratch for ``mma`` when interpreted, else nothing."""
    if not interpret:
        return {"scratch": None}
    return {"scratch": (plgpu.SMEM((2, *a_shape), dtype), plgpu.SMEM((2, *b_shape), dtype))}


def store_owned_rows(out_smem, out_gmem, lo, hi, row0, col0, rows_max: int) -> None:
    """TMA-store rows ``[lo, hi)`` of ``out_smem`` to ``out_gmem[row0 + lo :, col0 :]``."""
    plgpu.commit_smem()
    start = lo
    size = hi - lo
    remaining = rows_max
    while remaining > 0:
        rows = 1 << int(math.log2(remaining))
        remaining //= 2

        @pl.when(size & rows != 0)
        def _store(rows=rows, start=start):
            plgpu.copy_smem_to_gmem(
                out_smem.at[pl.ds(start, rows)],
                out_gmem.at[pl.ds(row0 + start, rows), pl.ds(col0, out_smem.shape[1])],
            )

        start = start + (size & rows)


def write_owned_rows(values, out_slots, out_gmem, lo, hi, row0, col0,
                     tiling: GmmTiling) -> None:
    """Write rows ``[lo, hi)`` of a warpgroup's ``wg_tile`` result ``values`` to
    ``out_gmem[row0:, col0:]``, staged through ``out_slots`` ([out_slots, *out_tile]) in
    ``tiling.out_tile`` pieces; pieces without owned rows are skipped (``lo`` may be negative
    and ``hi`` past the tile: only rows inside it are written)."""
    em, en = tiling.out_tile
    wm, wn = tiling.wg_tile
    slots = tiling.out_slots
    # Two slots alternate within and across tiles when a row of pieces is even.
    pending = 1 if slots == 2 and (wn // en) % 2 == 0 else 0
    for r in range(wm // em):
        sub_lo = jnp.clip(lo - r * em, 0, em)
        sub_hi = jnp.clip(hi - r * em, 0, em)

        @pl.when(sub_hi > sub_lo)
        def _rows(r=r, sub_lo=sub_lo, sub_hi=sub_hi):
            for c in range(wn // en):
                slot = c % slots
                plgpu.wait_smem_to_gmem(pending, wait_read_only=True)
                piece = values[r * em:(r + 1) * em, c * en:(c + 1) * en]
                out_slots[slot] = piece.astype(out_slots.dtype)
                store_owned_rows(out_slots.at[slot], out_gmem, sub_lo, sub_hi,
                                 row0 + r * em, col0 + c * en, em)


def output_staging(tiling: GmmTiling, out_dtype, combine):
    """Shared memory for the two compute warpgroups' output pieces: ``out_slots`` pieces each,
    or one float32 piece each to add into the combined rows."""
    if combine is not None:
        return staging(tiling.out_tile[0])
    return plgpu.SMEM((2, tiling.out_slots, *tiling.out_tile), out_dtype)


def write_tile(values, out_smem, out_gmem, dest_gmem, lo, hi, row0, col0,
               tiling: GmmTiling) -> None:
    """Write rows ``[lo, hi)`` of a warpgroup's ``wg_tile`` result to
    ``out_gmem[row0:, col0:]``, or with ``dest_gmem`` add them into ``out_gmem[dest[row]]``."""
    if dest_gmem is None:
        write_owned_rows(values, out_smem, out_gmem, lo, hi, row0, col0, tiling)
    else:
        wm, wn = tiling.wg_tile
        combine_owned_rows(values, out_smem, dest_gmem, out_gmem, lo, hi, row0, col0,
                           tile_m=wm, tile_n=wn, piece=tiling.out_tile[0])


def warpgroup_part(tiling: GmmTiling, wg, lo, hi, row0, col0):
    """A tile's ``(lo, hi, row0, col0)`` as seen by compute warpgroup ``wg``: its half of the
    rows (``split_rows``) or of the columns, or all of it (``pingpong``: the tile is its own)."""
    if tiling.pingpong:
        return lo, hi, row0, col0
    if tiling.split_rows:
        half = tiling.tile_m // 2
        return lo - wg * half, hi - wg * half, row0 + wg * half, col0
    return lo, hi, row0, col0 + wg * tiling.tile_n


def warpgroup_operands(tiling: GmmTiling, wg, a_smem, b_smem, transpose_rhs: bool):
    """The shared-memory operands of warpgroup ``wg``'s wgmma (all of them with ``pingpong``)."""
    if tiling.pingpong:
        return a_smem, b_smem
    if tiling.split_rows:
        half = tiling.tile_m // 2
        return a_smem.at[pl.ds(wg * half, half)], b_smem
    tn = tiling.tile_n
    return a_smem, (b_smem.at[pl.ds(wg * tn, tn)] if transpose_rhs
                    else b_smem.at[:, pl.ds(wg * tn, tn)])


def launch(kernel, tiles: RowTiles, lhs: jax.Array, rhs: jax.Array, out_shape, out_dtype,
           combine, interpret: bool) -> jax.Array | None:
    """Run a gmm kernel: returns its output, or None when it combined into ``combine[1]``."""
    if combine is not None:
        platform.warp_specialized_kernel(kernel, (), interpret=False)(*tiles, lhs, rhs, *combine)
        return None
    out_type = jax.ShapeDtypeStruct(out_shape, out_dtype)
    return platform.warp_specialized_kernel(kernel, out_type, interpret=interpret)(
        *tiles, lhs, rhs)


def check_tiles(k: int, n: int, tiling: GmmTiling, combine, interpret: bool) -> None:
    """Tiles that cover the [*, k] @ [k, n] product exactly; the combining epilogue
    (``gmm_combine_mgpu``) runs compiled, with square pieces."""
    if k % tiling.tile_k or n % tiling.block_n:
        raise ValueError(f"gmm tiles of {tiling.tile_k} x {tiling.block_n} do not divide "
                         f"K={k}, N={n}; use grouped_matmul.gmm_tiling")
    if tiling.split_rows and (tiling.pingpong or tiling.tile_m % 128):
        raise ValueError("split_rows needs the cooperative schedule and tile_m a multiple of "
                         f"128; got tile_m={tiling.tile_m}, pingpong={tiling.pingpong}")
    (wm, wn), (em, en) = tiling.wg_tile, tiling.out_tile
    if wm % em or wn % en:
        raise ValueError(f"output pieces of {em} x {en} (epi_tile) do not divide a warpgroup's "
                         f"{wm} x {wn} tile; use grouped_matmul.gmm_tiling")
    if combine is not None and (interpret or tiling.out_tile[0] != tiling.out_tile[1]):
        raise ValueError("the combining grouped matmul runs compiled only, with square "
                         "output pieces (epi_tile)")


def gmm_call(
    lhs: jax.Array,
    rhs: jax.Array,
    tiles: RowTiles,
    *,
    out_dtype,
    tiling: GmmTiling,
    transpose_rhs: bool,
    interpret: bool,
    fill_tail: bool = True,
    combine: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array | None:
    """Run the kernel: lhs [M, K] (M >= tile_m, a multiple of 8), rhs [G, K, N] or [G, N, K].
    Rows past the last group are zeros, or left unwritten without ``fill_tail``.

    ``combine=(dest [M] int32, out)``: instead, add each row of a group into the float32 ref
    ``out[dest[row]]`` (``gmm_combine_mgpu``; GPU only, ``out`` zeroed; returns None)."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk = tiling.tile_m, tiling.tile_k
    wm, wn = tiling.wg_tile
    bn = tiling.block_n
    n_iters, k_iters = n // bn, k // tk
    transforms = _smem_transforms(tk, lhs.dtype)
    rhs_block = (bn, tk) if transpose_rhs else (tk, bn)
    rhs_index = (lambda kk: (0, kk)) if transpose_rhs else (lambda kk: (kk, 0))

    if tiling.chain and k_iters % tiling.stages:
        raise ValueError(f"chained tiles need (K / tile_k) % stages == 0; got K / tile_k = "
                         f"{k_iters} and {tiling.stages} stages")

    def pipeline(body, compute_context, state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=transforms,
                                memory_space=plgpu.SMEM),
                plgpu.BlockSpec(rhs_block, rhs_index, transforms=transforms,
                                memory_space=plgpu.SMEM),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=tiling.stages,
            compute_context=compute_context,
            pipeline_state=state,
        )

    check_tiles(k, n, tiling, combine, interpret)

    def kernel(group_ref, row0_ref, lo_ref, hi_ref, count_ref, live_ref,
               lhs_gmem, rhs_gmem, *out_refs):
        dest_gmem, out_gmem = out_refs if combine is not None else (None, out_refs[0])
        def ignore(*_, **__):
            return None

        rhs_view = rhs_gmem.at[0]

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore).get_allocations(lhs_gmem, rhs_view),
            out_smem=output_staging(tiling, out_dtype, combine),
            **interpret_scratch(interpret, (wm, tk), (tk, wn), lhs.dtype),
            collective_axes="wg",
        )
        def _scope(allocs, out_smem, scratch):
            wg = lax.axis_index("wg")
            live = live_ref[0]

            def write(values, ti, ni):
                part = warpgroup_part(tiling, wg, lo_ref[ti], hi_ref[ti],
                                      first_row(row0_ref, ti), ni * bn)
                write_tile(values, out_smem.at[wg], out_gmem, dest_gmem, *part, tiling)

            def matmul(ti, ni, state):
                def compute_context(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((wm, wn), jnp.float32))
                    def _acc(acc):
                        eval_pipeline(acc)
                        write(acc[...], ti, ni)

                def step(_, a_smem, b_smem, acc):
                    a, b = warpgroup_operands(tiling, wg, a_smem, b_smem, transpose_rhs)
                    mma(acc, a, b, transpose_a=False, transpose_b=transpose_rhs,
                        scratch=scratch and (scratch[0].at[wg], scratch[1].at[wg]))
                    return acc

                rhs_g = (rhs_gmem.at[group_ref[ti], pl.ds(ni * bn, bn)] if transpose_rhs
                         else rhs_gmem.at[group_ref[ti], :, pl.ds(ni * bn, bn)])
                pipeline(step, compute_context, state)(
                    lhs_gmem.at[pl.ds(first_row(row0_ref, ti), tm)], rhs_g, allocations=allocs
                )

            @plgpu.nd_loop((live * n_iters,), collective_axes="sm")
            def _tile(info):
                ti, ni = plgpu.planar_snake(
                    info.index[0], (live, n_iters), 1, tiling.grid_tile_width
                )
                if not tiling.chain:
                    matmul(ti, ni, None)
                    return
                first = info.local_index == 0
                last = info.local_index == info.num_local_steps - 1

                @pl.when(first & last)
                def _alone():
                    matmul(ti, ni, None)

                @pl.when(jnp.logical_not(first & last))
                def _chained():
                    state = jnp.where(first, int(plgpu.PipelinePipeline.START),
                                      jnp.where(last, int(plgpu.PipelinePipeline.STOP),
                                                int(plgpu.PipelinePipeline.STEADY)))
                    matmul(ti, ni, state)

            if not fill_tail or combine is not None:
                return

            @plgpu.nd_loop(((count_ref[0] - live) * n_iters,), collective_axes="sm")
            def _zero_tile(info):
                ti = live + info.index[0] // n_iters

                @pl.when(wg < 2)
                def _zeros():
                    write(jnp.zeros((wm, wn), jnp.float32), ti, info.index[0] % n_iters)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return launch(kernel, tiles, lhs, rhs, (m, n), out_dtype, combine, interpret)
