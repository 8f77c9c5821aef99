"""The library's earlier defaults, patched back in while a benchmark variant traces, so that
``benchmarks/fused_experts.py`` can time them beside the current ones in one run: a variant
named ``<variant>@cooperative``, ``@gridrows``, ``@copytrain``, ``@coopshort``,
``@colsplit``, ``@gatherrows`` or ``@gmmcols`` (suffixes combine); ``@widedw`` is a
candidate measured and dropped (session 18), kept so that its measurement can be repeated.
``benchmarks/moe_layer.py`` takes ``pallas@perlaunch`` (``previous_transport``)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

PREVIOUS = ("@cooperative", "@gridrows", "@copytrain", "@coopshort", "@colsplit",
            "@gatherrows", "@gmmcols", "@widedw")


@contextlib.contextmanager
def previous_schedules(name: str):
    """Each suffix undoes one change, so an older default is the combination of the suffixes of
    the changes made since (the schedule before session 15: ``@coopshort@colsplit@gmmcols``).
    ``…@cooperative``: gmm and tgmm default to the cooperative schedule, tgmm splitting
    columns (the defaults before 2026-11-24); ``…@gridrows``: row tiles on the tile grid,
    tgmm's tiles in group order; ``…@copytrain``: the gate|up product copies the
    rows into item order under differentiation (``gate_up_copied_in_training``);
    ``…@coopshort``: gmm with a contraction of at most 1024 and a 2048-wide output on the
    cooperative kernel, not ping-pong (the default before session 15); ``…@colsplit``: tgmm
    splits a tile's columns between the warpgroups wherever n % 256 == 0 (before session
    15 it split rows only where columns could not be split, e.g. n = 1408);
    ``…@gatherrows``: gather_tgmm takes tgmm's default tiling (split rows; sessions 15-16);
    ``…@gmmcols``: cooperative gmm and gather_gmm tiles split columns between the warpgroups
    (two 128 x 128 accumulators; before session 18) instead of rows; ``…@widedw``: tgmm and
    gather_tgmm compute 128 x 256 output tiles, 64 x 256 per warpgroup, where they fit.
    Jit traces a custom_vjp's backward when the gradient is traced, so a variant must be
    traced (called first) inside this context, forward and gradient both."""
    import kernels.grouped_matmul as gm
    import kernels.occult_matmul as om
    import occult_jax.experts as experts

    saved = gm.default_gmm_tiling, gm.gmm_tiling, gm.tgmm_tiling, gm.PINGPONG_MAX_CONTRACTION
    saved_gather, saved_gate_up = om.gather_tgmm_tiling, experts.gate_up_items
    try:  # each patch wraps the current function, so suffixes combine
        if "@coopshort" in name:
            gm.PINGPONG_MAX_CONTRACTION = 0
        if "@cooperative" in name:  # looked up per call, so later patches of gmm_tiling apply
            gm.default_gmm_tiling = lambda *a, **kw: gm.gmm_tiling(*a, **kw)
            gm.tgmm_tiling = functools.partial(gm.tgmm_tiling, split_k=False)
        if "@colsplit" in name:
            rows_where_needed = gm.tgmm_tiling
            gm.tgmm_tiling = lambda k, n, *a, **kw: rows_where_needed(
                k, n, *a, **{"split_k": n % 256 != 0 and n % 128 == 0 and k % 256 == 0, **kw})
        if "@gatherrows" in name:
            om.gather_tgmm_tiling = lambda *a, **kw: gm.tgmm_tiling(*a, **kw)
        if "@gmmcols" in name:
            gm.gmm_tiling = functools.partial(gm.gmm_tiling, split_rows=False)  # gather_gmm too
        if "@widedw" in name:
            def wide(make):
                def tiling(k, n, *a, **kw):
                    t = make(k, n, *a, **kw)
                    if n % 256 or k % 128:
                        return t
                    return dataclasses.replace(t, tile_k=64, tile_n=256, split_k=True)
                return tiling

            gm.tgmm_tiling = wide(gm.tgmm_tiling)
            om.gather_tgmm_tiling = wide(om.gather_tgmm_tiling)
        if "@gridrows" in name:
            def on_grid(make, **changes):
                return lambda *a, **kw: dataclasses.replace(make(*a, **kw), group_aligned=False,
                                                            **changes)

            gm.gmm_tiling = on_grid(gm.gmm_tiling)
            gm.tgmm_tiling = on_grid(gm.tgmm_tiling, balance=False)
        if "@copytrain" in name:
            experts.gate_up_items = gate_up_copied_in_training
        yield
    finally:
        (gm.default_gmm_tiling, gm.gmm_tiling, gm.tgmm_tiling,
         gm.PINGPONG_MAX_CONTRACTION) = saved
        om.gather_tgmm_tiling, experts.gate_up_items = saved_gather, saved_gate_up


def gate_up_copied_in_training(rows, item_row, row_items, group_sizes, w_gate_up):
    """The gate|up product as before 2026-11-24 (session 14): read through the item index
    when served, but under differentiation the rows copied into item order (the copy is the
    residual tgmm reads in the backward)."""
    import jax

    from kernels.grouped_matmul import gmm
    from kernels.occult_matmul import gather_gmm
    from occult_jax.row_maps import expand_rows

    def copied(r, w):
        x_items = expand_rows(r, item_row, row_items, fill_empty=False)
        return gmm(x_items, w, group_sizes, fill_tail=False)

    @jax.custom_vjp
    def product(r, w):
        return gather_gmm(r, item_row, w, group_sizes)

    product.defvjp(lambda r, w: jax.vjp(copied, r, w), lambda pullback, ct: pullback(ct))
    return product(rows, w_gate_up)


@contextlib.contextmanager
def previous_transport(name: str):
    """``pallas@perlaunch`` (``benchmarks/moe_layer.py --transports``): the Pallas transport
    launches one kernel per message (rows, then their metadata), as before session 19, instead
    of one kernel per exchange. The layer's jitted function is cached per config, and both
    variants share one, so the cache is cleared on the way in and out: each variant traces its
    own program. Unknown suffixes are an error."""
    import occult_jax.moe as moe
    import occult_jax.transport as transport

    base, _, suffix = name.partition("@")
    if suffix not in ("", "perlaunch") or (suffix and base != "pallas"):
        raise ValueError(f"transport variant {name!r}: use a transport name, or pallas@perlaunch")
    saved = transport._move
    moe.expert_parallel_fn.cache_clear()
    try:
        if suffix == "perlaunch":
            def per_message(packed, kind, axis_name, send_counts, recv_counts):
                return [saved([w], kind, axis_name, send_counts, recv_counts)[0]
                        for w in packed]

            transport._move = per_message
        yield
    finally:
        transport._move = saved
        moe.expert_parallel_fn.cache_clear()
