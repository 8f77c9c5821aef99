"""Transports: move per-peer row blocks across the expert axis (inside shard_map).

Every array handed to `exchange` has the block layout [N * C, ...]: block n (rows n*C … n*C+C-1)
goes to device n, and block n of the result came from device n. Rows used in a block sit at its
start (`send_counts[n]` of them), so a ragged transport can move only those.

Arrays travel as 32-bit words. A wide array (the activation rows) is its own message, moved
as it is — bit-cast, never copied into a shared buffer — while the narrow ones (expert ids,
routing weights) are packed side by side into one small message. A dispatch is therefore two
collectives, a combine one (the "pallas" transport moves all of an exchange's messages in one
kernel launch). (Packing the rows in with the metadata cost a copy of the whole
buffer on each side: ~3.7 of 23 ms in a profile of the standard OLMoE layer on 2×H200.) The
backward of an exchange is the same exchange run in reverse, on the float cotangents only.

* "dense":  `jax.lax.all_to_all` of the whole buffers; runs everywhere.
* "ragged": `jax.lax.ragged_all_to_all` of the used rows only (GPU/TPU). XLA:CPU lacks it, so on
  CPU an emulation with the same arguments and semantics stands in (`ragged_all_to_all_emulated`).
* "pallas": the used rows only, written straight into the peers' buffers over NVLink by one
  Pallas Mosaic GPU kernel per exchange, all its messages together
  (`kernels.nvlink_exchange.exchange_messages`); GPUs only. Same result as "ragged".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

WORD = jnp.uint32
WIDE_WORDS = 64  # an array with at least this many words per row travels as its own message


def _to_words(x: jax.Array) -> jax.Array:
    """[R, ...] → [R, words] uint32, bit-exact."""
    rows = x.shape[0]
    flat = x.reshape(rows, -1)
    bits = jnp.dtype(x.dtype).itemsize * 8
    if bits == 32:
        return jax.lax.bitcast_convert_type(flat, WORD)
    if bits == 16:
        if flat.shape[1] % 2:
            flat = jnp.pad(flat, ((0, 0), (0, 1)))
        return jax.lax.bitcast_convert_type(flat.reshape(rows, -1, 2), WORD)
    raise ValueError(f"transport packs 16- and 32-bit dtypes; got {x.dtype}. Cast first.")


def _from_words(words: jax.Array, like: jax.ShapeDtypeStruct) -> jax.Array:
    rows = words.shape[0]
    dtype = jnp.dtype(like.dtype)
    width = int(np.prod(like.shape[1:], dtype=np.int64))
    if dtype.itemsize == 4:
        flat = jax.lax.bitcast_convert_type(words, dtype)
    else:
        flat = jax.lax.bitcast_convert_type(words, dtype).reshape(rows, -1)[:, :width]
    return flat.reshape(like.shape)


def _word_count(like) -> int:
    width = int(np.prod(like.shape[1:], dtype=np.int64))
    return width if jnp.dtype(like.dtype).itemsize == 4 else (width + 1) // 2


def pack(arrays, multiple: int = 1) -> jax.Array:
    """Arrays [R, ...] → one [R, words] uint32 buffer, padded to a multiple of `multiple` words."""
    words = [_to_words(a) for a in arrays]
    extra = -sum(w.shape[1] for w in words) % multiple
    if extra:
        words.append(jnp.zeros((words[0].shape[0], extra), WORD))
    return words[0] if len(words) == 1 else jnp.concatenate(words, axis=1)


def _row_multiple(kind: str) -> int:
    """Words a transport wants each row to be a multiple of (TMA copies move 16-byte units)."""
    return 4 if kind == "pallas" else 1


def unpack(words: jax.Array, likes) -> list[jax.Array]:
    out, start = [], 0
    for like in likes:
        n = _word_count(like)
        out.append(_from_words(words[:, start:start + n], like))
        start += n
    return out


def messages(likes) -> list[list[int]]:
    """Indices of the arrays that travel together: each wide array alone, the narrow ones in
    one shared message (kept in order)."""
    wide = [[i] for i, a in enumerate(likes) if _word_count(a) >= WIDE_WORDS]
    narrow = [i for i, a in enumerate(likes) if _word_count(a) < WIDE_WORDS]
    return wide + ([narrow] if narrow else [])


def _exchange_arrays(arrays, kind, axis_name, send_counts, recv_counts) -> list[jax.Array]:
    groups = messages(arrays)
    likes = [[arrays[i] for i in group] for group in groups]
    packed = [pack(group_likes, _row_multiple(kind)) for group_likes in likes]
    moved = _move(packed, kind, axis_name, send_counts, recv_counts)
    out = [None] * len(arrays)
    for group, group_likes, words in zip(groups, likes, moved, strict=True):
        for i, value in zip(group, unpack(words, group_likes), strict=True):
            out[i] = value
    return out


def row_bytes(arrays, kind: str = "dense") -> int:
    """Bytes one row of these arrays occupies on the wire with transport `kind` (its messages'
    padding included)."""
    multiple = _row_multiple(kind)
    total = 0
    for group in messages(arrays):
        words = sum(_word_count(arrays[i]) for i in group)
        total += -(-words // multiple) * multiple
    return 4 * total


# --- the collectives ---------------------------------------------------------------------------


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all` built from dense collectives, for backends that lack it.

    Same arguments and result: device i sends operand[input_offsets[j] : +send_sizes[j]] to
    device j, which writes it at output[output_offsets[j] (as given by i) : +…]; the rest of
    `output` is kept.
    """
    del recv_sizes  # implied by the senders' sizes, as in the primitive
    num = input_offsets.shape[0]
    rows = operand.shape[0]
    take = jnp.arange(rows)
    chunks = jax.vmap(lambda off: jnp.take(operand, off + take, axis=0, mode="fill",
                                           fill_value=0))(input_offsets)  # [N, rows, W]
    meta = jnp.stack([send_sizes, output_offsets], axis=1)  # [N, 2]
    chunks = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=False)
    meta = jax.lax.all_to_all(meta, axis_name, 0, 0, tiled=False)
    sizes, offsets = meta[:, 0], meta[:, 1]
    dest = jnp.where(take[None, :] < sizes[:, None], offsets[:, None] + take[None, :],
                     output.shape[0])
    return output.at[dest.reshape(-1)].set(chunks.reshape(num * rows, -1), mode="drop")


def _ragged_primitive():
    if jax.default_backend() == "cpu":
        return ragged_all_to_all_emulated
    return jax.lax.ragged_all_to_all


def _move(packed: list[jax.Array], kind, axis_name, send_counts, recv_counts):
    """Move each [N*C, words] message; the pallas transport moves them all in one kernel."""
    if kind == "pallas" and send_counts.shape[0] > 1 and packed:
        from kernels.nvlink_exchange import exchange_messages

        # rows come from `pack(..., _row_multiple("pallas"))`: whole 16-byte units. The counts
        # need no run-time check: recv_counts is an all_to_all of send_counts (exchange) and
        # plans never count past a block.
        return exchange_messages(packed, send_counts, recv_counts, axis_name=axis_name,
                                 num_devices=send_counts.shape[0], validate=False)
    return [_move_one(words, kind, axis_name, send_counts, recv_counts) for words in packed]


def _move_one(words, kind, axis_name, send_counts, recv_counts):
    if kind == "dense":
        return jax.lax.all_to_all(words, axis_name, 0, 0, tiled=True)
    num = send_counts.shape[0]
    if num == 1:  # one device on the axis: its own block, counted rows kept, the rest zeros
        kept = jnp.arange(words.shape[0])[:, None] < send_counts[0]
        return jnp.where(kept, words, jnp.zeros_like(words))
    if kind != "ragged":  # "pallas" moves whole exchanges (_move)
        raise ValueError(f"_move_one moves dense and ragged messages, not {kind!r}")
    capacity = words.shape[0] // num
    me = jax.lax.axis_index(axis_name)
    starts = (jnp.arange(num) * capacity).astype(jnp.int32)
    output = jnp.zeros_like(words)
    return _ragged_primitive()(
        words, output, starts, send_counts.astype(jnp.int32),
        jnp.full((num,), me * capacity, jnp.int32), recv_counts.astype(jnp.int32),
        axis_name=axis_name)


def exchange_counts(send_counts: jax.Array, axis_name: str) -> jax.Array:
    """Each device's send_counts [N] → the rows it will receive from each peer [N]."""
    return jax.lax.all_to_all(send_counts, axis_name, 0, 0, tiled=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _exchange(floats, ints, send_counts, recv_counts, kind, axis_name):
    out = _exchange_arrays([*floats, *ints], kind, axis_name, send_counts, recv_counts)
    return tuple(out[: len(floats)]), tuple(out[len(floats):])


def _exchange_fwd(floats, ints, send_counts, recv_counts, kind, axis_name):
    out = _exchange(floats, ints, send_counts, recv_counts, kind, axis_name)
    return out, (send_counts, recv_counts, ints)


def _exchange_bwd(kind, axis_name, residuals, cotangents):
    send_counts, recv_counts, ints = residuals
    g_floats, _ = cotangents
    g_back = tuple(_exchange_arrays(list(g_floats), kind, axis_name, recv_counts, send_counts))
    return g_back, jax.tree.map(lambda _: None, ints), None, None


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def exchange(floats, ints, *, kind: str, axis_name: str, send_counts: jax.Array,
             recv_counts: jax.Array | None = None):
    """Send block n of every array to device n; differentiable in `floats`.

    Returns (floats, ints, recv_counts). For the ragged and pallas transports `recv_counts` is
    exchanged first when not given; the dense transport needs none and returns None.
    """
    floats, ints = tuple(floats), tuple(ints)
    ragged = kind in ("ragged", "pallas")
    if ragged and recv_counts is None:
        recv_counts = exchange_counts(send_counts, axis_name)
    if kind == "dense":
        recv_counts = send_counts  # unused by the dense move; keeps the signature uniform
    out_floats, out_ints = _exchange(floats, ints, send_counts, recv_counts, kind, axis_name)
    return out_floats, out_ints, (recv_counts if ragged else None)
