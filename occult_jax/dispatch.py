"""The token's path through one expert-parallel MoE layer, as seen by one device (in shard_map).

route → plan → exchange → expert compute (+ pre-combine) → exchange back → combine.
`standard` and `occult` share all of it; only the plan's grouping differs (see plan.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from occult_jax import plan as plan_lib
from occult_jax import routing as routing_lib
from occult_jax.config import MoEConfig
from occult_jax.experts import row_layout, swiglu, swiglu_combine
from occult_jax.row_maps import expand_rows, reduce_rows
from occult_jax.transport import exchange, row_bytes


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ExpertWeights:
    router: jax.Array  # [d, E], logical expert columns
    w_gate: jax.Array  # [E, d, f], physical slot order
    w_up: jax.Array  # [E, d, f]
    w_down: jax.Array  # [E, f, d]
    similarity: jax.Array  # [E, E] expert similarity for the "similarity" prune rule


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static facts of one layer call on one mesh."""

    axis_name: str  # the expert axis
    all_axes: tuple[str, ...]  # every mesh axis (tokens are sharded over all)
    num_devices: int  # size of the expert axis
    capacity: int  # rows per peer block
    backend: str  # grouped-matmul backend
    platform: str = ""  # the platform the kernels are chosen for (kernels.platform.of)
    identity_experts: bool = False  # benchmarks only: rows return unchanged (times the exchange)


def compute_experts(rows: jax.Array, slot_expert: jax.Array, slot_weight: jax.Array,
                    weights: ExpertWeights, backend: str, precombine: str = "rows") -> jax.Array:
    """Received rows [R, d] → one pre-combined output row each: Σ_pairs weight · FFN_e(row)
    (``precombine``: MoEConfig.precombine, for the "pallas" backend)."""
    experts_per_device = weights.w_gate.shape[0]
    items = plan_lib.make_expert_plan(slot_expert, experts_per_device, *row_layout(backend))
    w_items = plan_lib.item_weights(items, slot_weight)
    dtype = rows.dtype
    return swiglu_combine(rows, items, w_items, weights.w_gate.astype(dtype),
                          weights.w_up.astype(dtype), weights.w_down.astype(dtype), backend,
                          precombine)


def expert_parallel_moe(x: jax.Array, weights: ExpertWeights, expert_slot: jax.Array,
                        cfg: MoEConfig, layout: Layout) -> tuple[jax.Array, dict]:
    """x [T_local, d] → (y [T_local, d], global stats). Runs inside shard_map."""
    n, axis = layout.num_devices, layout.axis_name
    experts_per_device = cfg.num_experts // n

    routing = routing_lib.route(x, weights.router, cfg, expert_slot // experts_per_device, n,
                                weights.similarity)
    plan = plan_lib.make_plan(
        routing.expert_ids, routing.weights, expert_slot, num_devices=n,
        experts_per_device=experts_per_device, capacity=layout.capacity,
        dedup=cfg.dispatch == "occult")

    send_rows = expand_rows(x, plan.slot_token, plan.token_slot)
    (rows, slot_weight), (slot_expert,), recv_counts = exchange(
        (send_rows, plan.slot_weight), (plan.slot_expert,), kind=cfg.transport, axis_name=axis,
        send_counts=plan.send_counts)
    if recv_counts is not None:  # ragged, pallas: rows past each block's count are zeros
        block_row = jnp.arange(rows.shape[0]) % layout.capacity
        filled = block_row < jnp.repeat(recv_counts, layout.capacity)
        slot_expert = jnp.where(filled[:, None], slot_expert, -1)

    if layout.identity_experts:
        out_rows = rows
    else:
        out_rows = compute_experts(rows, slot_expert, slot_weight, weights, layout.backend,
                                   cfg.precombine)

    (back_rows,), _, _ = exchange(
        (out_rows,), (), kind=cfg.transport, axis_name=axis,
        send_counts=plan.send_counts if recv_counts is None else recv_counts,
        recv_counts=plan.send_counts)
    y = reduce_rows(back_rows, plan.token_slot, plan.slot_token, None)

    me = jax.lax.axis_index(axis)
    off_device = jnp.sum(plan.send_counts) - plan.send_counts[me]
    bytes_per_row = (row_bytes((send_rows, plan.slot_weight, plan.slot_expert), cfg.transport)
                     + row_bytes((out_rows,), cfg.transport))
    if cfg.transport == "dense":
        wire_bytes = jnp.asarray((n - 1) * layout.capacity * bytes_per_row, jnp.float32)
    else:
        wire_bytes = off_device.astype(jnp.float32) * bytes_per_row
    local = {
        "dropped": jnp.sum(~plan.kept).astype(jnp.int32),
        "wire_rows": off_device.astype(jnp.int32),
        "wire_bytes": wire_bytes,
        "ct_sum": jnp.sum(plan.devices_per_token).astype(jnp.float32),
    }
    return y, _global_stats(routing, local, cfg, layout.all_axes)


def _global_stats(routing: routing_lib.Routing, local: dict, cfg: MoEConfig,
                  all_axes: tuple[str, ...]) -> dict:
    terms = routing_lib.loss_terms(routing, cfg.num_experts)
    means = jax.lax.pmean({k: terms[k] for k in ("fraction", "mean_score", "z")}, all_axes)
    stats = routing_lib.losses_from_terms({**means, "load": terms["load"]}, cfg.num_experts)
    stats["expert_load"] = jax.lax.psum(terms["load"], all_axes)
    stats["coactivation"] = jax.lax.psum(
        routing_lib.coactivation(routing.expert_ids, cfg.num_experts), all_axes)
    stats.update(jax.lax.psum(routing_lib.logit_moments(routing.logits), all_axes))
    totals = jax.lax.psum(local, all_axes)
    tokens = jax.lax.psum(routing.expert_ids.shape[0], all_axes)
    stats["ct"] = totals.pop("ct_sum") / tokens
    stats["tokens"] = jnp.asarray(tokens, jnp.int32)
    stats.update(totals)
    return stats


def reference_moe(x: jax.Array, weights: ExpertWeights, expert_slot: jax.Array,
                  cfg: MoEConfig, num_devices: int = 1) -> tuple[jax.Array, dict]:
    """No expert parallelism: every expert on every token, masked by the routing weights.

    The ground truth other dispatches are tested against. `num_devices` places expert slot s on
    device s // (E / num_devices): it feeds `stats["ct"]` and the device-limited top-k of
    `cfg.max_devices_per_token` (a cap ≥ num_devices does not bind).
    """
    tokens = x.shape[0]
    experts_per_device = cfg.num_experts // num_devices
    routing = routing_lib.route(x, weights.router, cfg, expert_slot // experts_per_device,
                                num_devices, weights.similarity)
    combine = jnp.zeros((tokens, cfg.num_experts), jnp.float32).at[
        jnp.arange(tokens)[:, None], routing.expert_ids].add(routing.weights)
    dtype = x.dtype
    outs = jax.vmap(swiglu, in_axes=(None, 0, 0, 0), out_axes=1)(
        x, weights.w_gate[expert_slot].astype(dtype), weights.w_up[expert_slot].astype(dtype),
        weights.w_down[expert_slot].astype(dtype))  # [T, E, d]
    y = jnp.einsum("te,ted->td", combine, outs.astype(jnp.float32)).astype(dtype)

    terms = routing_lib.loss_terms(routing, cfg.num_experts)
    stats = routing_lib.losses_from_terms(terms, cfg.num_experts)
    device = expert_slot[routing.expert_ids] // experts_per_device
    distinct = jnp.sum(jax.nn.one_hot(device, num_devices).max(axis=1), axis=-1)
    stats.update(dropped=jnp.int32(0), wire_rows=jnp.int32(0), wire_bytes=jnp.float32(0),
                 ct=jnp.mean(distinct), tokens=jnp.asarray(tokens, jnp.int32),
                 coactivation=routing_lib.coactivation(routing.expert_ids, cfg.num_experts),
                 **routing_lib.logit_moments(routing.logits))
    return y, stats
