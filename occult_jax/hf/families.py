"""Hugging Face `config.json` → occult_jax `ModelConfig` / `MoEConfig` fields, per family.

Supported: `OlmoeForCausalLM`, `Qwen2MoeForCausalLM`, `DeepseekV2ForCausalLM` (multi-head latent
attention included). A config feature the model cannot express raises a one-line ValueError
naming the field and what to change, before any weight is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from occult_jax import rope as rope_lib
from occult_jax.config import _is_int, _is_real

ARCHITECTURES = {
    "OlmoeForCausalLM": "olmoe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
}
MODEL_TYPES = {family: cls for cls, family in ARCHITECTURES.items()}

# MoEConfig fields that an HF checkpoint fixes; the others (dispatch, transport, capacity, ...)
# are run choices.
MOE_ARCHITECTURE_FIELDS = ("num_experts", "top_k", "d_ff", "score_fn", "renormalize",
                           "num_shared_experts", "shared_d_ff", "shared_expert_gate",
                           "routed_scaling_factor", "num_expert_groups", "topk_groups")

# An absent optional field takes transformers' class default (OlmoeConfig, Qwen2MoeConfig,
# DeepseekV2Config); these differ between families. An absent size field is an error (`_size`).
DEFAULT_EPS = {"olmoe": 1e-5, "qwen2_moe": 1e-6, "deepseek_v2": 1e-6}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What an HF config describes, as occult_jax config fields."""

    family: str  # "olmoe" | "qwen2_moe" | "deepseek_v2"
    hf_class: str
    model: dict[str, Any]  # ModelConfig fields (all but dtype)
    moe: dict[str, Any] | None  # MOE_ARCHITECTURE_FIELDS; None when no layer is MoE


def _unsupported(field: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"config.json: {field}={value!r} is not supported; {fix}.")


def read_config(directory: str) -> dict[str, Any]:
    """The parsed config.json of a checkpoint folder (one-line ValueError when absent/bad)."""
    if not os.path.isdir(directory):
        raise ValueError(f"Hugging Face checkpoint folder {directory!r} does not exist; give a "
                         "local folder holding config.json and *.safetensors.")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} has no config.json; give the folder that "
                         "save_pretrained wrote.")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({str(e).splitlines()[0]}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object.")
    return config


def architecture(config: dict[str, Any]) -> Architecture:
    """The occult_jax fields of an HF config dict, after checking every feature is supported."""
    archs = config.get("architectures") or []
    known = [a for a in archs if a in ARCHITECTURES]
    if known:
        hf_class = known[0]
    elif not archs and config.get("model_type") in MODEL_TYPES:
        hf_class = MODEL_TYPES[config["model_type"]]
    else:
        raise ValueError(f"config.json: architecture {archs or None} (model_type "
                         f"{config.get('model_type')!r}) is not supported; oj.hf reads "
                         f"{', '.join(ARCHITECTURES)}.")
    _check_common(config)
    family = ARCHITECTURES[hf_class]
    model, moe = {"olmoe": _olmoe, "qwen2_moe": _qwen2_moe, "deepseek_v2": _deepseek_v2}[
        family](config)
    return Architecture(family, hf_class, model, moe)


def _get(config: dict, name: str, default: Any = None) -> Any:
    value = config.get(name)
    return default if value is None else value


def _optional_int(config: dict, name: str, default: int, minimum: int) -> int:
    """An optional integer field: absent or null → `default`, else an int >= minimum."""
    value = _get(config, name, default)
    if not _is_int(value) or value < minimum:
        raise ValueError(f"config.json: {name}={value!r} must be an integer >= {minimum} "
                         "(or absent).")
    return value


def _optional_real(config: dict, name: str, default: float) -> float:
    """An optional number field: absent or null → `default`, else a finite number >= 0."""
    value = _get(config, name, default)
    if not _is_real(value) or not 0 <= value < 1e300:
        raise ValueError(f"config.json: {name}={value!r} must be a finite number >= 0 "
                         "(or absent).")
    return float(value)


def _layer_list(config: dict, name: str) -> tuple[int, ...]:
    """An optional list of layer indices (absent or null → none)."""
    value = _get(config, name, [])
    if not isinstance(value, list) or any(
            not _is_int(i) or i < 0 for i in value):
        raise ValueError(f"config.json: {name}={value!r} must be a list of layer indices >= 0.")
    return tuple(value)


def _size(config: dict, name: str, minimum: int = 1, nullable: bool = False) -> int:
    """A size field config.json must give: an int >= minimum (null → 0 when nullable)."""
    if name not in config:
        raise ValueError(f"config.json lacks {name}; give it (an integer >= {minimum}"
                         f"{', or null' if nullable else ''}).")
    value = config[name]
    if value is None and nullable:
        return 0
    if not _is_int(value) or value < minimum:
        raise ValueError(f"config.json: {name}={value!r} must be an integer >= {minimum}"
                         f"{' or null' if nullable else ''}.")
    return value


def _check_common(config: dict) -> None:
    if config.get("quantization_config"):
        raise _unsupported("quantization_config", config["quantization_config"].get(
            "quant_method", "..."), "load an unquantised (float) checkpoint")
    act = _get(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _unsupported("hidden_act", act, "the experts and MLPs are SwiGLU (silu) only")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        _size(config, name)


def _base(config: dict, family: str) -> dict[str, Any]:
    """Fields every family shares: sizes, norms, embeddings, RoPE."""
    return {"vocab_size": config["vocab_size"], "num_layers": config["num_hidden_layers"],
            "d_model": config["hidden_size"], "num_heads": config["num_attention_heads"],
            "norm_eps": float(_get(config, "rms_norm_eps", DEFAULT_EPS[family])),
            "tie_embeddings": bool(_get(config, "tie_word_embeddings", False)),
            **_rope(config)[0]}


def _rope(config: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ModelConfig RoPE fields, the merged rope parameters) from `rope_parameters`
    (transformers >= 5) or the older `rope_theta` + `rope_scaling`."""
    params = dict(_get(config, "rope_scaling", {}))
    params.update(_get(config, "rope_parameters", {}))
    if any(isinstance(v, dict) for v in params.values()):
        raise _unsupported("rope_parameters", "per-layer-type dict",
                           "one RoPE for all layers is supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", _get(config, "rope_theta", 10_000.0)))
    partial = params.get("partial_rotary_factor", _get(config, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _unsupported("partial_rotary_factor", partial, "set it to 1.0 (full RoPE)")
    if rope_type == "default":
        return {"rope_theta": theta}, {**params, "rope_type": "default"}
    if rope_type != "yarn":
        raise _unsupported("rope_parameters.rope_type", rope_type,
                           "only 'default' and 'yarn' RoPE are implemented")
    original = (config.get("original_max_position_embeddings")
                or params.get("original_max_position_embeddings")
                or config.get("max_position_embeddings"))
    if not original:
        raise ValueError("config.json: yarn RoPE needs original_max_position_embeddings.")
    factor = params.get("factor") or config["max_position_embeddings"] / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = (rope_lib.yarn_mscale(factor, mscale)
                                / rope_lib.yarn_mscale(factor, mscale_all))
        else:
            attention_factor = rope_lib.yarn_mscale(factor)
    fields = {"rope_theta": theta, "rope_scaling": "yarn", "rope_factor": float(factor),
              "rope_original_max_len": int(original),
              "rope_beta_fast": float(params.get("beta_fast") or 32),
              "rope_beta_slow": float(params.get("beta_slow") or 1),
              "rope_truncate": bool(params.get("truncate", True)),
              "rope_attention_factor": float(attention_factor)}
    return fields, {**params, "rope_type": "yarn", "factor": factor}


def _kv_heads(config: dict, default: int | None = None) -> int:
    """0 (= heads) or the grouped key/value head count; `default` when absent (else heads)."""
    heads = config["num_attention_heads"]
    kv = _get(config, "num_key_value_heads", default or heads)
    if not isinstance(kv, int) or kv < 1 or heads % kv:
        raise ValueError(f"config.json: num_key_value_heads={kv} must divide "
                         f"num_attention_heads={heads}.")
    return 0 if kv == heads else kv


def _experts(config: dict, num_experts: int) -> dict[str, Any]:
    top_k = _size(config, "num_experts_per_tok")
    if top_k > num_experts:
        raise ValueError(f"config.json: num_experts_per_tok={top_k!r} must be in "
                         f"[1, {num_experts}].")
    return {"num_experts": num_experts, "top_k": top_k, "score_fn": "softmax",
            "num_shared_experts": 0, "shared_d_ff": None, "shared_expert_gate": False,
            "routed_scaling_factor": 1.0, "num_expert_groups": 0, "topk_groups": 0}


def _olmoe(config: dict) -> tuple[dict, dict]:
    if config.get("attention_bias"):
        raise _unsupported("attention_bias", True, "set it to false (no attention biases)")
    d, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = _optional_int(config, "head_dim", d // heads, 1)
    if head_dim * heads != d:  # OlmoeAttention's q_norm spans hidden_size
        raise _unsupported("head_dim", head_dim, f"OLMoE needs head_dim × heads = hidden_size {d}")
    num_experts, d_ff = _size(config, "num_experts"), _size(config, "intermediate_size")
    model = {**_base(config, "olmoe"), "head_dim": 0 if head_dim == d // heads else head_dim,
             "d_ff": d_ff, "moe_every": 1, "first_dense_layers": 0,
             "num_kv_heads": _kv_heads(config), "qk_norm": True,
             "qkv_clip": _optional_real(config, "clip_qkv", 0.0)}
    moe = {**_experts(config, num_experts), "d_ff": d_ff,
           "renormalize": bool(_get(config, "norm_topk_prob", False))}
    return model, moe


def _qwen2_moe(config: dict) -> tuple[dict, dict | None]:
    if config.get("use_sliding_window"):
        raise _unsupported("use_sliding_window", True,
                           "set it to false (sliding-window attention is not implemented)")
    types = set(_get(config, "layer_types", ["full_attention"]))
    if types - {"full_attention"}:
        raise _unsupported("layer_types", sorted(types), "only full_attention is implemented")
    d, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = _optional_int(config, "head_dim", d // heads, 1)
    num_experts = _size(config, "num_experts", minimum=0)
    step = _optional_int(config, "decoder_sparse_step", 1, 1)
    model = {**_base(config, "qwen2_moe"), "head_dim": 0 if head_dim * heads == d else head_dim,
             "d_ff": _size(config, "intermediate_size"),
             "num_kv_heads": _kv_heads(config, default=16),  # Qwen2MoeConfig's default
             "qkv_bias": bool(_get(config, "qkv_bias", True)),
             "moe_every": step if num_experts else 0, "first_dense_layers": step - 1,
             "dense_layers": _layer_list(config, "mlp_only_layers")}
    if not num_experts:
        return model, None
    shared = _size(config, "shared_expert_intermediate_size")  # Qwen2-MoE always has one
    moe = {**_experts(config, num_experts), "d_ff": _size(config, "moe_intermediate_size"),
           "renormalize": bool(_get(config, "norm_topk_prob", False)),
           "num_shared_experts": 1, "shared_d_ff": shared, "shared_expert_gate": True}
    return model, moe


def _deepseek_v2(config: dict) -> tuple[dict, dict | None]:
    for name, fix in (("attention_bias", "set it to false (no attention biases)"),
                      ("mlp_bias", "set it to false (no MLP biases)"),
                      ("norm_topk_prob", "set it to false (transformers' DeepseekV2 ignores it; "
                                         "DeepSeek's code renormalises: ambiguous)")):
        if config.get(name):
            raise _unsupported(name, True, fix)
    if _get(config, "scoring_func", "softmax") != "softmax":
        raise _unsupported("scoring_func", config["scoring_func"], "DeepSeek-V2 uses softmax")
    if _get(config, "moe_layer_freq", 1) != 1:
        raise _unsupported("moe_layer_freq", config["moe_layer_freq"],
                           "every layer after first_k_dense_replace is MoE")
    heads = config["num_attention_heads"]
    if _get(config, "num_key_value_heads", heads) != heads:
        raise _unsupported("num_key_value_heads", config["num_key_value_heads"],
                           f"MLA has one key/value head per query head ({heads})")
    nope, rope_dim = _size(config, "qk_nope_head_dim", 0), _size(config, "qk_rope_head_dim", 0)
    _, rope_params = _rope(config)
    scale = (nope + rope_dim) ** -0.5
    if rope_params["rope_type"] != "default" and rope_params.get("mscale_all_dim"):
        scale *= rope_lib.yarn_mscale(rope_params["factor"], rope_params["mscale_all_dim"]) ** 2
    num_experts = _size(config, "n_routed_experts", minimum=0)
    model = {**_base(config, "deepseek_v2"), "d_ff": _size(config, "intermediate_size"),
             "attention": "mla", "q_lora_rank": _size(config, "q_lora_rank", 0, nullable=True),
             "kv_lora_rank": _size(config, "kv_lora_rank"), "qk_nope_head_dim": nope,
             "qk_rope_head_dim": rope_dim, "v_head_dim": _size(config, "v_head_dim"),
             "latent_norm_eps": 1e-6, "rope_interleaved": True, "attn_scale": scale,
             "moe_every": 1 if num_experts else 0,
             "first_dense_layers": _optional_int(config, "first_k_dense_replace", 0, 0)}
    if not num_experts:
        return model, None
    method = _get(config, "topk_method", "greedy")
    moe = {**_experts(config, num_experts), "d_ff": _size(config, "moe_intermediate_size"),
           "renormalize": False,
           "routed_scaling_factor": float(_get(config, "routed_scaling_factor", 1.0)),
           "num_shared_experts": _size(config, "n_shared_experts", 0, nullable=True)}
    if moe["num_shared_experts"]:
        moe["shared_d_ff"] = moe["d_ff"]
    if method == "group_limited_greedy":
        groups, keep = config.get("n_group"), config.get("topk_group")
        if not (isinstance(groups, int) and isinstance(keep, int) and groups >= 1
                and num_experts % groups == 0 and 1 <= keep <= groups):
            raise _unsupported("n_group, topk_group", (groups, keep), "group_limited_greedy "
                               "needs n_group dividing n_routed_experts and 1 <= topk_group <= "
                               "n_group")
        moe.update(num_expert_groups=groups, topk_groups=keep)
    elif method != "greedy":
        raise _unsupported("topk_method", method,
                           "use 'greedy' or 'group_limited_greedy' (DeepSeek-V2)")
    return model, moe
