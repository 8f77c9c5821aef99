"""Hugging Face import against `transformers` itself: tiny random OLMoE, Qwen2-MoE and
DeepSeek-V2 models (every parameter perturbed, so any mis-mapped tensor shows), saved with
`save_pretrained`, loaded with `oj.hf.load`, logits compared in every dispatch mode on the
8-device CPU mesh; sharded bf16 and fused-expert checkpoints; fine-tuning from `hf:PATH`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mesh_or_skip
from flax import nnx

REASON = ("the 'hf' extra (torch, transformers) is not installed; "
          "pip install -e '.[test,hf]' to run the Hugging Face parity tests")
torch = pytest.importorskip("torch", reason=REASON)
transformers = pytest.importorskip("transformers", reason=REASON)

import occult_jax as oj  # noqa: E402
from occult_jax import data as data_lib  # noqa: E402
from occult_jax import train_lib  # noqa: E402
from occult_jax.hf import SafetensorsCheckpoint, weights  # noqa: E402

DISPATCHES = ("reference", "standard", "occult")
VOCAB = 320  # >= 256, so the byte-level training corpus fits
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096}
FAMILIES = {
    # grouped-query attention, q/k norm, clip_qkv, top-k weights not renormalised
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                  num_key_value_heads=2, clip_qkv=3.0)),
    # q/k/v biases, gated shared expert, a dense mlp_only layer, renormalised top-k, tied head
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=40,
        num_experts=8, num_experts_per_tok=2, num_key_value_heads=2, norm_topk_prob=True,
        mlp_only_layers=[0], tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # DeepSeek-V2-Lite's structure: MLA without q compression, YaRN, first layer dense, greedy
    "deepseek_v2_lite": ("DeepseekV2Config", dict(
        intermediate_size=48, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=16,
        q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
        topk_method="greedy", max_position_embeddings=163840, rope_parameters=YARN)),
    # DeepSeek-V2's: compressed queries, group-limited routing, routed scaling factor
    "deepseek_v2": ("DeepseekV2Config", dict(
        intermediate_size=48, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16,
        q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
        topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5)),
    # YaRN on multi-head attention: factor 8 gives attention_factor 0.1·ln 8 + 1 ≈ 1.208
    # (DeepSeek-V2-Lite's mscale == mscale_all_dim makes its factor 1)
    "olmoe_yarn": ("OlmoeConfig", dict(
        intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_key_value_heads=2,
        max_position_embeddings=64, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
            "original_max_position_embeddings": 8})),
    # unrounded YaRN ramp bounds (truncate=False) and other betas
    "qwen2_moe_yarn": ("Qwen2MoeConfig", dict(
        intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=40,
        num_experts=8, num_experts_per_tok=2, num_key_value_heads=2, norm_topk_prob=True,
        max_position_embeddings=16384, rope_parameters={  # ramp over dims 2.9..5.3 of 8
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 24,
            "beta_slow": 1.5, "truncate": False, "original_max_position_embeddings": 4096})),
}


def tiny_hf_model(family: str, seed: int = 0):
    """A tiny float32 HF model of the family with every parameter randomised."""
    config_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * noise)  # norms: around 1, never exactly 1
            elif p.ndim == 1:
                p.copy_(0.2 * noise)  # biases
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model.eval()


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def our_logits(model, ids: np.ndarray) -> np.ndarray:
    logits, _ = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(ids))
    return np.asarray(logits)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{family: (folder, random ids [8, 16], HF logits)}, built on first use."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model = tiny_hf_model(family)
            path = str(tmp_path_factory.mktemp(family))
            model.save_pretrained(path, safe_serialization=True)
            ids = np.random.default_rng(1).integers(0, VOCAB, (8, 16))
            cache[family] = (path, ids, hf_logits(model, ids))
        return cache[family]

    return get


def tolerance(reference: np.ndarray) -> float:
    """float32 tolerance: 1e-5 relative to the largest logit (observed ~1e-6 relative)."""
    return 1e-5 * (1.0 + float(np.abs(reference).max()))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_in_every_dispatch_mode(family, saved):
    mesh = mesh_or_skip(expert=4, data=2)
    path, ids, reference = saved(family)
    diffs = {}
    for dispatch in DISPATCHES:
        model = oj.hf.load(path, mesh, dispatch=dispatch)
        diffs[dispatch] = float(np.abs(our_logits(model, ids) - reference).max())
    print(f"{family}: max |logits - transformers| = {diffs} (|logits| <= "
          f"{np.abs(reference).max():.2f})")
    for dispatch, diff in diffs.items():
        assert diff <= tolerance(reference), (family, dispatch, diff)


def test_sharded_bf16_checkpoint_loads_onto_expert_shards(tmp_path, monkeypatch):
    mesh = mesh_or_skip(expert=4, data=2)
    hf_model = tiny_hf_model("olmoe").to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded

    reads: list[str] = []
    array = SafetensorsCheckpoint.array
    monkeypatch.setattr(SafetensorsCheckpoint, "array",
                        lambda self, name: reads.append(name) or array(self, name))
    model = oj.hf.load(str(tmp_path), mesh, dispatch="occult")
    monkeypatch.undo()

    state = {k: v.float().numpy() for k, v in hf_model.state_dict().items()}
    moe = model.blocks[1].ffn
    w_gate = moe.w_gate[...]
    assert w_gate.sharding.spec[0] == "expert"
    gate_up = state["model.layers.1.mlp.experts.gate_up_proj"]  # in memory: fused [E, 2f, d]
    for e in range(8):  # bf16 values arrive exactly, transposed to [E, d, f]
        np.testing.assert_array_equal(np.asarray(w_gate[e]), gate_up[e, :32].T)
    np.testing.assert_array_equal(np.asarray(moe.router[...]),
                                  state["model.layers.1.mlp.gate.weight"].T)
    # each device holds only its 2 experts' block; a block is read once per distinct slice
    shard = w_gate.addressable_shards[0]
    assert shard.data.shape == (2, 64, 32)
    assert max(reads.count(f"model.layers.1.mlp.experts.{e}.up_proj.weight")
               for e in range(8)) <= 2  # once for its block (+ once for the shape check)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
    for path, leaf in leaves:  # routed experts over "expert", everything else replicated
        keys = [k.key for k in path]
        assert leaf.sharding.mesh == mesh, keys
        if len(keys) == 4 and keys[2] == "ffn" and keys[3] in ("w_gate", "w_up", "w_down"):
            assert leaf.sharding.spec[0] == "expert", keys
        else:
            assert leaf.sharding.is_fully_replicated, keys

    ids = np.random.default_rng(2).integers(0, VOCAB, (8, 16))
    reference = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval(), ids)
    got = our_logits(model, ids)
    assert np.abs(got - reference).max() <= tolerance(reference)


def test_stacked_experts_read_only_their_slice(saved, monkeypatch):
    path = saved("olmoe")[0]
    ckpt = SafetensorsCheckpoint(path)
    cfg, moe = oj.hf.architecture(path)
    source = weights.sources("olmoe", cfg, moe, ckpt.names())[("blocks", 0, "ffn", "w_down")]
    reads: list[str] = []
    array = SafetensorsCheckpoint.array
    monkeypatch.setattr(SafetensorsCheckpoint, "array",
                        lambda self, name: reads.append(name) or array(self, name))
    block = source.read(ckpt, (slice(2, 4), slice(None), slice(0, 5)))
    assert reads == [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in (2, 3)]
    full = np.asarray(array(ckpt, "model.layers.0.mlp.experts.3.down_proj.weight"))
    np.testing.assert_array_equal(block[1], full.T[:, :5])


def test_fused_expert_layout_loads_the_same(saved, tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj [E, 2f, d], experts.down_proj
    [E, d, f]) saved as such gives the same model as the per-expert layout."""
    from safetensors.numpy import save_file

    path, ids, reference = saved("olmoe")
    ckpt = SafetensorsCheckpoint(path)
    tensors = {n: np.asarray(ckpt.array(n)) for n in ckpt.names() if ".experts." not in n}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts."
        experts = [{k: np.asarray(ckpt.array(f"{p}{e}.{k}.weight"))
                    for k in ("gate_proj", "up_proj", "down_proj")} for e in range(8)]
        tensors[p + "gate_up_proj"] = np.stack(
            [np.concatenate([x["gate_proj"], x["up_proj"]]) for x in experts])
        tensors[p + "down_proj"] = np.stack([x["down_proj"] for x in experts])
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    fused = our_logits(oj.hf.load(str(tmp_path)), ids)
    assert np.abs(fused - reference).max() <= tolerance(reference)


def test_legacy_rope_config_maps_the_same(saved, tmp_path):
    """Pre-v5 config.json (rope_theta + rope_scaling {"type": "yarn"}) as on the Hub."""
    path = saved("deepseek_v2_lite")[0]
    config = json.loads(open(os.path.join(path, "config.json")).read())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert oj.hf.architecture(str(tmp_path)) == oj.hf.architecture(path)
    assert oj.hf.architecture(path)[0].rope_scaling == "yarn"


def test_mismatched_checkpoint_tensors_fail_in_one_line(saved, tmp_path):
    from safetensors.numpy import save_file

    path = saved("olmoe")[0]
    ckpt = SafetensorsCheckpoint(path)
    tensors = {n: np.asarray(ckpt.array(n)) for n in ckpt.names()}
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    extra = {**tensors, "model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)}
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="does not use") as info:
        oj.hf.load(str(tmp_path))
    assert "\n" not in str(info.value)
    short = {k: v for k, v in tensors.items() if "q_norm" not in k}
    save_file(short, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 2 tensors .*q_norm"):
        oj.hf.load(str(tmp_path))
    wrong = {**tensors, "model.embed_tokens.weight": np.zeros((VOCAB, 32), np.float32)}
    save_file(wrong, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="embed: the checkpoint gives shape"):
        oj.hf.load(str(tmp_path))


def _fds_into(folder) -> list[str]:
    """Files under `folder` this process holds open (Linux /proc), e.g. through an mmap."""
    root, fds = os.path.realpath(folder) + os.sep, "/proc/self/fd"
    targets = (os.path.realpath(os.path.join(fds, f)) for f in os.listdir(fds))
    return [t for t in targets if t.startswith(root)]


def test_loaded_model_owns_its_memory(saved, tmp_path):
    """Rewriting the checkpoint file after `load` changes no parameter: none aliases the file."""
    import shutil

    path, ids, reference = saved("olmoe")
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    file = tmp_path / "model.safetensors"
    raw = file.read_bytes()  # pad the header so that every tensor is 64-byte aligned, as
    n = int(np.frombuffer(raw[:8], "<u8")[0])  # zero-copy host → CPU-device transfer needs
    header = raw[8:8 + n].rstrip(b" ")
    header += b" " * (-(8 + len(header)) % 64)
    file.write_bytes(np.uint64(len(header)).tobytes() + header + raw[8 + n:])
    tensors = SafetensorsCheckpoint(str(tmp_path)).tensors
    assert all(info.begin % 64 == 0 for info in tensors.values())

    model = oj.hf.load(str(tmp_path))
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))
    before = [np.array(leaf, copy=True) for _, leaf in leaves]
    if os.path.isdir("/proc/self/fd"):
        assert _fds_into(tmp_path) == []
    rng = np.random.default_rng()
    with open(file, "r+b") as f:  # same size, new values, in place
        for info in tensors.values():
            f.seek(info.begin)
            f.write(rng.standard_normal(info.shape).astype(info.dtype).tobytes())
    changed = [jax.tree_util.keystr(key) for (key, leaf), old in zip(leaves, before, strict=True)
               if not np.array_equal(np.asarray(leaf), old)]
    assert changed == []
    assert np.abs(our_logits(model, ids) - reference).max() <= tolerance(reference)


def test_build_moe_checkpoint_without_moe_config_fails_in_one_line(saved):
    path = saved("olmoe")[0]
    model_cfg, _ = oj.hf.architecture(path)
    with pytest.raises(ValueError, match="moe_cfg is None; pass the MoEConfig") as info:
        oj.hf.build(path, model_cfg, None)
    assert "\n" not in str(info.value)


# the size fields oj.hf requires in config.json (transformers falls back to its flagship sizes)
REQUIRED = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
            "num_experts", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
            "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_absent_config_fields_take_transformers_defaults(family, tmp_path):
    """Each config.json field left out in turn: oj.hf maps the config as it maps the one where
    the field holds what transformers' config class sets when it is absent (its default, or the
    value derived in __post_init__), or, for a size, fails in one line naming it."""
    from occult_jax.hf import families

    config_cls = getattr(transformers, FAMILIES[family][0])
    config_cls(**{**COMMON, **FAMILIES[family][1]}).save_pretrained(tmp_path)
    full = json.loads((tmp_path / "config.json").read_text())

    def mapped(config):
        try:
            return families.architecture(config)
        except ValueError as e:
            return str(e)

    for field in sorted(set(full) - {"architectures", "model_type"}):  # the class itself
        config = {k: v for k, v in full.items() if k != field}
        ours = mapped(config)
        if field in REQUIRED:
            assert isinstance(ours, str) and f"config.json lacks {field}" in ours, (field, ours)
            continue
        theirs = config_cls.from_dict(config).to_dict()
        assert ours == mapped({**config, field: theirs.get(field)}), (field, theirs.get(field))


def test_finetune_from_hf_checkpoint(saved, tmp_path):
    """train.py's `init_from="hf:PATH"`: the HF architecture replaces config.model, the first
    step's loss is the HF model's loss on that batch, and training lowers it."""
    mesh_or_skip(expert=4, data=2)
    from test_train import losses, tiny_config

    path = saved("qwen2_moe")[0]
    config = tiny_config(tmp_path / "run", steps=4, init_from="hf:" + path)
    config.optim.update(warmup_steps=0, lr=3e-3)
    config.moe.dispatch = "occult"
    run = train_lib.setup(config, config.workdir)
    assert run.model.cfg.vocab_size == VOCAB and run.model.cfg.qkv_bias
    assert run.model.moe_cfg.shared_expert_gate and run.model.moe_cfg.dispatch == "occult"
    assert any("model.vocab_size=256→320" in note for note in run.notes)
    run.checkpointer.close()
    train_lib.train_and_evaluate(config, progress=False)

    corpus = data_lib.load_corpus(config.data.path, config.data.max_bytes,
                                  config.data.val_fraction, config.data.bin_dtype)
    batch = data_lib.batch_at(corpus.train, config.seed, 0, config.batch_size, config.seq_len)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager").eval()
    with torch.no_grad():
        hf_loss = float(hf_model(torch.as_tensor(batch, dtype=torch.long),
                                 labels=torch.as_tensor(batch, dtype=torch.long)).loss)
    got = losses(tmp_path / "run")
    assert got[1] == pytest.approx(hf_loss, rel=1e-5)
    assert all(np.isfinite(v) for v in got.values())
    assert got[4] < got[1]
