"""Tile schedules for grouped matmuls, computed by XLA before a kernel runs.

Rows ``[0, M)`` are sorted by group; group ``g`` owns ``group_sizes[g]`` consecutive rows, and
rows past ``sum(group_sizes)`` belong to no group. A *row tile* is one ``tile_m``-row block of
the buffer seen by one group: a block that straddles two groups is visited once per group, each
visit writing only its own rows. Tiles of the rows past the groups are marked with group ``G``
(zero tiles): the kernel writes zeros there, so every output row is written.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RowTiles(NamedTuple):
    """Per-tile group, block index and the [lo, hi) rows of the block it owns; ``count`` tiles
    are used, the first ``live`` of them belong to real groups (the rest are zero tiles)."""

    group: jax.Array  # [max_tiles] int32; G marks a zero tile
    block: jax.Array  # [max_tiles] int32
    lo: jax.Array  # [max_tiles] int32
    hi: jax.Array  # [max_tiles] int32
    count: jax.Array  # [1] int32
    live: jax.Array  # [1] int32


def max_row_tiles(num_rows: int, num_groups: int, tile_m: int) -> int:
    """Static bound on row tiles: every block once, plus one per group boundary and the tail."""
    return -(-num_rows // tile_m) + num_groups


def row_tiles(group_sizes: jax.Array, num_rows: int, tile_m: int) -> RowTiles:
    """The row-tile schedule of ``group_sizes`` (a trailing zero group covers unused rows)."""
    sizes = group_sizes.astype(jnp.int32)
    used = jnp.minimum(jnp.sum(sizes), num_rows)
    sizes = jnp.concatenate([sizes, (num_rows - used)[None]])
    ends = jnp.minimum(jnp.cumsum(sizes), num_rows)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    first = starts // tile_m
    tiles = jnp.where(ends > starts, (ends - 1) // tile_m - first + 1, 0)
    cum = jnp.cumsum(tiles)
    n_max = max_row_tiles(num_rows, group_sizes.shape[0], tile_m)
    t = jnp.arange(n_max, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(cum, t, side="right"), sizes.shape[0] - 1).astype(jnp.int32)
    block = first[g] + t - (cum[g] - tiles[g])
    base = block * tile_m
    lo = jnp.clip(starts[g] - base, 0, tile_m)
    hi = jnp.clip(ends[g] - base, 0, tile_m)
    in_use = t < cum[-1]
    return RowTiles(
        group=g,
        block=jnp.where(in_use, block, 0).astype(jnp.int32),
        lo=jnp.where(in_use, lo, 0).astype(jnp.int32),
        hi=jnp.where(in_use, hi, 0).astype(jnp.int32),
        count=cum[-1:].astype(jnp.int32),
        live=cum[-2:-1].astype(jnp.int32),
    )


class GroupBlocks(NamedTuple):
    """For the transposed matmul: each group's first row, end row, first block and block count."""

    start: jax.Array  # [G] int32
    end: jax.Array  # [G] int32
    first_block: jax.Array  # [G] int32
    num_blocks: jax.Array  # [G] int32


def group_blocks(group_sizes: jax.Array, num_rows: int, tile_m: int) -> GroupBlocks:
    """The ``tile_m``-row blocks each group's rows touch (none for an empty group)."""
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(sizes), num_rows)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    first = starts // tile_m
    blocks = jnp.where(ends > starts, (ends - 1) // tile_m - first + 1, 0)
    return GroupBlocks(starts, ends, first.astype(jnp.int32), blocks.astype(jnp.int32))
