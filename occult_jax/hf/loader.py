"""`oj.hf.load(path)`: a local Hugging Face checkpoint → an occult_jax `Transformer`.

The model is first built abstractly (`nnx.eval_shape`: no parameter memory), then each leaf is
made with `jax.make_array_from_callback` on its final sharding, so a device reads and holds only
its own slice: the routed experts [E, ...] are sharded over the mesh's expert axis (a device
reads only its experts' tensors), everything else is replicated. Host memory stays one tensor
(or one device's expert slice) at a time, on top of the memory-mapped files.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from occult_jax import mesh as mesh_lib
from occult_jax.config import MoEConfig
from occult_jax.hf import families, weights
from occult_jax.hf.safetensors_reader import SafetensorsCheckpoint
from occult_jax.model import Transformer
from occult_jax.model_config import ModelConfig

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def architecture(path: str, *, dtype: str = "float32", **moe_options: Any
                 ) -> tuple[ModelConfig, MoEConfig | None]:
    """(ModelConfig, MoEConfig or None) of a checkpoint folder, from its config.json only.

    moe_options: MoEConfig run choices (dispatch, transport, capacity_factor, expert_matmul,
    param_dtype, max_devices_per_token, prune_rule, loss weights, expert_axis). The fields the
    checkpoint fixes (`families.MOE_ARCHITECTURE_FIELDS`) cannot be given.
    """
    fixed = sorted(set(moe_options) & set(families.MOE_ARCHITECTURE_FIELDS))
    if fixed:
        raise ValueError(f"MoE fields {fixed} are fixed by the checkpoint's config.json; "
                         "leave them out.")
    arch = families.architecture(families.read_config(path))
    model_cfg = ModelConfig(**arch.model, dtype=dtype)
    if arch.moe is None:
        return model_cfg, None
    moe_cfg = MoEConfig(**{**moe_options, **arch.moe, "d_model": model_cfg.d_model,
                           "dtype": dtype})
    return model_cfg, moe_cfg


def load(path: str, mesh: Mesh | None = None, *, dtype: str = "float32",
         **moe_options: Any) -> Transformer:
    """The `Transformer` of a local HF checkpoint folder (config.json + *.safetensors).

    With a mesh, experts are sharded over its expert axis and MoE layers dispatch as
    `moe_options["dispatch"]` (MoEConfig's default otherwise); without one, everything sits on
    the first device and dispatch defaults to "reference". `dtype` is the compute dtype;
    parameters are float32 (routed experts: `param_dtype`).
    """
    if mesh is None:
        moe_options.setdefault("dispatch", "reference")
    model_cfg, moe_cfg = architecture(path, dtype=dtype, **moe_options)
    return build(path, model_cfg, moe_cfg, mesh)


def build(path: str, model_cfg: ModelConfig, moe_cfg: MoEConfig | None,
          mesh: Mesh | None = None) -> Transformer:
    """`Transformer(model_cfg, moe_cfg)` with its parameters read from the checkpoint at path.

    The configs must describe the checkpoint's architecture (see `architecture`); any
    mismatch with the tensors found raises a one-line ValueError before anything is placed.
    """
    if moe_cfg is None and model_cfg.moe_layers:
        raise ValueError(f"model_cfg has {len(model_cfg.moe_layers)} MoE layers but moe_cfg is "
                         "None; pass the MoEConfig, e.g. from oj.hf.architecture(path).")
    arch = families.architecture(families.read_config(path))
    ckpt = SafetensorsCheckpoint(path)
    names = ckpt.names()
    sources = weights.sources(arch.family, model_cfg, moe_cfg, names)
    missing = sorted({n for s in sources.values() for n in s.names()} - names)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors that its config.json "
                         f"implies, e.g. {missing[0]!r}.")
    extra = weights.unused(sources, names, model_cfg)
    if extra:
        raise ValueError(f"checkpoint {path} holds {len(extra)} tensors the {arch.hf_class} "
                         f"mapping does not use, e.g. {extra[0]!r}; this checkpoint has parts "
                         "oj.hf does not model.")

    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, moe_cfg, mesh=mesh,
                                                  rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves = _flatten(nnx.to_pure_dict(state))
    if set(leaves) != set(sources):
        odd = sorted(map(str, set(leaves) ^ set(sources)))
        raise ValueError(f"model state and checkpoint mapping differ at {len(odd)} paths, e.g. "
                         f"{odd[0]}; the configs do not describe this checkpoint.")
    for leaf_path, leaf in leaves.items():
        got = sources[leaf_path].shape(ckpt)
        if tuple(got) != tuple(leaf.shape):
            raise ValueError(f"{'/'.join(map(str, leaf_path))}: the checkpoint gives shape "
                             f"{tuple(got)}, the model expects {tuple(leaf.shape)}; the configs "
                             "do not describe this checkpoint.")
    arrays = {p: _make_array(sources[p], ckpt, leaf, _sharding(p, model_cfg, moe_cfg, mesh))
              for p, leaf in leaves.items()}
    nnx.replace_by_pure_dict(state, _unflatten(arrays))
    return nnx.merge(graphdef, state)


def _sharding(path: tuple, cfg: ModelConfig, moe: MoEConfig | None, mesh: Mesh | None):
    """Routed-expert weights over the expert axis; everything else replicated."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    if (len(path) == 4 and path[0] == "blocks" and path[2] == "ffn"
            and path[3] in EXPERT_WEIGHTS and cfg.is_moe(path[1])):
        return NamedSharding(mesh, mesh_lib.expert_spec(moe.expert_axis))
    return NamedSharding(mesh, PartitionSpec())


def _make_array(source: weights.Source, ckpt: SafetensorsCheckpoint, leaf: Any,
                sharding: jax.sharding.Sharding) -> jax.Array:
    """The leaf on `sharding`, each device's block read from the checkpoint (once per block)."""
    dtype = np.dtype(leaf.dtype)
    blocks: dict[tuple, np.ndarray] = {}

    def block(index: tuple) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in blocks:
            # a copy: an array aliasing the memory-mapped file would keep it open and change
            # (or fault) when the file is rewritten
            blocks[key] = np.array(source.read(ckpt, index), dtype=dtype, order="C", copy=True)
        return blocks[key]

    return jax.make_array_from_callback(tuple(leaf.shape), sharding, block)


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out

