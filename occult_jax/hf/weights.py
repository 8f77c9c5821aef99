"""Which Hugging Face tensors make each occult_jax parameter, and how (transposes, reshapes).

`sources(family, model_cfg, moe_cfg, names)` maps every leaf path of the Transformer's state
(`("blocks", 0, "attn", "wq")`, ...) to a `Source` that reads any index of it from the
checkpoint. torch `Linear` weights are [out, in]; ours are [in, out] (heads split out:
wq [d, heads, head_dim], wo [heads, head_dim, d]). Routed experts are stacked [E, ...] from
per-expert tensors (`mlp.experts.{e}.gate_proj.weight`, the layout `save_pretrained` writes) or
sliced from the fused `mlp.experts.gate_up_proj` / `down_proj` (transformers' in-memory layout);
either way a read touches only the experts of the requested slice.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from occult_jax.config import MoEConfig
from occult_jax.hf.safetensors_reader import SafetensorsCheckpoint
from occult_jax.model_config import ModelConfig

Path = tuple
Transform = Callable[[np.ndarray], np.ndarray]
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # non-persistent buffers some old saves include


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _transpose(a: np.ndarray) -> np.ndarray:
    return a.T


def _heads_in(a: np.ndarray, heads: int) -> np.ndarray:
    """[heads·dim, in] → [in, heads, dim]."""
    return a.T.reshape(a.shape[1], heads, -1)


def _heads_out(a: np.ndarray, heads: int) -> np.ndarray:
    """[out, heads·dim] → [heads, dim, out]."""
    return a.T.reshape(heads, -1, a.shape[0])


def _bias(a: np.ndarray, heads: int) -> np.ndarray:
    return a.reshape(heads, -1)


def _rows_t(a: np.ndarray, begin: int, end: int | None) -> np.ndarray:
    """Rows [begin, end) of an [out, in] weight, transposed to [in, rows]."""
    return a[begin:end].T


def _kv_b(a: np.ndarray, heads: int, begin: int, end: int | None) -> np.ndarray:
    """kv_b_proj [heads·(nope + v), rank] → [rank, heads, end - begin] (the k or the v part)."""
    return a.reshape(heads, -1, a.shape[1])[:, begin:end, :].transpose(2, 0, 1)


def _fused(a: np.ndarray, begin: int, end: int | None) -> np.ndarray:
    """Fused experts [E, out, in] → rows [begin, end) as [E, in, rows]."""
    return a[:, begin:end, :].transpose(0, 2, 1)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor, transformed whole (transforms are views: no bytes read)."""

    name: str
    transform: Transform = _identity

    def names(self) -> tuple[str, ...]:
        return (self.name,)

    def shape(self, ckpt: SafetensorsCheckpoint) -> tuple[int, ...]:
        return self.transform(ckpt.array(self.name)).shape

    def read(self, ckpt: SafetensorsCheckpoint, index: tuple) -> np.ndarray:
        return np.asarray(self.transform(ckpt.array(self.name))[index])


@dataclasses.dataclass(frozen=True)
class Stacked:
    """Per-expert tensors stacked on a new leading axis; reads only the indexed experts."""

    expert_names: tuple[str, ...]
    transform: Transform = _transpose

    def names(self) -> tuple[str, ...]:
        return self.expert_names

    def shape(self, ckpt: SafetensorsCheckpoint) -> tuple[int, ...]:
        return (len(self.expert_names), *self.transform(ckpt.array(self.expert_names[0])).shape)

    def read(self, ckpt: SafetensorsCheckpoint, index: tuple) -> np.ndarray:
        experts = range(len(self.expert_names))[index[0]]
        parts = [np.asarray(self.transform(ckpt.array(self.expert_names[e]))[index[1:]])
                 for e in experts]
        return np.stack(parts)


@dataclasses.dataclass(frozen=True)
class Sliced:
    """A tensor with a leading expert axis, sliced by expert before it is transformed."""

    name: str
    transform: Transform

    def names(self) -> tuple[str, ...]:
        return (self.name,)

    def shape(self, ckpt: SafetensorsCheckpoint) -> tuple[int, ...]:
        return self.transform(ckpt.array(self.name)).shape

    def read(self, ckpt: SafetensorsCheckpoint, index: tuple) -> np.ndarray:
        part = self.transform(ckpt.array(self.name)[index[0]])
        return np.asarray(part[(slice(None), *index[1:])])


@dataclasses.dataclass(frozen=True)
class Constant:
    """A value the checkpoint does not hold (e.g. the identity expert placement)."""

    value: np.ndarray

    def names(self) -> tuple[str, ...]:
        return ()

    def shape(self, ckpt: SafetensorsCheckpoint) -> tuple[int, ...]:
        return self.value.shape

    def read(self, ckpt: SafetensorsCheckpoint, index: tuple) -> np.ndarray:
        return self.value[index]


Source = Tensor | Stacked | Sliced | Constant


def _attention(cfg: ModelConfig, p: str) -> dict[tuple, Source]:
    h, kv = cfg.num_heads, cfg.kv_heads
    out = {("wq",): Tensor(p + "q_proj.weight", functools.partial(_heads_in, heads=h)),
           ("wk",): Tensor(p + "k_proj.weight", functools.partial(_heads_in, heads=kv)),
           ("wv",): Tensor(p + "v_proj.weight", functools.partial(_heads_in, heads=kv)),
           ("wo",): Tensor(p + "o_proj.weight", functools.partial(_heads_out, heads=h))}
    if cfg.qkv_bias:
        for ours, theirs, n in (("bq", "q_proj", h), ("bk", "k_proj", kv), ("bv", "v_proj", kv)):
            out[(ours,)] = Tensor(p + theirs + ".bias", functools.partial(_bias, heads=n))
    if cfg.qk_norm:
        out[("q_norm", "scale")] = Tensor(p + "q_norm.weight")
        out[("k_norm", "scale")] = Tensor(p + "k_norm.weight")
    return out


def _latent_attention(cfg: ModelConfig, p: str) -> dict[tuple, Source]:
    h, nope, rkv = cfg.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
    heads_in = functools.partial(_heads_in, heads=h)
    if cfg.q_lora_rank:
        out = {("wq_a",): Tensor(p + "q_a_proj.weight", _transpose),
               ("q_a_norm", "scale"): Tensor(p + "q_a_layernorm.weight"),
               ("wq",): Tensor(p + "q_b_proj.weight", heads_in)}
    else:
        out = {("wq",): Tensor(p + "q_proj.weight", heads_in)}
    kv_a = p + "kv_a_proj_with_mqa.weight"
    out.update({
        ("wkv_a",): Tensor(kv_a, functools.partial(_rows_t, begin=0, end=rkv)),
        ("wk_rope",): Tensor(kv_a, functools.partial(_rows_t, begin=rkv, end=None)),
        ("kv_a_norm", "scale"): Tensor(p + "kv_a_layernorm.weight"),
        ("wk_b",): Tensor(p + "kv_b_proj.weight", functools.partial(_kv_b, heads=h, begin=0,
                                                                    end=nope)),
        ("wv_b",): Tensor(p + "kv_b_proj.weight", functools.partial(_kv_b, heads=h, begin=nope,
                                                                    end=None)),
        ("wo",): Tensor(p + "o_proj.weight", functools.partial(_heads_out, heads=h)),
    })
    return out


def _mlp(p: str) -> dict[tuple, Source]:
    return {("w_gate",): Tensor(p + "gate_proj.weight", _transpose),
            ("w_up",): Tensor(p + "up_proj.weight", _transpose),
            ("w_down",): Tensor(p + "down_proj.weight", _transpose)}


def _moe(family: str, moe: MoEConfig, p: str, names: set[str]) -> dict[tuple, Source]:
    e, f = moe.num_experts, moe.d_ff
    out: dict[tuple, Source] = {("router",): Tensor(p + "gate.weight", _transpose)}
    if p + "experts.gate_up_proj" in names:  # fused [E, 2f, d] and [E, d, f]
        out[("w_gate",)] = Sliced(p + "experts.gate_up_proj",
                                  functools.partial(_fused, begin=0, end=f))
        out[("w_up",)] = Sliced(p + "experts.gate_up_proj",
                                functools.partial(_fused, begin=f, end=None))
        out[("w_down",)] = Sliced(p + "experts.down_proj",
                                  functools.partial(_fused, begin=0, end=None))
    else:
        for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"),
                             ("w_down", "down_proj")):
            out[(ours,)] = Stacked(tuple(f"{p}experts.{i}.{theirs}.weight" for i in range(e)))
    out[("placement",)] = Constant(np.arange(e, dtype=np.int32))
    out[("similarity",)] = Constant(np.zeros((e, e), np.float32))
    out[("similarity_calibrated",)] = Constant(np.zeros((), np.bool_))
    if moe.num_shared_experts:
        shared = p + ("shared_expert." if family == "qwen2_moe" else "shared_experts.")
        out.update({("shared", *k): v for k, v in _mlp(shared).items()})
        if moe.shared_expert_gate:
            out[("shared", "gate")] = Tensor(p + "shared_expert_gate.weight", _transpose)
    return out


def sources(family: str, cfg: ModelConfig, moe: MoEConfig | None,
            names: set[str]) -> dict[Path, Source]:
    """{state path: Source} for every leaf of `Transformer(cfg, moe)`'s state."""
    out: dict[Path, Source] = {("embed",): Tensor("model.embed_tokens.weight"),
                               ("final_norm", "scale"): Tensor("model.norm.weight")}
    if not cfg.tie_embeddings:
        out[("head",)] = Tensor("lm_head.weight", _transpose)
    attention = _latent_attention if cfg.attention == "mla" else _attention
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layer = {("attn_norm", "scale"): Tensor(p + "input_layernorm.weight"),
                 ("ffn_norm", "scale"): Tensor(p + "post_attention_layernorm.weight")}
        layer.update({("attn", *k): v for k, v in attention(cfg, p + "self_attn.").items()})
        ffn = _moe(family, moe, p + "mlp.", names) if cfg.is_moe(i) else _mlp(p + "mlp.")
        layer.update({("ffn", *k): v for k, v in ffn.items()})
        out.update({("blocks", i, *k): v for k, v in layer.items()})
    return out


def unused(all_sources: dict[Path, Source], names: set[str], cfg: ModelConfig) -> list[str]:
    """Checkpoint tensors no source reads (a mapping gap), less known-harmless ones."""
    used = {n for s in all_sources.values() for n in s.names()}
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # some tied checkpoints store the copy too
    return sorted(n for n in names - used if not n.endswith(IGNORED_SUFFIXES))
