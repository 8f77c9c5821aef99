"""Dispatch plans: where each token row goes, for the standard and the Occult layouts.

A plan is a pure function of the routing, the expert→slot map and the buffer capacity. The send
buffer has `num_devices` blocks of `capacity` rows; block n goes to device n. Each row carries a
token's activations plus up to `pairs` (local expert, weight) pairs:

* standard: one row per (token, expert) — `pairs = 1`;
* occult:   one row per (token, device), listing every chosen expert of that device —
            `pairs = min(k, E/N)`.

That grouping is the only difference between the two; everything downstream is shared.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DispatchPlan:
    slot_token: jax.Array  # [N*C] source token of each send row, -1 if empty
    token_slot: jax.Array  # [T, k] send row owned by each assignment (first of its group), else -1
    slot_expert: jax.Array  # [N*C, pairs] local expert index of each pair, -1 if empty
    slot_weight: jax.Array  # [N*C, pairs] routing weight of each pair, 0 if empty
    send_counts: jax.Array  # [N] rows used in each block (rows are packed at the block start)
    kept: jax.Array  # [T, k] bool, False where the assignment overflowed its block
    devices_per_token: jax.Array  # [T] distinct devices among the token's experts (C_T)


def pairs_per_row(dedup: bool, top_k: int, experts_per_device: int) -> int:
    return min(top_k, experts_per_device) if dedup else 1


def make_plan(expert_ids: jax.Array, weights: jax.Array, expert_slot: jax.Array, *,
              num_devices: int, experts_per_device: int, capacity: int,
              dedup: bool) -> DispatchPlan:
    """expert_ids/weights [T, k] (logical ids) → a DispatchPlan.

    expert_slot [E] maps a logical expert to its physical slot; slot // experts_per_device is
    its device and slot % experts_per_device its index there (placement permutes the map).
    """
    tokens, k = expert_ids.shape
    slot = expert_slot[expert_ids]
    device = slot // experts_per_device
    local = slot % experts_per_device
    col = jnp.arange(k)

    same = device[:, :, None] == device[:, None, :]  # [T, k, k]
    if dedup:  # group = all of a token's assignments to one device; leader = first of them
        leader = jnp.argmax(same, axis=-1)
        rank = jnp.sum(same & (col[None, :] < col[:, None])[None], axis=-1)
    else:
        leader = jnp.broadcast_to(col, (tokens, k))
        rank = jnp.zeros((tokens, k), jnp.int32)
    is_leader = leader == col
    first_of_device = jnp.sum(same & (col[None, :] < col[:, None])[None], axis=-1) == 0
    devices_per_token = jnp.sum(first_of_device, axis=-1)

    # Row position of each leader inside its destination block, in (token, expert) order.
    wants = (device[..., None] == jnp.arange(num_devices)) & is_leader[..., None]  # [T, k, N]
    running = jnp.cumsum(wants.reshape(tokens * k, num_devices), axis=0) - 1
    position = jnp.take_along_axis(running.reshape(tokens, k, num_devices), device[..., None],
                                   axis=-1)[..., 0]
    position = jnp.take_along_axis(position, leader, axis=1)  # followers share the leader's row
    kept = position < capacity
    row = device * capacity + position  # [T, k]

    blocks = num_devices * capacity
    pairs = pairs_per_row(dedup, k, experts_per_device)
    owner = is_leader & kept
    token_index = jnp.broadcast_to(jnp.arange(tokens)[:, None], (tokens, k))
    slot_token = jnp.full((blocks,), -1, jnp.int32).at[jnp.where(owner, row, blocks)].set(
        token_index, mode="drop")
    pair_row = jnp.where(kept, row, blocks)
    slot_expert = jnp.full((blocks, pairs), -1, jnp.int32).at[pair_row, rank].set(
        local, mode="drop")
    slot_weight = jnp.zeros((blocks, pairs), weights.dtype).at[pair_row, rank].set(
        weights, mode="drop")
    send_counts = jnp.minimum(jnp.sum(wants, axis=(0, 1)), capacity).astype(jnp.int32)
    return DispatchPlan(
        slot_token=slot_token,
        token_slot=jnp.where(owner, row, -1).astype(jnp.int32),
        slot_expert=slot_expert,
        slot_weight=slot_weight,
        send_counts=send_counts,
        kept=kept,
        devices_per_token=devices_per_token,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ExpertPlan:
    """Received rows expanded to (row, local expert) items, grouped by local expert.

    Items are laid out group after group; with `block > 1` each group starts on a multiple of
    `block` (padding items between groups are empty), so every block of rows has one expert.
    """

    item_row: jax.Array  # [M] received row of each item, -1 for padding
    item_pair: jax.Array  # [M] flat (row, pair) index of each item, -1 for padding
    row_items: jax.Array  # [R, pairs] item position of each (row, pair), -1 if empty
    group_sizes: jax.Array  # [E_local] rows each expert owns in the layout (padding included)
    block_group: jax.Array  # [M / block] expert of each row block
    used_blocks: jax.Array  # [] number of leading blocks that hold items


def expert_items_bound(rows: int, pairs: int, experts_per_device: int, block: int,
                       align: int = 1) -> int:
    """Static item-buffer length: every (row, pair), plus up to block − 1 padding per expert,
    rounded up to a multiple of `align` rows."""
    items = rows * pairs
    if block > 1:
        items += experts_per_device * (block - 1)
    return -(-items // align) * align


def make_expert_plan(slot_expert: jax.Array, experts_per_device: int,
                     block: int = 1, align: int = 1) -> ExpertPlan:
    """slot_expert [R, pairs] (received; -1 = empty) → items grouped by local expert.

    `align` (a multiple of `block`) rounds the item buffer's length, for backends that step
    through it in chunks of blocks.
    """
    rows, pairs = slot_expert.shape
    groups = experts_per_device
    flat = slot_expert.reshape(-1)
    valid = flat >= 0
    key = jnp.where(valid, flat, groups)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    sizes = jnp.bincount(key, length=groups + 1)[:groups].astype(jnp.int32)
    padded = -(-sizes // block) * block
    starts = jnp.cumsum(sizes) - sizes
    padded_starts = jnp.cumsum(padded) - padded

    sorted_key = key[order]
    sorted_valid = sorted_key < groups
    group = jnp.minimum(sorted_key, groups - 1)
    rank = jnp.arange(order.shape[0], dtype=jnp.int32) - starts[group]
    length = expert_items_bound(rows, pairs, groups, block, align)
    dest = jnp.where(sorted_valid, padded_starts[group] + rank, length)

    item_pair = jnp.full((length,), -1, jnp.int32).at[dest].set(order, mode="drop")
    item_row = jnp.where(item_pair >= 0, item_pair // pairs, -1)
    row_items = jnp.full((rows * pairs,), -1, jnp.int32).at[order].set(
        jnp.where(sorted_valid, dest, -1)).reshape(rows, pairs)
    block_starts = jnp.arange(length // block, dtype=jnp.int32) * block
    block_group = jnp.searchsorted(jnp.cumsum(padded), block_starts, side="right")
    return ExpertPlan(
        item_row=item_row,
        item_pair=item_pair,
        row_items=row_items,
        group_sizes=padded,
        block_group=jnp.minimum(block_group, groups - 1).astype(jnp.int32),
        used_blocks=(jnp.sum(padded) // block).astype(jnp.int32),
    )


def item_weights(items: ExpertPlan, slot_weight: jax.Array) -> jax.Array:
    """Routing weight of each item ([R, pairs] slot weights picked by ``item_pair``; 0 for
    padding items). Its gradient gathers back through ``row_items`` (a row map): the plain
    gather's scatter-add piled every padding item onto one slot (0.7 ms on an H200)."""
    from occult_jax.row_maps import expand_rows

    picked = expand_rows(slot_weight.reshape(-1, 1), items.item_pair,
                         items.row_items.reshape(-1, 1))
    return picked[:, 0]
