"""Bad input gets a one-line error that says what to change, before anything compiles."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mesh_or_skip
from flax import nnx
from jax.sharding import AxisType, Mesh

import occult_jax as oj
from occult_jax.model_config import ModelConfig


@pytest.mark.parametrize("changes,needle", [
    ({"top_k": 9}, "top_k=9 exceeds num_experts=8"),
    ({"dispatch": "fast"}, "dispatch='fast' is unknown"),
    ({"transport": "nvlink"}, "transport='nvlink' is unknown"),
    ({"capacity_factor": 0.0}, "capacity_factor=0.0 must be a finite number > 0"),
    ({"capacity_factor": float("inf")}, "capacity_factor=inf must be a finite number"),
    ({"num_experts": True}, "num_experts=True must be a positive integer"),
    ({"num_shared_experts": 1, "shared_d_ff": -8}, "shared_d_ff=-8 must be a positive integer"),
    ({"shared_d_ff": 64}, "set num_shared_experts >= 1"),
    ({"shared_expert_gate": True}, "set num_shared_experts >= 1"),
    ({"num_experts": 0}, "num_experts=0 must be a positive integer"),
    ({"expert_matmul": "cublas"}, "expert_matmul='cublas' is unknown"),
    ({"precombine": "sum"}, "precombine='sum' is unknown"),
    ({"precombine": "epilogue", "expert_matmul": "ragged_dot"}, "precombine='epilogue' is an "
     "option of the Pallas expert path"),
    # Values of the wrong type or out of range are refused here, not at trace time or as NaN.
    ({"max_devices_per_token": 1.5}, "max_devices_per_token=1.5 must be an integer >= 1"),
    ({"max_devices_per_token": True}, "max_devices_per_token=True must be an integer"),
    ({"num_experts": 8, "num_expert_groups": 2.0, "topk_groups": 1},
     "num_expert_groups=2.0 must be an integer >= 0"),
    ({"num_expert_groups": 2, "topk_groups": 1.5}, "topk_groups=1.5 must be an integer >= 0"),
    ({"capacity_factor": "2"}, "capacity_factor='2' must be a finite number > 0"),
    ({"capacity_factor": True}, "capacity_factor=True must be a finite number > 0"),
    ({"routed_scaling_factor": float("inf")}, "routed_scaling_factor=inf must be a finite"),
    ({"routed_scaling_factor": 0.0}, "routed_scaling_factor=0.0 must be a finite number > 0"),
    ({"aux_loss_weight": float("nan")}, "aux_loss_weight=nan must be a finite number >= 0"),
    ({"z_loss_weight": -1.0}, "z_loss_weight=-1.0 must be a finite number >= 0"),
    ({"renormalize": "yes"}, "renormalize='yes' must be True or False"),
    ({"num_shared_experts": 1, "shared_expert_gate": "no"},
     "shared_expert_gate='no' must be True or False"),
    ({"expert_axis": ""}, "expert_axis='' must name a mesh axis"),
])
def test_bad_config_values(changes, needle):
    with pytest.raises(ValueError, match=needle) as info:
        oj.MoEConfig(**changes)
    assert "\n" not in str(info.value)


def test_precombine_is_an_option_of_the_pallas_path_and_auto():
    for matmul in ("pallas", "auto"):  # auto: where it picks Pallas
        cfg = oj.MoEConfig(d_model=128, d_ff=128, expert_matmul=matmul, precombine="epilogue")
        assert cfg.precombine == "epilogue"


def test_numpy_integers_are_integers():
    cfg = oj.MoEConfig(num_experts=np.int64(8), top_k=np.int32(2))
    assert cfg.top_k == 2 and cfg.num_experts == 8


def test_experts_not_divisible_by_expert_axis():
    mesh = mesh_or_skip(4)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the 'expert' axis"):
        oj.MoELayer(oj.MoEConfig(num_experts=6, top_k=2), mesh=mesh, rngs=nnx.Rngs(0))


def test_mesh_without_expert_axis():
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("x",), axis_types=(AxisType.Auto,))
    with pytest.raises(ValueError, match="no 'expert' axis"):
        oj.MoELayer(oj.MoEConfig(), mesh=mesh, rngs=nnx.Rngs(0))


def test_tokens_not_divisible_by_mesh():
    mesh = mesh_or_skip(4, 2)
    layer = oj.MoELayer(oj.MoEConfig(d_model=16), mesh=mesh, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 12, 16)), jnp.float32)
    with pytest.raises(ValueError, match=r"token count 12 .* not divisible by the 8 devices"):
        layer(x)


def test_wrong_model_width():
    mesh = mesh_or_skip(2)
    layer = oj.MoELayer(oj.MoEConfig(d_model=16), mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_model=16"):
        layer(jnp.ones((2, 4, 8)))


def test_mesh_off_the_default_devices_is_refused(monkeypatch):
    # Row maps, transports and expert kernels are chosen for the default devices; a mesh of
    # other devices (a CPU mesh on a GPU host) gets a one-line error, not a failing compile.
    mesh = mesh_or_skip(2)
    layer = oj.MoELayer(oj.MoEConfig(d_model=16), mesh=mesh, rngs=nnx.Rngs(0))
    monkeypatch.setattr(oj.moe.kernel_platform, "backend", lambda: "gpu")
    with pytest.raises(ValueError, match="default devices \\(gpu\\), but the mesh is on cpu"):
        layer(jnp.ones((2, 4, 16)))


def test_expert_parallel_dispatch_needs_mesh():
    with pytest.raises(ValueError, match="needs a mesh"):
        oj.MoELayer(oj.MoEConfig(dispatch="occult"), rngs=nnx.Rngs(0))


def test_fused_config_errors():
    with pytest.raises(ValueError, match="multiples of 16"):
        oj.MoEConfig(d_model=24, expert_matmul="fused")
    cfg = oj.MoEConfig(expert_matmul="fused", dispatch="occult")
    with pytest.raises(ValueError, match="runs on GPUs"):
        oj.config.validate_for_mesh(cfg, ("expert",), 2, 2, 8, platform="tpu")


def test_device_cap_needs_a_mesh():
    # Without a mesh every expert is on one device: the cap could not bind, so it is refused
    # rather than silently ignored (the reference on a mesh applies it).
    with pytest.raises(ValueError, match=r"max_devices_per_token caps .* needs a mesh"):
        oj.MoELayer(oj.MoEConfig(dispatch="reference", max_devices_per_token=1),
                    rngs=nnx.Rngs(0))


def test_empty_batch_is_refused():
    mesh = mesh_or_skip(2)
    layer = oj.MoELayer(oj.MoEConfig(d_model=16), mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="got 0 tokens"):
        layer(jnp.ones((0, 4, 16)))


def test_make_mesh_too_large():
    with pytest.raises(ValueError, match=r"needs .* devices"):
        oj.make_mesh(expert=jax.device_count(), data=2)


def test_pallas_expert_matmul_needs_hopper():
    cfg = oj.MoEConfig(d_model=128, d_ff=128, expert_matmul="pallas")
    check = functools.partial(oj.config.validate_for_mesh, cfg, ("expert",), 2, 2, 2, "gpu")
    with pytest.raises(ValueError, match="Hopper \\(sm_90\\) kernels; these GPUs are sm_80"):
        check(gpu_capability="8.0")
    check(gpu_capability="9.0")
    check(gpu_capability="")  # unknown: left to the kernels
    oj.config.validate_for_mesh(cfg, ("expert",), 2, 2, 2, "cpu")  # interpreted on CPU
    oj.config.validate_for_mesh(cfg.replace(expert_matmul="auto"), ("expert",), 2, 2, 2, "gpu",
                                gpu_capability="8.0")


MODEL = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=48)
YARN = dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=8)
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("changes,needle", [
    # values that crashed at the first forward (ZeroDivisionError, math domain error, deep
    # TypeError) or trained to NaN
    ({**YARN, "rope_theta": 1.0}, "rope_theta=1.0 must be > 1 with rope_scaling='yarn'"),
    ({**YARN, "rope_theta": 0.5}, "rope_theta=0.5 must be > 1 with rope_scaling='yarn'"),
    ({**YARN, "rope_beta_fast": 0.0}, "rope_beta_fast=0.0 must be a finite number > 0"),
    ({**YARN, "rope_beta_slow": -1.0}, "rope_beta_slow=-1.0 must be a finite number > 0"),
    ({**YARN, "rope_factor": NAN}, "rope_factor=nan must be a finite number"),
    ({"attn_scale": INF}, "attn_scale=inf must be a finite number"),
    ({"attn_scale": -1.0}, "attn_scale=-1.0 must be >= 0"),
    ({"qkv_clip": NAN}, "qkv_clip=nan must be a finite number"),
    ({"rope_attention_factor": NAN}, "rope_attention_factor=nan must be a finite number"),
    ({"rope_attention_factor": 0.0}, "rope_attention_factor=0.0 must be a finite number > 0"),
    ({"rope_theta": "1e4"}, "rope_theta='1e4' must be a finite number"),
    ({"norm_eps": True}, "norm_eps=True must be a finite number"),
    ({"num_kv_heads": 2.0}, "num_kv_heads=2.0 must be an integer"),
    ({"num_layers": 4, "moe_every": 1.5}, "moe_every=1.5 must be an integer"),
    ({"num_layers": True}, "num_layers=True must be an integer"),
    ({"qkv_bias": 1}, "qkv_bias=1 must be True or False"),
    ({"rope_truncate": 0}, "rope_truncate=0 must be True or False"),
    ({"dense_layers": (1.5,)}, r"dense_layers holds \[1.5\]; give layer indices in \[0, "),
    ({"dense_layers": (2,)}, r"dense_layers holds \[2\]; give layer indices in \[0, "),
    ({"dense_layers": (True,)}, r"dense_layers holds \[True\]"),
    ({"dense_layers": 1}, "dense_layers=1 must be a tuple of layer indices"),
])
def test_bad_model_config_values(changes, needle):
    with pytest.raises(ValueError, match=needle) as info:
        ModelConfig(**{**MODEL, **changes})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(ModelConfig)
                                   if f.type in ("int", "float", "bool")], ids=lambda f: f.name)
def test_every_typed_model_field_is_checked(field):
    """Every int, float and bool field refuses a value of the wrong type, naming the field."""
    bad = {"int": [1.0, True, "2"], "float": [NAN, INF, -INF, True, None],
           "bool": [1, 0, "yes", None]}[field.type]
    for value in bad:
        with pytest.raises(ValueError, match=f"^model.{field.name}=") as info:
            ModelConfig(**{**MODEL, **YARN, field.name: value})
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("changes", [
    {**YARN, "rope_theta": 1.01, "rope_beta_fast": 1e-3, "rope_beta_slow": 1e-3},
    {**YARN, "rope_factor": 0.5, "rope_truncate": False, "rope_attention_factor": 1e-3},
    {"rope_theta": 1, "norm_eps": np.float32(1e-12), "attn_scale": 0, "qkv_clip": 0.0},
    {"num_heads": np.int64(2), "num_kv_heads": np.int32(1), "head_dim": np.int64(8)},
    {"num_layers": 3, "dense_layers": [np.int64(0), 2], "moe_every": 1},
])
def test_edge_model_config_values_construct(changes):
    cfg = ModelConfig(**{**MODEL, **changes})
    assert np.all(np.isfinite(np.asarray(cfg.inverse_frequencies())))
    assert all(type(i) is int for i in cfg.dense_layers)
