"""Router: scores, top-k, and the auxiliary losses (load balancing, z-loss)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from occult_jax import pruning
from occult_jax.config import MoEConfig

# Added to every normalising sum: sigmoid scores that all underflow to 0 give zero weights
# instead of 0/0 = NaN. DeepSeek-V3 adds 1e-20, whose square underflows, so the gradient
# (-top / (sum + eps)²) is still NaN there; 1e-12 keeps it finite in float32 and is below
# float32 rounding for any sum above 1e-5.
RENORM_EPS = 1e-12


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Routing:
    """One routing decision for T tokens. Expert ids are logical (router column) ids."""

    expert_ids: jax.Array  # [T, k] int32
    weights: jax.Array  # [T, k] float32, the combine weights
    scores: jax.Array  # [T, E] float32, normalised scores (softmax, or sigmoid / sum)
    logits: jax.Array  # [T, E] float32


def route(x: jax.Array, router_kernel: jax.Array, cfg: MoEConfig,
          expert_device: jax.Array | None = None, num_devices: int = 1,
          similarity: jax.Array | None = None) -> Routing:
    """x [T, d] → top-k experts and their weights; the router runs in float32.

    With `cfg.max_devices_per_token`, the top-k is device-limited over `expert_device` [E] (the
    device of each logical expert); see pruning.py for the rules. With `cfg.num_expert_groups`,
    it is group-limited over fixed groups of logical experts (DeepSeek-V2
    "group_limited_greedy"). Order: scores → top-k → renormalise → × routed_scaling_factor.
    """
    logits = jnp.dot(x.astype(jnp.float32), router_kernel.astype(jnp.float32))
    if cfg.score_fn == "softmax":
        raw = jax.nn.softmax(logits, axis=-1)
        scores = raw
    else:
        raw = jax.nn.sigmoid(logits)
        scores = raw / (jnp.sum(raw, axis=-1, keepdims=True) + RENORM_EPS)
    cap = cfg.max_devices_per_token
    if cfg.num_expert_groups:
        top_raw, expert_ids = group_limited_top_k(raw, cfg.num_expert_groups, cfg.topk_groups,
                                                  cfg.top_k)
    elif cap is not None and cap < num_devices:
        top_raw, expert_ids = pruning.limited_top_k(
            raw, expert_device, num_devices, cfg.prune_rule, cfg.top_k, cap, similarity)
    else:
        top_raw, expert_ids = jax.lax.top_k(raw, cfg.top_k)
    weights = top_raw
    if cfg.renormalize:
        weights = top_raw / (jnp.sum(top_raw, axis=-1, keepdims=True) + RENORM_EPS)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return Routing(expert_ids.astype(jnp.int32), weights, scores, logits)


def group_limited_top_k(scores: jax.Array, num_groups: int, keep_groups: int,
                        top_k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k of scores [T, E] among the `keep_groups` best of `num_groups` fixed groups of
    consecutive expert ids, a group ranked by its best score; other experts' scores count 0."""
    tokens, experts = scores.shape
    group_best = jnp.max(scores.reshape(tokens, num_groups, experts // num_groups), axis=-1)
    _, groups = jax.lax.top_k(group_best, keep_groups)
    keep = jnp.zeros((tokens, num_groups), jnp.bool_).at[
        jnp.arange(tokens)[:, None], groups].set(True)
    keep = jnp.repeat(keep, experts // num_groups, axis=1)
    return jax.lax.top_k(jnp.where(keep, scores, 0.0), top_k)


def loss_terms(routing: Routing, num_experts: int) -> dict[str, jax.Array]:
    """Per-shard means whose global mean gives the losses (equal tokens per shard).

    Returns the assignment fraction f_e, the mean score P_e, and the mean squared logsumexp.
    """
    tokens, k = routing.expert_ids.shape
    counts = jnp.zeros((num_experts,), jnp.float32).at[routing.expert_ids.reshape(-1)].add(1.0)
    return {
        "fraction": counts / (tokens * k),
        "mean_score": jnp.mean(routing.scores, axis=0),
        "z": jnp.mean(jax.nn.logsumexp(routing.logits, axis=-1) ** 2),
        "load": counts,
    }


def logit_moments(logits: jax.Array) -> dict[str, jax.Array]:
    """Σ logits [E] and Σ logitsᵀ·logits [E, E]: summed over tokens (and devices) they give the
    expert similarity of the "similarity" prune rule (pruning.similarity_from_moments)."""
    logits = logits.astype(jnp.float32)
    return {"logit_sum": jnp.sum(logits, axis=0),
            "logit_gram": jnp.dot(logits.T, logits, preferred_element_type=jnp.float32)}


def coactivation(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """[T, k] ids → [E, E] int32 counts of tokens that chose both i and j (zero diagonal)."""
    chosen = jnp.zeros((expert_ids.shape[0], num_experts), jnp.float32).at[
        jnp.arange(expert_ids.shape[0])[:, None], expert_ids].set(1.0)
    counts = jnp.dot(chosen.T, chosen, preferred_element_type=jnp.float32)
    return (counts * (1.0 - jnp.eye(num_experts))).astype(jnp.int32)


def losses_from_terms(terms: dict[str, jax.Array], num_experts: int) -> dict[str, jax.Array]:
    """Switch load-balancing loss E·Σ f_e·P_e (1 at perfect balance) and the router z-loss."""
    aux = num_experts * jnp.sum(jax.lax.stop_gradient(terms["fraction"]) * terms["mean_score"])
    return {"aux_loss": aux, "z_loss": terms["z"], "expert_load": terms["load"]}
