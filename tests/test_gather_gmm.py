"""``gather_gmm``: a grouped matmul whose rows are read through an index vector.

On a GPU the Mosaic GPU kernel (cp.async gathers into swizzled tiles) runs against float64
NumPy; the Mosaic GPU interpreter cannot run its inline cp.async, so on CPU the same
differentiable op runs its fallback (XLA gather, interpreted ``gmm``) and the GPU kernel is
checked to lower for CUDA. Routings: random, every item reading one row, one group holding all
items, empty groups, and items past the last group.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import f64, np_gmm, np_tgmm, random_sizes

from kernels import grouped_matmul as gm
from kernels import occult_matmul as om

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ON_GPU = jax.default_backend() == "gpu"


def routing(rng, kind: str, t: int, m: int, g: int):
    """(rows [m], group_sizes [g]) for a named routing; items beyond sum(sizes) are unused."""
    if kind == "random":
        sizes = random_sizes(rng, m, g, empty=2, tail=m // 10)
        rows = rng.integers(0, t, m)
    elif kind == "one_row":  # every item reads the same receive row
        sizes = random_sizes(rng, m, g, empty=1)
        rows = np.full(m, rng.integers(t))
    else:  # one_group: all items on one expert, rows in order (a device that got everything)
        sizes = np.eye(g, dtype=np.int32)[rng.integers(g)] * m
        rows = np.sort(rng.integers(0, t, m))
    return rows.astype(np.int32), sizes.astype(np.int32)


def items_of_rows(rows, sizes, t):
    """[t, P]: the used items that read each row, -1 padded (the plan's row_items)."""
    used = np.flatnonzero(np.arange(rows.size) < sizes.sum())
    per_row = [used[rows[used] == r] for r in range(t)]
    out = np.full((t, max(1, max(map(len, per_row)))), -1, np.int32)
    for r, its in enumerate(per_row):
        out[r, :len(its)] = its
    return out


@pytest.mark.parametrize("kind,inverse,split_rows", [
    ("random", False, True), ("one_row", False, True), ("one_group", False, True),
    ("random", True, True), ("random", False, False), ("one_group", False, False)])
def test_gather_gmm_values_and_gradients(kind, inverse, split_rows, monkeypatch):
    """Forward, d x (a scatter-add into rows, or with ``row_items`` a gather-sum over each
    row's items) and d w against float64 NumPy, at a size the interpreter runs on CPU and the
    compiled kernel on a GPU (its warpgroups splitting a tile's columns or rows)."""
    if not split_rows and not ON_GPU:
        pytest.skip("the gathering kernel runs compiled only; CPU runs the fallback")
    monkeypatch.setattr(om, "gather_gmm_tiling", functools.partial(
        gm.gmm_tiling, split_rows=split_rows))
    rng = np.random.default_rng()
    t, m, k, n, g = (4096, 20000, 512, 1024, 12) if ON_GPU else (96, 300, 128, 256, 5)
    rows, sizes = routing(rng, kind, t, m, g)
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.bfloat16)
    cot = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)

    row_items = jnp.asarray(items_of_rows(rows, sizes, t)) if inverse else None

    def loss(x, w):
        out = om.gather_gmm(x, jnp.asarray(rows), w, jnp.asarray(sizes), row_items=row_items,
                            preferred_element_type=jnp.float32)
        return jnp.sum(out * cot), out

    (_, out), (dx, dw) = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w)
    want = np_gmm(f64(x)[rows], f64(w), sizes)  # zero past the groups
    used = np.arange(m) < sizes.sum()
    d_items = np.where(used[:, None], f64(cot), 0.0)
    want_dx = np.zeros((t, k))
    np.add.at(want_dx, rows, np_gmm(d_items, f64(w), sizes, transpose=True))
    want_dw = np_tgmm(f64(x)[rows], d_items, sizes)
    for got, ref, tol in [(out, want, 1e-4), (dx, want_dx, 1e-2), (dw, want_dw, 1e-2)]:
        got = np.asarray(got, np.float64)
        assert not np.isnan(got).any(), "unwritten output"
        # d x and d w come back in bf16 (the operands' dtype): 1% of the largest entry.
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())
    assert np.all(np.asarray(out)[~used] == 0)


@pytest.mark.parametrize("split_rows", [False, True])
def test_gather_gmm_lowers_for_cuda(split_rows, monkeypatch):
    """The compiled path (inline cp.async, mbarriers, wgmma; warpgroups splitting a tile's
    columns or rows) lowers on any machine: one Mosaic GPU kernel forward, two in the gradient
    of its sum (transposed gmm, tgmm; the unused forward is dropped)."""
    from conftest import mosaic_gpu_calls

    monkeypatch.setattr(om, "gather_gmm_tiling", functools.partial(
        gm.gmm_tiling, split_rows=split_rows))

    bf16 = jnp.bfloat16
    t, m, k, n, g = 512, 1000, 256, 512, 8

    def forward(x, rows, w, sizes):
        return om._gather_gmm(x, rows, None, w, sizes, x.dtype, "gpu", True)

    def loss(x, rows, w, sizes):
        return jnp.sum(forward(x, rows, w, sizes).astype(jnp.float32))

    args = [jax.ShapeDtypeStruct((t, k), bf16), jax.ShapeDtypeStruct((m,), jnp.int32),
            jax.ShapeDtypeStruct((g, k, n), bf16), jax.ShapeDtypeStruct((g,), jnp.int32)]
    for fn, kernels in [(forward, 1), (jax.grad(loss, argnums=(0, 2)), 2)]:
        calls = mosaic_gpu_calls(fn, args, triton=True)
        assert len(calls) == kernels, calls


@pytest.mark.parametrize("columns", ["even", "odd"])
@pytest.mark.parametrize("kind", ["random", "one_row", "one_group"])
def test_gather_tgmm_against_numpy(kind, columns):
    """``gather_tgmm(x, rows, dy)`` = tgmm of ``x[rows]``: per-group ``x[rows].T @ dy`` over
    each group's items, zeros for empty groups; items past the groups hold NaN in dy and must
    not reach any group (the kernel masks them). An even multiple of 128 columns splits the
    GPU kernel's tiles by columns, an odd one by rows."""
    if columns == "odd" and not ON_GPU:
        pytest.skip("on CPU gather_tgmm is tgmm of x[rows]; the tile split is the GPU kernel's")
    rng = np.random.default_rng()
    t, m, k, n, g = (4096, 20000, 512, 1024, 12) if ON_GPU else (96, 300, 128, 256, 5)
    n = n if columns == "even" else n + 128
    rows, sizes = routing(rng, kind, t, m, g)
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    dy = rng.standard_normal((m, n))
    dy[sizes.sum():] = np.nan
    dy = jnp.asarray(dy, jnp.bfloat16)
    got = om.gather_tgmm(x, jnp.asarray(rows), dy, jnp.asarray(sizes),
                         preferred_element_type=jnp.float32)
    used = np.arange(m) < sizes.sum()
    want = np_tgmm(f64(x)[rows], np.where(used[:, None], f64(dy), 0.0), sizes)
    got = np.asarray(got, np.float64)
    assert got.shape == (g, k, n)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_gather_tgmm_lowers_for_cuda():
    """Both gathered operands of the tgmm kernel (cp.async blocks 256 and 512 bytes wide) and
    the public op lower for CUDA on any machine, one Mosaic GPU kernel each."""
    from conftest import mosaic_gpu_calls

    from kernels import schedule, tgmm_mgpu

    bf16 = jnp.bfloat16
    t, m, k, n, g = 512, 1024, 256, 512, 8
    tiling = gm.tgmm_tiling(k, n)

    def gathered(x, rows, y, sizes, operand):
        blocks = schedule.group_blocks(sizes, m, tiling.tile_m)
        lhs, rhs = (x, y) if operand == "lhs" else (y, x)
        return tgmm_mgpu.tgmm_call(lhs, rhs, blocks, g, out_dtype=bf16, tiling=tiling,
                                   interpret=False, **{f"{operand}_rows": rows})

    def public(x, rows, y, sizes):
        return om._gather_tgmm_raw(x, rows, y, sizes, bf16, "gpu")

    for operand, (x_width, y_width) in [("lhs", (k, n)), ("rhs", (n, k))]:
        args = [jax.ShapeDtypeStruct((t, x_width), bf16), jax.ShapeDtypeStruct((m,), jnp.int32),
                jax.ShapeDtypeStruct((m, y_width), bf16), jax.ShapeDtypeStruct((g,), jnp.int32)]
        fn = functools.partial(gathered, operand=operand)
        assert len(mosaic_gpu_calls(fn, args)) == 1
    args = [jax.ShapeDtypeStruct((t, k), bf16), jax.ShapeDtypeStruct((m,), jnp.int32),
            jax.ShapeDtypeStruct((m, n), bf16), jax.ShapeDtypeStruct((g,), jnp.int32)]
    assert len(mosaic_gpu_calls(public, args)) == 1


def test_gather_gmm_bad_shapes_are_one_line_errors():
    x, w = jnp.ones((8, 128), jnp.bfloat16), jnp.ones((2, 128, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="rows \\[M\\]"):
        om.gather_gmm(x, jnp.zeros((4, 2), jnp.int32), w, jnp.array([2, 2]))
