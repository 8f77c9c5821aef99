"""MoELayer: the Flax NNX module users build models from."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from kernels import platform as kernel_platform
from occult_jax import config as config_lib
from occult_jax import mesh as mesh_lib
from occult_jax import pruning
from occult_jax.config import MoEConfig
from occult_jax.dispatch import ExpertWeights, Layout, expert_parallel_moe, reference_moe
from occult_jax.experts import resolve_backend, swiglu


class ExpertPlacement(nnx.Variable):
    """Non-trainable logical→physical expert map: expert e lives in weight slot `map[e]`.

    Slot s sits on device s // (E / N) of the expert axis. Placement permutes it (with the
    weights), so routing and the router stay in logical ids.
    """


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    std = 1.0 / math.sqrt(fan_in)
    return (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape)).astype(dtype)


def _placer(mesh: Mesh | None, spec: PartitionSpec):
    """A function that puts an array on `spec` over `mesh` (identity without a mesh)."""
    if mesh is None:
        return lambda value: value
    return lambda value: jax.device_put(value, mesh_lib.sharding(mesh, spec))


class ExpertSimilarity(nnx.Variable):
    """Non-trainable [E, E] expert similarity from calibration (`MoELayer.calibrate_similarity`);
    until calibrated, the "similarity" prune rule uses the router-column cosine instead."""


class SharedExperts(nnx.Module):
    """Always-on dense SwiGLU added to the MoE output (Qwen1.5-MoE, DeepSeek-MoE)."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        d, f, dtype = cfg.d_model, cfg.shared_width, jnp.dtype(cfg.param_dtype)
        replicated = _placer(mesh, PartitionSpec())
        self.w_gate = nnx.Param(replicated(_normal(rngs, (d, f), d, dtype)))
        self.w_up = nnx.Param(replicated(_normal(rngs, (d, f), d, dtype)))
        self.w_down = nnx.Param(replicated(_normal(rngs, (f, d), f, dtype)))
        self.gate = (nnx.Param(replicated(_normal(rngs, (d, 1), d, dtype)))
                     if cfg.shared_expert_gate else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        y = swiglu(x, self.w_gate[...].astype(dtype), self.w_up[...].astype(dtype),
                   self.w_down[...].astype(dtype))
        if self.gate is not None:
            y = y * jax.nn.sigmoid(jnp.dot(x, self.gate[...].astype(dtype)))
        return y


class MoELayer(nnx.Module):
    """Top-k routed SwiGLU experts, expert-parallel over the mesh's expert axis.

    `layer(x)` with x [batch, seq, d_model] returns (y of the same shape, stats). stats holds
    aux_loss, z_loss, expert_load [E], coactivation [E, E] (tokens that chose both experts; sum
    it over steps for placement), logit_sum [E] / logit_gram [E, E] / tokens (router-logit
    moments, for similarity calibration), ct (mean devices per token), dropped (assignments lost
    to capacity), wire_rows and wire_bytes (sent off-device, forward, summed over devices).
    """

    def __init__(self, cfg: MoEConfig, *, mesh: Mesh | None = None, rngs: nnx.Rngs):
        if cfg.dispatch != "reference" and mesh is None:
            raise ValueError(f"dispatch={cfg.dispatch!r} needs a mesh; pass "
                             "mesh=oj.make_mesh(...) or use dispatch='reference'.")
        if mesh is None and cfg.max_devices_per_token is not None:
            raise ValueError("MoEConfig.max_devices_per_token caps the devices of each token's "
                             "experts, so it needs a mesh: without one every expert is on one "
                             "device and no cap binds. Pass mesh=oj.make_mesh(...) "
                             "(dispatch='reference' runs on meshes too) or unset the cap.")
        if mesh is not None:
            config_lib.validate_for_mesh(cfg, tuple(mesh.axis_names), self._axis_size(cfg, mesh),
                                         mesh.size, mesh.size,
                                         **mesh_lib.mesh_facts(cfg.expert_axis, mesh))
        self.cfg, self.mesh = cfg, mesh
        e, d, f, dtype = cfg.num_experts, cfg.d_model, cfg.d_ff, jnp.dtype(cfg.param_dtype)
        expert_sharding = _placer(mesh, mesh_lib.expert_spec(cfg.expert_axis))
        replicated = _placer(mesh, PartitionSpec())
        self.router = nnx.Param(replicated(_normal(rngs, (d, e), d, jnp.float32)))
        self.w_gate = nnx.Param(expert_sharding(_normal(rngs, (e, d, f), d, dtype)))
        self.w_up = nnx.Param(expert_sharding(_normal(rngs, (e, d, f), d, dtype)))
        self.w_down = nnx.Param(expert_sharding(_normal(rngs, (e, f, d), f, dtype)))
        self.placement = ExpertPlacement(replicated(jnp.arange(e, dtype=jnp.int32)))
        self.similarity = ExpertSimilarity(replicated(jnp.zeros((e, e), jnp.float32)))
        self.similarity_calibrated = ExpertSimilarity(replicated(jnp.zeros((), jnp.bool_)))
        self.shared = SharedExperts(cfg, rngs=rngs, mesh=mesh) if cfg.num_shared_experts else None

    @staticmethod
    def _axis_size(cfg: MoEConfig, mesh: Mesh) -> int:
        return dict(mesh.shape).get(cfg.expert_axis, 0)

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self._axis_size(self.cfg, self.mesh)

    def expert_weights(self) -> ExpertWeights:
        router, similarity = self.router[...], self.similarity[...]
        if self.cfg.max_devices_per_token is not None and self.cfg.prune_rule == "similarity":
            fallback = jax.lax.stop_gradient(pruning.similarity_from_router(router))
            similarity = jnp.where(self.similarity_calibrated[...], similarity, fallback)
        return ExpertWeights(router, self.w_gate[...], self.w_up[...], self.w_down[...],
                             similarity)

    def calibrate_similarity(self, x: jax.Array) -> None:
        """Store the cosine similarity of experts' router-logit columns over tokens x [..., d]."""
        logits = jnp.dot(x.reshape(-1, self.cfg.d_model).astype(jnp.float32),
                         self.router[...].astype(jnp.float32))
        self.set_similarity(pruning.similarity_from_logits(logits))

    def set_similarity(self, similarity: jax.Array) -> None:
        self.similarity[...] = jnp.asarray(similarity, jnp.float32)
        self.similarity_calibrated[...] = jnp.asarray(True)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
        cfg = self.cfg
        if x.ndim < 2 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoELayer expects [..., d_model={cfg.d_model}] input, got shape "
                             f"{tuple(x.shape)}; reshape it or fix MoEConfig.d_model.")
        shape = x.shape
        x2d = x.reshape(-1, cfg.d_model).astype(jnp.dtype(cfg.dtype))
        weights, placement = self.expert_weights(), self.placement[...]
        if cfg.dispatch == "reference":
            y, stats = _reference_fn(cfg, self.num_devices)(x2d, weights, placement)
        else:
            y, stats = self._expert_parallel(x2d, weights, placement)
        if self.shared is not None:
            y = y + self.shared(x2d)
        return y.reshape(shape).astype(x.dtype), stats

    def layout(self, num_tokens: int) -> Layout:
        """The static layout of a call on `num_tokens` tokens (validated first)."""
        cfg, mesh = self.cfg, self.mesh
        facts = mesh_lib.mesh_facts(cfg.expert_axis, mesh)
        config_lib.validate_for_mesh(cfg, tuple(mesh.axis_names), self.num_devices, mesh.size,
                                     num_tokens, **facts)
        platform = facts["platform"]
        backend = resolve_backend(cfg.expert_matmul, cfg.d_model, cfg.d_ff, cfg.dtype, platform)
        if platform != kernel_platform.backend():  # row maps, transports, expert kernels
            raise ValueError(f"the MoE layer picks its kernels for this process's default "
                             f"devices ({kernel_platform.backend()}), but the mesh is on "
                             f"{platform}; build the mesh on the default devices "
                             f"(oj.make_mesh does).")
        return Layout(
            axis_name=cfg.expert_axis,
            all_axes=tuple(mesh.axis_names),
            num_devices=self.num_devices,
            capacity=config_lib.peer_capacity(cfg, num_tokens // mesh.size, self.num_devices),
            backend=backend,
            platform=platform,
        )

    def _expert_parallel(self, x2d, weights, placement):
        layout = self.layout(x2d.shape[0])
        return expert_parallel_fn(self.cfg, layout, self.mesh)(x2d, weights, placement)


@functools.lru_cache(maxsize=128)
def expert_parallel_fn(cfg: MoEConfig, layout: Layout, mesh: Mesh):
    """The shard_map'd layer, jitted once per (config, layout, mesh): eager calls stay fast."""
    tokens = mesh_lib.token_spec(mesh)
    experts = mesh_lib.expert_spec(cfg.expert_axis)
    weight_specs = ExpertWeights(PartitionSpec(), experts, experts, experts, PartitionSpec())
    local = functools.partial(expert_parallel_moe, cfg=cfg, layout=layout)
    # Kernels whose outputs carry no mesh-axis variance fail shard_map's variance checks: the
    # fused kernels in the Pallas interpreter (CPU tests) and JAX's megablox kernels (the
    # Pallas path on TPU). Those run unchecked — same values, JAX's conservative psum-based
    # transposes.
    unchecked = ((layout.backend == "fused" and layout.platform == "cpu")
                 or (layout.backend == "pallas" and layout.platform == "tpu"))
    return jax.jit(jax.shard_map(local, mesh=mesh,
                                 in_specs=(tokens, weight_specs, PartitionSpec()),
                                 out_specs=(tokens, PartitionSpec()), check_vma=not unchecked))


@functools.lru_cache(maxsize=128)
def _reference_fn(cfg: MoEConfig, num_devices: int):
    return jax.jit(functools.partial(reference_moe, cfg=cfg, num_devices=num_devices))
