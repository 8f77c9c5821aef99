"""SwiGLU of the item buffer, ``silu(gate) · up`` from one [M, 2f] gate|up array, that touches
only the live rows (Pallas; Triton on GPU, the interpreter in tests, XLA elsewhere).

The expert compute's item buffer is sized for the worst case (every received row listing
min(k, E/N) experts) and is mostly padding: 131k live of 524k rows at the OLMoE shape on 4
devices. XLA's elementwise fusions read and write all of it. Here a program whose row tile
starts past ``live`` writes zeros without reading (or, with ``fill_tail=False``, nothing);
the others compute in float32. The backward (``jax.custom_vjp``) is the same kind of kernel:
d[gate | up] from d hidden and the saved gate|up.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import platform
from kernels.triton_launch import call, pow2_tile

ROWS = 16  # rows per program at most
COLUMNS = 256  # hidden columns per program at most
NUM_WARPS = 4


def swiglu_f32(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) · up (float32 operands; inside kernels too)."""
    return gate * jax.nn.sigmoid(gate) * up


def swiglu_grads_f32(gate: jax.Array, up: jax.Array,
                     d_hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(d gate, d up) of silu(gate) · up for d hidden (float32 operands; inside kernels too)."""
    sig = jax.nn.sigmoid(gate)
    return d_hidden * up * sig * (1.0 + gate * (1.0 - sig)), d_hidden * (gate * sig)


def _forward_kernel(live_ref, gate_up_ref, scale_ref, out_ref, *, rows: int, cols: int,
                    hidden: int, fill_tail: bool, scaled: bool):
    i, j = pl.program_id(0), pl.program_id(1)
    tile_rows = pl.ds(i * rows, rows)

    @pl.when(i * rows < live_ref[0])
    def _():
        gate = gate_up_ref[tile_rows, pl.ds(j * cols, cols)].astype(jnp.float32)
        up = gate_up_ref[tile_rows, pl.ds(hidden + j * cols, cols)].astype(jnp.float32)
        hidden_f32 = swiglu_f32(gate, up)
        if scaled:
            hidden_f32 = hidden_f32 * scale_ref[tile_rows].astype(jnp.float32)[:, None]
        out_ref[tile_rows, pl.ds(j * cols, cols)] = hidden_f32.astype(out_ref.dtype)

    if fill_tail:
        @pl.when(i * rows >= live_ref[0])
        def _():
            out_ref[tile_rows, pl.ds(j * cols, cols)] = jnp.zeros((rows, cols), out_ref.dtype)


def _backward_kernel(live_ref, gate_up_ref, d_hidden_ref, scale_ref, out_ref, *d_scale_ref,
                     rows: int, cols: int, hidden: int, fill_tail: bool, scaled: bool):
    i, j = pl.program_id(0), pl.program_id(1)
    tile_rows = pl.ds(i * rows, rows)
    gate_cols, up_cols = pl.ds(j * cols, cols), pl.ds(hidden + j * cols, cols)

    @pl.when(i * rows < live_ref[0])
    def _():
        gate = gate_up_ref[tile_rows, gate_cols].astype(jnp.float32)
        up = gate_up_ref[tile_rows, up_cols].astype(jnp.float32)
        d_hidden = d_hidden_ref[tile_rows, gate_cols].astype(jnp.float32)
        if scaled:  # this column tile's share of d scale = Σ d hidden · silu(gate) · up
            d_scale_ref[0][j, tile_rows] = jnp.sum(d_hidden * swiglu_f32(gate, up), axis=1)
            d_hidden = d_hidden * scale_ref[tile_rows].astype(jnp.float32)[:, None]
        d_gate, d_up = swiglu_grads_f32(gate, up, d_hidden)
        out_ref[tile_rows, gate_cols] = d_gate.astype(out_ref.dtype)
        out_ref[tile_rows, up_cols] = d_up.astype(out_ref.dtype)

    if fill_tail:
        @pl.when(i * rows >= live_ref[0])
        def _():
            zeros = jnp.zeros((rows, cols), out_ref.dtype)
            out_ref[tile_rows, gate_cols] = zeros
            out_ref[tile_rows, up_cols] = zeros
            if scaled:
                d_scale_ref[0][j, tile_rows] = jnp.zeros((rows,), jnp.float32)


def _launch(kernel, live, arrays, out_types, interpret: bool, fill_tail: bool, scaled: bool):
    """Run a kernel over (row tiles, hidden column tiles); out_types are (shape, dtype)
    pairs, a shape given as a function of (row tile, column tile) counts where it needs them."""
    m, hidden = arrays[0].shape[0], arrays[0].shape[1] // 2
    rows, cols = pow2_tile(m, ROWS), pow2_tile(hidden, COLUMNS)
    operands = platform.vary_together(live.reshape(1).astype(jnp.int32), *arrays)
    grid = (m // rows, hidden // cols)
    out_type = tuple(platform.out_struct(shape(*grid) if callable(shape) else shape, dtype,
                                         *operands) for shape, dtype in out_types)
    body = functools.partial(kernel, rows=rows, cols=cols, hidden=hidden, fill_tail=fill_tail,
                             scaled=scaled)
    return call(body, grid, out_type, num_warps=NUM_WARPS, interpret=interpret)(*operands)


def _scale_operand(scale, m):
    return jnp.ones((m,), jnp.float32) if scale is None else scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _swiglu(gate_up, live, scale, mode, fill_tail):
    m, two_f = gate_up.shape
    if mode == "xla" or m == 0 or two_f == 0:
        gate, up = jnp.split(gate_up.astype(jnp.float32), 2, axis=1)
        hidden = swiglu_f32(gate, up)  # float32, as the kernel
        if scale is not None:
            hidden = hidden * scale.astype(jnp.float32)[:, None]
        return hidden.astype(gate_up.dtype)
    (out,) = _launch(_forward_kernel, live, (gate_up, _scale_operand(scale, m)),
                     [((m, two_f // 2), gate_up.dtype)], mode == "interpret", fill_tail,
                     scale is not None)
    return out


def _swiglu_fwd(gate_up, live, scale, mode, fill_tail):
    return _swiglu(gate_up, live, scale, mode, fill_tail), (gate_up, live, scale)


def _swiglu_bwd(mode, fill_tail, residuals, d_hidden):
    gate_up, live, scale = residuals
    d_hidden = d_hidden.astype(gate_up.dtype)
    if mode == "xla" or gate_up.size == 0:
        d_gate_up, d_scale = _swiglu_xla_bwd(gate_up, d_hidden, scale)
        return d_gate_up, None, d_scale
    outs = _launch(_backward_kernel, live, (gate_up, d_hidden, _scale_operand(scale, len(gate_up))),
                   [(gate_up.shape, gate_up.dtype)]
                   + ([] if scale is None else [(lambda r, c: (c, len(gate_up)), jnp.float32)]),
                   mode == "interpret", fill_tail, scale is not None)
    if scale is None:
        return outs[0], None, None
    return outs[0], None, jnp.sum(outs[1], axis=0).astype(scale.dtype)


def _swiglu_xla_bwd(gate_up, d_hidden, scale):
    gate, up = jnp.split(gate_up.astype(jnp.float32), 2, axis=1)
    d_hidden = d_hidden.astype(jnp.float32)
    d_scale = None
    if scale is not None:
        d_scale = jnp.sum(d_hidden * swiglu_f32(gate, up), axis=1).astype(scale.dtype)
        d_hidden = d_hidden * scale.astype(jnp.float32)[:, None]
    d_gate, d_up = swiglu_grads_f32(gate, up, d_hidden)
    return jnp.concatenate([d_gate, d_up], axis=1).astype(gate_up.dtype), d_scale


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(gate_up: jax.Array, live: jax.Array, *, scale: jax.Array | None = None,
           fill_tail: bool = True, interpret: bool | None = None) -> jax.Array:
    """gate_up [M, 2f] (gate columns then up columns), live: rows [0, live) hold items →
    silu(gate) · up [M, f], each row times ``scale[row]`` if given ([M]; the routing weight of
    the item: the weighted pre-combine moved before the down projection); differentiable in
    gate_up and scale. Rows past ``live`` are zeros (gate|up must be zero
    there too), or with ``fill_tail=False`` undefined in the output and the gradient (the
    kernel neither reads nor writes whole tiles of them; XLA computes them anyway).

    ``interpret``: None runs the Triton kernel on GPU and XLA elsewhere; True the kernel in
    the Pallas interpreter.
    """
    if gate_up.ndim != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"swiglu wants gate_up [M, 2f] (gate then up columns); got "
                         f"{gate_up.shape}")
    if interpret:
        mode = "interpret"
    elif interpret is None and platform.backend() != "gpu":
        mode = "xla"
    else:
        mode = "gpu"
    if scale is not None and scale.shape != gate_up.shape[:1]:
        raise ValueError(f"swiglu: scale must be [{gate_up.shape[0]}] (one per row); got "
                         f"{scale.shape}")
    return _swiglu(gate_up, jnp.asarray(live, jnp.int32), scale, mode, fill_tail)
