"""DeepSeek-V2-Lite-like shapes: 27 layers (the first dense, width 10944), d_model 2048, 16
heads, 64 routed experts top-6 of width 1408 plus 2 shared experts of width 1408, vocab 102400,
untied head, no top-k renormalisation.

Left off here: multi-head latent attention (standard multi-head attention with RoPE is used,
head_dim 128) and the YaRN RoPE extension. The model implements both (`model.attention="mla"`,
`model.rope_scaling="yarn"`); `--config.init_from=hf:PATH` loads the released checkpoint with its
exact architecture (docs/hf_import.md).

    python train.py --config=configs/deepseek_v2_lite.py
    python train.py --config=configs/deepseek_v2_lite.py:small   # 4 layers, d_model 1024: 2 GPUs
"""

import os

from occult_jax.frontends import load_config


def _default():
    return load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


def get_config(variant: str = ""):
    c = _default()
    c.workdir = "runs/deepseek_v2_lite" + (f"_{variant}" if variant else "")
    c.steps, c.batch_size, c.seq_len = 1000, 16, 2048
    c.log_every, c.eval_every, c.checkpoint_every, c.keep_checkpoints = 10, 200, 200, 2
    c.mesh.update(expert=-1, data=1)
    c.model.update(vocab_size=102400, num_layers=27, d_model=2048, num_heads=16, head_dim=128,
                   d_ff=10944, moe_every=1, first_dense_layers=1, tie_embeddings=False,
                   rope_theta=10_000.0, norm_eps=1e-6, dtype="bfloat16")
    c.moe.update(num_experts=64, top_k=6, d_ff=1408, score_fn="softmax", renormalize=False,
                 num_shared_experts=2, shared_d_ff=1408, shared_expert_gate=False,
                 aux_loss_weight=0.001, z_loss_weight=0.0)
    c.optim.update(lr=4.2e-4, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1,
                   grad_clip=1.0, b2=0.95)
    c.data.max_bytes = 64_000_000
    if variant == "small":  # same expert structure (64 top-6 + 2 shared), first layer dense
        c.seq_len = 1024
        c.model.update(num_layers=4, d_model=1024, num_heads=8, head_dim=128, d_ff=5472)
        c.moe.update(d_ff=704, shared_d_ff=704)
        c.mesh.update(expert=2, data=-1)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of deepseek_v2_lite; use '' or 'small'.")
    return c
