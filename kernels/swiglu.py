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


def _forward_kernel(live_ref, gate_up_ref, out_ref, *, rows: int, cols: int, hidden: int,
                    fill_tail: bool):
    i, j = pl.program_id(0), pl.program_id(1)
    tile_rows = pl.ds(i * rows, rows)

    @pl.when(i * rows < live_ref[0])
    def _():
        gate = gate_up_ref[tile_rows, pl.ds(j * cols, cols)].astype(jnp.float32)
        up = gate_up_ref[tile_rows, pl.ds(hidden + j * cols, cols)].astype(jnp.float32)
        out_ref[tile_rows, pl.ds(j * cols, cols)] = swiglu_f32(gate, up).astype(out_ref.dtype)

    if fill_tail:
        @pl.when(i * rows >= live_ref[0])
        def _():
            out_ref[tile_rows, pl.ds(j * cols, cols)] = jnp.zeros((rows, cols), out_ref.dtype)


def _backward_kernel(live_ref, gate_up_ref, d_hidden_ref, out_ref, *, rows: int, cols: int,
                     hidden: int, fill_tail: bool):
    i, j = pl.program_id(0), pl.program_id(1)
    tile_rows = pl.ds(i * rows, rows)
    gate_cols, up_cols = pl.ds(j * cols, cols), pl.ds(hidden + j * cols, cols)

    @pl.when(i * rows < live_ref[0])
    def _():
        gate = gate_up_ref[tile_rows, gate_cols].astype(jnp.float32)
        up = gate_up_ref[tile_rows, up_cols].astype(jnp.float32)
        d_hidden = d_hidden_ref[tile_rows, gate_cols].astype(jnp.float32)
        d_gate, d_up = swiglu_grads_f32(gate, up, d_hidden)
        out_ref[tile_rows, gate_cols] = d_gate.astype(out_ref.dtype)
        out_ref[tile_rows, up_cols] = d_up.astype(out_ref.dtype)

    if fill_tail:
        @pl.when(i * rows >= live_ref[0])
        def _():
            zeros = jnp.zeros((rows, cols), out_ref.dtype)
            out_ref[tile_rows, gate_cols] = zeros
            out_ref[tile_rows, up_cols] = zeros


def _launch(kernel, live, arrays, out_shape, dtype, interpret: bool, fill_tail: bool):
    m, hidden = arrays[0].shape[0], arrays[0].shape[1] // 2
    rows, cols = pow2_tile(m, ROWS), pow2_tile(hidden, COLUMNS)
    operands = platform.vary_together(live.reshape(1).astype(jnp.int32), *arrays)
    out_type = platform.out_struct(out_shape, dtype, *operands)
    body = functools.partial(kernel, rows=rows, cols=cols, hidden=hidden, fill_tail=fill_tail)
    return call(body, (m // rows, hidden // cols), out_type, num_warps=NUM_WARPS,
                interpret=interpret)(*operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _swiglu(gate_up, live, mode, fill_tail):
    m, two_f = gate_up.shape
    if mode == "xla" or m == 0 or two_f == 0:
        gate, up = jnp.split(gate_up.astype(jnp.float32), 2, axis=1)
        return swiglu_f32(gate, up).astype(gate_up.dtype)  # float32, as the kernel
    return _launch(_forward_kernel, live, (gate_up,), (m, two_f // 2), gate_up.dtype,
                   mode == "interpret", fill_tail)


def _swiglu_fwd(gate_up, live, mode, fill_tail):
    return _swiglu(gate_up, live, mode, fill_tail), (gate_up, live)


def _swiglu_bwd(mode, fill_tail, residuals, d_hidden):
    gate_up, live = residuals
    d_hidden = d_hidden.astype(gate_up.dtype)
    if mode == "xla" or gate_up.size == 0:
        return _swiglu_xla_bwd(gate_up, d_hidden), None
    d_gate_up = _launch(_backward_kernel, live, (gate_up, d_hidden), gate_up.shape,
                        gate_up.dtype, mode == "interpret", fill_tail)
    return d_gate_up, None


def _swiglu_xla_bwd(gate_up, d_hidden):
    gate, up = jnp.split(gate_up.astype(jnp.float32), 2, axis=1)
    d_gate, d_up = swiglu_grads_f32(gate, up, d_hidden.astype(jnp.float32))
    return jnp.concatenate([d_gate, d_up], axis=1).astype(gate_up.dtype)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(gate_up: jax.Array, live: jax.Array, *, fill_tail: bool = True,
           interpret: bool | None = None) -> jax.Array:
    """gate_up [M, 2f] (gate columns then up columns), live: rows [0, live) hold items →
    silu(gate) · up [M, f]; differentiable. Rows past ``live`` are zeros (gate|up must be zero
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
    return _swiglu(gate_up, jnp.asarray(live, jnp.int32), mode, fill_tail)
