"""Row-gathering grouped matmuls: the pieces of Occult's fused expert FFN (Pallas, Triton on GPU).

The work list is *items*: (received row, local expert) pairs laid out expert after expert, each
expert's items padded to a multiple of ``block_m`` (``plan.make_expert_plan(block=block_m)``), so
every block of ``block_m`` items belongs to one expert (``block_group``) and only the first
``used_blocks`` blocks hold items. ``item_row[i]`` is item i's row in the receive buffer, -1 for
padding. Nothing is copied into item order: rows are read through ``item_row`` and results are
added back through it.

* ``gather_swiglu``:      silu(x_i @ w_gate[g]) · (x_i @ w_up[g]) with x_i = x[item_row[i]],
                          one gather for both products                          [M, N]
* ``gather_matmul``:      x[item_row[i]] @ w[g] (w optionally read transposed)  [M, N] f32
* ``gather_swiglu_grad``: its backward through the weighted down matmul: gather_matmul of
                          d_out with w_downᵀ, then the SwiGLU and routing-weight gradients
                          (one XLA fusion)                                      [M, N] ×3, [M]
* ``matmul_scatter_add``: out[r] = Σ_{i: item_row[i] = r} scale[i] · Σ_t h_t[i] @ w_t[g(i)]
                                                                              [R, N] f32
* ``gather_tmatmul``:     dw[g] = Σ_{i in g} a_i^T · b_i, a and/or b read through item_row,
                          b optionally scaled per item                            [G, K, N]

Row gathers are per-thread pointer loads, which Mosaic GPU cannot express on Hopper (no TMA
gather before sm_100, no single-row slices of swizzled shared memory); the deprecated Triton
lowering can, so these kernels use it on GPUs. On CPU they run in the Pallas interpreter (tests).
The scatter-add uses float32 atomics: a row's ≤ min(k, E/N) terms are summed in an unspecified
order, so results may differ from run to run in the last bits.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels import platform
from kernels.swiglu import swiglu_f32, swiglu_grads_f32
from kernels.triton_launch import load_rows as _load_rows

MIN_TILE = 16  # smallest Triton dot operand edge
EPILOGUE_BYTES = 32 * 1024  # shared memory left to Triton beside the pipelined operand tiles


@dataclasses.dataclass(frozen=True)
class GatherTiling:
    # defaults: the best of the tilings tried on an H200 at the OLMoE shape (fwd+bwd)
    block_m: int = 128  # items per block; must equal the expert plan's block
    block_n: int = 128  # output columns per program
    block_k: int = 64  # contraction step
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < MIN_TILE or value & (value - 1):
                raise ValueError(f"GatherTiling.{name}={value} must be a power of two >= "
                                 f"{MIN_TILE} (Triton block shapes)")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1) or self.num_stages < 1:
            raise ValueError(f"GatherTiling: num_warps={self.num_warps} must be a power of two "
                             f"and num_stages={self.num_stages} >= 1")


def fit_tile(dim: int, preferred: int, what: str) -> int:
    """Largest power of two ≤ preferred (and ≥ MIN_TILE) dividing dim."""
    tile = preferred
    while tile >= MIN_TILE:
        if dim % tile == 0:
            return tile
        tile //= 2
    raise ValueError(f"the fused expert kernels need {what}={dim} to be a multiple of "
                     f"{MIN_TILE}; pad it or use expert_matmul='ragged_dot'")


def fit_stages(tiling: GatherTiling, stage_bytes: int) -> GatherTiling:
    """The tiling with no more pipeline stages than fit in shared memory, `stage_bytes` being
    the operand tiles one stage holds (float32 operands need about half as many)."""
    fit = max(1, (platform.SMEM_BYTES - EPILOGUE_BYTES) // stage_bytes)
    return dataclasses.replace(tiling, num_stages=min(tiling.num_stages, fit))


def fit(tiling: GatherTiling, *, k_dim: int, n: int, itemsize: int, stage_tiles,
        what: tuple[str, str] = ("K", "N")) -> GatherTiling:
    """The tiling fitted to one call: block_k dividing the contraction k_dim, block_n the
    output width n, and as many pipeline stages as shared memory holds, one stage being
    ``stage_tiles(block_m, block_k, block_n)`` operand elements of ``itemsize`` bytes."""
    bk = fit_tile(k_dim, tiling.block_k, what[0])
    bn = fit_tile(n, tiling.block_n, what[1])
    return fit_stages(dataclasses.replace(tiling, block_k=bk, block_n=bn),
                      stage_tiles(tiling.block_m, bk, bn) * itemsize)


def _call(kernel, grid, out_shape, tiling: GatherTiling, interpret: bool, aliases=None):
    params = None if interpret else plt.CompilerParams(num_warps=tiling.num_warps,
                                                       num_stages=tiling.num_stages)
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, interpret=interpret,
                          compiler_params=params, input_output_aliases=aliases or {})


def _dot(a, b, contract_a: int = 1, contract_b: int = 0):
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _times_weight_tile(a, w_ref, g, k0, n0, bk, bn, transpose_w: bool):
    """a [bm, bk] @ the [bk, bn] tile of w[g] at (k0, n0); w[g] is read as [N, K] when
    transpose_w (the product then contracts its second axis: no transpose is materialised)."""
    if transpose_w:
        return _dot(a, w_ref[g, pl.ds(n0, bn), pl.ds(k0, bk)], contract_b=1)
    return _dot(a, w_ref[g, pl.ds(k0, bk), pl.ds(n0, bn)])


def _gathered_products(item_row_ref, block_group_ref, used_ref, x_ref, w_refs, *,
                       tiling: GatherTiling, k_dim: int, transpose_w: bool):
    """This program's tile: its block's rows read through item_row, times each weight's
    column tile (one gather serves every product); float32 [bm, bn] each, and the tile's
    (rows, cols) slices. Zeros past used_blocks."""
    bm, bn, bk = tiling.block_m, tiling.block_n, tiling.block_k
    i, j = pl.program_id(0), pl.program_id(1)
    rows = item_row_ref[pl.ds(i * bm, bm)]
    valid = rows >= 0
    g = block_group_ref[i]
    # arithmetic, not jnp.where: JAX's Triton lowering types scalar select constants as the
    # predicate (i1), which breaks the loop bound
    steps = (i < used_ref[0]).astype(jnp.int32) * (k_dim // bk)

    def step(s, accs):
        a = _load_rows(x_ref, rows, valid, s * bk + jnp.arange(bk))
        return tuple(acc + _times_weight_tile(a, w_ref, g, s * bk, j * bn, bk, bn, transpose_w)
                     for acc, w_ref in zip(accs, w_refs, strict=True))

    zeros = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in w_refs)
    accs = jax.lax.fori_loop(0, steps, step, zeros)
    return accs, (pl.ds(i * bm, bm), pl.ds(j * bn, bn))


def _gather_swiglu_kernel(item_row_ref, block_group_ref, used_ref, x_ref, wg_ref, wu_ref,
                          *out_refs, tiling: GatherTiling, k_dim: int):
    (gate, up), tile = _gathered_products(item_row_ref, block_group_ref, used_ref, x_ref,
                                          (wg_ref, wu_ref), tiling=tiling, k_dim=k_dim,
                                          transpose_w=False)
    hidden_ref = out_refs[0]
    # from the pre-activations as stored, so the backward (which recomputes hidden from them)
    # differentiates exactly the function the forward evaluated
    gate = gate.astype(hidden_ref.dtype).astype(jnp.float32)
    up = up.astype(hidden_ref.dtype).astype(jnp.float32)
    hidden_ref[tile] = swiglu_f32(gate, up).astype(hidden_ref.dtype)
    if len(out_refs) == 3:  # the pre-activations, for the backward
        out_refs[1][tile] = gate.astype(out_refs[1].dtype)
        out_refs[2][tile] = up.astype(out_refs[2].dtype)


def gather_swiglu(x, w_gate, w_up, item_row, block_group, used_blocks, *,
                  save_preactivations: bool = False, tiling: GatherTiling = GatherTiling(),
                  interpret: bool = False) -> tuple[jax.Array, ...]:
    """hidden[i] = silu(x[item_row[i]] @ w_gate[g]) · (x[item_row[i]] @ w_up[g]), both products
    from one gathered tile; returns (hidden,) or, with save_preactivations, (hidden, gate, up).
    x [R, K]; w_gate, w_up [G, K, N]; outputs [M, N] in x's dtype (zeros for padding items)."""
    m, (k_dim, n) = item_row.shape[0], w_gate.shape[1:]
    tiling = fit(tiling, k_dim=k_dim, n=n, itemsize=x.dtype.itemsize,
                 stage_tiles=lambda bm, bk, bn: (bm + 2 * bn) * bk)  # x tile + two weight tiles
    kernel = functools.partial(_gather_swiglu_kernel, tiling=tiling, k_dim=k_dim)
    operands = platform.vary_together(item_row, block_group, used_blocks.reshape(1), x, w_gate,
                                      w_up)
    out_type = platform.out_struct((m, n), x.dtype, *operands)
    outs = 3 if save_preactivations else 1
    return tuple(_call(kernel, (m // tiling.block_m, n // tiling.block_n), (out_type,) * outs,
                       tiling, interpret)(*operands))


def _gather_matmul_kernel(item_row_ref, block_group_ref, used_ref, x_ref, w_ref, o_ref, *,
                          tiling: GatherTiling, k_dim: int, transpose_w: bool):
    (product,), tile = _gathered_products(item_row_ref, block_group_ref, used_ref, x_ref,
                                          (w_ref,), tiling=tiling, k_dim=k_dim,
                                          transpose_w=transpose_w)
    o_ref[tile] = product


def gather_matmul(x, w, item_row, block_group, used_blocks, *, transpose_w: bool = False,
                  tiling: GatherTiling = GatherTiling(), interpret: bool = False) -> jax.Array:
    """out[i] = x[item_row[i]] @ w[g(i)] in float32 [M, N] (zeros for padding items).
    x [R, K]; w [G, K, N], or [G, N, K] read transposed with transpose_w."""
    m, k_dim = item_row.shape[0], x.shape[1]
    n = w.shape[1] if transpose_w else w.shape[2]
    tiling = fit(tiling, k_dim=k_dim, n=n, itemsize=x.dtype.itemsize,
                 stage_tiles=lambda bm, bk, bn: (bm + bn) * bk)
    kernel = functools.partial(_gather_matmul_kernel, tiling=tiling, k_dim=k_dim,
                               transpose_w=transpose_w)
    operands = platform.vary_together(item_row, block_group, used_blocks.reshape(1), x, w)
    out_type = platform.out_struct((m, n), jnp.float32, *operands)
    return _call(kernel, (m // tiling.block_m, n // tiling.block_n), out_type, tiling,
                 interpret)(*operands)


def gather_swiglu_grad(d_out, w_down, gate, up, item_weight, item_row, block_group, used_blocks,
                       *, tiling: GatherTiling = GatherTiling(),
                       interpret: bool = False) -> tuple[jax.Array, ...]:
    """The SwiGLU + weighted pre-combine backward up to the down matmul's weight gradient.

    With g_i = d_out[item_row[i]] @ w_down[g]ᵀ (d_out [R, N], w_down [G, K, N]; a gathered
    matmul kernel, float32) and hidden_i = silu(gate_i) · up_i as the forward stored it, returns
    d_gate, d_up = the SwiGLU backward of weight_i · g_i, and hidden (all [M, K] in gate's
    dtype), and d_weight [M] = ⟨g_i, hidden_i⟩ in float32. The elementwise part is one XLA
    fusion: in the kernel's epilogue it made the kernel 4× slower (H200, Triton).
    """
    g = gather_matmul(d_out, w_down, item_row, block_group, used_blocks, transpose_w=True,
                      tiling=tiling, interpret=interpret)
    gate32, up32 = gate.astype(jnp.float32), up.astype(jnp.float32)
    hidden = swiglu_f32(gate32, up32).astype(gate.dtype)  # as the forward stored it
    d_weight = jnp.sum(g * hidden.astype(jnp.float32), axis=1)
    d_hidden = g * item_weight.astype(jnp.float32)[:, None]
    d_gate, d_up = swiglu_grads_f32(gate32, up32, d_hidden)
    return d_gate.astype(gate.dtype), d_up.astype(gate.dtype), hidden, d_weight


def _scatter_add_kernel(item_row_ref, block_group_ref, used_ref, scale_ref, *refs,
                        tiling: GatherTiling, k_dim: int, terms: int, transpose_w: bool,
                        scaled: bool, interpret: bool):
    h_refs, w_refs, o_ref = refs[:terms], refs[terms:2 * terms], refs[-1]  # refs[-2]: aliased
    bm, bn, bk = tiling.block_m, tiling.block_n, tiling.block_k
    i, j = pl.program_id(0), pl.program_id(1)
    g = block_group_ref[i]

    @pl.when(i < used_ref[0])
    def _():
        def step(s, acc):
            for h_ref, w_ref in zip(h_refs, w_refs, strict=True):
                a = h_ref[pl.ds(i * bm, bm), pl.ds(s * bk, bk)]
                acc = acc + _times_weight_tile(a, w_ref, g, s * bk, j * bn, bk, bn, transpose_w)
            return acc

        acc = jax.lax.fori_loop(0, k_dim // bk, step, jnp.zeros((bm, bn), jnp.float32))
        if scaled:
            acc = acc * scale_ref[pl.ds(i * bm, bm)][:, None]
        rows = item_row_ref[pl.ds(i * bm, bm)]
        valid = rows >= 0
        # The interpreter has no masked atomics: there padding items add into a spare last row.
        r = jnp.broadcast_to(jnp.where(valid, rows, o_ref.shape[0] - 1)[:, None], (bm, bn))
        c = jnp.broadcast_to(j * bn + jnp.arange(bn)[None, :], (bm, bn))
        mask = None if interpret else jnp.broadcast_to(valid[:, None], (bm, bn))
        plt.atomic_add(o_ref, (r, c), acc, mask=mask)


def matmul_scatter_add(hs, ws, item_row, block_group, used_blocks, num_rows: int, *,
                       scale=None, transpose_w: bool = False,
                       tiling: GatherTiling = GatherTiling(),
                       interpret: bool = False) -> jax.Array:
    """[num_rows, N] float32: row r gets Σ over items i with item_row[i] = r of
    scale[i] · Σ_t hs[t][i] @ ws[t][g(i)] — one accumulator and one atomic pass for all terms.
    hs: [M, K] arrays; ws: [G, K, N] arrays (or [G, N, K] with transpose_w)."""
    hs, ws = tuple(hs), tuple(ws)
    m, k_dim = hs[0].shape
    n = ws[0].shape[1] if transpose_w else ws[0].shape[2]
    tiling = fit(tiling, k_dim=k_dim, n=n, itemsize=hs[0].dtype.itemsize,
                 stage_tiles=lambda bm, bk, bn: len(hs) * (bm + bn) * bk)
    scaled = scale is not None
    scale = jnp.zeros((1,), jnp.float32) if scale is None else scale.astype(jnp.float32)
    init = jnp.zeros((num_rows + (1 if interpret else 0), n), jnp.float32)
    kernel = functools.partial(_scatter_add_kernel, tiling=tiling, k_dim=k_dim, terms=len(hs),
                               transpose_w=transpose_w, scaled=scaled, interpret=interpret)
    operands = platform.vary_together(item_row, block_group, used_blocks.reshape(1), scale, *hs,
                                      *ws, init)
    out_type = platform.out_struct(init.shape, jnp.float32, *operands)
    out = _call(kernel, (m // tiling.block_m, n // tiling.block_n), out_type, tiling, interpret,
                aliases={len(operands) - 1: 0})(*operands)
    return out[:num_rows] if interpret else out


def _tmatmul_kernel(item_row_ref, first_ref, count_ref, scale_ref, a_ref, b_ref, o_ref, *,
                    tiling: GatherTiling, gather_a: bool, gather_b: bool, scaled: bool):
    bm, bn, bk = tiling.block_m, tiling.block_n, tiling.block_k
    g, kt, nt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first = first_ref[g]

    def step(s, acc):
        block = first + s
        rows = item_row_ref[pl.ds(block * bm, bm)]
        valid = rows >= 0
        if gather_a:
            a = _load_rows(a_ref, rows, valid, kt * bk + jnp.arange(bk))
        else:
            a = a_ref[pl.ds(block * bm, bm), pl.ds(kt * bk, bk)]
        if gather_b:
            b = _load_rows(b_ref, rows, valid, nt * bn + jnp.arange(bn))
        else:
            b = b_ref[pl.ds(block * bm, bm), pl.ds(nt * bn, bn)]
        if scaled:
            b = (b.astype(jnp.float32) * scale_ref[pl.ds(block * bm, bm)][:, None]).astype(b.dtype)
        return acc + _dot(a, b, contract_a=0, contract_b=0)

    acc = jax.lax.fori_loop(0, count_ref[g], step, jnp.zeros((bk, bn), jnp.float32))
    o_ref[g, pl.ds(kt * bk, bk), pl.ds(nt * bn, bn)] = acc.astype(o_ref.dtype)


def gather_tmatmul(a, b, item_row, group_sizes, *, gather_a: bool, gather_b: bool,
                   b_scale=None, out_dtype=None, tiling: GatherTiling = GatherTiling(),
                   interpret: bool = False) -> jax.Array:
    """dw[g] = Σ_{items i of g} a_i^T · (b_scale[i] · b_i) → [G, K, N].

    a_i is a[item_row[i]] when gather_a (a [R, K]) else a[i] (a [M, K]); likewise b. Padding
    items contribute zeros. ``group_sizes`` [G] are the plan's padded sizes (multiples of
    block_m)."""
    k_dim, n = a.shape[1], b.shape[1]
    tiling = fit(tiling, k_dim=k_dim, n=n, itemsize=a.dtype.itemsize,
                 stage_tiles=lambda bm, bk, bn: bm * (bk + bn))
    bm, bk, bn = tiling.block_m, tiling.block_k, tiling.block_n
    blocks = (group_sizes // bm).astype(jnp.int32)
    first = (jnp.cumsum(blocks) - blocks).astype(jnp.int32)
    scaled = b_scale is not None
    scale = jnp.zeros((1,), jnp.float32) if b_scale is None else b_scale.astype(jnp.float32)
    kernel = functools.partial(_tmatmul_kernel, tiling=tiling, gather_a=gather_a,
                               gather_b=gather_b, scaled=scaled)
    groups = group_sizes.shape[0]
    operands = platform.vary_together(item_row, first, blocks, scale, a, b)
    out_type = platform.out_struct((groups, k_dim, n), out_dtype or a.dtype, *operands)
    return _call(kernel, (groups, k_dim // bk, n // bn), out_type, tiling, interpret)(*operands)
