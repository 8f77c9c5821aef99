"""Tiny default: a 2-layer byte-level MoE transformer that trains in a couple of minutes on CPU.

    python train.py                                   # this config, 8 fake CPU devices
    python train.py --config=configs/default.py --config.moe.dispatch=standard
"""

from ml_collections import config_dict


def moe_defaults() -> config_dict.ConfigDict:
    """Every field of `oj.MoEConfig` but d_model and the compute dtype (from `model`) and
    expert_axis (train.py's mesh names its axes "data" and "expert")."""
    return config_dict.ConfigDict({
        "num_experts": 8,
        "top_k": 2,
        "d_ff": 128,
        "dispatch": "occult",  # reference | standard | occult
        "transport": "dense",  # dense | ragged
        "score_fn": "softmax",
        "renormalize": True,
        "routed_scaling_factor": 1.0,
        "num_expert_groups": 0,  # group-limited top-k (DeepSeek-V2); 0: off
        "topk_groups": 0,
        "capacity_factor": config_dict.placeholder(float),  # None: dropless
        "num_shared_experts": 0,
        "shared_d_ff": 0,  # 0: d_ff
        "shared_expert_gate": False,
        "expert_matmul": "auto",
        "precombine": "rows",  # rows | epilogue (less memory; with expert_matmul pallas or auto)
        "max_devices_per_token": config_dict.placeholder(int),  # pruning cap; None: no cap
        "prune_rule": "score",  # score | group_score | similarity
        "param_dtype": "float32",
        "aux_loss_weight": 0.01,
        "z_loss_weight": 0.001,
    })


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.seed = 0
    c.workdir = "runs/default"
    c.steps = 300
    c.batch_size = 16  # global, in sequences; a multiple of the device count
    c.seq_len = 128
    c.log_every = 10
    c.eval_every = 100  # 0: off
    c.eval_batches = 4
    c.checkpoint_every = 100  # 0: only at the end and on SIGTERM/SIGINT
    c.keep_checkpoints = 3
    c.calibration_batches = 4  # batches that calibrate the "similarity" prune rule
    c.init_from = ""  # fine-tuning: a workdir or checkpoint step folder to load params from,
    # or "hf:PATH", a Hugging Face checkpoint folder (its config.json sets model and moe shapes)

    # expert 0: auto — the most devices that leave each at least two experts (4 x 2 on 8 CPU
    # devices, 2 on 2 GPUs, 1 on one); -1: the remaining devices
    c.mesh = config_dict.ConfigDict({"expert": 0, "data": -1})

    c.model = config_dict.ConfigDict({
        "vocab_size": 256,
        "num_layers": 2,
        "d_model": 64,
        "num_heads": 4,
        "head_dim": 0,  # 0: d_model // num_heads
        "d_ff": 256,  # dense SwiGLU layers (none here: every layer is MoE)
        "moe_every": 1,
        "first_dense_layers": 0,
        "tie_embeddings": True,
        "rope_theta": 10_000.0,
        "norm_eps": 1e-6,
        "dtype": "float32",  # compute dtype; "bfloat16" on GPU
    })
    c.moe = moe_defaults()

    c.optim = config_dict.ConfigDict({
        "lr": 3e-3,
        "warmup_steps": 30,
        "min_lr_ratio": 0.1,
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "weight_decay": 0.1,
        "grad_clip": 1.0,  # 0: off
    })

    c.placement = config_dict.ConfigDict({  # online expert placement (online_placement.py)
        "every": 0,  # re-place every N steps from the co-activation since the last; 0: off
        "method": "best",  # "best" | "greedy" (oj.placement.place)
    })

    c.data = config_dict.ConfigDict({
        "path": "",  # "": the Python stdlib byte corpus; or a text file / folder / .npy / .bin
        "max_bytes": 4_000_000,  # cap on text read (bytes)
        "val_fraction": 0.1,
        "bin_dtype": "uint16",  # dtype of a raw .bin token file: uint16 | int32
    })
    return c
