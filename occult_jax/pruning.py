"""Collaboration pruning: device-limited top-k over any expert→device map.

A token may use experts on at most `max_devices_per_token` devices (M). Devices are ranked per
token, the best M kept, and the top-k is taken again among their experts. Masks go through the
expert→device map, never through a reshape of the logits, so placement may scatter a device's
experts over any ids.

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
    """[T, E] scores → [T, N] device ranking scores for the rule."""
    on_device = expert_device[None, :] == jnp.arange(num_devices)[:, None]  # [N, E]
    per_device = jnp.where(on_device[None], scores[:, None, :], NEG)  # [T, N, E]
    if rule == "group_score":
        take = -(-top_k // max_devices)
        best, _ = jax.lax.top_k(per_device, take)
        return jnp.sum(jnp.where(best > NEG / 2, best, 0.0), axis=-1)
    return jnp.max(per_device, axis=-1)


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
