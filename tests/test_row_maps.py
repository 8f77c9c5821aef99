"""Gather-only row maps: values and custom gradients against plain autodiff of a dense map, on
XLA gathers and on the Pallas row kernels (kernels/row_gather.py; interpreted on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.row_gather import gather_rows, sum_rows
from occult_jax.row_maps import expand_rows, reduce_rows, use_kernels

IMPLS = [pytest.param(False, id="xla"), pytest.param(True, id="kernels")]


def random_links(rng, sources, buffer_rows, max_links):
    """A random map: each source row feeds up to max_links distinct buffer rows."""
    b_src = np.full(buffer_rows, -1)
    a_dst = np.full((sources, max_links), -1)
    free = list(rng.permutation(buffer_rows))
    for a in range(sources):
        for j in range(rng.integers(0, max_links + 1)):
            if free:
                b = free.pop()
                b_src[b], a_dst[a, j] = a, b
    return jnp.asarray(b_src, jnp.int32), jnp.asarray(a_dst, jnp.int32)


def dense_matrix(b_src, sources):
    """[B, A] 0/1 matrix of the links: expand is M @ a, reduce is M.T @ b."""
    b_src = np.asarray(b_src)
    m = np.zeros((b_src.shape[0], sources))
    m[b_src >= 0, b_src[b_src >= 0]] = 1.0
    return jnp.asarray(m, jnp.float32)


def adversarial_links(kind, sources, buffer_rows, max_links):
    """every_link: each source row uses all its links; one_source: source 0 feeds max_links
    rows and the rest none; empty: no links at all."""
    b_src = np.full(buffer_rows, -1)
    a_dst = np.full((sources, max_links), -1)
    if kind == "every_link":
        for a in range(min(sources, buffer_rows // max_links)):
            a_dst[a] = np.arange(a * max_links, (a + 1) * max_links)
            b_src[a_dst[a]] = a
    elif kind == "one_source":
        a_dst[0] = np.arange(max_links)[::-1]
        b_src[:max_links] = 0
    return jnp.asarray(b_src, jnp.int32), jnp.asarray(a_dst, jnp.int32)


@pytest.mark.parametrize("kernels", IMPLS)
@pytest.mark.parametrize("links", ["random", "random", "every_link", "one_source", "empty"])
def test_expand_and_reduce_match_dense_maps(links, kernels):
    rng = np.random.default_rng()
    a_rows, b_rows, d = 12, 30, 24
    if links == "random":
        b_src, a_dst = random_links(rng, a_rows, b_rows, 3)
    else:
        b_src, a_dst = adversarial_links(links, a_rows, b_rows, 3)
    m = dense_matrix(b_src, a_rows)
    a = jnp.asarray(rng.standard_normal((a_rows, d)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((b_rows, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(b_rows), jnp.float32)
    g_b = jnp.asarray(rng.standard_normal((b_rows, d)), jnp.float32)
    g_a = jnp.asarray(rng.standard_normal((a_rows, d)), jnp.float32)

    with use_kernels(kernels):
        check_maps(a, b, w, g_a, g_b, b_src, a_dst, m)


def check_maps(a, b, w, g_a, g_b, b_src, a_dst, m):
    np.testing.assert_allclose(expand_rows(a, b_src, a_dst), m @ a, rtol=1e-6)
    np.testing.assert_allclose(reduce_rows(b, a_dst, b_src, None), m.T @ b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reduce_rows(b, a_dst, b_src, w), m.T @ (w[:, None] * b),
                               rtol=1e-5, atol=1e-6)

    _, vjp = jax.vjp(lambda a: expand_rows(a, b_src, a_dst), a)
    _, vjp_ref = jax.vjp(lambda a: m @ a, a)
    np.testing.assert_allclose(vjp(g_b)[0], vjp_ref(g_b)[0], rtol=1e-5, atol=1e-6)

    _, vjp = jax.vjp(lambda b, w: reduce_rows(b, a_dst, b_src, w), b, w)
    _, vjp_ref = jax.vjp(lambda b, w: m.T @ (w[:, None] * b), b, w)
    for got, want in zip(vjp(g_a), vjp_ref(g_a), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernels", IMPLS)
def test_bfloat16_rows_accumulate_in_float32(kernels):
    rng = np.random.default_rng()
    b_src, a_dst = random_links(rng, 4, 16, 4)
    b = jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16)
    with use_kernels(kernels):
        out = reduce_rows(b, a_dst, b_src, None)
    assert out.dtype == jnp.bfloat16
    want = dense_matrix(b_src, 4).T @ b.astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=1e-2, atol=1e-2)


def test_kernels_and_xla_agree_in_bfloat16_under_jit():
    """Both implementations sum a row's links in float32 in link order, so the bfloat16 results
    agree to the last bit or one rounding step; odd sizes give one-row / one-column tiles."""
    rng = np.random.default_rng()
    b_src, a_dst = random_links(rng, 37, 101, 5)
    b = jnp.asarray(rng.standard_normal((101, 72)), jnp.bfloat16)
    w = jnp.asarray(rng.uniform(size=101), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((37, 72)), jnp.bfloat16)

    def run(kernels):
        with use_kernels(kernels):
            out, vjp = jax.vjp(lambda b, w: reduce_rows(b, a_dst, b_src, w), b, w)
            return (out, *vjp(cot))

    for got, want in zip(jax.jit(lambda: run(True))(), jax.jit(lambda: run(False))(), strict=True):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-5 * np.abs(want).max())


def test_row_kernels_against_numpy_with_scale_and_dot():
    """gather_rows' scale and row dot (the weight gradient's inputs) and sum_rows' weights,
    against float64 NumPy, with tile-sized and odd shapes."""
    rng = np.random.default_rng()
    for a_rows, b_rows, d in [(64, 128, 1024), (7, 13, 40)]:
        a = rng.standard_normal((a_rows, d)).astype(np.float32)
        index = rng.integers(-1, a_rows, b_rows).astype(np.int32)
        scale = rng.standard_normal(b_rows).astype(np.float32)
        other = rng.standard_normal((b_rows, d)).astype(np.float32)
        picked = np.where(index[:, None] >= 0, a.astype(np.float64)[np.maximum(index, 0)], 0)
        out, dot = gather_rows(jnp.asarray(a), jnp.asarray(index), scale=jnp.asarray(scale),
                               dot_with=jnp.asarray(other), interpret=True)
        np.testing.assert_allclose(out, picked * scale[:, None], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dot, np.sum(picked * other, axis=1), rtol=1e-4, atol=1e-4)

        b = rng.standard_normal((b_rows, d)).astype(np.float32)
        for per_row in (3, 40):  # an unrolled loop over the slots, and a loop
            slots = rng.integers(-1, b_rows, (a_rows, per_row)).astype(np.int32)
            want = sum(np.where(slots[:, j, None] >= 0, (b * scale[:, None]).astype(
                np.float64)[np.maximum(slots[:, j], 0)], 0) for j in range(per_row))
            got = sum_rows(jnp.asarray(b), jnp.asarray(slots), weight=jnp.asarray(scale),
                           interpret=True)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * per_row)


def test_row_kernels_with_no_source_rows():
    """A device that received no rows: every link is empty, so the results are zeros."""
    rng = np.random.default_rng()
    other = jnp.asarray(rng.standard_normal((5, 24)), jnp.float32)
    out, dot = gather_rows(jnp.zeros((0, 24), jnp.bfloat16), -jnp.ones((5,), jnp.int32),
                           dot_with=other, out_dtype=jnp.float32, interpret=True)
    assert out.shape == (5, 24) and out.dtype == jnp.float32 and dot.shape == (5,)
    assert not np.any(np.asarray(out)) and not np.any(np.asarray(dot))
    summed = sum_rows(jnp.zeros((0, 24)), -jnp.ones((4, 3), jnp.int32), interpret=True)
    assert summed.shape == (4, 24) and not np.any(np.asarray(summed))


def test_row_kernels_reject_bad_shapes():
    a = jnp.ones((4, 8))
    with pytest.raises(ValueError, match="index"):
        gather_rows(a, jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(ValueError, match="scale must be"):
        gather_rows(a, jnp.zeros((3,), jnp.int32), scale=jnp.ones(4))
    with pytest.raises(ValueError, match="weight must be"):
        sum_rows(a, jnp.zeros((2, 3), jnp.int32), weight=jnp.ones(3))


def test_row_maps_lower_to_triton_for_cuda(monkeypatch):
    """The compiled kernels lower (verified Triton IR) for CUDA inside shard_map, as the layer
    runs them: an expand then a weighted reduce is two kernels forward, three for the gradient
    (the expand; the reduce's backward, one gather with the weight gradient's dot; the expand's
    backward, one sum — the reduce's forward value is not needed)."""
    from conftest import cuda_module_text, mesh_or_skip
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kernels import row_gather

    monkeypatch.setattr(row_gather, "_interpret", lambda interpret: False)
    rng = np.random.default_rng()
    b_src, a_dst = random_links(rng, 64, 256, 4)

    def forward(a, w):
        with use_kernels(True):
            return reduce_rows(expand_rows(a, b_src, a_dst), a_dst, b_src, w)

    def loss(a, w):
        return jnp.sum(forward(a, w).astype(jnp.float32))

    mesh = mesh_or_skip(2)
    sharded = jax.shard_map(forward, mesh=mesh, in_specs=(P(), P()), out_specs=P())
    sharded_loss = jax.shard_map(loss, mesh=mesh, in_specs=(P(), P()), out_specs=P())
    args = [jax.ShapeDtypeStruct((64, 256), jnp.bfloat16), jax.ShapeDtypeStruct((256,),
                                                                               jnp.float32)]
    target = "__gpu$xla.gpu.triton"
    on_mesh = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P()))
               for a in args]
    for fn, fn_args, kernels in [(forward, args, 2), (jax.grad(loss, (0, 1)), args, 3),
                                 (sharded, on_mesh, 2),
                                 (jax.grad(sharded_loss, (0, 1)), on_mesh, 3)]:
        assert cuda_module_text(fn, fn_args, [target]).count(f"@{target}(") == kernels


def test_expand_without_fill_empty_matches_on_linked_rows():
    """fill_empty=False changes nothing on rows that have a source, values or gradients."""
    rng = np.random.default_rng()
    b_src, a_dst = random_links(rng, 20, 96, 3)
    a = jnp.asarray(rng.standard_normal((20, 64)), jnp.float32)
    g_b = jnp.asarray(rng.standard_normal((96, 64)), jnp.float32)
    linked = np.asarray(b_src) >= 0
    with use_kernels(True):
        results = [jax.vjp(lambda a, fill=fill: expand_rows(a, b_src, a_dst, fill_empty=fill), a)
                   for fill in (True, False)]
        (full, full_vjp), (lean, lean_vjp) = results
        np.testing.assert_array_equal(np.asarray(lean)[linked], np.asarray(full)[linked])
        np.testing.assert_array_equal(lean_vjp(g_b)[0], full_vjp(g_b)[0])


@pytest.mark.parametrize("kernels", IMPLS)
def test_reduce_gradients_ignore_undefined_empty_rows(kernels):
    """Empty buffer rows may hold anything (a grouped matmul leaves them unwritten): NaN there
    must not reach the weight gradient or the linked rows' gradients."""
    rng = np.random.default_rng()
    b_src, a_dst = random_links(rng, 16, 64, 3)
    empty = np.asarray(b_src) < 0
    b = rng.standard_normal((64, 64))
    b[empty] = np.nan
    b = jnp.asarray(b, jnp.float32)
    w = jnp.asarray(rng.uniform(size=64), jnp.float32)
    g_a = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    with use_kernels(kernels):
        out, vjp = jax.vjp(lambda b, w: reduce_rows(b, a_dst, b_src, w, fill_empty=False), b, w)
        g_b, g_w = vjp(g_a)
    assert np.isfinite(np.asarray(out)).all()
    assert np.isfinite(np.asarray(g_w)).all()
    assert np.isfinite(np.asarray(g_b)[~empty]).all()
    np.testing.assert_array_equal(np.asarray(g_w)[empty], 0.0)


def test_sum_rows_with_many_slots_lowers_to_a_triton_loop(monkeypatch):
    """Past UNROLLED_SLOTS slots per row the sum is a loop in the Triton kernel, not thousands
    of unrolled loads (which took Triton minutes to compile on an H100): the verified IR has a
    loop and as many loads as a few slots, with 4 × UNROLLED_SLOTS slots."""
    from conftest import cuda_module_text

    from kernels import row_gather

    monkeypatch.setattr(row_gather, "_interpret", lambda interpret: False)
    modules = []
    target = "__gpu$xla.gpu.triton"
    for slots in (row_gather.UNROLLED_SLOTS, 4 * row_gather.UNROLLED_SLOTS):
        args = [jax.ShapeDtypeStruct((512, 256), jnp.bfloat16),
                jax.ShapeDtypeStruct((64, slots), jnp.int32)]
        text = cuda_module_text(lambda b, s: row_gather.sum_rows(b, s), args, [target],
                                triton_modules=modules)
        assert text.count(f"@{target}(") == 1
    unrolled, looped = modules[-2:]
    assert "scf.for" not in unrolled and "scf.for" in looped
    assert looped.count("tt.load") < unrolled.count("tt.load") / 4
