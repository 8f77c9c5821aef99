"""Transposed grouped matmul on Hopper (Pallas Mosaic GPU), the weight gradient of ``gmm``:
``out[g] = lhs[rows of g].T @ rhs[rows of g]`` for ``lhs [M, K]``, ``rhs [M, N]``.

A persistent kernel over (group, K tile, N tile) with a hand-written warp-specialised pipeline.
A tile's length is its group's row-block count, so tiles are dealt to the SMs longest first, in
a snake (``schedule.balanced_order``): in group order, skewed groups leave SMs idle at the end.
The memory warpgroup streams the ``tile_m``-row blocks of all of its block's tiles (a group's
blocks start at its first row: ``schedule.group_blocks``) through one ring of shared-memory
stages, without restarting per tile, so the next tile's first blocks arrive while the compute
warpgroups still write the current tile's output (JAX's ``emit_pipeline_warp_specialized``
cannot chain pipelines whose length is dynamic, and a group's block count is). Each compute
warpgroup zeroes the rows of the operand views it multiplies that are not the group's, in
blocks that are only partly its own (a neighbouring group's rows, or rows past the groups,
which may hold anything, NaN included; both write the same zeros into the block they share),
and accumulates ``lhs_block.T @ rhs_block`` with wgmma in float32. Empty groups write zeros.

The two compute warpgroups split a ``tile_k x 2*tile_n`` output tile by columns, sharing the
``lhs`` block, or with ``split_k`` a ``2*tile_k x tile_n`` tile by rows, sharing the ``rhs``
block: an output width that is an odd multiple of 128 (1408) gets 128-wide tiles that way
instead of 64-wide halves.

Either operand can instead be read through an index vector (``x[rows]``, the rows of Occult's
receive buffer that the items use): the memory warpgroup then gathers its blocks with
``cp.async`` as ``gather_gmm_mgpu`` does, and no item-order copy is materialised (GPU only).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import platform
from kernels.gather_gmm_mgpu import (
    WARPGROUP,
    gather_rows_cp_async,
    init_mbarriers,
    wait_mbarrier,
)
from kernels.gmm_mgpu import _smem_transforms, interpret_scratch, mma
from kernels.schedule import GroupBlocks, TileOrder, balanced_order, block_rows


@dataclasses.dataclass(frozen=True)
class TgmmTiling:
    """``tile_k x 2*tile_n`` output tiles (``2*tile_k x tile_n`` with ``split_k``), reduced
    over ``tile_m``-row blocks."""

    tile_m: int = 64
    tile_k: int = 128
    tile_n: int = 128
    stages: int = 4
    grid_tile_width: int = 8
    split_k: bool = False  # the warpgroups split the tile's rows, not its columns
    balance: bool = True  # longest tiles first, snaked over the SMs (schedule.balanced_order)
    group_aligned: bool = True  # row blocks start at their group's first row (schedule.py)

    @property
    def block_k(self) -> int:
        """Rows of an output tile (the lhs block's width)."""
        return 2 * self.tile_k if self.split_k else self.tile_k

    @property
    def block_n(self) -> int:
        """Columns of an output tile (the rhs block's width)."""
        return self.tile_n if self.split_k else 2 * self.tile_n


def tgmm_call(
    lhs: jax.Array,
    rhs: jax.Array,
    blocks: GroupBlocks,
    num_groups: int,
    *,
    out_dtype,
    tiling: TgmmTiling,
    interpret: bool,
    lhs_rows: jax.Array | None = None,
    rhs_rows: jax.Array | None = None,
) -> jax.Array:
    """Run the kernel: ``lhs [M, K]``, ``rhs [M, N]`` with M >= ``tile_m`` a multiple of 8.

    ``lhs_rows`` / ``rhs_rows`` [M] (GPU only): that operand is instead ``x [T, *]`` read as
    ``x[rows]``, gathered into shared memory by ``cp.async`` (``gather_gmm_mgpu``); every
    index must lie in ``[0, T)``."""
    gathered = {"lhs": lhs_rows is not None, "rhs": rhs_rows is not None}
    if any(gathered.values()) and interpret:
        raise ValueError("tgmm with gathered rows runs compiled only (inline cp.async)")
    m = (lhs_rows if gathered["lhs"] else rhs_rows if gathered["rhs"] else lhs).shape[0]
    k = lhs.shape[1]
    n = rhs.shape[1]
    tm, tk, tn = tiling.tile_m, tiling.tile_k, tiling.tile_n
    bk, bn = tiling.block_k, tiling.block_n
    if k % bk or n % bn:
        raise ValueError(f"tgmm tiles of {bk} x {bn} do not divide the [{k}, {n}] outputs; "
                         "use grouped_matmul.tgmm_tiling")
    k_iters, n_iters = k // bk, n // bn
    stages = tiling.stages
    lhs_transforms = _smem_transforms(bk, lhs.dtype)
    rhs_transforms = _smem_transforms(bn, rhs.dtype)
    out_transforms = _smem_transforms(tn, out_dtype)

    gather_lhs = gather_rows_cp_async(tm, bk * lhs.dtype.itemsize, k * lhs.dtype.itemsize,
                                      lhs_transforms) if gathered["lhs"] else None
    gather_rhs = gather_rows_cp_async(tm, bn * rhs.dtype.itemsize, n * rhs.dtype.itemsize,
                                      rhs_transforms) if gathered["rhs"] else None

    def load(src_gmem, rows_gmem, cols, smem, ready, gather, rows, slot):
        """One operand's block into stage ``slot``: by TMA, or gathered through its rows."""
        if gather is not None:
            gather(rows_gmem.at[rows], src_gmem.at[:, cols], smem.at[slot],
                   ready.at[pl.ds(2 * slot, 2)])
        else:
            plgpu.copy_gmem_to_smem(src_gmem.at[rows, cols], smem.at[slot], ready.at[slot])

    def wait_loaded(ready, gather, slot, step):
        if gather is not None:  # phase step // stages of the slot's cp.async mbarrier
            wait_mbarrier(ready.at[pl.ds(2 * slot, 2)], lax.rem(step // stages, 2))
        else:
            plgpu.barrier_wait(ready.at[slot])

    def kernel(start_ref, end_ref, base_ref, nblocks_ref, order_group_ref, order_tile_ref,
               lhs_rows_gmem, rhs_rows_gmem, lhs_gmem, rhs_gmem, out_gmem,
               lhs_smem, rhs_smem, out_smem, lhs_ready, rhs_ready, consumed, scratch):
        wg = lax.axis_index("wg")
        for operand, ready in (("lhs", lhs_ready), ("rhs", rhs_ready)):
            if gathered[operand]:  # every warpgroup takes part
                init_mbarriers(ready, WARPGROUP)

        def group_rows(g):
            """Block r of group g → (row read from, [lo, hi) of it that are the group's)."""
            base, start, end = base_ref[g], start_ref[g], end_ref[g]  # loaded once per tile
            return lambda r: block_rows(base, r, start, end, m, tm)

        def tiles(body):
            """Loop over this block's (group, K tile, N tile) with a running block count."""

            def tile(info, carry):
                i = info.index[0]
                ki, ni = plgpu.planar_snake(
                    order_tile_ref[i], (k_iters, n_iters), 1, tiling.grid_tile_width
                )
                return body(order_group_ref[i], ki, ni, carry)

            return plgpu.nd_loop((num_groups * k_iters * n_iters,), collective_axes="sm",
                                 init_carry=jnp.int32(0))(tile)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def fetch_tile(g, ki, ni, step0):
                rows_of = group_rows(g)

                def fetch(r, step):
                    slot = lax.rem(step, stages)

                    @pl.when(step >= stages)
                    def _wait_free():
                        plgpu.barrier_wait(consumed.at[slot])

                    row0, _, _ = rows_of(r)
                    rows = pl.ds(row0, tm)
                    operands = [(lhs_gmem, lhs_rows_gmem, pl.ds(ki * bk, bk), lhs_smem,
                                 lhs_ready, gather_lhs),
                                (rhs_gmem, rhs_rows_gmem, pl.ds(ni * bn, bn), rhs_smem,
                                 rhs_ready, gather_rhs)]
                    # TMA copies first: a gather waits for its index loads before it can issue
                    for operand in sorted(operands, key=lambda o: o[-1] is not None):
                        load(*operand, rows, slot)
                    return step + 1

                return lax.fori_loop(0, nblocks_ref[g], fetch, step0)

            fetched = tiles(fetch_tile)

            @pl.loop(jnp.maximum(fetched - stages, 0), fetched)
            def _drain(step):  # observe the last releases, so no barrier phase goes unseen
                plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")

            def reduce_tile(g, ki, ni, step0):
                nblocks = nblocks_ref[g]
                rows_of = group_rows(g)

                def reduce(acc):
                    def block(r, step):
                        slot = lax.rem(step, stages)
                        wait_loaded(lhs_ready, gather_lhs, slot, step)
                        wait_loaded(rhs_ready, gather_rhs, slot, step)
                        if tiling.split_k:  # this warpgroup's rows of the tile
                            a, b = lhs_smem.at[slot, :, pl.ds(wg * tk, tk)], rhs_smem.at[slot]
                        else:  # this warpgroup's columns of the tile
                            a, b = lhs_smem.at[slot], rhs_smem.at[slot, :, pl.ds(wg * tn, tn)]

                        _, lo, hi = rows_of(r)

                        @pl.when((lo > 0) | (hi < tm))
                        def _mask():  # rows of other groups, or undefined rows past them
                            def keep(cols):
                                row = lax.broadcasted_iota(jnp.int32, (tm, cols), 0)
                                if not interpret:  # the interpreter has no layouts
                                    row = plgpu.layout_cast(row, plgpu.Layout.WGMMA)
                                return (row >= lo) & (row < hi)

                            # both operands (the shared one: both warpgroups write the same
                            # zeros): a NaN in one times a zeroed row of the other is NaN
                            b[...] = jnp.where(keep(tn), b[...], jnp.zeros_like(b[...]))
                            a[...] = jnp.where(keep(tk), a[...], jnp.zeros_like(a[...]))
                            plgpu.commit_smem()

                        mma(acc, a, b, transpose_a=True, transpose_b=False,
                            scratch=scratch and (scratch[0].at[wg], scratch[1].at[wg]))
                        plgpu.barrier_arrive(consumed.at[slot])
                        return step + 1

                    step = lax.fori_loop(0, nblocks, block, step0)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem[wg] = acc[...].astype(out_dtype)  # zeros for an empty group
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        out_smem.at[wg],
                        out_gmem.at[g, pl.ds(ki * bk + wg * (bk - tk), tk),
                                    pl.ds(ni * bn + wg * (bn - tn), tn)],
                    )
                    return step

                return pl.run_scoped(reduce, plgpu.ACC((tk, tn), jnp.float32))

            tiles(reduce_tile)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def entry(*refs):
        pl.run_scoped(
            lambda *scoped: kernel(*refs, *scoped),
            plgpu.SMEM((stages, tm, bk), lhs.dtype, transforms=lhs_transforms),
            plgpu.SMEM((stages, tm, bn), rhs.dtype, transforms=rhs_transforms),
            plgpu.SMEM((2, tk, tn), out_dtype, transforms=out_transforms),
            *(plgpu.SMEM((2 * stages,), jnp.uint32) if gathered[operand]  # raw mbarriers
              else plgpu.Barrier(num_barriers=stages) for operand in ("lhs", "rhs")),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            interpret_scratch(interpret, (tk, tm), (tm, tn), lhs.dtype)["scratch"],
            collective_axes="wg",
        )

    call = platform.warp_specialized_kernel(
        entry, jax.ShapeDtypeStruct((num_groups, k, n), out_dtype), interpret=interpret)
    tiles_per_group = k_iters * n_iters
    if tiling.balance:
        order = balanced_order(blocks.num_blocks, tiles_per_group,
                               platform.num_sms(interpret))
    else:  # group by group
        step = jnp.arange(num_groups * tiles_per_group, dtype=jnp.int32)
        order = TileOrder(step // tiles_per_group, step % tiles_per_group)
    no_rows = jnp.zeros((1,), jnp.int32)  # a placeholder where an operand is not gathered
    return call(*blocks, *order, no_rows if lhs_rows is None else lhs_rows,
                no_rows if rhs_rows is None else rhs_rows, lhs, rhs)
