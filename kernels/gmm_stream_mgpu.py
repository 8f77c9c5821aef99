"""Grouped matmul on Hopper with one stream of stages across a block's tiles, and a wgmma left
in flight: the same product and row-tile schedule as ``gmm_mgpu``
(``out[rows of g] = lhs[rows of g] @ rhs[g]``), with a hand-written warp-specialised pipeline
instead of JAX's ``emit_pipeline_warp_specialized``.

The memory warpgroup streams every tile's ``lhs`` and ``rhs`` k-steps, in tile order, through
one ring of shared-memory stages that never restarts (any stage count; ``gmm_mgpu`` can chain
tiles only when the stage count divides ``K / tile_k``). Each compute warpgroup keeps one wgmma
in flight (``wgmma_wait(1)``) and releases a stage once the wgmma after it is issued. Two
schedules of the compute warpgroups:

* cooperative (``pingpong=False``): both work on every ``tile_m x 2*tile_n`` tile, one half of
  its rows each (``split_rows``, sharing the ``rhs`` stage) or of its columns (sharing ``lhs``);
* ping-pong (``pingpong=True``): the block's tiles, ``tile_m x tile_n`` each, alternate between
  them — warpgroup ``j % 2`` computes the ``j``-th alone, so one warpgroup's output write
  overlaps the other's k-steps (CUTLASS's "ping-pong" Hopper schedule). A stage's "loaded"
  barriers are then per owner (``owner * stages + slot``): Mosaic GPU tracks a barrier's phase
  per thread, so a warpgroup must see every phase of each barrier it waits on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.gmm_mgpu import (
    GmmTiling,
    _smem_transforms,
    check_tiles,
    interpret_scratch,
    launch,
    mma,
    output_staging,
    warpgroup_operands,
    warpgroup_part,
    write_tile,
)
from kernels.schedule import RowTiles, first_row


def gmm_stream_call(
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
    """Run the kernel: lhs [M, K] (M >= tile_m, a multiple of 8), rhs [G, K, N] or [G, N, K]. Rows
    past the last group are zeros, or left unwritten without ``fill_tail``.

    ``combine=(dest [M] int32, out)``: instead, add each row of a group into the float32 ref
    ``out[dest[row]]`` (``gmm_combine_mgpu``; GPU only, ``out`` zeroed; returns None)."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    check_tiles(k, n, tiling, combine, interpret)
    tm, tk, stages = tiling.tile_m, tiling.tile_k, tiling.stages
    wm, wn = tiling.wg_tile
    pingpong = tiling.pingpong
    tile_cols = tiling.block_n  # columns of one tile
    n_iters, k_iters = n // tile_cols, k // tk
    transforms = _smem_transforms(tk, lhs.dtype)
    b_tile = (tile_cols, tk) if transpose_rhs else (tk, tile_cols)
    owners = 2 if pingpong else 1  # sets of "loaded" barriers

    def kernel(group_ref, row0_ref, lo_ref, hi_ref, count_ref, live_ref, lhs_gmem, rhs_gmem,
               *refs):
        dest_gmem = refs[0] if combine is not None else None
        (out_gmem, a_smem, b_smem, out_smem, a_loaded, b_loaded, consumed,
         scratch) = refs[combine is not None:]
        wg = lax.axis_index("wg")
        live = live_ref[0]

        def tiles_loop(body):
            """This block's tiles in order; ``body(j, ti, ni, step)`` with ``j`` the local
            tile index and ``step`` the ring step of the tile's first k-step."""

            def tile(info, carry):
                ti, ni = plgpu.planar_snake(info.index[0], (live, n_iters), 1,
                                            tiling.grid_tile_width)
                body(info.local_index, ti, ni, carry)
                return carry + k_iters

            return plgpu.nd_loop((live * n_iters,), collective_axes="sm",
                                 init_carry=jnp.int32(0))(tile)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def fetch_tile(j, ti, ni, step0):
                owner = lax.rem(j, 2) if pingpong else 0
                row0 = first_row(row0_ref, ti)
                g = group_ref[ti]

                @pl.loop(0, k_iters)
                def _fetch(kk):
                    step = step0 + kk
                    slot = lax.rem(step, stages)

                    @pl.when(step >= stages)
                    def _wait_free():
                        plgpu.barrier_wait(consumed.at[slot])

                    plgpu.copy_gmem_to_smem(lhs_gmem.at[pl.ds(row0, tm), pl.ds(kk * tk, tk)],
                                            a_smem.at[slot], a_loaded.at[owner * stages + slot])
                    cols = pl.ds(ni * tile_cols, tile_cols)
                    rhs_tile = (rhs_gmem.at[g, cols, pl.ds(kk * tk, tk)] if transpose_rhs
                                else rhs_gmem.at[g, pl.ds(kk * tk, tk), cols])
                    plgpu.copy_gmem_to_smem(rhs_tile, b_smem.at[slot],
                                            b_loaded.at[owner * stages + slot])

            fetched = tiles_loop(fetch_tile)

            @pl.loop(jnp.maximum(fetched - stages, 0), fetched)
            def _drain(step):  # observe the last releases, so no barrier phase goes unseen
                plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])

        def write(values, ti, ni):
            part = warpgroup_part(tiling, wg, lo_ref[ti], hi_ref[ti], first_row(row0_ref, ti),
                                  ni * tile_cols)
            write_tile(values, out_smem.at[wg], out_gmem, dest_gmem, *part, tiling)

        def my_tile(j):
            return lax.rem(j, 2) == wg if pingpong else True

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            barriers = (wg if pingpong else 0) * stages

            def compute_tile(j, ti, ni, step0):
                def run(acc):
                    @pl.loop(0, k_iters)
                    def _kstep(kk):
                        slot = lax.rem(step0 + kk, stages)
                        plgpu.barrier_wait(a_loaded.at[barriers + slot])
                        plgpu.barrier_wait(b_loaded.at[barriers + slot])
                        a, b = warpgroup_operands(tiling, wg, a_smem.at[slot], b_smem.at[slot],
                                                  transpose_rhs)
                        mma(acc, a, b, transpose_a=False,
                            transpose_b=transpose_rhs, wait=False,
                            scratch=scratch and (scratch[0].at[wg], scratch[1].at[wg]))
                        plgpu.wgmma_wait(1)  # the previous k-step's wgmma is done

                        @pl.when(kk > 0)
                        def _release_previous():
                            plgpu.barrier_arrive(consumed.at[lax.rem(step0 + kk - 1, stages)])

                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(consumed.at[lax.rem(step0 + k_iters - 1, stages)])
                    write(acc[...], ti, ni)

                pl.when(my_tile(j))(
                    lambda: pl.run_scoped(run, plgpu.ACC((wm, wn), jnp.float32)))

            tiles_loop(compute_tile)

            if fill_tail and combine is None:
                @plgpu.nd_loop(((count_ref[0] - live) * n_iters,), collective_axes="sm")
                def _zero_tile(info):
                    @pl.when(my_tile(info.local_index))
                    def _zeros():
                        write(jnp.zeros((wm, wn), jnp.float32), live + info.index[0] // n_iters,
                              info.index[0] % n_iters)

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def entry(*refs):
        pl.run_scoped(
            lambda *scoped: kernel(*refs, *scoped),
            plgpu.SMEM((stages, tm, tk), lhs.dtype, transforms=transforms),
            plgpu.SMEM((stages, *b_tile), rhs.dtype, transforms=transforms),
            output_staging(tiling, out_dtype, combine),
            plgpu.Barrier(num_barriers=owners * stages),
            plgpu.Barrier(num_barriers=owners * stages),
            plgpu.Barrier(num_arrivals=1 if pingpong else 2, num_barriers=stages),
            interpret_scratch(interpret, (wm, tk), (tk, wn), lhs.dtype)["scratch"],
            collective_axes="wg",
        )

    return launch(entry, tiles, lhs, rhs, (m, n), out_dtype, combine, interpret)
