"""Bad input gets a one-line error that says what to change, before anything compiles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mesh_or_skip
from flax import nnx
from jax.sharding import AxisType, Mesh

import occult_jax as oj


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
