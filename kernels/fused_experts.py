"""Occult's fused sparse expert FFN: SwiGLU experts read straight from the deduplicated receive
buffer and pre-combined into one row per received row, forward and backward.

    out[r] = Σ_{items i of row r} weight_i · SwiGLU_{e(i)}(rows[r])          [R, d]

Items are (received row, local expert) pairs from ``plan.make_expert_plan(block=block_m)``.
Nothing is materialised in item order except the hidden activations: one kernel reads each
row tile through ``item_row`` (no k-expanded copy of the buffer) for both the gate and the up
product and writes silu(gate) · up, and the down matmul adds weight × output into each row's
float32 accumulator (no per-item output buffer, no separate segment-sum). The backward uses the
kernels of kernels/gather_matmul.py:

    g_i        = dout[row_i] @ W_down[e]ᵀ               gather_swiglu_grad (a gathered
    dweight_i  = ⟨g_i, h_i⟩;  dh_i = weight_i · g_i      matmul kernel writes g in float32,
    dgate, dup = SwiGLU backward of dh                    one XLA fusion does the rest)
    dW_down[e] = Σ_i h_iᵀ · weight_i dout[row_i]        gather_tmatmul (b gathered, scaled)
    drows[r]   = Σ_i dgate_i W_gate[e]ᵀ + dup_i W_up[e]ᵀ matmul_scatter_add (both terms)
    dW_gate[e] = Σ_i rows[row_i]ᵀ dgate_i (same for up) gather_tmatmul (a gathered)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import platform
from kernels.gather_matmul import (
    GatherTiling,
    gather_swiglu,
    gather_swiglu_grad,
    gather_tmatmul,
    matmul_scatter_add,
)

INTERPRET_TILING = GatherTiling(block_m=16, block_n=32, block_k=32)  # small: fast on CPU


def default_tiling(interpret: bool | None = None) -> GatherTiling:
    """The tiling the fused FFN uses here (its block_m is the expert plan's block)."""
    return INTERPRET_TILING if _interpret(interpret) else GatherTiling()


def _interpret(interpret: bool | None) -> bool:
    if interpret is not None:
        return interpret
    kind = platform.backend()
    if kind == "cpu":
        return True
    if kind != "gpu":
        raise ValueError(f"expert_matmul='fused' runs on GPUs (and interpreted on CPU), not on "
                         f"{kind}; use expert_matmul='auto'")
    return False


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _fused(rows, w_gate, w_up, w_down, item_weight, item_row, block_group, used_blocks,
           group_sizes, tiling, interpret):
    out, _ = _forward(rows, w_gate, w_up, w_down, item_weight, item_row, block_group,
                      used_blocks, tiling, interpret)
    return out


def _forward(rows, w_gate, w_up, w_down, item_weight, item_row, block_group, used_blocks,
             tiling, interpret, save_preactivations=False):
    plan = dict(item_row=item_row, block_group=block_group, used_blocks=used_blocks,
                tiling=tiling, interpret=interpret)
    hidden, *preactivations = gather_swiglu(rows, w_gate, w_up,
                                            save_preactivations=save_preactivations, **plan)
    out = matmul_scatter_add((hidden,), (w_down,), num_rows=rows.shape[0], scale=item_weight,
                             **plan)
    return out.astype(rows.dtype), preactivations


def _fused_fwd(rows, w_gate, w_up, w_down, item_weight, item_row, block_group, used_blocks,
               group_sizes, tiling, interpret):
    out, (gate, up) = _forward(rows, w_gate, w_up, w_down, item_weight, item_row, block_group,
                               used_blocks, tiling, interpret, save_preactivations=True)
    # gate and up, as the unfused path keeps; the backward recomputes hidden from them
    return out, (rows, w_gate, w_up, w_down, item_weight, item_row, block_group, used_blocks,
                 group_sizes, gate, up)


def _fused_bwd(tiling, interpret, residuals, d_out):
    (rows, w_gate, w_up, w_down, item_weight, item_row, block_group, used_blocks, group_sizes,
     gate, up) = residuals
    dtype = rows.dtype
    d_out = d_out.astype(dtype)
    plan = dict(item_row=item_row, block_group=block_group, used_blocks=used_blocks,
                tiling=tiling, interpret=interpret)
    groups = dict(item_row=item_row, group_sizes=group_sizes, tiling=tiling,
                  interpret=interpret)

    d_gate, d_up, hidden, d_weight = gather_swiglu_grad(d_out, w_down, gate, up, item_weight,
                                                        **plan)
    d_w_down = gather_tmatmul(hidden, d_out, gather_a=False, gather_b=True,
                              b_scale=item_weight, out_dtype=w_down.dtype, **groups)

    d_rows = matmul_scatter_add((d_gate, d_up), (w_gate, w_up), num_rows=rows.shape[0],
                                transpose_w=True, **plan)
    d_w_gate = gather_tmatmul(rows, d_gate, gather_a=True, gather_b=False,
                              out_dtype=w_gate.dtype, **groups)
    d_w_up = gather_tmatmul(rows, d_up, gather_a=True, gather_b=False, out_dtype=w_up.dtype,
                            **groups)
    return (d_rows.astype(dtype), d_w_gate, d_w_up, d_w_down,
            d_weight.astype(item_weight.dtype), None, None, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_swiglu_combine(rows: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                         w_down: jax.Array, item_weight: jax.Array, item_row: jax.Array,
                         block_group: jax.Array, used_blocks: jax.Array,
                         group_sizes: jax.Array, *, tiling: GatherTiling | None = None,
                         interpret: bool | None = None) -> jax.Array:
    """rows [R, d], w_gate/w_up [G, d, f], w_down [G, f, d], per-item weights [M] and the
    expert plan's item_row [M] / block_group / used_blocks / group_sizes → [R, d].

    The plan must have been built with ``block = tiling.block_m`` (see ``default_tiling``).
    Differentiable in rows, the three weights and item_weight.
    """
    dtypes = {jnp.dtype(a.dtype) for a in (rows, w_gate, w_up, w_down)}
    if len(dtypes) != 1:
        got = sorted(map(str, dtypes))
        raise ValueError(f"fused_swiglu_combine: rows and weights must share one dtype (the "
                         f"Triton products take equal operand types); got {got}; cast the "
                         "weights to rows.dtype")
    d = rows.shape[-1]
    g, _, f = w_gate.shape if w_gate.ndim == 3 else (0, 0, 0)
    if (rows.ndim != 2 or w_gate.shape != (g, d, f) or w_up.shape != (g, d, f)
            or w_down.shape != (g, f, d) or item_weight.shape != item_row.shape
            or item_row.ndim != 1):
        raise ValueError(f"fused_swiglu_combine wants rows [R, d], w_gate/w_up [G, d, f], "
                         f"w_down [G, f, d], item_weight and item_row [M]; got rows "
                         f"{rows.shape}, w_gate {w_gate.shape}, w_up {w_up.shape}, w_down "
                         f"{w_down.shape}, item_weight {item_weight.shape}, item_row "
                         f"{item_row.shape}")
    interpret = _interpret(interpret)
    tiling = tiling or default_tiling(interpret)
    if item_row.shape[0] % tiling.block_m:
        raise ValueError(f"fused_swiglu_combine: {item_row.shape[0]} items is not a multiple of "
                         f"block_m={tiling.block_m}; build the plan with block=align=block_m")
    # Inside shard_map the weights may vary over fewer mesh axes than the rows; widening them
    # here (outside the custom VJP) lets autodiff insert the psum their gradients need.
    w_gate, w_up, w_down = (platform.vary_like(w, rows) for w in (w_gate, w_up, w_down))
    return _fused(rows, w_gate, w_up, w_down, item_weight, item_row.astype(jnp.int32),
                  block_group.astype(jnp.int32), used_blocks.astype(jnp.int32),
                  group_sizes.astype(jnp.int32), tiling, interpret)
