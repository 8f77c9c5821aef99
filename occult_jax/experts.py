"""Expert FFNs: SwiGLU over rows grouped by expert, behind one function whatever the backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import platform as kernel_platform
from occult_jax.blocked_gmm import blocked_gmm
from occult_jax.config import PRECOMBINES, pallas_fits
from occult_jax.mesh import compute_capability
from occult_jax.plan import ExpertPlan
from occult_jax.row_maps import expand_rows, reduce_rows


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Dense SwiGLU: x [..., d] with w_gate/w_up [d, f], w_down [f, d]."""
    return jnp.dot(jax.nn.silu(jnp.dot(x, w_gate)) * jnp.dot(x, w_up), w_down)


BLOCKED_ROWS = 1024  # rows per expert-aligned block of the "blocked" backend
BLOCKED_CHUNK = 8  # blocks per batched product (one loop step) of the "blocked" backend


def _hopper_gpu() -> bool:
    device = jax.devices()[0]  # wgmma: sm_90 only
    return device.platform == "gpu" and compute_capability(device).split(".")[0] == "9"


def resolve_backend(name: str, d_model: int, d_ff: int, dtype: str = "bfloat16",
                    platform: str | None = None) -> str:
    """"auto" → the fastest grouped matmul on ``platform`` (default: where the kernels run,
    ``kernels.platform.backend()``): the Pallas kernels on Hopper GPUs and TPUs (when the
    widths fit them; on GPUs for 16-bit dtypes only, float32 there is XLA's ragged_dot at
    full precision), the blocked XLA matmul otherwise, ragged_dot on CPU."""
    if name != "auto":
        return name
    platform = platform or kernel_platform.backend()
    if platform == "cpu":
        return "ragged_dot"
    fast_on_gpu = _hopper_gpu() and jnp.dtype(dtype).itemsize == 2
    if pallas_fits(d_model, d_ff) and (platform == "tpu" or fast_on_gpu):
        return "pallas"
    return "blocked"


def row_layout(backend: str) -> tuple[int, int]:
    """(block, align): each expert's rows start on a multiple of `block`, and the item buffer
    length is a multiple of `align`; (1, 1) for backends that need neither."""
    if backend == "blocked":
        return BLOCKED_ROWS, BLOCKED_ROWS * BLOCKED_CHUNK
    if backend == "pallas":
        from kernels.grouped_matmul import ROW_MULTIPLE

        return 1, ROW_MULTIPLE
    if backend == "fused":
        from kernels.fused_experts import default_tiling

        block = default_tiling().block_m
        return block, block
    return 1, 1


def _group_ids(group_sizes: jax.Array, rows: int) -> jax.Array:
    """Group of each row for rows laid out group after group; len(group_sizes) past the end."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(rows), side="right")


def _einsum_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Grouped matmul by masked dense einsum: G× the FLOPs, but plain XLA everywhere."""
    groups = _group_ids(group_sizes, x.shape[0])
    mask = (groups[:, None] == jnp.arange(w.shape[0])[None, :]).astype(x.dtype)  # [M, G]
    return jnp.einsum("md,gdf,mg->mf", x, w, mask)


def grouped_matmul(x: jax.Array, w: jax.Array, groups: ExpertPlan, backend: str) -> jax.Array:
    """x [M, K] rows laid out group after group (see ExpertPlan), w [G, K, N] → [M, N].

    Rows past the groups give zeros. Padding rows inside a group (the blocked layout aligns
    groups to blocks) are multiplied like the group's own, so they must be zero, as
    `expand_rows` leaves them.
    """
    if backend == "ragged_dot":
        return jax.lax.ragged_dot(x, w, groups.group_sizes)
    if backend == "einsum":
        return _einsum_matmul(x, w, groups.group_sizes)
    if backend == "blocked":
        return blocked_gmm(x, w, groups.block_group, groups.used_blocks, BLOCKED_ROWS,
                           BLOCKED_CHUNK)
    if backend == "pallas":
        from kernels.grouped_matmul import gmm

        return gmm(x, w, groups.group_sizes)
    raise ValueError(f"unknown expert_matmul backend {backend!r}; use one of "
                     "'ragged_dot', 'blocked', 'einsum', 'pallas', 'fused'.")


def grouped_swiglu(x: jax.Array, groups: ExpertPlan, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, backend: str) -> jax.Array:
    """SwiGLU of each row with its group's expert: x [M, d] grouped by expert → [M, d]."""
    gate = grouped_matmul(x, w_gate, groups, backend)
    up = grouped_matmul(x, w_up, groups, backend)
    return grouped_matmul(jax.nn.silu(gate) * up, w_down, groups, backend)


def swiglu_combine(rows: jax.Array, items: ExpertPlan, item_weight: jax.Array,
                   w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                   backend: str, precombine: str = "rows") -> jax.Array:
    """Received rows [R, d] → Σ over each row's items of item_weight · SwiGLU_expert(row).

    "fused": one set of kernels reads the rows through the plan and pre-combines in float32
    (kernels/fused_experts.py). Otherwise: copy rows into item order, grouped SwiGLU, weighted
    gather-sum — except that "pallas" reads the rows through the plan (``gate_up_items``).
    """
    if backend == "fused":
        from kernels.fused_experts import fused_swiglu_combine

        return fused_swiglu_combine(rows, w_gate, w_up, w_down, item_weight, items.item_row,
                                    items.block_group, items.used_blocks, items.group_sizes)
    if backend == "pallas":
        return _pallas_swiglu_combine(rows, items, item_weight, w_gate, w_up, w_down,
                                      precombine=precombine)
    x_items = expand_rows(rows, items.item_row, items.row_items)
    y_items = grouped_swiglu(x_items, items, w_gate, w_up, w_down, backend)
    return reduce_rows(y_items, items.row_items, items.item_row, item_weight)


def _pallas_swiglu_combine(rows, items: ExpertPlan, item_weight, w_gate, w_up, w_down, *,
                           precombine: str = "rows"):
    """The Pallas path: gate|up product of every item (``gate_up_items``), SwiGLU
    (kernels/swiglu.py), down projection, pre-combine into the received rows.

    ``precombine``: "rows" (default) — down ``gmm`` into item order, then the weighted
    gather-sum row kernel; "epilogue" — Occult's fused form: the SwiGLU kernel scales each
    item by its routing weight (``(w · h) @ W = w · (h @ W)``) and ``gmm_combine`` adds each
    product row into its received row in float32 in the matmul's epilogue, so the item-order
    product is never stored (20–28% less scratch per training step), but the float32 sum must
    be zero-filled and cast: training 0.96–1.02×, serving 0.86–0.98× the speed of "rows" on
    an H100 and an H200 (docs/benchmarks.md, sessions 15 and 17). MoEConfig.precombine picks
    it.

    The item buffer is sized for the worst case (every row listing min(k, E/N) experts) and
    mostly padding: 131k live of 524k rows at the OLMoE shape on 4 devices. With the "pallas"
    layout (no padding inside groups) the padding is the tail past the groups; no step here
    reads it except row by row in the last, partly filled tile (whose results land in the tail
    again), and tgmm masks rows outside each group. So the tail of the item arrays is left
    unwritten (``fill_tail`` / ``fill_empty``), forward and backward, instead of zero-filled."""
    from kernels import swiglu as swiglu_kernel
    from kernels.grouped_matmul import gmm
    from kernels.occult_matmul import gmm_combine

    if precombine not in PRECOMBINES:
        raise ValueError(f"unknown precombine {precombine!r}; use one of {PRECOMBINES}")
    if items.block_group.shape != items.item_row.shape:
        raise ValueError("the pallas expert path needs a plan with block=1 "
                         "(make_expert_plan(..., *row_layout('pallas'))): padding inside groups "
                         "would be left undefined")
    gate_up = gate_up_items(rows, items.item_row, items.row_items, items.group_sizes,
                            jnp.concatenate([w_gate, w_up], axis=2))
    live = jnp.sum(items.group_sizes)
    if precombine == "rows":
        hidden = swiglu_kernel.swiglu(gate_up, live, fill_tail=False)
        y_items = gmm(hidden, w_down, items.group_sizes, fill_tail=False)
        return reduce_rows(y_items, items.row_items, items.item_row, item_weight,
                           fill_empty=False)
    hidden = swiglu_kernel.swiglu(gate_up, live, scale=item_weight, fill_tail=False)
    out = gmm_combine(hidden, w_down, items.group_sizes, items.item_row, rows.shape[0],
                      fill_tail=False)
    return out.astype(rows.dtype)


def gate_up_items(rows, item_row, row_items, group_sizes, w_gate_up):
    """The gate|up product [M, 2f] of every item's row (w_gate_up [G, d, 2f]: gate columns,
    then up columns), on the Pallas kernels, reading the rows through ``item_row``
    (``gather_gmm``), forward and backward: no item-order copy of the rows is made (the
    weight gradient gathers them inside ``gather_tgmm``, the row gradient sums each row's
    items). Outputs past the items are left undefined (nothing reads them).

    One product on concatenated weights, not two: the backward then has one item gradient to
    sum into the rows, not two to add first (a 1.5 ms pass over the padded item buffer at the
    OLMoE shape on an H200).
    """
    from kernels.occult_matmul import gather_gmm

    return gather_gmm(rows, item_row, w_gate_up, group_sizes, row_items=row_items,
                      fill_tail=False)
