"""Pallas grouped-matmul kernels (kernels/) in the Mosaic GPU interpreter, against float64 NumPy.

Group sizes are fresh random draws with empty groups, groups that are not a multiple of the tile,
M not a multiple of the tile and rows past the last group. The interpreter fills unwritten memory
with NaN, so any output element the kernel forgot to write fails the comparison.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import grouped_matmul as gm

ON_GPU = jax.default_backend() == "gpu"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
# float32 operands: exact in the CPU interpreter, TF32 tensor-core products on a GPU.
F32_TOL = 1e-4 if jax.default_backend() == "cpu" else 5e-3


def random_sizes(rng, m, g, *, empty=1, tail=0):
    """g group sizes summing to m - tail, `empty` of them zero, the rest random."""
    cuts = np.sort(rng.integers(0, m - tail + 1, g - 1 - empty))
    sizes = np.diff(np.concatenate([[0], cuts, [m - tail]]))
    sizes = np.insert(sizes, rng.integers(0, len(sizes) + 1, empty), 0)
    rng.shuffle(sizes)
    return sizes.astype(np.int32)


def np_gmm(x, w, sizes, transpose=False):
    ends = np.cumsum(sizes)
    out = np.zeros((x.shape[0], w.shape[1] if transpose else w.shape[2]))
    for g, (s, e) in enumerate(zip(ends - sizes, ends, strict=True)):
        out[s:e] = x[s:e] @ (w[g].T if transpose else w[g])
    return out


def np_tgmm(x, y, sizes):
    ends = np.cumsum(sizes)
    return np.stack([x[s:e].T @ y[s:e] for s, e in zip(ends - sizes, ends, strict=True)])


def f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


@pytest.mark.parametrize("dtype,transpose", [("bfloat16", False), ("float32", False),
                                             ("bfloat16", True)])
def test_gmm_matches_numpy(dtype, transpose):
    rng = np.random.default_rng()
    m, k, n, g = 333, 128, 256, 5  # M not a multiple of 128; one empty group; unused tail rows
    sizes = random_sizes(rng, m, g, tail=7)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((g, n, k) if transpose else (g, k, n)), dtype)
    if transpose:
        from kernels.grouped_matmul import _gmm_raw, _mode

        out = _gmm_raw(x, w, jnp.asarray(sizes), jnp.float32, True, _mode(None))
    else:
        out = gm.gmm(x, w, jnp.asarray(sizes), preferred_element_type=jnp.float32)
    want = np_gmm(f64(x), f64(w), sizes, transpose)
    got = np.asarray(out, np.float64)
    assert not np.isnan(got).any(), "unwritten output rows"
    tol = F32_TOL if dtype == "float32" else 1e-4
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=tol * np.abs(want).max())
    assert np.all(got[sizes.sum():] == 0)


def test_tgmm_ignores_nan_rows_past_the_groups():
    """Rows past the last group may hold anything (gmm with fill_tail=False leaves them
    unwritten): NaN and inf there, in both operands, must not reach the weight gradient."""
    rng = np.random.default_rng()
    m, k, n, g = 320, 128, 256, 4
    sizes = random_sizes(rng, m, g, empty=1, tail=77)
    used = int(sizes.sum())
    x_np, y_np = rng.standard_normal((m, k)), rng.standard_normal((m, n))
    x_np[used:], y_np[used::2], y_np[used + 1::2] = np.nan, np.inf, np.nan
    x, y = jnp.asarray(x_np, jnp.bfloat16), jnp.asarray(y_np, jnp.bfloat16)
    got = np.asarray(gm.tgmm(x, y, jnp.asarray(sizes), preferred_element_type=jnp.float32),
                     np.float64)
    want = np_tgmm(f64(x)[:used], f64(y)[:used], sizes)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def test_gmm_can_leave_rows_past_the_groups_unwritten():
    """fill_tail=False skips the zero tiles; the rows within the groups are unchanged (the
    interpreter fills unwritten output with NaN, so the tail shows it was not written)."""
    rng = np.random.default_rng()
    m, k, n, g = 300, 128, 256, 5
    sizes = random_sizes(rng, m, g, empty=1, tail=140)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.bfloat16)
    used = int(sizes.sum())
    full = np.asarray(gm.gmm(x, w, jnp.asarray(sizes)), np.float32)
    lean = np.asarray(gm.gmm(x, w, jnp.asarray(sizes), fill_tail=False), np.float32)
    np.testing.assert_array_equal(lean[:used], full[:used])
    assert np.all(full[used:] == 0)
    if not ON_GPU:
        assert np.isnan(lean[-(m - used) // 2:]).all()


def test_tgmm_matches_numpy_and_zeroes_empty_groups():
    rng = np.random.default_rng()
    m, k, n, g = 300, 128, 128, 6
    sizes = random_sizes(rng, m, g, empty=2, tail=5)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    got = np.asarray(gm.tgmm(x, y, jnp.asarray(sizes), preferred_element_type=jnp.float32),
                     np.float64)
    want = np_tgmm(f64(x), f64(y), sizes)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    assert np.all(got[sizes == 0] == 0)


@pytest.mark.parametrize("options", [
    dict(chain=True), dict(epi_tile=64), dict(epi_tile=64, tile_n=128, chain=True),
    dict(split_rows=True), dict(split_rows=True, epi_tile=64, chain=True),
    dict(split_rows=True, transpose=True), dict(split_rows=True, epi_tile=64, transpose=True),
])
def test_gmm_pipeline_options_match_numpy(options):
    """Chained tiles (a pipeline of pipelines), outputs written in pieces and warpgroups
    splitting a tile's rows give the same products; the interpreter runs every tile in one
    block, so a chain spans all of them. ``transpose``: weights given as [G, N, K] (dX)."""
    from kernels.gmm_mgpu import GmmTiling
    from kernels.grouped_matmul import _gmm_raw, _mode

    options = dict(options)
    transpose = options.pop("transpose", False)
    rng = np.random.default_rng()
    m, k, n, g = 333, 256, 256, 5
    sizes = random_sizes(rng, m, g, empty=1, tail=40)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, n, k) if transpose else (g, k, n)), jnp.bfloat16)
    tiling = GmmTiling(**{"tile_n": 64, "tile_k": 64, "stages": 2, **options})
    got = np.asarray(_gmm_raw(x, w, jnp.asarray(sizes), jnp.float32, transpose, _mode(None),
                              tiling), np.float64)
    want = np_gmm(f64(x), f64(w), sizes, transpose)
    assert not np.isnan(got).any(), "unwritten output rows"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    assert np.all(got[sizes.sum():] == 0)


@pytest.mark.parametrize("stages,split_k", [(2, False), (3, False), (3, True)])
def test_tgmm_stream_across_tiles_matches_numpy(stages, split_k):
    """tgmm's pipeline is one stream of row blocks across tiles: small rings, empty groups and
    one-block groups between the others, the warpgroups splitting each output tile's columns
    or rows, against float64 NumPy."""
    from kernels.grouped_matmul import _mode, _tgmm_raw
    from kernels.tgmm_mgpu import TgmmTiling

    rng = np.random.default_rng()
    m, k, n, g = 300, 256, 256, 6  # split rows: two K tiles of 128
    sizes = random_sizes(rng, m, g, empty=2, tail=5)
    sizes[np.flatnonzero(sizes)[0]] = 3  # a group inside one block
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    tiling = TgmmTiling(tile_k=64, tile_n=64, stages=stages, split_k=split_k)
    got = np.asarray(_tgmm_raw(x, y, jnp.asarray(sizes), jnp.float32, _mode(None), tiling),
                     np.float64)
    want = np_tgmm(f64(x), f64(y), sizes)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    assert np.all(got[sizes == 0] == 0)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="needs a GPU: enough tiles for every block to chain several (the "
                           "interpreter runs one block, covered by the tests above)")
def test_many_tiles_per_block_match_numpy_on_gpu():
    """With ~16 gmm tiles and ~6 tgmm tiles per SM (132 SMs), gmm's chained pipelines and
    tgmm's stream run START, STEADY and STOP on every block, with group boundaries and empty
    groups among them."""
    rng = np.random.default_rng()
    m, k, n, g = 131072, 1024, 512, 48
    sizes = random_sizes(rng, m, g, empty=3, tail=300)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, k, n)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    gs = jnp.asarray(sizes)
    # bf16 output: the tiling that chains (float32 staging leaves room for 3 stages, not 4);
    # the warpgroups splitting each tile's rows (the default) or its columns, forward and dX
    for (transpose, lhs), split_rows in itertools.product(((False, x), (True, dy)),
                                                          (True, False)):
        tiling = gm.gmm_tiling(n if transpose else k, k if transpose else n,
                               split_rows=split_rows)
        assert tiling.chain
        got = f64(gm._gmm_raw(lhs, w, gs, jnp.bfloat16, transpose, "gpu", tiling))
        want = np_gmm(f64(lhs), f64(w), sizes, transpose)
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    got = np.asarray(gm.tgmm(x, dy, gs, preferred_element_type=jnp.float32), np.float64)
    want = np_tgmm(f64(x), f64(dy), sizes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    # the streamed kernel: ~15-30 tiles per block, cooperative and ping-pong, forward and dX
    for (transpose, lhs), pingpong in itertools.product(((False, x), (True, dy)), (False, True)):
        tiling = gm.gmm_tiling(n if transpose else k, k if transpose else n, stream=True,
                               pingpong=pingpong)
        got = f64(gm._gmm_raw(lhs, w, gs, jnp.bfloat16, transpose, "gpu", tiling))
        want = np_gmm(f64(lhs), f64(w), sizes, transpose)
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


def test_chained_tiles_need_whole_stage_rounds():
    from kernels.gmm_mgpu import GmmTiling
    from kernels.grouped_matmul import _gmm_raw, _mode

    x, w = jnp.ones((128, 192), jnp.bfloat16), jnp.ones((2, 192, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="K / tile_k"):
        _gmm_raw(x, w, jnp.array([64, 64]), jnp.float32, False, _mode(None),
                 GmmTiling(tile_n=64, tile_k=64, stages=2, chain=True))


@pytest.mark.parametrize("routing,tiles", [
    ("random", "default"), ("one_group", "default"), ("one_row_each", "default"),
    ("random", "options"), ("random", "pingpong"), ("one_group", "pingpong"),
    ("random", "stream"), ("tail", "default"), ("tail", "pingpong"),
])
def test_gmm_gradients_match_reference(routing, tiles, monkeypatch):
    """Forward, dX and dW through the custom VJP against XLA's ragged_dot; "options" runs the
    kernels with chained tiles (forward) and output in pieces (forward, dX), which this small
    shape does not get by default, and tgmm with a 2-stage ring."""
    from kernels.gmm_mgpu import GmmTiling
    from kernels.tgmm_mgpu import TgmmTiling

    rng = np.random.default_rng()
    m, k, n, g = (200 if routing == "tail" else 256), 128, 128, 4  # tail: M off the tiles
    if tiles == "options":
        monkeypatch.setattr(gm, "default_gmm_tiling", lambda k, *a, **kw: GmmTiling(
            tile_n=32, tile_k=64, stages=2, chain=(k // 64) % 2 == 0, epi_tile=32))
        monkeypatch.setattr(gm, "tgmm_tiling", lambda *a, **kw: TgmmTiling(
            tile_k=64, tile_n=32, stages=2))
    if tiles in ("pingpong", "stream"):
        monkeypatch.setattr(gm, "default_gmm_tiling", lambda k, *a, **kw: GmmTiling(
            tile_n=64 if tiles == "pingpong" else 32, tile_k=64, stages=3, epi_tile=32,
            stream=True, pingpong=tiles == "pingpong"))
    sizes = {"random": random_sizes(rng, m, g),
             "one_group": np.eye(g, dtype=np.int32)[rng.integers(g)] * m,
             "one_row_each": np.array([1] * (g - 1) + [m - g + 1], np.int32),
             "tail": random_sizes(rng, m, g, tail=37)}[routing]
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    gs = jnp.asarray(sizes)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * cot)

    got = jax.grad(loss(lambda x, w: gm.gmm(x, w, gs)), (0, 1))(x, w)
    ref = jax.grad(loss(lambda x, w: jax.lax.ragged_dot(x, w, gs)), (0, 1))(x, w)
    for a, b in zip(got, ref, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert not np.isnan(a).any()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=F32_TOL * np.abs(b).max())
    assert np.all(np.asarray(got[0])[int(sizes.sum()):] == 0)  # no gradient past the groups


@pytest.mark.parametrize("shapes,message", [
    (((64, 100), (2, 100, 128)), "multiple of 64"),
    (((64, 128), (2, 128, 96)), "multiple of 128"),
    (((64, 128), (2, 64, 128)), "lhs has K=128 but rhs has K=64"),
])
def test_bad_shapes_are_one_line_errors(shapes, message):
    (xs, ws) = shapes
    with pytest.raises(ValueError, match=message):
        gm.gmm(jnp.ones(xs, jnp.bfloat16), jnp.ones(ws, jnp.bfloat16), jnp.array([32, 32]))


def test_negative_group_sizes_count_as_empty():
    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 64, 128)), jnp.float32)
    for sizes, clamped in (([12, -4], [12, 0]), ([-4, 12], [0, 12])):
        got = gm.gmm(x, w, jnp.asarray(sizes))
        want = np_gmm(np.asarray(x, np.float64), np.asarray(w, np.float64), np.array(clamped))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=F32_TOL * 10)


def test_group_size_and_dtype_errors():
    x = jnp.ones((16, 128), jnp.bfloat16)
    w = jnp.ones((2, 128, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"gmm wants group_sizes \[G\] with G=2"):
        gm.gmm(x, w, jnp.asarray([[8, 8]]))
    with pytest.raises(ValueError, match=r"tgmm wants group_sizes \[G\]; got shape \(1, 2\)"):
        gm.tgmm(x, x, jnp.asarray([[8, 8]]))
    with pytest.raises(ValueError, match="tgmm wants lhs and rhs of one dtype"):
        gm.tgmm(x, x.astype(jnp.float32), jnp.asarray([8, 8]))
    # K = 64 is a valid contraction, but lhs's gradient has K as its output width
    x64, w64 = jnp.ones((16, 64), jnp.bfloat16), jnp.ones((2, 64, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"gmm's gradient for lhs .* output width K=64"):
        jax.grad(lambda x: jnp.sum(gm.gmm(x, w64, jnp.asarray([8, 8])).astype(float)))(x64)


def test_compiled_kernels_lower_for_cuda():
    """The compiled Mosaic GPU path (not the interpreter) lowers on any machine: gmm forward is
    one Mosaic GPU kernel, the gradient of its sum two (transposed gmm, tgmm)."""
    from conftest import mosaic_gpu_calls

    bf16 = jnp.bfloat16
    m, k, n, g = 1024, 256, 512, 8

    def forward(x, w, sizes):
        return gm._gmm(x, w, sizes, x.dtype, "gpu", True)  # the GPU path, whatever this machine is

    def loss(x, w, sizes):
        return jnp.sum(forward(x, w, sizes).astype(jnp.float32))

    args = [jax.ShapeDtypeStruct((m, k), bf16), jax.ShapeDtypeStruct((g, k, n), bf16),
            jax.ShapeDtypeStruct((g,), jnp.int32)]
    for fn, kernels in [(forward, 1), (jax.grad(loss, argnums=(0, 1)), 2)]:
        calls = mosaic_gpu_calls(fn, args)
        assert len(calls) == kernels, calls


def test_vary_like_marks_variance_without_arithmetic():
    """Kernel outputs get their operands' shard_map variance by a cast, not by adding sums."""
    from conftest import mesh_or_skip
    from jax.sharding import PartitionSpec as P

    from kernels import platform

    mesh = mesh_or_skip(2)

    def local(x):
        fresh = jnp.zeros(x.shape, x.dtype)
        marked = platform.vary_like(fresh, x)
        assert platform.varying_axes(fresh) == frozenset()
        assert platform.varying_axes(marked) == platform.varying_axes(x) == {"expert"}
        return x * marked

    fn = jax.shard_map(local, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"))
    text = str(jax.make_jaxpr(fn)(jnp.ones(8)))
    assert "reduce_sum" not in text
