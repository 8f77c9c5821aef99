"""OLMoE-1B-7B shapes (Muennighoff et al. 2024): 16 layers, d_model 2048, 16 heads, 64 experts
top-8 of width 1024, no shared expert, vocab 50304, untied head, no top-k renormalisation.
QK-norm (`model.qk_norm`) is left off here; `--config.init_from=hf:PATH` loads the released
checkpoint with its exact architecture (docs/hf_import.md).

    python train.py --config=configs/olmoe_1b7b.py          # full size (a multi-GPU host)
    python train.py --config=configs/olmoe_1b7b.py:small    # 4 layers, d_model 1024: 2 GPUs

Point `data.path` at a pre-tokenised .bin/.npy (GPT-NeoX tokenizer) for real training; the
default byte corpus works but only uses 256 of the 50304 ids.
"""

import os

from occult_jax.frontends import load_config


def _default():
    return load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


def get_config(variant: str = ""):
    c = _default()
    c.workdir = "runs/olmoe_1b7b" + (f"_{variant}" if variant else "")
    c.steps, c.batch_size, c.seq_len = 1000, 16, 2048
    c.log_every, c.eval_every, c.checkpoint_every, c.keep_checkpoints = 10, 200, 200, 2
    c.mesh.update(expert=-1, data=1)
    c.model.update(vocab_size=50304, num_layers=16, d_model=2048, num_heads=16, head_dim=128,
                   d_ff=8192, moe_every=1, first_dense_layers=0, tie_embeddings=False,
                   rope_theta=10_000.0, norm_eps=1e-5, dtype="bfloat16")
    c.moe.update(num_experts=64, top_k=8, d_ff=1024, score_fn="softmax", renormalize=False,
                 num_shared_experts=0, aux_loss_weight=0.01, z_loss_weight=0.001)
    c.optim.update(lr=4e-4, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1,
                   grad_clip=1.0, b2=0.95)
    c.data.max_bytes = 64_000_000
    if variant == "small":  # same expert structure (64 experts, top-8), fewer layers, narrower
        c.seq_len = 1024
        c.model.update(num_layers=4, d_model=1024, num_heads=8, head_dim=128, d_ff=4096)
        c.moe.update(d_ff=512)
        c.mesh.update(expert=2, data=-1)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of olmoe_1b7b; use '' or 'small'.")
    return c
