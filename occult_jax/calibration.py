"""Expert-similarity calibration for the "similarity" prune rule.

A few batches go through the model; each MoE layer reports its router-logit moments in its stats
(`logit_sum`, `logit_gram`, `tokens`), which are summed here and turned into the cosine
similarity of the experts' logit columns. The result is written into each layer's
`ExpertSimilarity` variables, so it travels with the parameters into every later checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from flax import nnx

from occult_jax import pruning
from occult_jax.moe import MoELayer


def calibrate(model: nnx.Module, batches: Iterable[jax.Array]) -> int:
    """Calibrate every MoE layer of `model` (in place) on token batches; returns tokens seen.

    `model(batch)` must return (output, stats) with the MoE stats stacked per layer in the order
    of `nnx.iter_modules` (as `model.Transformer` does).
    """
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch)[1])
    totals: dict[str, np.ndarray] = {}
    for batch in batches:
        stats = jax.device_get(forward(state, batch))
        for key in ("logit_sum", "logit_gram", "tokens"):
            value = np.asarray(stats[key], np.float64)
            totals[key] = value if key not in totals else totals[key] + value
    if not totals:
        raise ValueError("calibration got no batches; give it at least one.")
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, MoELayer)]
    tokens = totals["tokens"].reshape(len(layers))
    for i, layer in enumerate(layers):
        layer.set_similarity(pruning.similarity_from_moments(
            totals["logit_sum"][i], totals["logit_gram"][i], tokens[i]))
    return int(tokens[0])


def is_calibrated(model: Any) -> bool:
    return all(bool(m.similarity_calibrated[...]) for _, m in nnx.iter_modules(model)
               if isinstance(m, MoELayer))
