"""Transports: packing is bit-exact, the ragged emulation has the primitive's semantics, and an
exchange sends block n to device n (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mesh_or_skip
from jax.sharding import PartitionSpec as P

from occult_jax.transport import exchange, pack, ragged_all_to_all_emulated, unpack


@pytest.mark.parametrize("dtype,width", [(jnp.float32, 5), (jnp.bfloat16, 7), (jnp.int32, 3)])
def test_pack_round_trip(dtype, width):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((6, width)) * 100, dtype)
    b = jnp.asarray(rng.integers(-5, 5, (6, 2)), jnp.int32)
    c = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    words = pack([a, b, c])
    assert words.dtype == jnp.uint32
    for got, want in zip(unpack(words, [a, b, c]), [a, b, c], strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_ragged_emulation_matches_spec():
    """Random offsets and sizes, checked against a NumPy statement of ragged_all_to_all."""
    n, rows, width = 4, 12, 3
    mesh = mesh_or_skip(n)
    rng = np.random.default_rng(1)
    operand = rng.standard_normal((n, rows, width)).astype(np.float32)
    output = rng.standard_normal((n, rows, width)).astype(np.float32)  # kept where not written
    send = rng.integers(0, 4, (n, n))  # send[i, j]: rows device i sends to device j
    in_off = np.zeros((n, n), int)
    out_off = np.zeros((n, n), int)
    for i in range(n):
        in_off[i] = rng.permutation(np.arange(0, rows - 2, 3))[:n]  # any start with room
    for j in range(n):
        starts = np.cumsum([0, *send[:, j]])[:-1]  # receiver j packs senders in order
        out_off[:, j] = starts
    expected = output.copy()
    for i in range(n):
        for j in range(n):
            s = send[i, j]
            expected[j, out_off[i, j]:out_off[i, j] + s] = operand[i, in_off[i, j]:in_off[i, j] + s]

    def local(op, out, io, ss, oo, rs):
        return ragged_all_to_all_emulated(op[0], out[0], io[0], ss[0], oo[0], rs[0],
                                          axis_name="expert")[None]

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("expert"), out_specs=P("expert")))
    got = fn(operand, output, in_off.astype(np.int32), send.astype(np.int32),
             out_off.astype(np.int32), send.T.astype(np.int32))
    np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("kind", ["dense", "ragged"])
def test_exchange_moves_blocks_and_gradients(kind, n):
    """On GPUs the ragged case runs the real `jax.lax.ragged_all_to_all` (n = 1: no
    collective, the one block kept as a ragged exchange would leave it)."""
    cap, width = 3, 5
    mesh = mesh_or_skip(n)
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((n, n * cap, width)).astype(np.float32)
    counts = rng.integers(0, cap + 1, (n, n)).astype(np.int32)  # counts[i, j]: i → j
    ids = rng.integers(0, 9, (n, n * cap, 2)).astype(np.int32)
    cot = rng.standard_normal((n, n * cap, width)).astype(np.float32)

    def local(x, i, c, g):
        def f(x):
            (y,), (j,), _ = exchange((x[0],), (i[0],), kind=kind, axis_name="expert",
                                     send_counts=c[0])
            return y, j
        y, vjp, j = jax.vjp(f, x, has_aux=True)
        (gx,) = vjp(g[0])
        return y[None], j[None], gx

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("expert"),
                               out_specs=P("expert")))
    y, j, gx = (np.asarray(a) for a in fn(rows, ids, counts, cot))
    for src in range(n):
        for dst in range(n):
            c = counts[src, dst] if kind == "ragged" else cap
            got = y[dst, src * cap: src * cap + c]
            np.testing.assert_array_equal(got, rows[src, dst * cap: dst * cap + c])
            assert np.all(y[dst, src * cap + c: (src + 1) * cap] == 0)  # ragged: zero tail
            np.testing.assert_array_equal(j[dst, src * cap: src * cap + c],
                                          ids[src, dst * cap: dst * cap + c])
            assert np.all(j[dst, src * cap + c: (src + 1) * cap] == 0)
            # backward: the cotangent of what dst received from src flows back to src, and
            # rows that were never sent get none
            np.testing.assert_array_equal(gx[src, dst * cap: dst * cap + c],
                                          cot[dst, src * cap: src * cap + c])
            assert np.all(gx[src, dst * cap + c: (dst + 1) * cap] == 0)


def test_messages_and_wire_bytes():
    """Wide rows travel alone, narrow arrays share one message; wire bytes count each message's
    padding (the pallas transport moves whole 16-byte units)."""
    from occult_jax.transport import WIDE_WORDS, messages, row_bytes

    rows = jax.ShapeDtypeStruct((8, 2 * WIDE_WORDS + 6), jnp.bfloat16)  # WIDE_WORDS + 3 words
    weight = jax.ShapeDtypeStruct((8, 3), jnp.float32)
    expert = jax.ShapeDtypeStruct((8, 3), jnp.int32)
    narrow = jax.ShapeDtypeStruct((8, 2 * WIDE_WORDS - 2), jnp.bfloat16)  # one word short
    assert messages([rows, weight, expert]) == [[0], [1, 2]]
    assert messages([narrow, weight]) == [[0, 1]]
    assert row_bytes([rows, weight, expert], "dense") == 4 * (WIDE_WORDS + 3 + 6)
    assert row_bytes([rows, weight, expert], "pallas") == 4 * ((WIDE_WORDS + 4) + 8)
