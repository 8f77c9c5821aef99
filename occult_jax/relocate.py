"""Applying a placement: move experts between devices inside one jitted, sharded function.

A MoE layer keeps its router in logical expert ids and an `ExpertPlacement` map (logical →
physical weight slot). Re-placing a layer therefore permutes only its expert-indexed arrays —
w_gate, w_up, w_down and every optimizer moment of them — along the expert axis, and rewrites the
map. The model function is unchanged, and the arrays move through XLA collectives on the mesh,
never through the host.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from occult_jax.moe import MoELayer

EXPERT_ARRAYS = ("w_gate", "w_up", "w_down")
PLACEMENT = "placement"


def moe_layer_paths(model: nnx.Module) -> list[tuple]:
    """Paths (as in nnx.State) of every MoELayer inside `model`."""
    return [tuple(path) for path, module in nnx.iter_modules(model)
            if isinstance(module, MoELayer)]


def _keys(path) -> tuple:
    out = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                out.append(getattr(entry, attr))
                break
    return tuple(out)


def _layer_of_placement(keys: tuple) -> tuple | None:
    """The layer path if keys name a layer's placement map (…, layer…, "placement"[, "value"])."""
    trimmed = keys[:-1] if keys and keys[-1] == "value" else keys
    return trimmed[:-1] if trimmed and trimmed[-1] == PLACEMENT else None


def _match(keys: tuple, layer: tuple, names: Iterable[str]) -> str | None:
    """The name if keys end with layer + (name,) (then "value"), else None. Prefixes are allowed
    (optimizer states nest the parameter paths); nothing may follow the name. For a bare layer
    (path ()) a submodule's array (shared experts' w_gate) looks the same, so callers also check
    the shape (`_is_expert_array`)."""
    trimmed = keys[:-1] if keys and keys[-1] == "value" else keys
    if len(trimmed) <= len(layer) or trimmed[-1] not in names:
        return None
    return trimmed[-1] if trimmed[len(trimmed) - 1 - len(layer):-1] == layer else None


def _owner(keys: tuple, layers: Iterable[tuple]) -> tuple | None:
    """The layer an expert array belongs to: the longest layer path it matches. A layer at
    ("sub", "moe") also matches ("moe",) as a suffix (prefixes are allowed for optimizer
    states), and must not move with it."""
    owners = [layer for layer in layers if _match(keys, layer, EXPERT_ARRAYS)]
    return max(owners, key=len) if owners else None


def _is_expert_array(leaf, num_experts: int) -> bool:
    """[E, a, b] stacked expert weights (or their optimizer moments)."""
    shape = getattr(leaf, "shape", ())
    return len(shape) == 3 and shape[0] == num_experts


def _check(placements: Mapping[tuple, Any], num_experts: dict[tuple, int]) -> None:
    for layer, slots in placements.items():
        if layer not in num_experts:
            raise ValueError(f"no MoE layer at path {layer}; use one of {sorted(num_experts)}.")
        slots = np.asarray(slots)
        e = num_experts[layer]
        if slots.shape != (e,) or sorted(slots.tolist()) != list(range(e)):
            raise ValueError(f"placement for {layer} must be a permutation of 0..{e - 1} "
                             f"(logical expert → slot), got shape {slots.shape}.")


def apply_placement(model_state: Any, placements: Mapping[tuple, Any], *others: Any):
    """Re-place MoE layers; returns (model_state, *others) with experts moved.

    model_state: the model's nnx.State (holds each layer's current `placement` map).
    placements: {layer path: new logical→slot map [E]}, paths as from `moe_layer_paths`.
      A slot s lives on device s // (E / N); `oj.placement.place` gives expert→device maps,
      which `slots_from_devices` turns into slot maps (moving as few experts as it can).
    others: more pytrees whose expert-indexed leaves move too (the optimizer state).
    Runs as one jitted function whose outputs keep the inputs' shardings.
    """
    current = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(model_state)[0]:
        layer = _layer_of_placement(_keys(path))
        if layer is not None:
            current[layer] = leaf
    if placements and not current:
        raise ValueError("model_state holds no MoE layer's `placement` map; pass the whole "
                         "nnx.state(model) (placement maps are not nnx.Params).")
    _check(placements, {layer: leaf.shape[0] for layer, leaf in current.items()})
    perms, maps = {}, {}
    for layer, new in placements.items():
        old = np.asarray(current[layer])
        new = np.asarray(new, np.int32)
        logical_at_new_slot = np.argsort(new)
        perms[layer] = jnp.asarray(old[logical_at_new_slot], jnp.int32)
        maps[layer] = jnp.asarray(new)
    trees = (model_state, *others)
    flat = [jax.tree_util.tree_flatten_with_path(tree) for tree in trees]
    values = [[leaf for _, leaf in leaves] for leaves, _ in flat]
    moves = {}  # (tree, leaf) → permutation of its expert axis
    for t, (leaves, _) in enumerate(flat):
        for i, (path, leaf) in enumerate(leaves):
            keys = _keys(path)
            owner = _owner(keys, current)
            if owner in perms and _is_expert_array(leaf, perms[owner].shape[0]):
                moves[t, i] = perms[owner]
            elif _layer_of_placement(keys) in maps:
                layer = _layer_of_placement(keys)
                values[t][i] = jax.device_put(maps[layer].astype(leaf.dtype), leaf.sharding)
    index = sorted(moves)
    moved = jax.jit(_take_rows, out_shardings=[values[t][i].sharding for t, i in index])(
        [values[t][i] for t, i in index], [moves[k] for k in index])
    for (t, i), value in zip(index, moved, strict=True):
        values[t][i] = value
    return tuple(jax.tree_util.tree_unflatten(treedef, vals)
                 for (_, treedef), vals in zip(flat, values, strict=True))


def _take_rows(arrays, perms):
    """Each array's expert axis (0) permuted: one jitted, sharded gather for all of them."""
    return [jnp.take(a, p, axis=0) for a, p in zip(arrays, perms, strict=True)]


def slots_from_devices(expert_to_device: Any, num_devices: int,
                       current_slots: Any | None = None) -> np.ndarray:
    """An expert→device assignment (E/N experts each) → a logical→slot map.

    Device labels of a placement are arbitrary. With `current_slots` (the layer's map now), the
    groups are relabelled to keep as many experts as possible on their current device, and an
    expert that stays keeps its slot: `apply_placement` then moves only what must move.
    """
    devices = _int_array(expert_to_device, "expert_to_device")
    if not isinstance(num_devices, int | np.integer) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive int; got {num_devices!r}.")
    e = devices.shape[0]
    if e == 0:
        raise ValueError("expert_to_device is empty; give one device per expert.")
    if e % num_devices:
        raise ValueError(f"num_devices={num_devices} must divide the number of experts "
                         f"(len(expert_to_device) = {e}) evenly.")
    if devices.min() < 0 or devices.max() >= num_devices:
        raise ValueError(f"expert_to_device entries must lie in 0..{num_devices - 1}; got "
                         f"{devices.min()}..{devices.max()}.")
    per_device = e // num_devices
    counts = np.bincount(devices, minlength=num_devices)
    if np.any(counts != per_device):
        raise ValueError(f"every device must hold {per_device} experts; got counts "
                         f"{counts.tolist()}.")
    if current_slots is None:
        slots = np.empty_like(devices)
        for device in range(num_devices):
            members = np.nonzero(devices == device)[0]
            slots[members] = device * per_device + np.arange(per_device)
        return slots.astype(np.int32)
    current = _int_array(current_slots, "current_slots")
    if sorted(current.tolist()) != list(range(e)):
        raise ValueError(f"current_slots must be a permutation of 0..{e - 1} (the layer's "
                         f"logical→slot map); got shape {current.shape} with "
                         f"{len(set(current.tolist()))} distinct values.")
    overlap = np.zeros((num_devices, num_devices), int)  # [group, current device]
    np.add.at(overlap, (devices, current // per_device), 1)
    label = _best_relabel(overlap)
    slots = np.full_like(devices, -1)
    for group in range(num_devices):
        device = label[group]
        members = np.nonzero(devices == group)[0]
        stays = members[current[members] // per_device == device]
        slots[stays] = current[stays]
        free = sorted(set(range(device * per_device, (device + 1) * per_device))
                      - set(current[stays].tolist()))
        slots[np.setdiff1d(members, stays)] = free
    return slots.astype(np.int32)


def _int_array(values: Any, name: str) -> np.ndarray:
    """values as a 1-D integer array, or a ValueError naming `name`."""
    a = np.asarray(values)
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise ValueError(f"{name} must be a 1-D array of integers; got shape {a.shape}, "
                         f"dtype {a.dtype}.")
    return a.astype(np.int64)


def _best_relabel(overlap: np.ndarray) -> np.ndarray:
    """group → device maximising Σ overlap[group, device] (exact up to 8 devices, else greedy)."""
    n = overlap.shape[0]
    if n <= 8:
        perms = np.asarray(list(itertools.permutations(range(n))))
        scores = overlap[np.arange(n), perms].sum(axis=1)
        return perms[int(np.argmax(scores))]
    label, used = np.full(n, -1), set()
    for flat in np.argsort(-overlap, axis=None):
        group, device = divmod(int(flat), n)
        if label[group] < 0 and device not in used:
            label[group] = device
            used.add(device)
    return label
