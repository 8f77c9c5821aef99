"""Gathered grouped matmul on Hopper (Pallas Mosaic GPU): ``out[i] = x[rows[i]] @ rhs[g(i)]``.

The first expert matmul of the Occult FFN: item ``i`` (sorted by expert) reads its row of the
deduplicated receive buffer ``x`` through ``rows``, so no k-expanded copy is materialised.
Hopper's TMA cannot gather rows into a swizzled tile (a 128B-swizzled destination must be a
whole 1024-byte swizzle atom, 8 rows), so the memory warpgroup gathers each lhs tile with
``cp.async`` — 16 bytes per thread and copy, written straight to their swizzled place — and
each thread's ``cp.async.mbarrier.arrive.noinc`` tells the stage's mbarrier when its copies
have landed; the weight tile comes by TMA as in ``gmm``. Like ``tgmm``, one stream of stages
runs across a block's tiles; two compute warpgroups issue wgmma on their halves of the tile
(rows with ``split_rows``, else columns) and write the rows their group owns.

Pallas exposes neither ``cp.async`` nor raw mbarriers, so both are reached through
``plgpu.inline_mgpu``. The Mosaic GPU interpreter cannot run that: this kernel is GPU-only
(``occult_matmul.gather_gmm`` gathers with XLA and calls ``gmm`` elsewhere).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import platform
from kernels.gmm_mgpu import (
    GmmTiling,
    _smem_transforms,
    check_tiles,
    output_staging,
    warpgroup_operands,
    warpgroup_part,
    write_owned_rows,
)
from kernels.schedule import RowTiles, first_row

WARPGROUP = 128
CHUNK_BYTES = 16  # one cp.async


def gather_rows_cp_async(tile_rows: int, row_bytes: int, x_row_stride: int, transforms):
    """An inline Mosaic GPU op: the warpgroup copies ``x[rows[r], :]`` (``row_bytes`` wide, a
    multiple of 128) for the ``tile_rows`` rows of ``rows`` into a shared tile laid out as
    ``transforms`` (8-row x 128-byte swizzled tiles, row-major over the tile grid); each thread
    has the mbarrier at ``bar_ref`` count its arrival once its copies land
    (``cp.async.mbarrier.arrive.noinc``: the barrier expects one arrival per thread)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, memref, nvvm
    from jax.experimental.mosaic.gpu import utils

    swizzle_bytes = 128
    col_tiles = row_bytes // swizzle_bytes
    chunks = row_bytes // CHUNK_BYTES
    rows_per_pass = WARPGROUP // chunks
    if row_bytes % swizzle_bytes or not rows_per_pass or tile_rows % rows_per_pass:
        raise ValueError(f"cp.async gathers need rows of a multiple of {swizzle_bytes} bytes, "
                         f"at most {WARPGROUP * CHUNK_BYTES}, and tiles of whole passes; got "
                         f"{row_bytes}-byte rows, {tile_rows} rows")

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType(transforms),
                                  plgpu.RefType()))
    def gather(ctx, rows_ref, x_ref, tile_ref, bar_ref):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        i64 = ir.IntegerType.get_signless(64)
        i8 = ir.IntegerType.get_signless(8)
        c32 = lambda v: utils.c(v, i32)
        t = arith.remui(utils.thread_idx(), c32(WARPGROUP))
        chunk = arith.remui(t, c32(chunks))
        row_in_pass = arith.divui(t, c32(chunks))
        col_tile = arith.divui(chunk, c32(8))
        chunk_in_tile = arith.remui(chunk, c32(8))
        x_base = llvm.addrspacecast(llvm.PointerType.get(address_space=1),
                                    utils.memref_ptr(x_ref))
        tile_base = utils.memref_ptr(tile_ref)
        for p in range(tile_rows // rows_per_pass):
            r = arith.addi(row_in_pass, c32(p * rows_per_pass))
            src_row = memref.load(rows_ref, [arith.index_cast(ir.IndexType.get(), r)])
            src_byte = arith.addi(
                arith.muli(arith.extui(i64, src_row), utils.c(x_row_stride, i64)),
                arith.extui(i64, arith.muli(chunk, c32(CHUNK_BYTES))))
            # 8-row swizzle tiles, row-major: tile (r // 8, col_tile), then row r % 8 of it;
            # 128B swizzle: the 16-byte chunk c of row r sits at chunk c ^ (r % 8) of its row.
            swizzled = arith.xori(chunk_in_tile, arith.remui(r, c32(8)))
            swizzle_tile = arith.addi(arith.muli(arith.divui(r, c32(8)), c32(col_tiles)),
                                      col_tile)
            dst_byte = arith.addi(
                arith.addi(arith.muli(swizzle_tile, c32(8 * swizzle_bytes)),
                           arith.muli(arith.remui(r, c32(8)), c32(swizzle_bytes))),
                arith.muli(swizzled, c32(CHUNK_BYTES)))
            nvvm.cp_async_shared_global(
                utils.getelementptr(tile_base, [dst_byte], i8),
                utils.getelementptr(x_base, [src_byte], i8),
                CHUNK_BYTES, nvvm.LoadCacheModifierKind.CG)
        nvvm.cp_async_mbarrier_arrive(utils.memref_ptr(bar_ref), noinc=True)

    return gather


def init_mbarriers(bars, count: int):
    """One thread initialises ``bars`` (pairs of uint32, one mbarrier each) to expect ``count``
    arrivals; then the whole block synchronises. Every warpgroup must call this."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import gpu, nvvm
    from jax.experimental.mosaic.gpu import utils

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
    def init(ctx, ref):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        i64 = ir.IntegerType.get_signless(64)
        base = utils.memref_ptr(ref)
        first = utils.single_thread_predicate(utils.ThreadSubset.BLOCK)
        for i in range(ir.MemRefType(ref.type).shape[0] // 2):
            nvvm.mbarrier_init(utils.getelementptr(base, [i], i64), utils.c(count, i32),
                               predicate=first)
        gpu.barrier()

    init(bars)


def wait_mbarrier(bar, parity):
    """Wait for phase ``parity`` of the mbarrier ``bar`` (two uint32), then fence the generic
    proxy writes it covered (cp.async) against the async proxy (wgmma)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, nvvm
    from jax.experimental.mosaic.gpu import utils

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.Layout.WG_SPLAT))
    def wait(ctx, ref, par):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        p = par.registers.flat[0]
        nvvm.mbarrier_try_wait_parity(utils.memref_ptr(ref), p if p.type == i32 else
                                      arith.extui(i32, p), arith.constant(i32, 10000000))
        nvvm.fence_proxy(nvvm.ProxyKind.async_shared, space=nvvm.SharedSpace.shared_cta)

    wait(bar, parity)


def gather_gmm_call(
    x: jax.Array,
    rows: jax.Array,
    rhs: jax.Array,
    tiles: RowTiles,
    *,
    out_dtype,
    tiling: GmmTiling,
    fill_tail: bool = True,
) -> jax.Array:
    """``x [T, K]``, ``rows [M]`` (M >= tile_m a multiple of 8, rows of x), ``rhs [G, K, N]``.
    Rows past the last group are zeros, or left unwritten without ``fill_tail``."""
    k = x.shape[1]
    m = rows.shape[0]
    n = rhs.shape[2]
    tm, tk, bn = tiling.tile_m, tiling.tile_k, tiling.block_n
    wm, wn = tiling.wg_tile
    if tk * x.dtype.itemsize != 128:
        raise ValueError("the gathered matmul copies 128-byte rows: tile_k must be 64 (16-bit)")
    if tiling.pingpong:
        raise ValueError("the gathered matmul runs cooperative tiles; use pingpong=False")
    check_tiles(k, n, tiling, None, interpret=False)
    n_iters, k_iters = n // bn, k // tk
    stages = tiling.stages
    transforms = _smem_transforms(tk, x.dtype)
    gather = gather_rows_cp_async(tm, tk * x.dtype.itemsize, k * x.dtype.itemsize, transforms)

    def kernel(group_ref, row0_ref, lo_ref, hi_ref, count_ref, live_ref, rows_gmem, x_gmem,
               rhs_gmem, out_gmem, a_smem, b_smem, out_smem, gathered, b_ready, consumed):
        wg = lax.axis_index("wg")
        live = live_ref[0]
        init_mbarriers(gathered, WARPGROUP)

        def tiles_loop(body):
            def tile(info, carry):
                ti, ni = plgpu.planar_snake(info.index[0], (live, n_iters), 1,
                                            tiling.grid_tile_width)
                return body(ti, ni, carry)

            return plgpu.nd_loop((live * n_iters,), collective_axes="sm",
                                 init_carry=jnp.int32(0))(tile)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def fetch_tile(ti, ni, step0):
                row0 = first_row(row0_ref, ti)
                g = group_ref[ti]

                def fetch(kk, step):
                    slot = lax.rem(step, stages)

                    @pl.when(step >= stages)
                    def _wait_free():
                        plgpu.barrier_wait(consumed.at[slot])

                    plgpu.copy_gmem_to_smem(
                        rhs_gmem.at[g, pl.ds(kk * tk, tk), pl.ds(ni * bn, bn)],
                        b_smem.at[slot], b_ready.at[slot])
                    gather(rows_gmem.at[pl.ds(row0, tm)], x_gmem.at[:, pl.ds(kk * tk, tk)],
                           a_smem.at[slot], gathered.at[pl.ds(2 * slot, 2)])

                    return step + 1

                return lax.fori_loop(0, k_iters, fetch, step0)

            fetched = tiles_loop(fetch_tile)

            @pl.loop(jnp.maximum(fetched - stages, 0), fetched)
            def _drain(step):  # observe the last releases, so no barrier phase goes unseen
                plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])

        def write(values, ti, ni):
            part = warpgroup_part(tiling, wg, lo_ref[ti], hi_ref[ti], first_row(row0_ref, ti),
                                  ni * bn)
            write_owned_rows(values, out_smem.at[wg], out_gmem, *part, tiling)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")

            def compute_tile(ti, ni, step0):
                def run(acc):
                    def kstep(kk, step):
                        slot = lax.rem(step, stages)
                        wait_mbarrier(gathered.at[pl.ds(2 * slot, 2)], lax.rem(step // stages, 2))
                        plgpu.barrier_wait(b_ready.at[slot])
                        plgpu.wgmma(acc, *warpgroup_operands(tiling, wg, a_smem.at[slot],
                                                             b_smem.at[slot], False))
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(consumed.at[slot])
                        return step + 1

                    step = lax.fori_loop(0, k_iters, kstep, step0)
                    write(acc[...], ti, ni)
                    return step

                return pl.run_scoped(run, plgpu.ACC((wm, wn), jnp.float32))

            tiles_loop(compute_tile)

            if fill_tail:
                @plgpu.nd_loop(((count_ref[0] - live) * n_iters,), collective_axes="sm")
                def _zero_tile(info):
                    ti = live + info.index[0] // n_iters
                    write(jnp.zeros((wm, wn), jnp.float32), ti, info.index[0] % n_iters)

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def entry(*refs):
        pl.run_scoped(
            lambda *scoped: kernel(*refs, *scoped),
            plgpu.SMEM((stages, tm, tk), x.dtype, transforms=transforms),
            plgpu.SMEM((stages, tk, bn), rhs.dtype, transforms=transforms),
            output_staging(tiling, out_dtype, None),
            plgpu.SMEM((2 * stages,), jnp.uint32),  # the gathers' mbarriers (8 bytes each)
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            collective_axes="wg",
        )

    call = platform.warp_specialized_kernel(
        entry, jax.ShapeDtypeStruct((m, n), out_dtype), interpret=False)
    return call(*tiles, rows, x, rhs)
