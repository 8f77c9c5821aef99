"""Transposed grouped matmul on Hopper (Pallas Mosaic GPU), the weight gradient of ``gmm``:
``out[g] = lhs[rows of g].T @ rhs[rows of g]`` for ``lhs [M, K]``, ``rhs [M, N]``.

A persistent kernel over (group, K tile, N tile). For each output tile, a warp-specialised
pipeline streams the group's ``tile_m``-row blocks; the two compute warpgroups zero the rows of
their half of the ``rhs`` tile that belong to a neighbouring group (first and last block only)
and accumulate ``lhs_tile.T @ rhs_tile`` with wgmma in float32. Empty groups write zeros.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import platform
from kernels.gmm_mgpu import _smem_transforms, interpret_scratch, mma
from kernels.schedule import GroupBlocks


@dataclasses.dataclass(frozen=True)
class TgmmTiling:
    """``tile_k x 2*tile_n`` output tiles, reduced over ``tile_m``-row blocks."""

    tile_m: int = 64
    tile_k: int = 128
    tile_n: int = 128
    stages: int = 4
    grid_tile_width: int = 8

    @property
    def block_n(self) -> int:
        return 2 * self.tile_n


def tgmm_call(
    lhs: jax.Array,
    rhs: jax.Array,
    blocks: GroupBlocks,
    num_groups: int,
    *,
    out_dtype,
    tiling: TgmmTiling,
    interpret: bool,
) -> jax.Array:
    """Run the kernel: ``lhs [M, K]``, ``rhs [M, N]`` with M a multiple of ``tile_m``."""
    m, k = lhs.shape
    n = rhs.shape[1]
    tm, tk, tn, bn = tiling.tile_m, tiling.tile_k, tiling.tile_n, tiling.block_n
    k_iters, n_iters = k // tk, n // bn
    lhs_transforms = _smem_transforms(tk, lhs.dtype)
    rhs_transforms = _smem_transforms(bn, rhs.dtype)
    out_transforms = _smem_transforms(tn, out_dtype)

    def pipeline(body, compute_context, num_blocks):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(num_blocks,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((tm, tk), lambda r: (r, 0), transforms=lhs_transforms,
                                memory_space=plgpu.SMEM),
                plgpu.BlockSpec((tm, bn), lambda r: (r, 0), transforms=rhs_transforms,
                                memory_space=plgpu.SMEM),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=tiling.stages,
            compute_context=compute_context,
        )

    def kernel(start_ref, end_ref, first_ref, nblocks_ref, lhs_gmem, rhs_gmem, out_gmem):
        def ignore(*_, **__):
            return None

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore, tiling.stages).get_allocations(
                lhs_gmem.at[:, pl.ds(0, tk)], rhs_gmem.at[:, pl.ds(0, bn)]
            ),
            out_smem=plgpu.SMEM((2, tk, tn), out_dtype, transforms=out_transforms),
            **interpret_scratch(interpret, (tk, tm), (tm, tn), lhs.dtype),
            collective_axes="wg",
        )
        def _scope(allocs, out_smem, scratch):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((num_groups, k_iters * n_iters), collective_axes="sm")
            def _tile(info):
                g = info.index[0]
                ki, ni = plgpu.planar_snake(
                    info.index[1], (k_iters, n_iters), 1, tiling.grid_tile_width
                )
                nblocks = nblocks_ref[g]
                row0 = first_ref[g] * tm
                lo = start_ref[g] - row0
                hi = end_ref[g] - row0

                def write(values):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem[wg] = values.astype(out_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        out_smem.at[wg],
                        out_gmem.at[g, pl.ds(ki * tk, tk), pl.ds(ni * bn + wg * tn, tn)],
                    )

                def compute_context(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((tk, tn), jnp.float32))
                    def _acc(acc):
                        eval_pipeline(acc)
                        write(acc[...])

                def step(idx, a_smem, b_smem, acc):
                    r = idx[0]
                    b = b_smem.at[:, pl.ds(wg * tn, tn)]

                    @pl.when((r == 0) | (r == nblocks - 1))
                    def _mask():
                        row = lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
                        if not interpret:  # the interpreter has no layouts
                            row = plgpu.layout_cast(row, plgpu.Layout.WGMMA)
                        row = row + r * tm
                        keep = (row >= lo) & (row < hi)
                        b[...] = jnp.where(keep, b[...], jnp.zeros_like(b[...]))
                        plgpu.commit_smem()

                    mma(acc, a_smem, b, transpose_a=True, transpose_b=False,
                        scratch=scratch and (scratch[0].at[wg], scratch[1].at[wg]))
                    return acc

                @pl.when(nblocks > 0)
                def _reduce():
                    # Views start at the group's first block; the pipeline reads only nblocks.
                    pipeline(step, compute_context, nblocks)(
                        lhs_gmem.at[pl.ds(row0, m), pl.ds(ki * tk, tk)],
                        rhs_gmem.at[pl.ds(row0, m), pl.ds(ni * bn, bn)],
                        allocations=allocs,
                    )

                @pl.when((nblocks == 0) & (wg < 2))
                def _zeros():
                    write(jnp.zeros((tk, tn), jnp.float32))

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid=(platform.num_sms(interpret),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup
        ),
        interpret=platform.interpret_params() if interpret else False,
    )
    return call(*blocks, lhs, rhs)
