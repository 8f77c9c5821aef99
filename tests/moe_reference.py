"""An independent float64 NumPy MoE, for tests: no JAX, no shared code with the library."""

from __future__ import annotations

import numpy as np


def np_route(x, router, top_k, score_fn="softmax", renormalize=True):
    logits = x.astype(np.float64) @ router.astype(np.float64)
    if score_fn == "softmax":
        z = np.exp(logits - logits.max(-1, keepdims=True))
        raw = z / z.sum(-1, keepdims=True)
    else:
        raw = 1.0 / (1.0 + np.exp(-logits))
    ids = np.argsort(-raw, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(raw, ids, axis=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return ids, weights


def np_swiglu(x, wg, wu, wd):
    g = x @ wg
    return ((g / (1.0 + np.exp(-g))) * (x @ wu)) @ wd


def np_moe(x, ids, weights, w_gate, w_up, w_down, placement, keep=None):
    """y[t] = Σ_j keep·w[t,j]·FFN_{ids[t,j]}(x[t]); expert e's weights sit in slot placement[e]."""
    x = x.astype(np.float64)
    y = np.zeros_like(x)
    keep = np.ones(ids.shape, bool) if keep is None else keep
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            if keep[t, j]:
                s = placement[ids[t, j]]
                y[t] += weights[t, j] * np_swiglu(x[t], w_gate[s].astype(np.float64),
                                                  w_up[s].astype(np.float64),
                                                  w_down[s].astype(np.float64))
    return y


def np_plan_drops(ids, placement, experts_per_device, num_devices, tokens_per_shard, capacity,
                  dedup):
    """Which assignments each shard keeps: rows fill each destination's block in token order."""
    keep = np.ones(ids.shape, bool)
    for start in range(0, ids.shape[0], tokens_per_shard):
        used = np.zeros(num_devices, int)
        for t in range(start, start + tokens_per_shard):
            devices = [placement[e] // experts_per_device for e in ids[t]]
            row_of = {}
            for j, dev in enumerate(devices):
                key = dev if dedup else (dev, j)
                if key not in row_of:
                    row_of[key] = used[dev]
                    used[dev] += 1
                keep[t, j] = row_of[key] < capacity
    return keep


def np_devices_per_token(ids, placement, experts_per_device):
    return np.array([len({placement[e] // experts_per_device for e in row}) for row in ids])
