"""Gather-only row maps: values and custom gradients against plain autodiff of a dense map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from occult_jax.row_maps import expand_rows, reduce_rows


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expand_and_reduce_match_dense_maps(seed):
    rng = np.random.default_rng(seed)
    a_rows, b_rows, d = 12, 30, 5
    b_src, a_dst = random_links(rng, a_rows, b_rows, 3)
    m = dense_matrix(b_src, a_rows)
    a = jnp.asarray(rng.standard_normal((a_rows, d)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((b_rows, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(b_rows), jnp.float32)
    g_b = jnp.asarray(rng.standard_normal((b_rows, d)), jnp.float32)
    g_a = jnp.asarray(rng.standard_normal((a_rows, d)), jnp.float32)

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


def test_bfloat16_rows_accumulate_in_float32():
    rng = np.random.default_rng(3)
    b_src, a_dst = random_links(rng, 4, 16, 4)
    b = jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16)
    out = reduce_rows(b, a_dst, b_src, None)
    assert out.dtype == jnp.bfloat16
    want = dense_matrix(b_src, 4).T @ b.astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=1e-2, atol=1e-2)
