"""Hugging Face import without torch: config.json mapping of the published checkpoints,
one-line errors for what is not supported, the safetensors reader on hand-written files, and
the group-limited routing DeepSeek-V2 needs."""

from __future__ import annotations

import json
import math
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import occult_jax as oj
from occult_jax import model as model_lib
from occult_jax import routing, run_config
from occult_jax.hf import SafetensorsCheckpoint

# config.json of the published checkpoints (the fields the import reads)
OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "attention_bias": False,
    "clip_qkv": None, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 1024,
    "max_position_embeddings": 4096, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "vocab_size": 50304}
QWEN15_MOE_A27B = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 8192,
    "max_window_layers": 21, "num_attention_heads": 16, "num_hidden_layers": 24,
    "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": False, "use_sliding_window": False,
    "vocab_size": 151936, "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60,
    "norm_topk_prob": False}
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "attention_bias": False, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
    "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128,
    "vocab_size": 102400}


def write_config(folder, config: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_published_configs_map_to_their_architectures(tmp_path):
    cfg, moe = oj.hf.architecture(write_config(tmp_path / "olmoe", OLMOE_1B_7B))
    assert (cfg.num_layers, cfg.d_model, cfg.vocab_size, cfg.kv_heads) == (16, 2048, 50304, 16)
    assert cfg.qk_norm and not cfg.qkv_bias and not cfg.tie_embeddings and cfg.norm_eps == 1e-5
    assert cfg.moe_layers == list(range(16))
    assert (moe.num_experts, moe.top_k, moe.d_ff, moe.renormalize) == (64, 8, 1024, False)
    assert moe.num_shared_experts == 0 and moe.num_expert_groups == 0

    cfg, moe = oj.hf.architecture(write_config(tmp_path / "qwen", QWEN15_MOE_A27B))
    assert cfg.qkv_bias and not cfg.qk_norm and cfg.rope_theta == 1e6 and cfg.d_ff == 5632
    assert (moe.num_experts, moe.top_k, moe.d_ff, moe.renormalize) == (60, 4, 1408, False)
    assert (moe.num_shared_experts, moe.shared_d_ff, moe.shared_expert_gate) == (1, 5632, True)

    cfg, moe = oj.hf.architecture(write_config(tmp_path / "ds", DEEPSEEK_V2_LITE),
                                  dispatch="occult")
    assert cfg.attention == "mla" and cfg.q_lora_rank == 0 and cfg.kv_lora_rank == 512
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (128, 64, 128)
    assert cfg.rope_interleaved and cfg.rope_scaling == "yarn" and cfg.rope_factor == 40
    assert cfg.rope_original_max_len == 4096 and cfg.rope_attention_factor == 1.0
    mscale = 0.1 * 0.707 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * mscale ** 2)
    assert cfg.moe_layers == list(range(1, 27)) and cfg.d_ff == 10944
    assert (moe.num_experts, moe.top_k, moe.d_ff, moe.dispatch) == (64, 6, 1408, "occult")
    assert (moe.num_shared_experts, moe.shared_d_ff, moe.shared_expert_gate) == (2, 1408, False)
    assert moe.num_expert_groups == 0 and moe.routed_scaling_factor == 1.0


def test_qwen_sparse_step_and_mlp_only_layers(tmp_path):
    config = {**QWEN15_MOE_A27B, "num_hidden_layers": 8, "decoder_sparse_step": 2,
              "mlp_only_layers": [5]}
    cfg, _ = oj.hf.architecture(write_config(tmp_path, config))
    assert cfg.moe_layers == [1, 3, 7]  # (i + 1) % 2 == 0, less layer 5


@pytest.mark.parametrize("base,changes,needle", [
    (QWEN15_MOE_A27B, {"use_sliding_window": True}, "use_sliding_window=True"),
    (QWEN15_MOE_A27B, {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
    (QWEN15_MOE_A27B, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    (OLMOE_1B_7B, {"attention_bias": True}, "attention_bias=True"),
    (OLMOE_1B_7B, {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    (DEEPSEEK_V2_LITE, {"topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
    (DEEPSEEK_V2_LITE, {"norm_topk_prob": True}, "norm_topk_prob=True"),
    (DEEPSEEK_V2_LITE, {"num_key_value_heads": 4}, "num_key_value_heads=4"),
    (DEEPSEEK_V2_LITE, {"topk_method": "group_limited_greedy", "n_group": 5},
     "n_group, topk_group"),
    ({**OLMOE_1B_7B, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}, {},
     "LlamaForCausalLM"),
])
def test_unsupported_config_fields_fail_in_one_line(tmp_path, base, changes, needle):
    path = write_config(tmp_path, {**base, **changes})
    with pytest.raises(ValueError) as info:
        oj.hf.load(path)  # fails on config.json, before looking for weights
    message = str(info.value)
    assert needle in message and "not supported" in message and "\n" not in message


def test_bad_paths_fail_in_one_line(tmp_path):
    for path, needle in ((tmp_path / "nope", "does not exist"),
                         (tmp_path, "has no config.json")):
        with pytest.raises(ValueError, match=needle) as info:
            oj.hf.load(str(path))
        assert "\n" not in str(info.value)
    write_config(tmp_path, OLMOE_1B_7B)
    with pytest.raises(ValueError, match="safe_serialization=True"):
        oj.hf.load(str(tmp_path))
    with pytest.raises(ValueError, match="fixed by the checkpoint"):
        oj.hf.architecture(str(tmp_path), num_experts=8)


def test_init_from_hf_errors_are_config_errors(tmp_path):
    from test_train import tiny_config

    config = tiny_config(tmp_path / "run", init_from=f"hf:{tmp_path / 'missing'}")
    with pytest.raises(run_config.ConfigError, match="does not exist"):
        run_config.validate(config, 8)
    config.init_from = "hf:" + write_config(tmp_path / "qwen", QWEN15_MOE_A27B)
    config.mesh.update(expert=8, data=1)
    with pytest.raises(run_config.ConfigError, match="num_experts=60 is not divisible"):
        run_config.validate(config, 8)
    config.mesh.update(expert=4, data=2)
    model_cfg, moe_cfg, _ = run_config.validate(config, 8)
    assert model_cfg.vocab_size == 151936 and moe_cfg.num_experts == 60
    assert moe_cfg.dispatch == config.moe.dispatch  # run choices stay the config's


@pytest.mark.parametrize("base,field", [
    (OLMOE_1B_7B, "intermediate_size"), (OLMOE_1B_7B, "num_experts"),
    (OLMOE_1B_7B, "num_experts_per_tok"), (OLMOE_1B_7B, "hidden_size"),
    (QWEN15_MOE_A27B, "intermediate_size"), (QWEN15_MOE_A27B, "moe_intermediate_size"),
    (QWEN15_MOE_A27B, "shared_expert_intermediate_size"), (QWEN15_MOE_A27B, "num_experts"),
    (DEEPSEEK_V2_LITE, "intermediate_size"), (DEEPSEEK_V2_LITE, "moe_intermediate_size"),
    (DEEPSEEK_V2_LITE, "n_routed_experts"), (DEEPSEEK_V2_LITE, "n_shared_experts"),
    (DEEPSEEK_V2_LITE, "kv_lora_rank"), (DEEPSEEK_V2_LITE, "q_lora_rank"),
    (DEEPSEEK_V2_LITE, "v_head_dim"), (DEEPSEEK_V2_LITE, "qk_rope_head_dim"),
])
def test_missing_or_non_integer_sizes_fail_in_one_line(tmp_path, base, field):
    """A size config.json leaves out, or gives as a string, float or bool, names the field."""
    config = {k: v for k, v in base.items() if k != field}
    with pytest.raises(ValueError, match=f"config.json lacks {field}; give it") as info:
        oj.hf.architecture(write_config(tmp_path / "missing", config))
    assert "\n" not in str(info.value)
    rng = np.random.default_rng()
    value = int(rng.integers(1, 64))
    for bad in (str(value), value + 0.5, True):
        path = write_config(tmp_path / type(bad).__name__, {**config, field: bad})
        with pytest.raises(ValueError, match=f"config.json: {field}={bad!r} must be an integer") \
                as info:
            oj.hf.architecture(path)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("base,field,bad", [
    (OLMOE_1B_7B, "head_dim", "128"), (OLMOE_1B_7B, "clip_qkv", "8.0"),
    (OLMOE_1B_7B, "clip_qkv", -1.0), (QWEN15_MOE_A27B, "decoder_sparse_step", 0),
    (QWEN15_MOE_A27B, "decoder_sparse_step", 1.5), (QWEN15_MOE_A27B, "head_dim", True),
    (QWEN15_MOE_A27B, "mlp_only_layers", "0"), (QWEN15_MOE_A27B, "mlp_only_layers", [1, "2"]),
    (DEEPSEEK_V2_LITE, "first_k_dense_replace", "1"),
    (DEEPSEEK_V2_LITE, "first_k_dense_replace", -1),
])
def test_optional_fields_of_the_wrong_type_fail_in_one_line(tmp_path, base, field, bad):
    """An optional field given with the wrong type or range names the field (they failed as
    TypeErrors inside the mapping, or reached the model)."""
    with pytest.raises(ValueError, match=f"config.json: {field}=") as info:
        oj.hf.architecture(write_config(tmp_path, {**base, field: bad}))
    assert "\n" not in str(info.value)
    oj.hf.architecture(write_config(tmp_path / "null", {**base, field: None}))  # null: default


def test_build_without_moe_config_fails_in_one_line(tmp_path):
    path = write_config(tmp_path, OLMOE_1B_7B)
    model_cfg, _ = oj.hf.architecture(path)
    with pytest.raises(ValueError, match=r"moe_cfg is None; pass the MoEConfig, e\.g\. from "
                                         r"oj\.hf\.architecture\(path\)") as info:
        oj.hf.build(path, model_cfg, None)
    assert "\n" not in str(info.value)


def _write_safetensors(path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """The format by hand: u64 header length, JSON header, raw little-endian bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, value) in tensors.items():
        raw = value.tobytes()
        header[name] = {"dtype": dtype, "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_safetensors_reader_single_and_sharded(tmp_path):
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    bf16 = rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16)
    i64 = np.arange(6, dtype=np.int64).reshape(2, 3)
    _write_safetensors(tmp_path / "model.safetensors",
                       {"a": ("F32", f32), "b": ("BF16", bf16), "c": ("I64", i64)})
    ckpt = SafetensorsCheckpoint(str(tmp_path))
    assert ckpt.names() == {"a", "b", "c"} and ckpt.shape("b") == (4, 2)
    np.testing.assert_array_equal(ckpt.array("a"), f32)
    np.testing.assert_array_equal(ckpt.array("b").astype(np.float32), bf16.astype(np.float32))
    np.testing.assert_array_equal(ckpt.array("c"), i64)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    _write_safetensors(sharded / "part-1.safetensors", {"a": ("F32", f32)})
    _write_safetensors(sharded / "part-2.safetensors", {"b": ("BF16", bf16)})
    index = {"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = SafetensorsCheckpoint(str(sharded))
    np.testing.assert_array_equal(ckpt.array("a"), f32)
    assert ckpt.array("b").dtype == ml_dtypes.bfloat16
    index["weight_map"]["z"] = "part-3.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"part-3\.safetensors, which is missing"):
        SafetensorsCheckpoint(str(sharded))


def test_safetensors_reader_rejects_malformed_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(ValueError, match="header length 10000 exceeds"):
        SafetensorsCheckpoint(str(tmp_path))
    bad = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}
    text = json.dumps(bad).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(8))
    with pytest.raises(ValueError, match="does not match its shape"):
        SafetensorsCheckpoint(str(tmp_path))


def _header_file(path, header) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(16))


@pytest.mark.parametrize("header,needle", [
    ([1, 2], "header is not a JSON object"),
    ({"x": {"dtype": "F32", "shape": [4]}}, "tensor 'x' has a malformed header entry"),
    ({"x": {"dtype": "F32", "shape": "abc", "data_offsets": [0, 16]}}, "malformed header entry"),
    ({"x": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, "malformed header entry"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}, "malformed header entry"),
    ({"x": "F32"}, "malformed header entry"),
    ({"x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, "or the file size"),
])
def test_corrupt_safetensors_headers_name_the_file(tmp_path, header, needle):
    _header_file(tmp_path / "model.safetensors", header)
    with pytest.raises(ValueError, match=needle) as info:
        SafetensorsCheckpoint(str(tmp_path))
    assert str(tmp_path / "model.safetensors") in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text,needle", [
    ("{not json", "is unreadable"), (b"\xff\xfe{}", "is unreadable"),
    ("[1]", "has no 'weight_map'"), ('{"weight_map": {}}', "has no 'weight_map'"),
])
def test_bad_index_file_names_the_file(tmp_path, text, needle):
    _header_file(tmp_path / "part-1.safetensors", {})
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=needle) as info:
        SafetensorsCheckpoint(str(tmp_path))
    assert str(index) in str(info.value) and "\n" not in str(info.value)


def test_group_limited_routing_matches_numpy():
    """DeepSeek-V2 group_limited_greedy: best `topk_groups` of the fixed expert groups (by their
    best score), then the top-k among them, × routed_scaling_factor."""
    cfg = oj.MoEConfig(num_experts=16, top_k=3, d_model=8, num_expert_groups=4, topk_groups=2,
                       renormalize=False, routed_scaling_factor=2.5)
    rng = np.random.default_rng(0)
    x, router = rng.standard_normal((32, 8)), rng.standard_normal((8, 16))
    got = routing.route(jnp.asarray(x, jnp.float32), jnp.asarray(router, jnp.float32), cfg)
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for t in range(32):
        groups = np.argsort(-probs[t].reshape(4, 4).max(-1))[:2]
        allowed = np.concatenate([np.arange(g * 4, g * 4 + 4) for g in groups])
        best = allowed[np.argsort(-probs[t, allowed])[:3]]
        assert sorted(np.asarray(got.expert_ids[t])) == sorted(best)
        np.testing.assert_allclose(sorted(np.asarray(got.weights[t])),
                                   sorted(2.5 * probs[t, best]), rtol=1e-5)
    assert np.any(np.asarray(got.expert_ids) != np.asarray(
        routing.route(jnp.asarray(x, jnp.float32), jnp.asarray(router, jnp.float32),
                      cfg.replace(num_expert_groups=0, topk_groups=0)).expert_ids))


@pytest.mark.parametrize("changes,needle", [
    (dict(num_expert_groups=3), "must divide num_experts"),
    (dict(num_expert_groups=4, topk_groups=5), "must be in [1, num_expert_groups=4]"),
    (dict(num_expert_groups=8, topk_groups=1), "fewer than top_k"),
    (dict(topk_groups=2), "needs num_expert_groups"),
    (dict(num_expert_groups=4, topk_groups=2, max_devices_per_token=1), "set one of them"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor=0.0 must be a finite number > 0"),
])
def test_bad_group_routing_configs(changes, needle):
    with pytest.raises(ValueError) as info:
        oj.MoEConfig(num_experts=16, top_k=3, **changes)
    assert needle in str(info.value)



@pytest.mark.parametrize("changes,needle", [
    (dict(num_kv_heads=3), "must divide num_heads=4"),
    (dict(attention="mla"), "needs model.kv_lora_rank >= 1"),
    (dict(attention="mla", kv_lora_rank=8, qk_rope_head_dim=8, v_head_dim=8, qkv_bias=True),
     "applies to attention='mha' only"),
    (dict(attention="mla", kv_lora_rank=8, qk_rope_head_dim=7, v_head_dim=8),
     "RoPE dim 7 must be even"),
    (dict(rope_scaling="yarn"), "needs rope_factor > 0 and rope_original_max_len >= 1"),
    (dict(rope_scaling="ntk"), "rope_scaling='ntk' is unknown"),
])
def test_bad_attention_configs(changes, needle):
    with pytest.raises(ValueError) as info:
        model_lib.ModelConfig(num_heads=4, **changes)
    assert needle in str(info.value)


@pytest.mark.parametrize("changes", [
    dict(num_kv_heads=2, qkv_bias=True, qk_norm=True, qkv_clip=1.0),
    dict(attention="mla", q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=4,
         qk_rope_head_dim=4, v_head_dim=6, rope_interleaved=True, rope_scaling="yarn",
         rope_factor=8.0, rope_original_max_len=4),
])
def test_attention_variants_are_causal(changes):
    cfg = model_lib.ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=48,
                                first_dense_layers=1, **changes)
    moe = oj.MoEConfig(num_experts=4, top_k=2, d_ff=16, dispatch="reference")
    model = model_lib.Transformer(cfg, moe, rngs=nnx.Rngs(0))
    a = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 12)))
    b = a.at[0, 8:].set((a[0, 8:] + 1) % 64)
    la, lb = model(a)[0], model(b)[0]
    np.testing.assert_allclose(la[0, :8], lb[0, :8], rtol=1e-5, atol=1e-6)
    assert not np.allclose(la[0, 8:], lb[0, 8:])
