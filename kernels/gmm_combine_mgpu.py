"""The Occult pre-combine as the epilogue of a grouped matmul (Pallas Mosaic GPU, Hopper):
``out[dest[i]] += lhs[i] @ rhs[g(i)]`` in float32, one output row per received token row.

``gmm_mgpu.gmm_call(..., combine=(dest, out))`` runs the usual persistent warp-specialised
grouped matmul, but instead of storing a tile's rows in item order each compute warpgroup
stages its float32 result in shared memory in 64 × 64 pieces and adds every owned row into
``out[dest[row]]`` with vectorised global reductions (``red.global.add.v4.f32``, sm_90): the
items of one received row sit in different experts' groups, computed by different blocks, so
their sum is formed in L2. The summation order of a row's items is therefore not fixed (float32
adds, at most min(k, E/N) terms per row). ``out`` must start zeroed.

Pallas has no scattered-row store (Hopper's TMA cannot scatter rows), so the reductions are
issued through ``plgpu.inline_mgpu``; the Mosaic GPU interpreter cannot run that, so this path
is GPU-only (``occult_matmul.gmm_combine`` falls back to ``gmm`` + a segment-sum elsewhere).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

WARPGROUP = 128
VECTOR = 4  # float32 lanes of one red.global.add.v4.f32


def staging(piece: int):
    """Shared memory for the two compute warpgroups' staged float32 pieces (row-major; a
    128B-swizzled piece, which avoids bank conflicts on the register stores, measured the same
    on an H200: docs/benchmarks.md)."""
    return plgpu.SMEM((2, piece, piece), jnp.float32)


def _add_rows_op(piece_rows: int, piece_cols: int, out_cols: int):
    """An inline Mosaic GPU op for one warpgroup: for rows ``r`` in ``[lo, hi)`` of the staged
    float32 piece ``[piece_rows, piece_cols]``, ``out[dest[row0 + r], col0:col0 + piece_cols]
    += piece[r]``. Every thread moves 16-byte chunks; a barrier before makes the warpgroup's
    staging stores visible, one after lets the piece be overwritten."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, memref
    from jax.experimental.mosaic.gpu import utils

    chunks = piece_cols // VECTOR  # 16-byte chunks per row
    rows_per_pass = WARPGROUP // chunks
    if WARPGROUP % chunks or piece_rows % rows_per_pass:
        raise ValueError(f"combine pieces of {piece_rows} x {piece_cols} do not split into "
                         f"{WARPGROUP} threads of {VECTOR} floats")

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType(),
                                  plgpu.Layout.WG_SPLAT, plgpu.Layout.WG_SPLAT,
                                  plgpu.Layout.WG_SPLAT, plgpu.Layout.WG_SPLAT))
    def add_rows(ctx, dest_ref, piece_ref, out_ref, row0, lo, hi, col0):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        i64 = ir.IntegerType.get_signless(64)
        f32 = ir.F32Type.get()
        vec = ir.VectorType.get((VECTOR,), f32)
        c32 = lambda v: utils.c(v, i32)

        def scalar(x):
            v = x.registers.flat[0]
            return v if v.type == i32 else arith.index_cast(i32, v)

        row0, lo, hi, col0 = map(scalar, (row0, lo, hi, col0))
        utils.warpgroup_barrier()  # the warpgroup's staging stores are visible
        t = arith.remui(utils.thread_idx(), c32(WARPGROUP))
        chunk = arith.remui(t, c32(chunks))
        row_in_pass = arith.divui(t, c32(chunks))
        out_base = llvm.addrspacecast(llvm.PointerType.get(address_space=1),
                                      utils.memref_ptr(out_ref))
        piece_base = utils.memref_ptr(piece_ref)
        col = arith.addi(col0, arith.muli(chunk, c32(VECTOR)))
        loaded = []
        for p in range(piece_rows // rows_per_pass):  # all loads first, then the reductions
            r = arith.addi(row_in_pass, c32(p * rows_per_pass))
            owned = arith.andi(arith.cmpi(arith.CmpIPredicate.sge, r, lo),
                               arith.cmpi(arith.CmpIPredicate.slt, r, hi))
            dest = memref.load(dest_ref, [arith.index_cast(ir.IndexType.get(),
                                                           arith.addi(row0, r))])
            dest = arith.select(owned, dest, c32(0))  # rows outside [lo, hi) add nothing
            values = llvm.load(vec, utils.getelementptr(
                piece_base, [arith.addi(arith.muli(r, c32(piece_cols)),
                                        arith.muli(chunk, c32(VECTOR)))], f32))
            offset = arith.addi(arith.muli(arith.extui(i64, dest), utils.c(out_cols, i64)),
                                arith.extui(i64, col))
            loaded.append((owned, utils.getelementptr(out_base, [offset], f32), values))
        for owned, ptr, values in loaded:
            lanes = [llvm.extractelement(values, c32(j)) for j in range(VECTOR)]
            llvm.inline_asm(
                ir.Type.parse("!llvm.void"), [arith.extui(i32, owned), ptr, *lanes],
                "{ .reg .pred p; setp.ne.b32 p, $0, 0; "
                "@p red.relaxed.gpu.global.add.v4.f32 [$1], {$2, $3, $4, $5}; }",
                "r,l,f,f,f,f", has_side_effects=True)
        utils.warpgroup_barrier()  # every thread has read the piece

    return add_rows


def combine_owned_rows(values: jax.Array, piece_ref, dest_gmem, out_gmem, lo, hi, row0, col0,
                       *, tile_m: int, tile_n: int, piece: int) -> None:
    """Add rows ``[lo, hi)`` of a warpgroup's ``tile_m x tile_n`` float32 result ``values`` into
    ``out_gmem[dest_gmem[row0 + r], col0:]``, staged through ``piece_ref`` [piece, piece]."""
    add_rows = _add_rows_op(piece, piece, out_gmem.shape[1])
    for r in range(tile_m // piece):
        sub_lo = jnp.clip(lo - r * piece, 0, piece)
        sub_hi = jnp.clip(hi - r * piece, 0, piece)

        @pl.when(sub_hi > sub_lo)
        def _rows(r=r, sub_lo=sub_lo, sub_hi=sub_hi):
            for c in range(tile_n // piece):
                piece_ref[...] = values[r * piece:(r + 1) * piece, c * piece:(c + 1) * piece]
                add_rows(dest_gmem, piece_ref, out_gmem, row0 + r * piece, sub_lo, sub_hi,
                         col0 + c * piece)
