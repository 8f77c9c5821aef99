"""MoEConfig: the plain dataclass every MoE layer is built from, with one-line validation errors."""

from __future__ import annotations

import dataclasses
import math
import numbers

DISPATCHES = ("reference", "standard", "occult")
TRANSPORTS = ("dense", "ragged", "pallas")
SCORE_FNS = ("softmax", "sigmoid")
EXPERT_MATMULS = ("auto", "pallas", "ragged_dot", "blocked", "einsum", "fused")
PRECOMBINES = ("rows", "epilogue")
PRUNE_RULES = ("score", "group_score", "similarity")
DTYPES = ("float32", "bfloat16", "float16")


def pallas_fits(d_model: int, d_ff: int) -> bool:
    """Whether the Pallas grouped matmul takes these widths (outputs in 128s, contractions
    in 64s)."""
    return d_model % 128 == 0 and d_ff % 128 == 0


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Shape and behaviour of one MoE layer.

    dispatch: "reference" (no expert parallelism; the ground truth), "standard" (one row per
      (token, expert) on the wire) or "occult" (one row per (token, device), pre-combined on the
      expert side).
    transport: "dense" (fixed per-peer buffers, `all_to_all`), "ragged" (`ragged_all_to_all`,
      only real rows move; GPU/TPU, emulated on CPU) or "pallas" (GPUs: a Pallas kernel writes
      the real rows straight into the peers' buffers over NVLink; kernels/nvlink_exchange.py).
    capacity_factor: None is dropless (buffers sized for the worst case); a float sizes each
      per-peer buffer to `capacity_factor` × the expected rows per peer under uniform routing.
      Overflowing assignments are dropped and counted in `stats["dropped"]`.
    precombine: how the Pallas expert path (expert_matmul="pallas", or "auto" where it picks
      Pallas; the other paths have one way) sums each received row's expert outputs,
      weighted, into the row. "rows": the down projection into item order, then a gather-sum
      kernel (the fastest forward). "epilogue": Occult's fused form, added
      into the rows in float32 in the down projection's epilogue; no item-order product is
      kept for the backward: 20-28% less scratch per training step at OLMoE/DeepSeek-like
      shapes, training 0.96-1.02x and serving 0.86-0.98x the speed of "rows" (H100/H200,
      docs/benchmarks.md). Results agree to rounding.
    """

    num_experts: int = 8
    top_k: int = 2
    d_model: int = 64
    d_ff: int = 128
    dispatch: str = "standard"
    transport: str = "dense"
    score_fn: str = "softmax"
    renormalize: bool = True
    routed_scaling_factor: float = 1.0  # multiplies the combine weights (DeepSeek)
    num_expert_groups: int = 0  # group-limited top-k over fixed groups of E/G experts; 0: off
    topk_groups: int = 0  # groups a token may use (ranked by their best score)
    capacity_factor: float | None = None
    num_shared_experts: int = 0
    shared_d_ff: int | None = None  # width of each shared expert; defaults to d_ff
    shared_expert_gate: bool = False  # Qwen2-MoE style sigmoid gate on the shared output
    expert_matmul: str = "auto"  # one of EXPERT_MATMULS (see experts.resolve_backend)
    precombine: str = "rows"  # one of PRECOMBINES; expert_matmul "pallas" or "auto" only
    max_devices_per_token: int | None = None  # collaboration pruning: cap devices per token
    prune_rule: str = "score"  # "score" | "group_score" | "similarity" (see pruning.py)
    dtype: str = "float32"  # compute dtype of activations and expert matmuls
    param_dtype: str = "float32"
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    expert_axis: str = "expert"

    def __post_init__(self):
        validate(self)

    @property
    def shared_width(self) -> int:
        return self.num_shared_experts * (self.shared_d_ff or self.d_ff)

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"MoEConfig.{name}={value!r} is unknown; use one of {choices}.")


def validate(cfg: MoEConfig) -> None:
    """Checks values that need no mesh or input; raises ValueError with what to change."""
    for name in ("num_experts", "top_k", "d_model", "d_ff"):
        value = getattr(cfg, name)
        _require(_is_int(value) and value >= 1,
                 f"MoEConfig.{name}={value!r} must be a positive integer.")
    _require(cfg.top_k <= cfg.num_experts,
             f"MoEConfig.top_k={cfg.top_k} exceeds num_experts={cfg.num_experts}; "
             "lower top_k or add experts.")
    _one_of("dispatch", cfg.dispatch, DISPATCHES)
    _one_of("transport", cfg.transport, TRANSPORTS)
    _one_of("score_fn", cfg.score_fn, SCORE_FNS)
    _one_of("expert_matmul", cfg.expert_matmul, EXPERT_MATMULS)
    _require(cfg.expert_matmul != "pallas" or pallas_fits(cfg.d_model, cfg.d_ff),
             f"MoEConfig.expert_matmul='pallas' needs d_model and d_ff to be multiples of 128 "
             f"(got {cfg.d_model}, {cfg.d_ff}); use 'auto' or 'ragged_dot'.")
    if cfg.expert_matmul == "fused":
        from kernels.gather_matmul import MIN_TILE

        _require(cfg.d_model % MIN_TILE == 0 and cfg.d_ff % MIN_TILE == 0,
                 f"MoEConfig.expert_matmul='fused' needs d_model and d_ff to be multiples of "
                 f"{MIN_TILE} (got {cfg.d_model}, {cfg.d_ff}); use 'auto'.")
    _one_of("precombine", cfg.precombine, PRECOMBINES)
    _require(cfg.precombine == "rows" or cfg.expert_matmul in ("pallas", "auto"),
             f"MoEConfig.precombine={cfg.precombine!r} is an option of the Pallas expert path; "
             f"set expert_matmul='pallas' or 'auto' (got {cfg.expert_matmul!r}) or "
             f"precombine='rows'.")
    _one_of("prune_rule", cfg.prune_rule, PRUNE_RULES)
    _require(cfg.max_devices_per_token is None
             or (_is_int(cfg.max_devices_per_token) and cfg.max_devices_per_token >= 1),
             f"MoEConfig.max_devices_per_token={cfg.max_devices_per_token!r} must be an "
             "integer >= 1, or None for no cap.")
    _one_of("dtype", cfg.dtype, DTYPES)
    _one_of("param_dtype", cfg.param_dtype, DTYPES)
    _require(cfg.capacity_factor is None
             or (_is_real(cfg.capacity_factor) and 0 < cfg.capacity_factor < math.inf),
             f"MoEConfig.capacity_factor={cfg.capacity_factor!r} must be a finite number > 0, "
             "or None for dropless.")
    _require(_is_int(cfg.num_shared_experts) and cfg.num_shared_experts >= 0,
             f"MoEConfig.num_shared_experts={cfg.num_shared_experts!r} must be an integer >= 0.")
    _require(cfg.shared_d_ff is None or (_is_int(cfg.shared_d_ff) and cfg.shared_d_ff >= 1),
             f"MoEConfig.shared_d_ff={cfg.shared_d_ff!r} must be a positive integer, or None "
             "for d_ff.")
    _require(cfg.num_shared_experts or (cfg.shared_d_ff is None and not cfg.shared_expert_gate),
             "MoEConfig.shared_d_ff and shared_expert_gate configure shared experts; set "
             "num_shared_experts >= 1 or leave them unset.")
    _require(_is_real(cfg.routed_scaling_factor) and 0 < cfg.routed_scaling_factor < math.inf,
             f"MoEConfig.routed_scaling_factor={cfg.routed_scaling_factor!r} must be a finite "
             "number > 0.")
    for name in ("aux_loss_weight", "z_loss_weight"):
        value = getattr(cfg, name)
        _require(_is_real(value) and 0 <= value < math.inf,
                 f"MoEConfig.{name}={value!r} must be a finite number >= 0 (0 turns it off).")
    for name in ("renormalize", "shared_expert_gate"):
        value = getattr(cfg, name)
        _require(isinstance(value, bool), f"MoEConfig.{name}={value!r} must be True or False.")
    _require(isinstance(cfg.expert_axis, str) and cfg.expert_axis != "",
             f"MoEConfig.expert_axis={cfg.expert_axis!r} must name a mesh axis.")
    _validate_groups(cfg)


def _validate_groups(cfg: MoEConfig) -> None:
    groups, keep = cfg.num_expert_groups, cfg.topk_groups
    for name, value in (("num_expert_groups", groups), ("topk_groups", keep)):
        _require(_is_int(value) and value >= 0,
                 f"MoEConfig.{name}={value!r} must be an integer >= 0 (0: off).")
    if not groups:
        _require(not keep, f"MoEConfig.topk_groups={keep} needs num_expert_groups >= 1.")
        return
    _require(groups >= 1 and cfg.num_experts % groups == 0,
             f"MoEConfig.num_expert_groups={groups} must divide num_experts="
             f"{cfg.num_experts}.")
    _require(1 <= keep <= groups, f"MoEConfig.topk_groups={keep} must be in [1, "
                                  f"num_expert_groups={groups}].")
    _require(keep * (cfg.num_experts // groups) >= cfg.top_k,
             f"MoEConfig.topk_groups={keep} groups of {cfg.num_experts // groups} experts hold "
             f"fewer than top_k={cfg.top_k}; raise topk_groups.")
    _require(cfg.max_devices_per_token is None,
             "MoEConfig.num_expert_groups and max_devices_per_token both limit the top-k; "
             "set one of them.")


def validate_for_mesh(cfg: MoEConfig, axis_names: tuple[str, ...], expert_axis_size: int,
                      num_devices: int, num_tokens: int, platform: str = "cpu",
                      expert_axis_hosts: int = 1, gpu_capability: str = "") -> None:
    """Checks that need the mesh and the input; called before anything is traced or compiled.
    `expert_axis_hosts`: most processes that one group of devices along the expert axis spans;
    `gpu_capability`: the GPUs' compute capability ("9.0"), "" if unknown."""
    pallas = cfg.transport == "pallas" and cfg.dispatch != "reference"
    _require(not pallas or platform == "gpu",
             f"MoEConfig.transport='pallas' writes into peer GPUs over NVLink and runs on GPU "
             f"meshes only (this mesh is on {platform}); use 'dense' or 'ragged'.")
    _require(not pallas or expert_axis_hosts == 1,
             f"MoEConfig.transport='pallas' needs each expert-axis group on one host (NVLink); "
             f"this mesh's expert axis spans {expert_axis_hosts} processes. Use 'dense' or "
             f"'ragged', or put the expert axis inside a host.")
    hopper = gpu_capability.split(".")[0] in ("", "9")
    _require(cfg.expert_matmul != "pallas" or platform != "gpu" or hopper,
             f"MoEConfig.expert_matmul='pallas' runs Hopper (sm_90) kernels; these GPUs are "
             f"sm_{gpu_capability.replace('.', '')}; use 'auto'.")
    _require(cfg.expert_matmul != "fused" or platform in ("gpu", "cpu"),
             f"MoEConfig.expert_matmul='fused' runs on GPUs (interpreted on CPU), not on "
             f"{platform}; use 'auto'.")
    _require(cfg.expert_axis in axis_names,
             f"mesh axes {axis_names} have no {cfg.expert_axis!r} axis; build the mesh with "
             f"oj.make_mesh(expert=...) or set MoEConfig.expert_axis.")
    _require(cfg.num_experts % expert_axis_size == 0,
             f"num_experts={cfg.num_experts} is not divisible by the {cfg.expert_axis!r} axis "
             f"size {expert_axis_size}; use a multiple of {expert_axis_size} experts.")
    cap = cfg.max_devices_per_token
    _require(cap is None or cap * (cfg.num_experts // expert_axis_size) >= cfg.top_k,
             f"max_devices_per_token={cap} devices hold {cap} × "
             f"{cfg.num_experts // max(expert_axis_size, 1)} experts, fewer than top_k="
             f"{cfg.top_k}; raise the cap or lower top_k.")
    _require(num_tokens >= 1, "the MoE layer got 0 tokens (batch × seq); give it at least "
                              "one token per device.")
    _require(num_tokens % num_devices == 0,
             f"token count {num_tokens} (batch × seq) is not divisible by the {num_devices} "
             f"devices of the mesh; use a batch × seq that is a multiple of {num_devices}.")


def expected_devices_per_token(num_experts: int, top_k: int, num_devices: int) -> float:
    """E[C_T] under uniform routing: N · (1 − C(E − E/N, k) / C(E, k))."""
    local = num_experts // num_devices
    miss = math.comb(num_experts - local, top_k) / math.comb(num_experts, top_k)
    return num_devices * (1.0 - miss)


def peer_capacity(cfg: MoEConfig, tokens_per_device: int, num_devices: int) -> int:
    """Rows in each per-peer buffer: the dropless bound, or capacity_factor × expected rows.

    Dropless bounds: a token sends at most min(k, E/N) copies to one device in the standard
    layout, and at most one row in the deduplicated (occult) layout.
    """
    local = cfg.num_experts // num_devices
    if cfg.dispatch == "occult":
        dropless = tokens_per_device
        rows_per_token = expected_devices_per_token(cfg.num_experts, cfg.top_k, num_devices)
    else:
        dropless = tokens_per_device * min(cfg.top_k, local)
        rows_per_token = float(cfg.top_k)
    if cfg.capacity_factor is None:
        return dropless
    expected = tokens_per_device * rows_per_token / num_devices
    return max(1, min(dropless, math.ceil(cfg.capacity_factor * expected)))
