"""A differentiable plain-JAX MoE for gradient checks: no occult_jax code. Every expert runs on
every token (dense), in float32 at the highest matmul precision; the top-k mask selects."""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def moe_loss(params, x, cotangent, placement, *, top_k, score_fn="softmax", renormalize=True,
             keep=None, aux_weight=0.1, z_weight=0.01):
    """Σ y·cotangent + aux_weight·aux + z_weight·z, and (y, aux, z).

    params: (router [d, E], w_gate / w_up [slots, d, f], w_down [slots, f, d]); expert e's
    weights sit in slot placement[e]. aux = E·Σ_e f_e·P_e (f_e: the fraction of assignments,
    held constant; P_e: the mean score, sigmoid scores normalised over experts),
    z = mean(logsumexp(logits)²). keep [T, k]: which assignments count (capacity drops).
    """
    router, w_gate, w_up, w_down = params
    d = router.shape[0]
    num_experts = router.shape[1]
    x2 = x.reshape(-1, d)
    logits = jnp.dot(x2, router, precision=HIGHEST)
    scores = jax.nn.softmax(logits) if score_fn == "softmax" else jax.nn.sigmoid(logits)
    ids = jnp.argsort(-jax.lax.stop_gradient(scores), axis=-1, stable=True)[:, :top_k]
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if keep is not None:
        weights = weights * keep
    wg, wu, wd = w_gate[placement], w_up[placement], w_down[placement]  # [E, ...] by expert
    gate = jnp.einsum("td,edf->tef", x2, wg, precision=HIGHEST)
    up = jnp.einsum("td,edf->tef", x2, wu, precision=HIGHEST)
    out = jnp.einsum("tef,efd->ted", jax.nn.silu(gate) * up, wd, precision=HIGHEST)
    mask = jnp.zeros((x2.shape[0], num_experts)).at[jnp.arange(x2.shape[0])[:, None], ids].add(
        weights)
    y = jnp.einsum("te,ted->td", mask, out, precision=HIGHEST).reshape(x.shape)
    counts = jnp.zeros(num_experts).at[ids.reshape(-1)].add(1.0)
    fraction = counts / ids.size
    # P_e is the mean of a distribution over experts: sigmoid scores are normalised first
    probs = scores if score_fn == "softmax" else scores / jnp.sum(scores, -1, keepdims=True)
    aux = num_experts * jnp.sum(fraction * jnp.mean(probs, axis=0))
    z = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    return jnp.sum(y * cotangent) + aux_weight * aux + z_weight * z, (y, aux, z)


def moe_grads(layer, x, cotangent, **kwargs):
    """(loss, (y, aux, z)) and the gradients {router, w_gate, w_up, w_down, x} of moe_loss at
    the layer's weights and placement."""
    params = tuple(jnp.asarray(getattr(layer, n)[...], jnp.float32)
                   for n in ("router", "w_gate", "w_up", "w_down"))
    placement = jnp.asarray(layer.placement[...])
    (loss, aux), (g_params, g_x) = jax.value_and_grad(moe_loss, argnums=(0, 1), has_aux=True)(
        params, jnp.asarray(x, jnp.float32), cotangent, placement, **kwargs)
    names = ("router", "w_gate", "w_up", "w_down")
    return (loss, aux), {**dict(zip(names, g_params, strict=True)), "x": g_x}
