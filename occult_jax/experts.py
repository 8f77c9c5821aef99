"""Expert FFNs: SwiGLU over rows grouped by expert, behind one function whatever the backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Dense SwiGLU: x [..., d] with w_gate/w_up [d, f], w_down [f, d]."""
    return jnp.dot(jax.nn.silu(jnp.dot(x, w_gate)) * jnp.dot(x, w_up), w_down)


def resolve_backend(name: str) -> str:
    """"auto" → the fastest grouped matmul available on this backend."""
    if name != "auto":
        return name
    return "ragged_dot"


def _group_ids(group_sizes: jax.Array, rows: int) -> jax.Array:
    """Group of each row for rows laid out group after group; len(group_sizes) past the end."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(rows), side="right")


def _einsum_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Grouped matmul by masked dense einsum: G× the FLOPs, but plain XLA everywhere."""
    groups = _group_ids(group_sizes, x.shape[0])
    mask = (groups[:, None] == jnp.arange(w.shape[0])[None, :]).astype(x.dtype)  # [M, G]
    return jnp.einsum("md,gdf,mg->mf", x, w, mask)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, backend: str) -> jax.Array:
    """x [M, K] rows sorted by group, w [G, K, N], group_sizes [G] (Σ ≤ M) → [M, N].

    Rows past Σ group_sizes give zeros.
    """
    if backend == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes)
    if backend == "einsum":
        return _einsum_matmul(x, w, group_sizes)
    raise ValueError(f"unknown expert_matmul backend {backend!r}; use 'ragged_dot' or 'einsum'.")


def grouped_swiglu(x: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, backend: str) -> jax.Array:
    """SwiGLU of each row with its group's expert: x [M, d] sorted by group → [M, d]."""
    gate = grouped_matmul(x, w_gate, group_sizes, backend)
    up = grouped_matmul(x, w_up, group_sizes, backend)
    return grouped_matmul(jax.nn.silu(gate) * up, w_down, group_sizes, backend)
