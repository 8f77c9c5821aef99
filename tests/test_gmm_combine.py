"""``gmm_combine``: a grouped matmul whose rows are summed into destination rows (Occult's
pre-combine in the down projection's epilogue).

On a GPU the Mosaic GPU kernel (float32 vector reductions into the destination rows) runs
against float64 NumPy; the Mosaic GPU interpreter cannot run its inline reductions, so on CPU
the same differentiable op runs its fallback (interpreted ``gmm`` + segment-sum) and the GPU
kernel is checked to lower for CUDA. Routings: random, every item into one row (the most
contended reductions), one group holding all items, empty groups and items past the groups.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import f64, np_gmm, np_tgmm, random_sizes

from kernels import grouped_matmul as gm
from kernels import occult_matmul as om

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ON_GPU = jax.default_backend() == "gpu"


def routing(rng, kind: str, r: int, m: int, g: int):
    """(dest [m], group_sizes [g]) for a named routing; items past sum(sizes) are unused and
    point at -1, as the plan leaves them."""
    if kind == "random":
        sizes = random_sizes(rng, m, g, empty=2, tail=m // 10)
        dest = rng.integers(0, r, m)
    elif kind == "one_row":  # every item adds into the same row
        sizes = random_sizes(rng, m, g, empty=1)
        dest = np.full(m, rng.integers(r))
    else:  # one_group: all items on one expert (a device that got everything)
        sizes = np.eye(g, dtype=np.int32)[rng.integers(g)] * m
        dest = rng.integers(0, r, m)
    dest = np.where(np.arange(m) < sizes.sum(), dest, -1)
    return dest.astype(np.int32), sizes.astype(np.int32)


GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="off GPU gmm_combine runs its fallback, the "
                              "same for every kernel schedule")


@pytest.mark.parametrize("kind", ["random", "one_row", "one_group"])
@pytest.mark.parametrize("fill_tail,pingpong", [
    (True, False), (False, False), pytest.param(True, True, marks=GPU_ONLY),
    pytest.param(False, True, marks=GPU_ONLY)])
def test_gmm_combine_values_and_gradients(kind, fill_tail, pingpong):
    """Cooperative and ping-pong kernels (the latter combines one warpgroup's tile while the
    other multiplies)."""
    rng = np.random.default_rng()
    r, m, k, n, g = (3000, 20000, 512, 1024, 12) if ON_GPU else (70, 300, 128, 256, 5)
    tiling = gm.gmm_tiling(k, n, combine=True, pingpong=True) if pingpong else None
    dest, sizes = routing(rng, kind, r, m, g)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.bfloat16)
    cot = jnp.asarray(rng.standard_normal((r, n)), jnp.float32)

    def loss(x, w):
        out = om.gmm_combine(x, w, jnp.asarray(sizes), jnp.asarray(dest), r, fill_tail=fill_tail,
                             tiling=tiling)
        return jnp.sum(out * cot), out

    (_, out), (dx, dw) = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w)
    used = np.arange(m) < sizes.sum()
    items = np_gmm(f64(x), f64(w), sizes)  # zero past the groups
    want = np.zeros((r, n))
    np.add.at(want, dest[used], items[used])
    d_items = np.where(used[:, None], f64(cot)[np.maximum(dest, 0)], 0.0)
    want_dx = np_gmm(d_items, f64(w), sizes, transpose=True)
    want_dw = np_tgmm(f64(x), d_items, sizes)
    dx = np.asarray(dx, np.float64)
    if not fill_tail:  # past the groups d x is undefined
        dx, want_dx = dx[used], want_dx[used]
    for got, ref, tol in [(out, want, 1e-4), (dx, want_dx, 1e-2), (dw, want_dw, 1e-2)]:
        got = np.asarray(got, np.float64)
        assert not np.isnan(got).any(), "unwritten output"
        # d x and d w come back in bf16 (the operands' dtype): 1% of the largest entry.
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())
    untouched = np.setdiff1d(np.arange(r), dest[used])
    assert np.all(np.asarray(out)[untouched] == 0), "rows no item adds into must stay zero"


def test_gmm_combine_lowers_for_cuda():
    """The compiled path (wgmma, inline vector reductions into a zeroed Ref) lowers on any
    machine: one Mosaic GPU kernel forward, two in the gradient (transposed gmm, tgmm; the
    row gather before them is a Triton kernel)."""
    from conftest import mosaic_gpu_calls

    bf16 = jnp.bfloat16
    r, m, k, n, g = 512, 1000, 256, 512, 8

    def forward(x, dest, w, sizes):
        return om._gmm_combine(x, w, sizes, dest, r, "gpu", False)

    def loss(x, dest, w, sizes):
        return jnp.sum(forward(x, dest, w, sizes))

    args = [jax.ShapeDtypeStruct((m, k), bf16), jax.ShapeDtypeStruct((m,), jnp.int32),
            jax.ShapeDtypeStruct((g, k, n), bf16), jax.ShapeDtypeStruct((g,), jnp.int32)]
    for fn, kernels in [(forward, 1), (jax.grad(loss, argnums=(0, 2)), 2)]:
        calls = mosaic_gpu_calls(fn, args, triton=True)
        assert len(calls) == kernels, calls
    pingpong = gm.gmm_tiling(k, n, combine=True, pingpong=True)
    calls = mosaic_gpu_calls(
        lambda x, dest, w, sizes: om._gmm_combine(x, w, sizes, dest, r, "gpu", False, pingpong),
        args)
    assert len(calls) == 1, calls


def test_gmm_combine_bad_arguments_are_one_line_errors():
    x, w = jnp.ones((8, 128), jnp.bfloat16), jnp.ones((2, 128, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="dest must be \\[8\\]"):
        om.gmm_combine(x, w, jnp.array([4, 4]), jnp.zeros((4,), jnp.int32), 3)
    with pytest.raises(ValueError, match="num_rows must be positive"):
        om.gmm_combine(x, w, jnp.array([4, 4]), jnp.zeros((8,), jnp.int32), 0)
