"""Row gathers and gather-sums in one pass over memory (Pallas; Triton on GPU, the interpreter
on CPU): the copies and sums of ``occult_jax.row_maps`` — dispatch into send slots and item
order, pre-combine of items, combine of returned slots — and their gradients.

* ``gather_rows(a, index, scale=, dot_with=)``: out[b] = scale[b] · a[index[b]] (zeros where
  index[b] < 0); with ``dot_with`` also Σ_d a[index[b], d] · dot_with[b, d] in float32 (the
  routing-weight gradient of a weighted sum, from the same read).
* ``sum_rows(b, slots, weight=)``: out[a] = Σ_j weight[slots[a, j]] · b[slots[a, j]] over the
  slots ≥ 0, accumulated in float32 in slot order.

XLA lowers these to element-wise gathers with a bounds check each, and the sum reads every slot
of the [A, P] table whether used or not (most are empty: a received row lists ≤ min(k, E/N)
experts; at the OLMoE shape on 4 devices 2 of 8 slots are used on average). Here a program
moves a tile of rows × columns with masked vector loads, so an empty slot costs no memory
traffic. Each program's rows are a power of two dividing the row count and its columns one
dividing the width, so no access is out of bounds and nothing needs masking but empty slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels import platform
from kernels.triton_launch import call, load_rows, pow2_tile

# Tiles: the best of `benchmarks/row_maps.py --sweep` on an H200 (bf16, width 2048): 16 × 256
# was within 2% of the best at every map; 16 × 512 and larger tiles were up to 1.4× slower on
# the sums.
ROWS = 16  # rows per program at most
COLUMNS = 256  # columns per program at most
NUM_WARPS = 4
UNROLLED_SLOTS = 16  # sum_rows unrolls its loop over a row's slots up to this many


def _interpret(interpret: bool | None) -> bool:
    if interpret is None:
        return platform.backend() != "gpu"
    return interpret


def _load_scalars(ref, index, valid):
    """ref[index] for a 1-D ref, zeros where ~valid."""
    return plt.load(ref.at[jnp.where(valid, index, 0)], mask=valid,
                    other=jnp.zeros((), ref.dtype))


def _gather_kernel(index_ref, scale_ref, a_ref, other_ref, out_ref, *dot_ref, rows: int,
                   cols: int, scaled: bool, fill_empty: bool):
    i, j = pl.program_id(0), pl.program_id(1)
    tile_rows, tile_cols = pl.ds(i * rows, rows), pl.ds(j * cols, cols)
    index = index_ref[tile_rows]
    valid, columns = index >= 0, j * cols + jnp.arange(cols)
    x = load_rows(a_ref, index, valid, columns).astype(jnp.float32)
    if dot_ref:  # this column tile's share of the row dot product; empty rows read nothing
        other = load_rows(other_ref, i * rows + jnp.arange(rows), valid, columns)
        dot_ref[0][j, tile_rows] = jnp.sum(x * other.astype(jnp.float32), axis=1)
    if scaled:
        x = x * scale_ref[tile_rows].astype(jnp.float32)[:, None]

    def store():
        out_ref[tile_rows, tile_cols] = x.astype(out_ref.dtype)

    if fill_empty:
        store()
    else:  # a tile of empty rows is left unwritten
        pl.when(jnp.max(index) >= 0)(store)


def gather_rows(a: jax.Array, index: jax.Array, *, scale: jax.Array | None = None,
                dot_with: jax.Array | None = None, out_dtype=None, fill_empty: bool = True,
                interpret: bool | None = None):
    """a [A, D], index [B] → scale[b] · a[index[b]] as [B, D] (``out_dtype``, default a's), or
    with ``dot_with`` [B, D] the pair (that, Σ_d a[index[b], d] · dot_with[b, d] as [B] float32).
    Empty rows (index < 0) are zeros, or with ``fill_empty=False`` may be left unwritten
    (undefined) where a whole tile of them is empty. Indices must be < A (not checked: a traced
    value; the callers' maps are built in range).

    ``interpret``: None runs the Triton kernel on GPU and the interpreter elsewhere.
    """
    if a.ndim != 2 or index.ndim != 1:
        raise ValueError(f"gather_rows wants a [A, D] and index [B]; got {a.shape}, "
                         f"{index.shape}")
    b, d = index.shape[0], a.shape[1]
    if scale is not None and scale.shape != (b,):
        raise ValueError(f"gather_rows: scale must be [{b}]; got {scale.shape}")
    if dot_with is not None and dot_with.shape != (b, d):
        raise ValueError(f"gather_rows: dot_with must be [{b}, {d}]; got {dot_with.shape}")
    if b == 0 or d == 0 or a.shape[0] == 0:  # no source rows: every index is empty
        out = jnp.zeros((b, d), out_dtype or a.dtype)
        return out if dot_with is None else (out, jnp.zeros((b,), jnp.float32))
    interpret = _interpret(interpret)
    rows, cols = pow2_tile(b, ROWS), pow2_tile(d, COLUMNS)
    scaled, dotted = scale is not None, dot_with is not None
    operands = platform.vary_together(
        index.astype(jnp.int32), jnp.zeros((1,), jnp.float32) if scale is None else scale, a,
        jnp.zeros((1, 1), a.dtype) if dot_with is None else dot_with)
    out_type = [platform.out_struct((b, d), out_dtype or a.dtype, *operands)]
    if dotted:
        out_type.append(platform.out_struct((d // cols, b), jnp.float32, *operands))
    kernel = functools.partial(_gather_kernel, rows=rows, cols=cols, scaled=scaled,
                               fill_empty=fill_empty)
    outs = call(kernel, (b // rows, d // cols), tuple(out_type), num_warps=NUM_WARPS,
                interpret=interpret)(*operands)
    return outs[0] if not dotted else (outs[0], jnp.sum(outs[1], axis=0))


def _sum_kernel(slots_ref, weight_ref, b_ref, out_ref, *, rows: int, cols: int, weighted: bool):
    i, j = pl.program_id(0), pl.program_id(1)
    tile_rows = pl.ds(i * rows, rows)
    columns = j * cols + jnp.arange(cols)

    def add_slot(p, acc):
        slot = slots_ref[tile_rows, p]
        valid = slot >= 0
        x = load_rows(b_ref, slot, valid, columns).astype(jnp.float32)
        if weighted:
            x = x * _load_scalars(weight_ref, slot, valid).astype(jnp.float32)[:, None]
        return acc + x

    acc = jnp.zeros((rows, cols), jnp.float32)
    slots = slots_ref.shape[1]
    if slots <= UNROLLED_SLOTS:
        for p in range(slots):
            acc = add_slot(p, acc)
    else:  # unrolled, thousands of slots took Triton minutes to compile
        acc = lax.fori_loop(0, slots, add_slot, acc)
    out_ref[tile_rows, pl.ds(j * cols, cols)] = acc.astype(out_ref.dtype)


def sum_rows(b: jax.Array, slots: jax.Array, *, weight: jax.Array | None = None,
             out_dtype=None, interpret: bool | None = None) -> jax.Array:
    """b [B, D], slots [A, P] (rows of b, -1 = none) → [A, D]: row a is
    Σ_j weight[slots[a, j]] · b[slots[a, j]] over its slots ≥ 0, summed in float32 and returned
    in ``out_dtype`` (default b's); zeros for a row with no slot."""
    if b.ndim != 2 or slots.ndim != 2:
        raise ValueError(f"sum_rows wants b [B, D] and slots [A, P]; got {b.shape}, "
                         f"{slots.shape}")
    if weight is not None and weight.shape != (b.shape[0],):
        raise ValueError(f"sum_rows: weight must be [{b.shape[0]}]; got {weight.shape}")
    (a, pairs), d = slots.shape, b.shape[1]
    if a == 0 or d == 0 or pairs == 0 or b.shape[0] == 0:
        return jnp.zeros((a, d), out_dtype or b.dtype)
    interpret = _interpret(interpret)
    rows, cols = pow2_tile(a, ROWS), pow2_tile(d, COLUMNS)
    weighted = weight is not None
    operands = platform.vary_together(
        slots.astype(jnp.int32), jnp.zeros((1,), jnp.float32) if weight is None else weight, b)
    out_type = platform.out_struct((a, d), out_dtype or b.dtype, *operands)
    kernel = functools.partial(_sum_kernel, rows=rows, cols=cols, weighted=weighted)
    return call(kernel, (a // rows, d // cols), out_type, num_warps=NUM_WARPS,
                interpret=interpret)(*operands)
