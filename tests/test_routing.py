"""Router weights against float64 NumPy: scores → top-k → renormalise → × routed_scaling_factor
(DeepSeek's order: the scaling survives renormalisation, so renormalised weights sum to it)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from moe_reference import np_route

import occult_jax as oj
from occult_jax import routing


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_scaled_weights_match_numpy(score_fn, renormalize):
    scale, top_k, d, experts = 2.5, 3, 16, 8
    cfg = oj.MoEConfig(num_experts=experts, top_k=top_k, d_model=d, score_fn=score_fn,
                       renormalize=renormalize, routed_scaling_factor=scale)
    rng = np.random.default_rng()
    x = rng.standard_normal((64, d)).astype(np.float32)
    kernel = (rng.standard_normal((d, experts)) / np.sqrt(d)).astype(np.float32)
    out = routing.route(jnp.asarray(x), jnp.asarray(kernel), cfg)
    ids, weights = np_route(x, kernel, top_k, score_fn, renormalize)
    weights = weights * scale
    np.testing.assert_array_equal(np.asarray(out.expert_ids), ids)
    np.testing.assert_allclose(np.asarray(out.weights), weights, rtol=1e-5, atol=1e-7)
    if renormalize:  # the scale applies after renormalisation, not before (where it cancels)
        np.testing.assert_allclose(np.asarray(out.weights).sum(-1), scale, rtol=1e-5)
