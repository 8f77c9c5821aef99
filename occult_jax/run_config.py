"""Training config (an ml_collections ConfigDict, read by attribute only) → library objects.

Every check that needs neither data nor compilation lives here and raises a one-line
`ConfigError` (a ValueError) naming the field to change.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from occult_jax.config import MoEConfig, validate_for_mesh
from occult_jax.mesh import DATA, EXPERT, mesh_facts
from occult_jax.model_config import ModelConfig


class ConfigError(ValueError):
    """A bad config value, found before anything is compiled."""



def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _known_fields(section: str, values: dict, cls: type) -> dict:
    """values, after checking each is a field of the dataclass cls (one-line error if not)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    _require(not unknown, f"config.{section} has unknown fields {unknown}; {cls.__name__} takes "
                          f"{sorted(fields)}.")
    return values


def moe_config(config: Any) -> MoEConfig:
    """The `MoEConfig` of `config.moe`; d_model and the compute dtype come from `config.model`."""
    values = _known_fields("moe", dict(config.moe.items()), MoEConfig)
    if not values.get("shared_d_ff"):
        values["shared_d_ff"] = None
    values.update(d_model=config.model.d_model, dtype=config.model.dtype)
    return MoEConfig(**values)


def model_config(config: Any) -> ModelConfig:
    return ModelConfig(**_known_fields("model", dict(config.model.items()), ModelConfig))


HF_PREFIX = "hf:"


def hf_checkpoint(config: Any) -> str | None:
    """The folder of `init_from="hf:PATH"`, or None."""
    spec = config.init_from or ""
    return spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else None


def architecture(config: Any) -> tuple[ModelConfig, MoEConfig]:
    """(ModelConfig, MoEConfig) of the run.

    From `config.model` / `config.moe`; with `init_from="hf:PATH"`, the checkpoint's config.json
    fixes the architecture (all of `model` but `dtype`, and the MoE shape fields), while
    `model.dtype` and the MoE run choices (dispatch, transport, capacity_factor, ...) still come
    from the config. A dense checkpoint keeps `config.moe` as its (unused) MoEConfig.
    """
    path = hf_checkpoint(config)
    if path is None:
        return model_config(config), moe_config(config)
    from occult_jax.hf import families, loader

    moe_values = _known_fields("moe", dict(config.moe.items()), MoEConfig)
    options = {k: v for k, v in moe_values.items()
               if k not in (*families.MOE_ARCHITECTURE_FIELDS, "d_model", "dtype")}
    model_cfg, moe_cfg = loader.architecture(path, dtype=config.model.dtype, **options)
    return model_cfg, moe_cfg or moe_config(config)


def hf_overrides(config: Any, model_cfg: ModelConfig, moe_cfg: MoEConfig) -> list[str]:
    """`section.field=old→new` for each config value an HF checkpoint's config.json replaced."""
    from occult_jax.hf import families

    out = []
    for name, value in config.model.items():
        new = getattr(model_cfg, name, value)
        if name != "dtype" and new != value and not (isinstance(new, tuple)
                                                     and tuple(value) == new):
            out.append(f"model.{name}={value!r}→{new!r}")
    if model_cfg.moe_layers:
        for name in families.MOE_ARCHITECTURE_FIELDS:
            value = config.moe.get(name)
            value = None if name == "shared_d_ff" and not value else value
            new = getattr(moe_cfg, name)
            if name in config.moe and new != value:
                out.append(f"moe.{name}={value!r}→{new!r}")
    return out


def mesh_shape(config: Any, num_devices: int, num_experts: int = 0) -> tuple[int, int]:
    """(expert, data) sizes; -1 means "every device the other axis leaves". ``mesh.expert=0``
    (auto) takes the most devices that the data axis leaves and the experts divide while every
    device keeps at least two experts (with one each, no token's experts share a device and
    Occult has nothing to save): 4 × 2 for 8 experts on 8 devices, 2 on 2 GPUs, 1 on one.
    ``num_experts``: 0 for a model without MoE layers (auto is then 1)."""
    expert, data = int(config.mesh.expert), int(config.mesh.data)
    _require(expert >= -1, f"mesh.expert={expert} must be >= 1, 0 (auto) or -1 for the "
                           "remaining devices.")
    _require(data == -1 or data >= 1, f"mesh.data={data} must be >= 1, or -1 for the remaining "
                                      "devices.")
    if expert == 0:
        _require(data == -1 or num_devices % data == 0, f"mesh.data={data} does not divide the "
                                                        f"{num_devices} devices; pick a divisor.")
        left = num_devices if data == -1 else num_devices // data
        expert = max(d for d in range(1, left + 1) if left % d == 0 and (d == 1 or (
            num_experts % d == 0 and num_experts // d >= 2)))
    if expert == -1 and data == -1:
        expert, data = num_devices, 1
    elif expert == -1 or data == -1:
        name, known = ("data", data) if expert == -1 else ("expert", expert)
        _require(num_devices % known == 0, f"mesh.{name}={known} does not divide the "
                                           f"{num_devices} devices; pick a divisor.")
        expert, data = (num_devices // data, data) if expert == -1 else (expert,
                                                                         num_devices // expert)
    _require(expert * data <= num_devices, f"mesh expert={expert} × data={data} needs "
                                           f"{expert * data} devices; {num_devices} present.")
    return expert, data


def validate_on_mesh(moe_cfg: MoEConfig, mesh: Any, num_tokens: int) -> None:
    """The MoE layer's mesh checks with what only the built mesh knows (how many processes
    an expert-axis group spans: transport="pallas" needs one host); one-line ConfigErrors."""
    try:
        validate_for_mesh(moe_cfg, tuple(mesh.axis_names), dict(mesh.shape)[EXPERT], mesh.size,
                          num_tokens, **mesh_facts(moe_cfg.expert_axis, mesh))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate(config: Any, num_devices: int, platform: str = "cpu", gpu_capability: str = ""
             ) -> tuple[ModelConfig, MoEConfig, tuple[int, int]]:
    """Every check that needs no data and no compilation, the MoE layer's mesh checks
    (`config.validate_for_mesh`) included; one-line ConfigErrors."""
    _require(bool(config.workdir), "workdir is empty; set --config.workdir.")
    for name in ("steps", "batch_size", "seq_len", "log_every"):
        value = config[name]
        _require(isinstance(value, int) and value > 0, f"{name}={value!r} must be a positive "
                                                      "integer.")
    for name in ("eval_every", "checkpoint_every", "eval_batches"):
        _require(config[name] >= 0, f"{name}={config[name]} must be >= 0 (0 turns it off).")
    _require(not config.eval_every or config.eval_batches >= 1,
             f"eval_batches={config.eval_batches} evaluates nothing every {config.eval_every} "
             "steps; set eval_batches >= 1 or eval_every=0.")
    _require(config.keep_checkpoints >= 1, f"keep_checkpoints={config.keep_checkpoints} must "
                                           "be >= 1.")
    _require(config.calibration_batches >= 1,
             f"calibration_batches={config.calibration_batches} must be >= 1.")
    every = config.placement.every
    _require(every >= 0, f"placement.every={every} must be >= 0 (0: off).")
    _require(config.placement.method in ("best", "greedy"),
             f"placement.method={config.placement.method!r} is unknown; use 'best' or 'greedy'.")
    opt = config.optim
    _require(opt.lr > 0, f"optim.lr={opt.lr} must be > 0.")
    _require(opt.warmup_steps >= 0, f"optim.warmup_steps={opt.warmup_steps} must be >= 0.")
    _require(0 <= opt.min_lr_ratio <= 1, f"optim.min_lr_ratio={opt.min_lr_ratio} must be in "
                                         "[0, 1].")
    _require(opt.grad_clip >= 0, f"optim.grad_clip={opt.grad_clip} must be >= 0 (0: off).")
    for name in ("b1", "b2"):
        _require(0 <= opt[name] < 1, f"optim.{name}={opt[name]} must be in [0, 1).")
    _require(opt.eps > 0, f"optim.eps={opt.eps} must be > 0.")
    _require(opt.weight_decay >= 0, f"optim.weight_decay={opt.weight_decay} must be >= 0.")
    _require(isinstance(config.seed, int) and 0 <= config.seed < 2**32,  # one 32-bit word:
             f"seed={config.seed!r} must be an integer in [0, 2**32).")  # no seed aliasing
    _require(not os.path.exists(config.workdir) or os.path.isdir(config.workdir),
             f"workdir={config.workdir!r} is a file; give a folder (new or a run's).")
    try:
        model_cfg, moe_cfg = architecture(config)
    except ConfigError:
        raise
    except ValueError as e:  # MoEConfig / ModelConfig validation, HF config.json checks
        raise ConfigError(str(e)) from None
    expert, data = mesh_shape(config, num_devices,
                              moe_cfg.num_experts if model_cfg.moe_layers else 0)
    devices = expert * data
    _require(config.batch_size % devices == 0,
             f"batch_size={config.batch_size} is not divisible by the {devices} devices of the "
             f"mesh (data={data} × expert={expert}); use a multiple of {devices}.")
    if model_cfg.moe_layers:
        _require(moe_cfg.num_experts % expert == 0,
                 f"moe.num_experts={moe_cfg.num_experts} is not divisible by mesh.expert="
                 f"{expert}; use a multiple of {expert} experts or a smaller expert axis.")
        _require(moe_cfg.expert_axis == EXPERT,
                 f"moe.expert_axis={moe_cfg.expert_axis!r}: train.py's mesh names its expert "
                 f"axis {EXPERT!r}; drop the field.")
        try:
            validate_for_mesh(moe_cfg, (DATA, EXPERT), expert, devices,
                              config.batch_size * config.seq_len, platform,
                              gpu_capability=gpu_capability)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _require(0 < config.data.val_fraction < 1, f"data.val_fraction={config.data.val_fraction} "
                                               "must be in (0, 1).")
    _require(config.data.max_bytes > 0, f"data.max_bytes={config.data.max_bytes} must be > 0.")
    _require(config.data.bin_dtype in ("uint16", "int32"),
             f"data.bin_dtype={config.data.bin_dtype!r} is unknown; use 'uint16' or 'int32'.")
    if config.data.path and not os.path.exists(config.data.path):
        raise ConfigError(f"data.path={config.data.path!r} does not exist; give a text file, a "
                         "folder of text files, or a .npy/.bin token array.")
    return model_cfg, moe_cfg, (expert, data)
