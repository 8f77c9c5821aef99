"""Tile schedules for grouped matmuls, computed by XLA before a kernel runs.

Rows ``[0, M)`` are sorted by group; group ``g`` owns ``group_sizes[g]`` consecutive rows, and
rows past ``sum(group_sizes)`` belong to no group. A *row tile* is ``tile_m`` consecutive rows
seen by one group, and writes only the rows ``[lo, hi)`` of it that the group owns.

Tiles start where their group starts (``group_aligned``), rounded down to a multiple of
``ROW_ALIGN`` rows: a group of ``s`` rows costs about ``ceil(s / tile_m)`` tiles, half a tile
fewer per group than tiles on the ``tile_m``-row block grid, where a block that straddles two
groups is visited once per group (``ceil(M / tile_m) + G`` bounds both: a group's first
row rounded down to 8 is never before it rounded down to ``tile_m``). A tile that would run
past row ``M`` starts ``tile_m`` rows before it instead and owns only its group's rows not yet
covered, so every tile reads inside the buffer. Tiles of the rows past the groups are marked
with group ``G`` (zero tiles): the kernel writes zeros there, so every output row is written.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Row offsets of tiles are multiples of this: TMA copies into 128-byte-swizzled tiles address
# rows in groups of 8 (Mosaic GPU cannot lower an arbitrary row offset there).
ROW_ALIGN = 8


def _check_rows(num_rows: int, tile_m: int) -> None:
    if tile_m % ROW_ALIGN or num_rows < tile_m or num_rows % ROW_ALIGN:
        raise ValueError(f"row tiles of {tile_m} rows need a multiple of {ROW_ALIGN} rows, at "
                         f"least tile_m of them; got {num_rows} (pad the rows to a multiple "
                         "of tile_m)")


class RowTiles(NamedTuple):
    """Per-tile group, first row and the [lo, hi) rows of the tile it owns; ``count`` tiles
    are used, the first ``live`` of them belong to real groups (the rest are zero tiles)."""

    group: jax.Array  # [max_tiles] int32; G marks a zero tile
    row0: jax.Array  # [max_tiles] int32; the tile is rows [row0, row0 + tile_m)
    lo: jax.Array  # [max_tiles] int32
    hi: jax.Array  # [max_tiles] int32
    count: jax.Array  # [1] int32
    live: jax.Array  # [1] int32


def max_row_tiles(num_rows: int, num_groups: int, tile_m: int) -> int:
    """Static bound on row tiles, either alignment: every block once, plus one per group
    boundary and the tail (a group's tiles from its start rounded down to 8 are never more
    than the grid blocks it touches, and those total at most ``ceil(M / tile_m) + G``)."""
    return -(-num_rows // tile_m) + num_groups


def row_tiles(group_sizes: jax.Array, num_rows: int, tile_m: int,
              group_aligned: bool = True) -> RowTiles:
    """The row-tile schedule of ``group_sizes`` (a trailing zero group covers unused rows);
    ``num_rows >= tile_m``."""
    sizes = group_sizes.astype(jnp.int32)
    used = jnp.minimum(jnp.sum(sizes), num_rows)
    blocks = group_blocks(jnp.concatenate([sizes, (num_rows - used)[None]]), num_rows, tile_m,
                          group_aligned)
    cum = jnp.cumsum(blocks.num_blocks)
    n_max = max_row_tiles(num_rows, group_sizes.shape[0], tile_m)
    t = jnp.arange(n_max, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(cum, t, side="right"), sizes.shape[0]).astype(jnp.int32)
    row0, lo, hi = block_rows(blocks.base[g], t - (cum[g] - blocks.num_blocks[g]),
                              blocks.start[g], blocks.end[g], num_rows, tile_m)
    in_use = t < cum[-1]
    return RowTiles(
        group=g,
        row0=jnp.where(in_use, row0, 0).astype(jnp.int32),
        lo=jnp.where(in_use, lo, 0).astype(jnp.int32),
        hi=jnp.where(in_use, hi, 0).astype(jnp.int32),
        count=cum[-1:].astype(jnp.int32),
        live=cum[-2:-1].astype(jnp.int32),
    )


class GroupBlocks(NamedTuple):
    """Each group's first row, end row, the first row of its first block and its block count
    (``tgmm`` reduces over the blocks; ``row_tiles`` lists them as row tiles). Block ``r`` is
    nominally rows ``base + r * tile_m`` onwards; one that would run past row ``M`` is read
    ``tile_m`` rows before it (``block_rows``)."""

    start: jax.Array  # [G] int32
    end: jax.Array  # [G] int32
    base: jax.Array  # [G] int32
    num_blocks: jax.Array  # [G] int32


def group_blocks(group_sizes: jax.Array, num_rows: int, tile_m: int,
                 group_aligned: bool = True) -> GroupBlocks:
    """The ``tile_m``-row blocks that cover each group's rows (none for an empty group):
    starting at the group's first row (rounded down to ``ROW_ALIGN``), or on the ``tile_m``-row
    grid."""
    _check_rows(num_rows, tile_m)
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(sizes), num_rows)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    align = ROW_ALIGN if group_aligned else tile_m
    base = starts // align * align
    blocks = jnp.where(ends > starts, (ends - base + tile_m - 1) // tile_m, 0)
    return GroupBlocks(starts, ends, base.astype(jnp.int32), blocks.astype(jnp.int32))


def block_rows(base, r, start, end, num_rows: int, tile_m: int):
    """Block ``r`` of a group: the row it is read from and the rows ``[lo, hi)`` of it that
    are the group's and not in an earlier block."""
    nominal = base + r * tile_m
    row0 = pl.multiple_of(jnp.minimum(nominal, num_rows - tile_m), ROW_ALIGN)
    return row0, jnp.maximum(start, nominal) - row0, jnp.minimum(end - row0, tile_m)


def first_row(row0_ref, tile) -> jax.Array:
    """Inside a kernel: the first row of a row tile, known to the compiler as a multiple of
    ``ROW_ALIGN`` (for TMA copies into swizzled tiles)."""
    return pl.multiple_of(row0_ref[tile], ROW_ALIGN)


class TileOrder(NamedTuple):
    """The order a persistent kernel visits (group, tile) pairs in: step ``i`` runs on worker
    ``i % workers`` (``plgpu.nd_loop`` over the SMs)."""

    group: jax.Array  # [G * tiles_per_group] int32
    tile: jax.Array  # [G * tiles_per_group] int32


def balanced_order(cost: jax.Array, tiles_per_group: int, workers: int) -> TileOrder:
    """Every group's ``tiles_per_group`` tiles (each costing ``cost[g]``, e.g. its row blocks),
    longest first, dealt to the workers in a snake (0 … W-1, then W-1 … 0): no worker ends
    more than one tile's cost after the average. In group order instead, the workers that
    draw the large groups' tiles of skewed groups finish last (a cost model put them at up to
    1.24× the average at the benchmark's shapes; measured: docs/benchmarks.md, session 13)."""
    num_groups = cost.shape[0]
    total = num_groups * tiles_per_group
    ranked = jnp.argsort(-cost.astype(jnp.int32), stable=True).astype(jnp.int32)
    step = jnp.arange(total, dtype=jnp.int32)
    rnd, lane = step // workers, step % workers
    in_round = jnp.minimum(workers, total - rnd * workers)  # the last round may be short
    position = rnd * workers + jnp.where(rnd % 2 == 0, lane, in_round - 1 - lane)
    return TileOrder(ranked[position // tiles_per_group], position % tiles_per_group)
