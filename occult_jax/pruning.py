"""Collaboration pruning: device-limited top-k over any expert→device map.

A token may use experts on at most `max_devices_per_token` devices (M). Devices are ranked per
token, the best M kept, and the top-k is taken again among their experts. Everything goes
through the expert→device map (balanced, E/N experts per device), so placement may scatter a
device's experts over any ids: device ranking gathers the scores into device order, [T, N, E/N].

Rules (`MoEConfig.prune_rule`):
* "score": walk the experts in score order collecting devices until M are found — the same as
  ranking devices by their best expert's score — then re-take the top-k on those devices.
* "group_score": rank devices by the sum of their top-⌈k/M⌉ expert scores (DeepSeek-V3 and
  Megatron group-limited routing), keep the best M, re-take the top-k.
* "similarity": keep the devices of the "score" rule; keep each original top-k expert that lies on
  them, and replace each one outside by the most similar not-yet-chosen expert on them. The
  replacement inherits the replaced expert's routing weight, so the token's weight mass (and,
  with renormalisation, every weight) is unchanged. Similarity is a [E, E] matrix: cosine between
  experts' router-logit columns over calibration tokens (`similarity_from_logits`), or, with no
  calibration, between the router's weight columns (`similarity_from_router`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1e30


def similarity_from_moments(logit_sum: jax.Array, logit_gram: jax.Array,
                            tokens: jax.Array) -> jax.Array:
    """Cosine similarity of the (centred) router-logit columns, from their summed moments."""
    mean = logit_sum / tokens
    cov = logit_gram / tokens - jnp.outer(mean, mean)
    scale = jnp.sqrt(jnp.maximum(jnp.diag(cov), 1e-12))
    return cov / jnp.outer(scale, scale)


def similarity_from_logits(logits: jax.Array) -> jax.Array:
    """Cosine similarity of experts' router-logit columns over calibration tokens [T, E]."""
    logits = logits.astype(jnp.float32)
    return similarity_from_moments(jnp.sum(logits, axis=0), logits.T @ logits, logits.shape[0])


def similarity_from_router(router_kernel: jax.Array) -> jax.Array:
    """Cosine similarity of the router's weight columns [d, E] (the calibration-free fallback)."""
    cols = router_kernel.astype(jnp.float32)
    cols = cols / (jnp.linalg.norm(cols, axis=0, keepdims=True) + 1e-9)
    return cols.T @ cols


def device_scores(scores: jax.Array, expert_device: jax.Array, num_devices: int, rule: str,
                  top_k: int, max_devices: int) -> jax.Array:
    """[T, E] scores → [T, N] device ranking scores for the rule.

    `expert_device` must be balanced (E/N experts on every device), as every placement is:
    the scores are gathered into device order and viewed as [T, N, E/N], O(T·E) memory.
    """
    _check_balanced(expert_device, num_devices)
    per = scores.shape[-1] // num_devices
    order = jnp.argsort(expert_device, stable=True)  # experts grouped by device, 0..N-1
    per_device = jnp.take(scores, order, axis=-1).reshape(*scores.shape[:-1], num_devices, per)
    if rule == "group_score":
        best, _ = jax.lax.top_k(per_device, min(-(-top_k // max_devices), per))
        return jnp.sum(best, axis=-1)
    return jnp.max(per_device, axis=-1)


def _check_balanced(expert_device: jax.Array, num_devices: int) -> None:
    """ValueError unless E/N experts sit on each device (checked when the map is concrete)."""
    e = expert_device.shape[0]
    if e % num_devices:
        raise ValueError(f"num_devices={num_devices} must divide the {e} experts evenly.")
    try:
        devices = np.asarray(expert_device).astype(np.int64)
    except jax.errors.TracerArrayConversionError:  # under jit: placements are balanced
        return
    counts = np.bincount(devices[(devices >= 0) & (devices < num_devices)],
                         minlength=num_devices)
    if np.any(counts != e // num_devices):
        raise ValueError(f"expert_device must put {e // num_devices} experts on each of devices "
                         f"0..{num_devices - 1}; got counts {counts.tolist()}.")


def allowed_experts(scores: jax.Array, expert_device: jax.Array, num_devices: int, rule: str,
                    top_k: int, max_devices: int) -> jax.Array:
    """[T, E] bool: experts on each token's best `max_devices` devices."""
    ranking = device_scores(scores, expert_device, num_devices,
                            "group_score" if rule == "group_score" else "score", top_k,
                            max_devices)
    _, keep = jax.lax.top_k(ranking, max_devices)  # [T, M]
    device_kept = jnp.any(keep[..., None] == jnp.arange(num_devices), axis=1)  # [T, N]
    return jnp.take(device_kept, expert_device, axis=1)


def limited_top_k(raw: jax.Array, expert_device: jax.Array, num_devices: int, rule: str,
                  top_k: int, max_devices: int,
                  similarity: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """raw [T, E] scores → (top-k values, ids) using experts on at most `max_devices` devices."""
    allowed = allowed_experts(raw, expert_device, num_devices, rule, top_k, max_devices)
    if rule != "similarity":
        masked = jnp.where(allowed, raw, NEG)
        _, ids = jax.lax.top_k(masked, top_k)
        return jnp.take_along_axis(raw, ids, axis=-1), ids
    top_vals, top_ids = jax.lax.top_k(raw, top_k)
    chosen = jnp.zeros(raw.shape, bool)
    chosen = chosen.at[jnp.arange(raw.shape[0])[:, None], top_ids].set(
        jnp.take_along_axis(allowed, top_ids, axis=-1))  # originals that survive
    ids = []
    for j in range(top_k):  # k is small and static
        original = top_ids[:, j]
        survives = jnp.take_along_axis(allowed, original[:, None], axis=-1)[:, 0]
        candidate = jnp.where(allowed & ~chosen, similarity[original], NEG)
        replacement = jnp.argmax(candidate, axis=-1)
        new = jnp.where(survives, original, replacement)
        chosen = chosen.at[jnp.arange(raw.shape[0]), new].set(True)
        ids.append(new)
    return top_vals, jnp.stack(ids, axis=-1).astype(top_ids.dtype)
