"""Qwen1.5-MoE-A2.7B shapes: 24 layers, d_model 2048, 16 heads, 60 experts top-4 of width
1408, one shared expert of width 5632 behind a sigmoid gate, vocab 151936, untied head, RoPE
theta 1e6, no top-k renormalisation.

    python train.py --config=configs/qwen15_moe_a27b.py
    python train.py --config=configs/qwen15_moe_a27b.py:small   # 4 layers, d_model 1024: 2 GPUs

60 experts split over an expert axis of 2, 4, 6, 10, ... devices (not 8): mesh.expert is 4
here (2 in `small`). For real training point `data.path` at Qwen-tokenised .bin/.npy data.
The q/k/v biases (`model.qkv_bias`) are left off here; `--config.init_from=hf:PATH` loads the
released checkpoint with its exact architecture (docs/hf_import.md).
"""

import os

from occult_jax.frontends import load_config


def _default():
    return load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


def get_config(variant: str = ""):
    c = _default()
    c.workdir = "runs/qwen15_moe_a27b" + (f"_{variant}" if variant else "")
    c.steps, c.batch_size, c.seq_len = 1000, 16, 2048
    c.log_every, c.eval_every, c.checkpoint_every, c.keep_checkpoints = 10, 200, 200, 2
    c.mesh.update(expert=4, data=-1)
    c.model.update(vocab_size=151936, num_layers=24, d_model=2048, num_heads=16, head_dim=128,
                   d_ff=5632, moe_every=1, first_dense_layers=0, tie_embeddings=False,
                   rope_theta=1_000_000.0, norm_eps=1e-6, dtype="bfloat16")
    c.moe.update(num_experts=60, top_k=4, d_ff=1408, score_fn="softmax", renormalize=False,
                 num_shared_experts=1, shared_d_ff=5632, shared_expert_gate=True,
                 aux_loss_weight=0.001, z_loss_weight=0.0)
    c.optim.update(lr=3e-4, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1,
                   grad_clip=1.0, b2=0.95)
    c.data.max_bytes = 64_000_000
    if variant == "small":  # same expert structure (60 experts top-4, gated shared expert)
        c.seq_len = 1024
        c.model.update(num_layers=4, d_model=1024, num_heads=8, head_dim=128, d_ff=2816)
        c.moe.update(d_ff=704, shared_d_ff=2816)
        c.mesh.update(expert=2, data=-1)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of qwen15_moe_a27b; use '' or 'small'.")
    return c
