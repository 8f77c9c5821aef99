"""Online placement: re-place experts during training from the co-activation the layers report.

The paper places experts once, offline. Here the train loop sums each MoE layer's
`stats["coactivation"]` between re-placements; every `placement.every` steps it searches a new
placement per layer (`placement.place`) and moves the experts and their optimizer moments on the
mesh (`apply_placement`), keeping as many experts in place as it can. The model function does
not change, so the loss curve continues.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from occult_jax import placement as placement_lib
from occult_jax.relocate import apply_placement, slots_from_devices


class CoactivationSum:
    """Running [L, E, E] co-activation counts and [L, E] expert loads of the MoE layers."""

    def __init__(self, coactivation: np.ndarray | None = None, load: np.ndarray | None = None):
        self.total = coactivation  # [L, E, E] or None before the first count
        self.load = load  # [L, E]

    def add(self, moe_stats: dict[str, Any]) -> None:
        if "coactivation" not in moe_stats:
            return
        counts = np.asarray(moe_stats["coactivation"], np.int64)
        load = np.asarray(moe_stats["expert_load"], np.int64)
        self.total = counts if self.total is None else self.total + counts
        self.load = load if self.load is None else self.load + load

    def reset(self) -> None:
        self.total = self.load = None


def replace_experts(params: Any, opt_state: Any, coactivation: np.ndarray,
                    layer_paths: list[tuple], num_devices: int, method: str = "best"):
    """New placements for every MoE layer from its counts; returns (params, opt_state, report).

    report: per layer (C_T before, C_T after), both as 1 + cut fraction of the counts (exact for
    top-2, the pairwise proxy above that).
    """
    current = _current_slots(params, layer_paths)
    per_device = coactivation.shape[-1] // num_devices
    new_slots, report = {}, []
    for counts, path in zip(coactivation, layer_paths, strict=True):
        before_devices = current[path] // per_device
        devices = placement_lib.place(counts, num_devices, method=method, kind="matrix")
        new_slots[path] = slots_from_devices(devices, num_devices, current[path])
        report.append((placement_lib.pairwise_cost(counts, before_devices),
                       placement_lib.pairwise_cost(counts, new_slots[path] // per_device)))
    params, opt_state = apply_placement(params, new_slots, opt_state)
    return params, opt_state, report


def _current_slots(params: Any, layer_paths: list[tuple]) -> dict[tuple, np.ndarray]:
    out = {}
    for path in layer_paths:
        node = params
        for key in (*path, "placement"):
            node = node[key]
        out[path] = np.asarray(node[...] if hasattr(node, "get_value") else node)
    return out
