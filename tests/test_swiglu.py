"""The item-buffer SwiGLU (kernels/swiglu.py): values and gradients against float64 NumPy, for
the kernel (interpreted on CPU) and the XLA fallback; rows past ``live`` are zeros and read
nothing; the compiled kernel lowers for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.swiglu import ROWS, swiglu

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def np_swiglu(gate_up):
    gate, up = np.split(gate_up.astype(np.float64), 2, axis=1)
    sig = 1.0 / (1.0 + np.exp(-gate))
    return gate * sig * up, sig, gate, up


@pytest.mark.parametrize("interpret", [True, None], ids=["kernel", "default"])
@pytest.mark.parametrize("live", ["none", "partial_tile", "all", "random"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_swiglu_values_and_gradients(interpret, live, dtype, scaled):
    """With ``scale`` (routing weights, float32 like the plan's), the rows are scaled and the
    scale gets the row dot product of d hidden with the unscaled SwiGLU."""
    rng = np.random.default_rng()
    m, f = 96, 192
    n_live = {"none": 0, "partial_tile": 37, "all": m, "random": int(rng.integers(1, m))}[live]
    gate_up = rng.standard_normal((m, 2 * f)) * 2
    gate_up[n_live:] = 0.0  # the grouped matmul leaves rows past the groups zero
    d_hidden = rng.standard_normal((m, f))  # nonzero everywhere, also past live
    gate_up_j = jnp.asarray(gate_up, dtype)
    gate_up = np.asarray(gate_up_j, np.float64)  # the values the kernel sees

    scale = rng.uniform(0.1, 1.0, m) if scaled else np.ones(m)

    def fn(g, s):
        return swiglu(g, n_live, scale=s if scaled else None, interpret=interpret)

    out, pullback = jax.vjp(fn, gate_up_j, jnp.asarray(scale, jnp.float32))
    d_gate_up, d_scale = pullback(jnp.asarray(d_hidden, dtype))
    hidden, sig, gate, up = np_swiglu(gate_up)
    d_h = np.asarray(jnp.asarray(d_hidden, dtype), np.float64)
    want_d_scale = np.where(np.arange(m) < n_live, np.sum(d_h * hidden, axis=1), 0.0)
    d_h = d_h * scale[:, None]
    want_d = np.concatenate([d_h * up * sig * (1 + gate * (1 - sig)), d_h * gate * sig], axis=1)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    checks = [(out, hidden * scale[:, None]), (d_gate_up, want_d)]
    if scaled:
        # d scale sums f products: bf16 inputs, float32 sum; 2% of the largest entry.
        np.testing.assert_allclose(np.asarray(d_scale, np.float64), want_d_scale, rtol=tol,
                                   atol=tol * max(1.0, np.abs(want_d_scale).max()))
    for got, want in checks:
        got = np.asarray(got, np.float64)
        assert not np.isnan(got).any()
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))
        assert np.all(got[n_live:] == 0)


def test_swiglu_rejects_odd_widths():
    with pytest.raises(ValueError, match="gate_up"):
        swiglu(jnp.ones((4, 7)), 4)


def test_swiglu_lowers_to_triton_for_cuda():
    """Forward one Triton kernel, gradient one (the forward's value is not needed for it)."""
    from conftest import cuda_module_text

    def forward(gate_up, live):
        return swiglu(gate_up, live, interpret=False)

    def loss(gate_up, live):
        return jnp.sum(forward(gate_up, live).astype(jnp.float32))

    args = [jax.ShapeDtypeStruct((256, 512), jnp.bfloat16), jax.ShapeDtypeStruct((), jnp.int32)]
    target = "__gpu$xla.gpu.triton"
    for fn, kernels in [(forward, 1), (jax.grad(loss), 1)]:
        assert cuda_module_text(fn, args, [target]).count(f"@{target}(") == kernels


def test_swiglu_without_fill_tail_matches_on_live_rows():
    """fill_tail=False: the same values and gradients on the live rows; tiles wholly past
    ``live`` are neither read (NaN there changes nothing) nor written."""
    rng = np.random.default_rng()
    m, f, live = 128, 64, 37
    gate_up = rng.standard_normal((m, 2 * f))
    gate_up[live:] = np.nan  # undefined rows, as gmm with fill_tail=False leaves them
    gate_up = jnp.asarray(gate_up, jnp.float32)
    d_hidden = jnp.asarray(rng.standard_normal((m, f)), jnp.float32)
    outs = []
    for fill in (True, False):
        out, pullback = jax.vjp(lambda g, fill=fill: swiglu(g, live, fill_tail=fill,
                                                            interpret=True), gate_up)
        outs.append((np.asarray(out), np.asarray(pullback(d_hidden)[0])))
    tail = -(-live // ROWS) * ROWS  # the first row of the tiles wholly past live
    for full, lean in zip(*outs, strict=True):
        np.testing.assert_array_equal(lean[:live], full[:live])
        assert np.isfinite(full[:live]).all()
        # fill_tail=True writes zeros there without reading the (NaN) rows
        assert np.all(full[tail:] == 0)
