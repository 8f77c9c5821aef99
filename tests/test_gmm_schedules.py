"""gmm's schedules and tilings: the row-tile schedules (tiles from each group's start or on
the tile grid), the streamed kernel (one ring of stages across tiles, a wgmma in flight;
cooperative or ping-pong warpgroups) in the Mosaic GPU interpreter against float64 NumPy and
lowered for CUDA, the default tilings, and tilings that cannot cover the product.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import ON_GPU, f64, np_gmm, np_tgmm, random_sizes

from kernels import grouped_matmul as gm
from kernels import occult_matmul as om
from kernels import schedule

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def random_layouts(seed, tile: int, count: int = 8):
    """``count`` (rows, groups, sizes): rows a multiple of 8 and at least a tile, some groups
    empty, some rows past the groups."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        m, g = 8 * int(rng.integers(tile // 8, 90)), int(rng.integers(1, 12))
        yield m, g, random_sizes(rng, m, g, empty=min(g - 1, 2), tail=int(rng.integers(0, m)))


@pytest.mark.parametrize("group_aligned", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_row_tiles_cover_each_row_once_with_its_group(seed, group_aligned):
    tile = 64
    for m, g, sizes in random_layouts(seed, tile):
        t = jax.tree.map(np.asarray, schedule.row_tiles(jnp.asarray(sizes), m, tile,
                                                        group_aligned))
        owner = np.full(m, -2)
        for i in range(int(t.count[0])):
            assert 0 <= t.row0[i] <= m - tile, "a tile reads outside the rows"
            assert t.row0[i] % schedule.ROW_ALIGN == 0 and t.lo[i] < t.hi[i]
            rows = t.row0[i] + np.arange(t.lo[i], t.hi[i])
            assert np.all(owner[rows] == -2), "row written twice"
            owner[rows] = t.group[i]
        assert np.all(t.group[:t.live[0]] < g) and np.all(t.group[t.live[0]:t.count[0]] == g), \
            "real tiles first, then the zero tiles"
        want = np.concatenate([np.repeat(np.arange(g), sizes), np.full(m - sizes.sum(), g)])
        np.testing.assert_array_equal(owner, want)
        assert t.count[0] <= schedule.max_row_tiles(m, g, tile)
        if group_aligned:  # tiles from the group's start (rounded down to 8) onwards
            counts = np.append(sizes, m - sizes.sum())  # and the rows past the groups
            ends = np.cumsum(counts)
            spans = np.where(counts > 0, ends - (ends - counts) // 8 * 8, 0)
            assert t.count[0] == np.sum(-(-spans // tile))


@pytest.mark.parametrize("group_aligned", [True, False])
def test_group_blocks_cover_each_group_once_inside_the_rows(group_aligned):
    tile = 64
    for m, g, sizes in random_layouts(3, tile):
        b = jax.tree.map(np.asarray, schedule.group_blocks(jnp.asarray(sizes), m, tile,
                                                           group_aligned))
        ends = np.cumsum(sizes)
        for gi in range(g):
            covered = []
            for r in range(int(b.num_blocks[gi])):
                row0, lo, hi = (int(v) for v in schedule.block_rows(
                    b.base[gi], r, b.start[gi], b.end[gi], m, tile))
                assert 0 <= row0 <= m - tile and 0 <= lo < hi <= tile
                covered.extend(row0 + np.arange(lo, hi))
            np.testing.assert_array_equal(covered, np.arange(ends[gi] - sizes[gi], ends[gi]))
            if group_aligned and sizes[gi]:
                start = ends[gi] - sizes[gi]
                assert b.num_blocks[gi] == -(-(ends[gi] - start // 8 * 8) // tile)


def test_row_schedules_refuse_fewer_rows_than_a_tile():
    with pytest.raises(ValueError, match="pad the rows"):
        schedule.row_tiles(jnp.asarray([3, 2]), 40, 64)
    with pytest.raises(ValueError, match="pad the rows"):
        schedule.group_blocks(jnp.asarray([3, 2]), 40, 64)
    with pytest.raises(ValueError, match="pad the rows"):
        schedule.row_tiles(jnp.asarray([3, 2]), 130, 64)


def _worst_load(groups, cost, workers):
    """The busiest worker's load when step i runs on worker i % workers (+1: the epilogue)."""
    load = np.zeros(workers)
    np.add.at(load, np.arange(groups.size) % workers, cost[groups] + 1)
    return load.max()


@pytest.mark.parametrize("workers,tiles_per_group", [(132, 88), (7, 3), (5, 16), (1, 4)])
def test_balanced_order_deals_every_tile_once_and_evens_the_load(workers, tiles_per_group):
    """Every (group, tile) pair once; dealt in the kernel's stride, no worker's load exceeds
    the average by more than one tile (skewed groups, one of them empty)."""
    rng = np.random.default_rng()
    cost = np.append(rng.integers(1, 200, 7) ** 2 // 50, 0).astype(np.int32)
    order = jax.tree.map(np.asarray, schedule.balanced_order(jnp.asarray(cost),
                                                             tiles_per_group, workers))
    pairs = set(zip(order.group.tolist(), order.tile.tolist(), strict=True))
    assert len(order.group) == len(pairs) == cost.size * tiles_per_group
    total = (cost + 1).sum() * tiles_per_group
    assert _worst_load(order.group, cost, workers) <= total / workers + cost.max() + 1


def test_balanced_order_beats_group_order_on_skewed_groups():
    """8 Dirichlet(2)-sized groups of 32 768 rows in 64-row blocks, 88 tiles each, on 132
    SMs (the dW of the benchmark's 32768x2048x1408x8): group order leaves the SMs that draw
    the large groups' tiles last by far more than one tile."""
    p = np.random.default_rng(0).dirichlet(np.full(8, 2.0))
    cost = np.ceil(p * 32768 / 64).astype(np.int32)
    order = np.asarray(schedule.balanced_order(jnp.asarray(cost), 88, 132).group)
    in_groups = np.repeat(np.arange(8), 88)
    average = (cost + 1).sum() * 88 / 132
    assert _worst_load(order, cost, 132) <= average + cost.max() + 1
    assert _worst_load(in_groups, cost, 132) > 1.1 * _worst_load(order, cost, 132)


@pytest.mark.parametrize("group_aligned", [True, False])
def test_tiles_moved_back_from_the_end_of_the_rows(group_aligned):
    """The last group starts 3 rows before the end: from the group's start its tile (and
    tgmm's block) would run past the rows, so it starts tile_m rows before the end and owns
    only those 3 rows (on the grid it starts at row 128). gmm's output and tgmm's weight
    gradient against float64 NumPy, interpreted, both alignments."""
    from kernels.gmm_mgpu import GmmTiling
    from kernels.grouped_matmul import _gmm_raw, _mode, _tgmm_raw
    from kernels.tgmm_mgpu import TgmmTiling

    rng = np.random.default_rng()
    m, k, n = 256, 128, 128
    sizes = np.array([5, 248, 3], np.int32)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, k, n)), jnp.bfloat16)
    y = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    tiling = GmmTiling(tile_n=64, tile_k=64, stages=2, group_aligned=group_aligned)
    got = np.asarray(_gmm_raw(x, w, jnp.asarray(sizes), jnp.float32, False, _mode(None),
                              tiling), np.float64)
    want = np_gmm(f64(x), f64(w), sizes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    t_tiling = TgmmTiling(tile_k=64, tile_n=64, stages=2, group_aligned=group_aligned,
                          balance=group_aligned)  # both tile orders
    got = np.asarray(_tgmm_raw(x, y, jnp.asarray(sizes), jnp.float32, _mode(None), t_tiling),
                     np.float64)
    want = np_tgmm(f64(x), f64(y), sizes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("pingpong,transpose,fill_tail,split_rows", [
    (True, False, True, False), (True, True, True, False), (True, False, False, False),
    (False, False, True, False), (False, True, False, False),
    (False, False, True, True), (False, True, False, True),
])
def test_gmm_streamed_matches_numpy(pingpong, transpose, fill_tail, split_rows):
    """The streamed kernel (one ring of stages across tiles, a wgmma left in flight), with the
    warpgroups sharing each tile (its columns or its rows split) or owning alternate tiles
    (ping-pong): forward and transposed weights, tiles over group boundaries, an empty group
    and rows past the groups (zeros, or left unwritten)."""
    from kernels.gmm_mgpu import GmmTiling
    from kernels.grouped_matmul import _gmm_raw, _mode

    rng = np.random.default_rng()
    m, k, g = 333, 256, 5
    n = 192 if pingpong else 256  # three tiles (alternating warpgroups), or two
    sizes = random_sizes(rng, m, g, empty=1, tail=40)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, n, k) if transpose else (g, k, n)), jnp.bfloat16)
    tiling = GmmTiling(tile_n=64, tile_k=64, stages=3, epi_tile=64, stream=True,
                       pingpong=pingpong, split_rows=split_rows)
    got = np.asarray(_gmm_raw(x, w, jnp.asarray(sizes), jnp.float32, transpose, _mode(None),
                              tiling, fill_tail=fill_tail), np.float64)
    want = np_gmm(f64(x), f64(w), sizes, transpose)
    used = sizes.sum()
    assert not np.isnan(got[:used]).any(), "unwritten output rows"
    np.testing.assert_allclose(got[:used], want[:used], rtol=1e-5,
                               atol=1e-4 * np.abs(want).max())
    if fill_tail:
        assert np.all(got[used:] == 0)
    elif not ON_GPU:  # the interpreter fills unwritten output with NaN
        assert np.isnan(got[used:]).all(), "rows past the groups were written"


def test_gmm_and_tgmm_default_tilings():
    """Ping-pong keeps whole 128-wide tiles per warpgroup at N = 1408, which the cooperative
    kernel must split into 64-wide halves, with as many stages as fit; tgmm splits rows there."""
    from kernels import platform

    t = gm.gmm_tiling(2048, 1408, pingpong=True)
    assert (t.tile_m, t.tile_n, t.pingpong) == (128, 128, True)
    stage = (t.tile_m + t.tile_n) * t.tile_k * 2
    staging = 2 * t.out_slots * t.out_tile[0] * t.out_tile[1] * 2
    assert t.stages * stage + staging <= platform.SMEM_BYTES < (t.stages + 1) * stage + staging
    assert gm.gmm_tiling(2048, 1408).tile_n == 64
    # cooperative tiles split rows (a 64 x 256 accumulator per warpgroup); ping-pong cannot
    assert gm.gmm_tiling(2048, 2048).wg_tile == (64, 256)
    assert gm.gmm_tiling(2048, 2048, split_rows=False).wg_tile == (128, 128)
    assert gm.default_gmm_tiling(2048, 1408).wg_tile == (128, 128)
    dw = gm.tgmm_tiling(2048, 1408)  # rows split: 256 x 128 tiles instead of 128 x 128
    assert (dw.split_k, dw.block_k, dw.block_n) == (True, 256, 128)
    assert dw.stages == gm.tgmm_tiling(2048, 1024).stages  # same stage bytes
    assert gm.tgmm_tiling(2048, 2048).split_k  # 256 x 128 wherever it fits
    assert not gm.tgmm_tiling(1408, 2048).split_k  # k = 1408: 128 x 256, columns split
    # a gathered lhs (gather_tgmm) is shared by the warpgroups wherever columns can split
    assert not om.gather_tgmm_tiling(2048, 2048).split_k
    assert not om.gather_tgmm_tiling(1024, 2816).split_k  # DeepSeek's gate|up: 2 x 1408
    assert om.gather_tgmm_tiling(2048, 1408).split_k  # 64-wide halves otherwise
    assert gm.gmm_tiling(2048, 1024, stream=True).stages == 4  # 48 KiB stages
    # gmm's default: ping-pong at n = 1408, n <= 1024 and k <= 1024, streamed where 22
    # k-steps cannot chain 4 stages
    assert gm.default_gmm_tiling(2048, 1408).pingpong
    assert gm.default_gmm_tiling(2048, 1024).pingpong
    assert gm.default_gmm_tiling(1024, 2048).pingpong
    assert gm.default_gmm_tiling(1408, 2048).stream
    assert gm.default_gmm_tiling(2048, 2048).chain
    combine = gm.gmm_tiling(2048, 1024, pingpong=True, combine=True)  # float32 64² staging
    assert combine.stages == t.stages


def test_tiles_that_do_not_divide_the_product_are_refused():
    """A caller-supplied tiling that would leave columns or rows unwritten is an error."""
    from kernels.gmm_mgpu import GmmTiling
    from kernels.grouped_matmul import _gmm_raw, _mode, _tgmm_raw
    from kernels.tgmm_mgpu import TgmmTiling

    x, w = jnp.ones((128, 256), jnp.bfloat16), jnp.ones((2, 256, 192), jnp.bfloat16)
    sizes = jnp.array([64, 64])
    with pytest.raises(ValueError, match="do not divide"):
        _gmm_raw(x, w, sizes, jnp.float32, False, _mode(None),
                 GmmTiling(tile_n=128, stages=2, pingpong=True))
    with pytest.raises(ValueError, match="do not divide a warpgroup's 64 x 256 tile"):
        _gmm_raw(x, jnp.ones((2, 256, 256), jnp.bfloat16), sizes, jnp.float32, False,
                 _mode(None), GmmTiling(stages=2, split_rows=True, epi_tile=128))
    with pytest.raises(ValueError, match="split_rows needs the cooperative"):
        _gmm_raw(x, jnp.ones((2, 256, 256), jnp.bfloat16), sizes, jnp.float32, False,
                 _mode(None), GmmTiling(stages=2, pingpong=True, split_rows=True))
    with pytest.raises(ValueError, match="do not divide"):
        _tgmm_raw(x, jnp.ones((128, 192), jnp.bfloat16), sizes, jnp.float32, _mode(None),
                  TgmmTiling(tile_k=128, tile_n=128, split_k=True, stages=2))


@pytest.mark.parametrize("stream,pingpong,split_rows", [
    (True, False, False), (True, True, False), (True, False, True), (False, False, True),
    (False, False, False)])
def test_gmm_kernels_lower_for_cuda(stream, pingpong, split_rows):
    """The compiled gmm (streamed: cooperative, columns or rows split, and ping-pong; chained
    cooperative, either split), forward and transposed, is one Mosaic GPU kernel each."""
    from conftest import mosaic_gpu_calls

    bf16 = jnp.bfloat16
    m, k, n, g = 1024, 256, 512, 8  # chained both ways: 4 and 8 k-steps
    for transpose in (False, True):
        tiling = gm.gmm_tiling(n if transpose else k, k if transpose else n, stream=stream,
                               pingpong=pingpong, split_rows=split_rows)
        assert stream or tiling.chain

        def forward(x, w, sizes, transpose=transpose, tiling=tiling):
            return gm._gmm_raw(x, w, sizes, bf16, transpose, "gpu", tiling)

        w_shape = (g, k, n)
        x_shape = (m, n) if transpose else (m, k)
        args = [jax.ShapeDtypeStruct(x_shape, bf16), jax.ShapeDtypeStruct(w_shape, bf16),
                jax.ShapeDtypeStruct((g,), jnp.int32)]
        assert len(mosaic_gpu_calls(forward, args)) == 1


def test_no_rows_at_all():
    """M = 0 (every group empty): gmm returns [0, N], tgmm zero weight gradients."""
    rng = np.random.default_rng()
    w = jnp.asarray(rng.standard_normal((3, 128, 256)), jnp.bfloat16)
    sizes = jnp.zeros(3, jnp.int32)
    assert gm.gmm(jnp.zeros((0, 128), jnp.bfloat16), w, sizes).shape == (0, 256)
    dw = gm.tgmm(jnp.zeros((0, 128), jnp.bfloat16), jnp.zeros((0, 256), jnp.bfloat16), sizes)
    assert dw.shape == (3, 128, 256) and not np.asarray(dw, np.float32).any()
