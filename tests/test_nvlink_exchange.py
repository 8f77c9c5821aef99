"""The Pallas NVLink transport (kernels/nvlink_exchange.py): the kernel moves exactly the counted
rows and zero-fills the rest; MoE layers with transport='pallas' match the dense transport
bit for bit, outputs and gradients. The kernel tests need ≥ 2 GPUs; on CPU only the config
errors run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cuda_module_text, mesh_or_skip
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_moe_layer import D_FF, D_MODEL, adversarial_layer, grads, make_input, make_layer

import occult_jax as oj

ON_GPUS = jax.default_backend() == "gpu" and jax.device_count() >= 2
needs_gpus = pytest.mark.skipif(
    not ON_GPUS, reason="the Pallas NVLink transport writes into peer GPUs: needs ≥ 2 GPUs "
                        "(run this file on a GPU host; CPU CI checks the config errors only)")


def test_pallas_transport_is_refused_off_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("checks the error raised on non-GPU meshes")
    mesh = mesh_or_skip(2)
    cfg = oj.MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=8, transport="pallas")
    with pytest.raises(ValueError, match=r"transport='pallas'.*GPU"):
        oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(0))


def test_expert_axis_across_hosts_is_refused():
    """Peers must share NVLink: an expert-axis group spanning processes is a config error."""
    from types import SimpleNamespace

    from occult_jax.mesh import expert_axis_hosts

    # mesh [data=2, expert=4] over 2 hosts of 4 devices: host = data index → groups on one host
    by_data = np.array([[SimpleNamespace(process_index=h) for _ in range(4)] for h in range(2)])
    assert expert_axis_hosts(by_data, 1) == 1
    assert expert_axis_hosts(by_data, 0) == 2  # the data axis does cross hosts
    # mesh [data=4, expert=2] where each expert pair straddles the two hosts
    straddle = np.array([[SimpleNamespace(process_index=e) for e in range(2)] for _ in range(4)])
    assert expert_axis_hosts(straddle, 1) == 2
    cfg = oj.MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=8, transport="pallas")
    with pytest.raises(ValueError, match="one host"):
        oj.config.validate_for_mesh(cfg, ("data", "expert"), 2, 8, 8, platform="gpu",
                                    expert_axis_hosts=2)
    oj.config.validate_for_mesh(cfg, ("data", "expert"), 2, 8, 8, platform="gpu")


def test_odd_row_width_is_refused():
    from kernels.nvlink_exchange import exchange_tiling

    with pytest.raises(ValueError, match="multiple of 4"):
        exchange_tiling(1041)
    assert exchange_tiling(1040).line_words == 16


def test_exchange_messages_refuses_mismatched_messages_and_tilings():
    """Checked while tracing, before any kernel (so on CPU too): messages must be uint32 with
    the same rows, one tiling each, all with the same blocks."""
    from kernels.nvlink_exchange import exchange_messages, exchange_tiling

    counts = jnp.zeros((2,), jnp.int32)

    def trace(messages, tilings=None):
        return jax.eval_shape(lambda *m: exchange_messages(
            list(m), counts, counts, axis_name="expert", num_devices=2, validate=False,
            tilings=tilings), *messages)

    rows = jax.ShapeDtypeStruct((64, 16), jnp.uint32)
    assert trace([]) == []
    with pytest.raises(ValueError, match="same rows"):
        trace([rows, jax.ShapeDtypeStruct((32, 16), jnp.uint32)])
    with pytest.raises(ValueError, match="same rows"):
        trace([jax.ShapeDtypeStruct((64, 16), jnp.float32)])
    with pytest.raises(ValueError, match="do not split"):
        trace([jax.ShapeDtypeStruct((63, 16), jnp.uint32)])
    with pytest.raises(ValueError, match="same blocks"):
        trace([rows, rows], [exchange_tiling(16, blocks=8), exchange_tiling(16, blocks=4)])
    with pytest.raises(ValueError, match="one tiling per message"):
        trace([rows, rows], [exchange_tiling(16, blocks=8)])


def _exchange_fn(mesh, axis):
    from kernels.nvlink_exchange import exchange_rows

    n = dict(mesh.shape)[axis]

    def body(words, send, recv):
        return exchange_rows(words, send[0], recv[0], axis_name=axis, num_devices=n)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(axis), P(axis), P(axis)),
                                 out_specs=P(axis)))


def _expected(words, send):
    """NumPy statement: device i's block p comes from device p's block i, first send[p, i] rows
    kept, the rest zero. words [N, N*C, W], send [N, N]."""
    n, rows, _ = words.shape
    cap = rows // n
    out = np.zeros_like(words)
    for i in range(n):
        for p in range(n):
            k = send[p, i]
            out[i, p * cap: p * cap + k] = words[p, i * cap: i * cap + k]
    return out


@needs_gpus
@pytest.mark.parametrize("cap,width", [(512, 1040), (300, 132), (1024, 64), (7, 12)])
@pytest.mark.parametrize("routing", ["random", "all_to_one", "empty", "full"])
def test_exchange_rows_moves_exactly_the_counted_rows(cap, width, routing):
    n = 2
    mesh = oj.make_mesh(expert=n)
    rng = np.random.default_rng()
    words = rng.integers(0, 2**32, (n, n * cap, width), dtype=np.uint64).astype(np.uint32)
    send = {"random": rng.integers(0, cap + 1, (n, n)),
            "all_to_one": np.array([[0, cap]] * n),  # every device sends only to device 1
            "empty": np.zeros((n, n), int),
            "full": np.full((n, n), cap)}[routing].astype(np.int32)
    recv = send.T.copy()
    sharding = NamedSharding(mesh, P("expert"))
    put = functools.partial(jax.device_put, device=sharding)
    out = _exchange_fn(mesh, "expert")(put(jnp.asarray(words.reshape(n * n * cap, width))),
                                       put(jnp.asarray(send)), put(jnp.asarray(recv)))
    got = np.asarray(out).reshape(n, n * cap, width)
    np.testing.assert_array_equal(got, _expected(words, send))


@needs_gpus
@pytest.mark.parametrize("widths", [(1024, 16), (132, 1040, 4), (64,), (1024, 16, "stages")])
@pytest.mark.parametrize("routing", ["random", "all_to_one", "empty", "full"])
def test_exchange_messages_moves_each_message_like_exchange_rows(widths, routing):
    """Several arrays of different widths in one kernel: each lands as exchange_rows would move
    it alone (the same NumPy statement), rows past the counts zero. ``"stages"``: the messages'
    rings have different depths (so different barrier sets)."""
    from kernels.nvlink_exchange import exchange_messages, exchange_tiling

    tilings = None
    if widths[-1] == "stages":
        widths = widths[:-1]
        tilings = [exchange_tiling(w, stages=3 - i) for i, w in enumerate(widths)]
        assert tilings[0].stages != tilings[1].stages

    n, cap = 2, 300
    mesh = oj.make_mesh(expert=n)
    rng = np.random.default_rng()
    arrays = [rng.integers(0, 2**32, (n, n * cap, w), dtype=np.uint64).astype(np.uint32)
              for w in widths]
    send = {"random": rng.integers(0, cap + 1, (n, n)),
            "all_to_one": np.array([[0, cap]] * n),
            "empty": np.zeros((n, n), int),
            "full": np.full((n, n), cap)}[routing].astype(np.int32)

    def body(send, recv, *words):
        return tuple(exchange_messages(list(words), send[0], recv[0], axis_name="expert",
                                       num_devices=n, tilings=tilings))

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("expert"),) * (2 + len(widths)),
                               out_specs=(P("expert"),) * len(widths)))
    put = functools.partial(jax.device_put, device=NamedSharding(mesh, P("expert")))
    outs = fn(put(jnp.asarray(send)), put(jnp.asarray(send.T.copy())),
              *[put(jnp.asarray(a.reshape(n * n * cap, -1))) for a in arrays])
    for a, got in zip(arrays, outs, strict=True):
        np.testing.assert_array_equal(np.asarray(got).reshape(a.shape), _expected(a, send))


@needs_gpus
@pytest.mark.parametrize("dispatch", ["standard", "occult"])
@pytest.mark.parametrize("routing", ["random", "all_on_one_device"])
def test_layer_matches_dense_transport_bitwise(dispatch, routing):
    n = 2
    mesh = oj.make_mesh(expert=n)
    cfg = oj.MoEConfig(num_experts=8, top_k=4, d_model=D_MODEL, d_ff=D_FF, dispatch=dispatch)
    seed = int(np.random.default_rng().integers(1 << 20))
    if routing == "random":
        placement = np.random.default_rng(seed).permutation(cfg.num_experts)
        dense, _ = make_layer(cfg, mesh, seed, placement)
        pallas, _ = make_layer(cfg.replace(transport="pallas"), mesh, seed, placement)
        x = make_input(mesh.size, seed)
    else:
        dense, direction = adversarial_layer(cfg, mesh, seed, target_device=1)
        pallas, _ = adversarial_layer(cfg.replace(transport="pallas"), mesh, seed, 1)
        x = make_input(mesh.size, seed, direction)
    cotangent = jnp.asarray(np.random.default_rng(seed).standard_normal(x.shape), jnp.float32)
    (y_d, s_d), (y_p, s_p) = dense(x), pallas(x)
    np.testing.assert_array_equal(np.asarray(y_p), np.asarray(y_d))
    assert int(s_p["wire_rows"]) == int(s_d["wire_rows"])
    for a, b in zip(jax.tree.leaves(grads(pallas, x, cotangent)),
                    jax.tree.leaves(grads(dense, x, cotangent)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_exchange_kernel_lowers_for_cuda():
    """On any machine: the transport's kernel lowers for CUDA inside shard_map, forward and
    backward — one Mosaic GPU kernel per exchange even when the rows, their weights and their
    expert ids travel as separate messages (a guard for API drift between GPU sessions)."""
    import re

    from occult_jax.transport import exchange, messages

    mesh = mesh_or_skip(2)
    capacity, width, pairs = 64, 1024, 8

    def local(rows, weight, expert, counts):
        (out, w), (e,), _ = exchange((rows, weight), (expert,), kind="pallas",
                                     axis_name="expert", send_counts=counts)
        return out, w, e

    moved = jax.shard_map(local, mesh=mesh, in_specs=(P("expert"),) * 4,
                          out_specs=(P("expert"),) * 3)

    def loss(rows, weight, expert, counts):
        out, w, _ = moved(rows, weight, expert, counts)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(w)

    sharded = NamedSharding(mesh, P("expert"))
    args = [jax.ShapeDtypeStruct((4 * capacity, width), jnp.bfloat16, sharding=sharded),
            jax.ShapeDtypeStruct((4 * capacity, pairs), jnp.float32, sharding=sharded),
            jax.ShapeDtypeStruct((4 * capacity, pairs), jnp.int32, sharding=sharded),
            jax.ShapeDtypeStruct((4,), jnp.int32, sharding=sharded)]
    assert len(messages(args[:3])) == 2  # rows alone; weights and ids together
    for fn in (moved, jax.grad(loss, argnums=(0, 1))):
        text = cuda_module_text(fn, args, ["mosaic_gpu", "mosaic_gpu_v2"])
        assert len(re.findall(r"custom_call @mosaic_gpu\w*\(", text)) == 1


def test_mismatched_or_out_of_bounds_counts_raise():
    """exchange_rows' count check (runs before the kernel; plain JAX, so also on CPU): counts
    derived by an all_to_all pass, a receiver expecting a different count or a count past the
    buffer raises at run time."""
    from kernels.nvlink_exchange import check_counts

    mesh = mesh_or_skip(4)
    capacity = 16
    rng = np.random.default_rng()

    def run(send, recv):
        def local(s, r):
            check_counts(s, r, axis_name="expert", capacity=capacity)
            return s

        fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("expert"), P("expert")),
                                   out_specs=P("expert")))
        sharded = NamedSharding(mesh, P("expert"))
        return jax.block_until_ready(fn(jax.device_put(jnp.asarray(send), sharded),
                                        jax.device_put(jnp.asarray(recv), sharded)))

    send = rng.integers(0, capacity + 1, (4, 4)).astype(np.int32)  # [sender, receiver]
    run(send.reshape(-1), send.T.reshape(-1))  # receiver q expects send[p, q] from p
    wrong = send.T.copy()
    wrong[2, 1] = (wrong[2, 1] + 1) % (capacity + 1)  # still in bounds, but not what is sent
    with pytest.raises(Exception, match="the peers send"):
        run(send.reshape(-1), wrong.reshape(-1))
    over = send.copy()
    over[1, 3] = capacity + 1
    with pytest.raises(Exception, match="outside the block bounds"):
        run(over.reshape(-1), over.T.reshape(-1))


@needs_gpus
@pytest.mark.parametrize("dispatch", ["standard", "occult"])
def test_wide_rows_two_messages_match_dense(dispatch):
    """Rows ≥ transport.WIDE_WORDS travel as their own message: each dispatch moves two
    messages of different widths (rows, then metadata) in one kernel; still bitwise equal to
    the dense transport."""
    n, d = 2, 256
    mesh = oj.make_mesh(expert=n)
    cfg = oj.MoEConfig(num_experts=8, top_k=4, d_model=d, d_ff=D_FF, dispatch=dispatch)
    seed = int(np.random.default_rng().integers(1 << 20))
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, 64 * n, d)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    dense = oj.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(seed))
    pallas = oj.MoELayer(cfg.replace(transport="pallas"), mesh=mesh, rngs=nnx.Rngs(seed))
    np.testing.assert_array_equal(np.asarray(pallas(x)[0]), np.asarray(dense(x)[0]))
    for a, b in zip(jax.tree.leaves(grads(pallas, x, cotangent)),
                    jax.tree.leaves(grads(dense, x, cotangent)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
