"""Row exchange over NVLink in one Pallas Mosaic GPU kernel: each device writes its rows straight
into its peers' receive buffers (``plgpu.remote_ref``), DeepEP-style, instead of an all-to-all.

Layout (the transports' block layout): ``words [N * C, W]`` uint32; block ``p`` (rows ``p*C`` …)
goes to device ``p``, which stores it as its block ``me``. Only the first ``send_counts[p]`` rows
of a block travel; the receiver zero-fills rows ``recv_counts[q] …  C`` of each block ``q``, so
the result equals ``ragged_all_to_all`` into a zero buffer.

Rows are moved as *lines* of ``line_words`` words (a row is ``W / line_words`` lines), in chunks
of ``chunk_lines`` lines: TMA load into a shared-memory ring, TMA store to the peer. A tail
shorter than a chunk goes as power-of-two pieces, so no byte outside the counted rows moves.
``exchange_messages`` moves several such arrays (same blocks and counts, any widths) in one
launch, one after another, each with its own lines and ring in a shared-memory scope that the
next reuses: XLA runs a cross-GPU barrier before every kernel that writes into a peer, so one
launch per exchange instead of one per array saves a barrier and a handshake each time.

Synchronisation (global semaphores, no NVLink multicast):
1. *ready*: every block signals every peer, and waits for one signal from each peer before
   writing into it — so a peer's output buffer belongs to this very call when it is written.
2. *done*: after its stores have completed, every block signals every peer; block 0 of each
   device waits for all of them, so no device finishes before all rows have landed in it.
Counts are clamped to [0, C] inside the kernel, so no copy ever leaves its block; and unless
told otherwise ``exchange_rows`` checks the counts first (``check_counts``) and raises at run
time when they are out of bounds or disagree between sender and receiver.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import platform

CHUNK_BYTES = 32 * 1024  # bytes per TMA copy
SMEM_BUDGET = 200 * 1024


@dataclasses.dataclass(frozen=True)
class ExchangeTiling:
    line_words: int  # words per line (TMA box minor dim); divides the row width
    chunk_lines: int  # lines per full copy (TMA box major dim, ≤ 256)
    stages: int = 3  # shared-memory ring depth (stores in flight per block)
    blocks: int = 132  # thread blocks (SMs) moving data


def exchange_tiling(width_words: int, blocks: int | None = None, stages: int = 3,
                    chunk_bytes: int = CHUNK_BYTES) -> ExchangeTiling:
    """Lines as wide as the row width allows (≤ 64 words); chunks of ~``chunk_bytes``; one
    block per SM unless told (2×H200 sweep in docs/benchmarks.md)."""
    blocks = blocks or platform.num_sms(interpret=False)
    for line in (64, 32, 16, 8, 4):
        if width_words % line == 0:
            chunk = max(1, min(256, chunk_bytes // (4 * line)))
            stages = max(2, min(stages, (SMEM_BUDGET - chunk * line * 4) // (chunk * line * 4)))
            return ExchangeTiling(line, chunk, stages, blocks)
    raise ValueError(f"the Pallas exchange needs a row width in 32-bit words that is a multiple "
                     f"of 4 (16 bytes); got {width_words}. Pad the rows.")


def _each_piece(lines, chunk: int, block, blocks: int, fn) -> None:
    """Call ``fn(first_line, size, i)`` for the pieces of ``lines`` lines this block owns:
    full chunks round-robin over blocks (``i`` counts this block's chunks), then the tail as
    power-of-two pieces (one block, ``i = 0``)."""
    full = lines // chunk
    mine = jnp.maximum(full - block + blocks - 1, 0) // blocks

    @pl.loop(0, mine)
    def _chunks(i):
        fn((block + i * blocks) * chunk, chunk, i)

    tail = lines - full * chunk

    @pl.when((tail > 0) & (block == lax.rem(full, blocks)))
    def _tail():
        start = full * chunk
        size = chunk // 2
        while size >= 1:
            @pl.when(tail & size != 0)
            def _piece(size=size, start=start):
                fn(start, size, 0)

            start = start + (tail & size)
            size //= 2


def _move_message(send_ref, recv_ref, src_ref, out_ref, *, axis_name: str, me, block,
                  peers: list, cap_lines: int, lines_per_row: int,
                  tiling: ExchangeTiling) -> None:
    """This block's share of one message: its pieces of every peer's rows (``peers``: this
    device last), then its share of the zero fill past what each peer sends here."""
    n, chunk, stages, blocks = len(peers), tiling.chunk_lines, tiling.stages, tiling.blocks

    def body(ring, bars, zeros):
        zeros[...] = jnp.zeros(zeros.shape, zeros.dtype)
        plgpu.commit_smem()

        def rows(ref, p):
            return jnp.clip(ref[p], 0, cap_lines // lines_per_row) * lines_per_row

        for j, p in enumerate(peers):
            dst = out_ref if j == n - 1 else plgpu.remote_ref(out_ref, {axis_name: p})

            def move(first, size, i, p=p, dst=dst):
                # A slot is reused once the store that last read it is done: `stages - 1`
                # stores may stay in flight within a peer's chunks; none across pieces.
                plgpu.wait_smem_to_gmem(stages - 1 if size == chunk else 0, wait_read_only=True)
                slot = lax.rem(i, stages) if size == chunk else 0
                buf = ring.at[slot, pl.ds(0, size)]
                plgpu.copy_gmem_to_smem(src_ref.at[pl.ds(p * cap_lines + first, size)], buf,
                                        bars.at[slot])
                plgpu.barrier_wait(bars.at[slot])
                plgpu.copy_smem_to_gmem(buf, dst.at[pl.ds(me * cap_lines + first, size)])

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            _each_piece(rows(send_ref, p), chunk, block, blocks, move)

        for p in peers:  # zero the rows past what each peer sends here
            used = rows(recv_ref, p)

            def zero(first, size, i, p=p, used=used):
                plgpu.copy_smem_to_gmem(zeros.at[pl.ds(0, size)],
                                        out_ref.at[pl.ds(p * cap_lines + used + first, size)])
                plgpu.wait_smem_to_gmem(stages - 1, wait_read_only=True)

            _each_piece(cap_lines - used, chunk, block, blocks, zero)

        plgpu.wait_smem_to_gmem(0, wait_read_only=False)

    line = tiling.line_words
    pl.run_scoped(  # scopes run one after another reuse the same shared memory
        body,
        plgpu.SMEM((stages, chunk, line), jnp.uint32),
        plgpu.Barrier(num_barriers=stages),
        plgpu.SMEM((chunk, line), jnp.uint32),
    )


def _kernel(send_ref, recv_ref, *refs, axis_name: str, num_devices: int,
            cap_lines: tuple[int, ...], lines_per_row: tuple[int, ...],
            tilings: tuple[ExchangeTiling, ...]) -> None:
    """All messages of one exchange in one launch: one handshake, then each message in turn."""
    n, blocks = num_devices, tilings[0].blocks
    srcs, outs = refs[: len(tilings)], refs[len(tilings):]
    me = lax.axis_index(axis_name)
    block = lax.axis_index("block")
    ready = pl.get_global(plgpu.SemaphoreType.REGULAR((n,)))
    done = pl.get_global(plgpu.SemaphoreType.REGULAR)
    peers = [lax.rem(me + j, n) for j in range(1, n + 1)]  # this device last
    others = peers[:-1]

    for p in others:
        pl.semaphore_signal(ready.at[me], device_id={axis_name: p})
    for p in others:
        pl.semaphore_wait(ready.at[p], 1)

    for src, out, cap, per_row, tiling in zip(srcs, outs, cap_lines, lines_per_row, tilings,
                                              strict=True):
        _move_message(send_ref, recv_ref, src, out, axis_name=axis_name, me=me, block=block,
                      peers=peers, cap_lines=cap, lines_per_row=per_row, tiling=tiling)

    for p in others:
        pl.semaphore_signal(done, device_id={axis_name: p})

    @pl.when(block == 0)
    def _wait_all():
        pl.semaphore_wait(done, (n - 1) * blocks)


class CountMismatchError(ValueError):
    """Send and receive counts of an exchange are inconsistent or outside the buffers."""


def _raise_on_bad_counts(mismatch, out_of_bounds, device, send_counts, recv_counts, expected,
                         capacity):
    where = (f"exchange_rows on device {int(device)}: send_counts {send_counts.tolist()}, "
             f"recv_counts {recv_counts.tolist()}")
    if out_of_bounds:
        raise CountMismatchError(f"{where}: a count is outside the block bounds [0, {capacity}]"
                                 "; count at most C rows per peer block")
    if mismatch:
        raise CountMismatchError(f"{where}: the peers send {expected.tolist()}, not what "
                                 "recv_counts says; derive recv_counts with an all_to_all of "
                                 "send_counts (transport.exchange_counts)")


def check_counts(send_counts: jax.Array, recv_counts: jax.Array, *, axis_name: str,
                 capacity: int) -> None:
    """Inside shard_map: raise CountMismatchError at run time unless every count lies in
    [0, capacity] and recv_counts[p] equals what peer p sends this device (one small
    all_to_all and a host callback; the kernel itself only clamps)."""
    send = send_counts.astype(jnp.int32)
    recv = recv_counts.astype(jnp.int32)
    expected = jax.lax.all_to_all(send, axis_name, 0, 0, tiled=True)
    out_of_bounds = jnp.any((send < 0) | (send > capacity) | (recv < 0) | (recv > capacity))
    jax.debug.callback(functools.partial(_raise_on_bad_counts, capacity=capacity),
                       jnp.any(expected != recv), out_of_bounds, jax.lax.axis_index(axis_name),
                       send, recv, expected)


def exchange_rows(words: jax.Array, send_counts: jax.Array, recv_counts: jax.Array, *,
                  axis_name: str, num_devices: int, tiling: ExchangeTiling | None = None,
                  validate: bool = True) -> jax.Array:
    """Inside shard_map over ``axis_name``: block p of ``words`` [N*C, W] uint32 (its first
    ``send_counts[p]`` rows) to device p; returns [N*C, W], rows past ``recv_counts`` zero.

    ``validate``: check the counts (``check_counts``) and raise at run time if they disagree;
    callers that derive recv_counts from send_counts in the same program may skip it."""
    (out,) = exchange_messages([words], send_counts, recv_counts, axis_name=axis_name,
                               num_devices=num_devices,
                               tilings=None if tiling is None else [tiling], validate=validate)
    return out


def exchange_messages(messages: list[jax.Array], send_counts: jax.Array,
                      recv_counts: jax.Array, *, axis_name: str, num_devices: int,
                      tilings: list[ExchangeTiling] | None = None,
                      validate: bool = True) -> list[jax.Array]:
    """``exchange_rows`` of several arrays with the same blocks and counts (rows of different
    widths: the activations and their metadata) in one kernel launch: one handshake and one
    launch-side barrier for all of them instead of one per array."""
    if not messages:
        return []
    rows = messages[0].shape[0]
    for words in messages:
        if words.dtype != jnp.uint32 or words.ndim != 2 or words.shape[0] != rows:
            raise ValueError(f"exchange_messages moves [rows, words] uint32 arrays with the same "
                             f"rows ({rows}); got {words.dtype} {words.shape}")
    if rows % num_devices:
        raise ValueError(f"exchange_messages: {rows} rows do not split into {num_devices} "
                         "blocks")
    if validate:
        check_counts(send_counts, recv_counts, axis_name=axis_name,
                     capacity=rows // num_devices)
    tilings = list(tilings or [exchange_tiling(w.shape[1]) for w in messages])
    if len({t.blocks for t in tilings}) != 1 or len(tilings) != len(messages):
        raise ValueError("exchange_messages: one tiling per message, all with the same blocks")
    per_row = [w.shape[1] // t.line_words for w, t in zip(messages, tilings, strict=True)]
    lines = [w.reshape(rows * k, t.line_words)
             for w, k, t in zip(messages, per_row, tilings, strict=True)]
    kernel = functools.partial(
        _kernel, axis_name=axis_name, num_devices=num_devices,
        cap_lines=tuple(rows // num_devices * k for k in per_row),
        lines_per_row=tuple(per_row), tilings=tuple(tilings))
    outs = plgpu.kernel(
        kernel,
        out_type=tuple(jax.ShapeDtypeStruct(x.shape, jnp.uint32) for x in lines),
        grid=(tilings[0].blocks,),
        grid_names=("block",),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(send_counts.astype(jnp.int32), recv_counts.astype(jnp.int32), *lines)
    return [platform.vary_like(out.reshape(words.shape), words, send_counts)
            for out, words in zip(outs, messages, strict=True)]
