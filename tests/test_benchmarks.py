"""The GPU benchmark scripts still run end to end (tiny shapes, CPU; no timing is asserted), and
the variants they compare agree — so a GPU session is not spent on a broken script."""

import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")
sys.path.insert(0, BENCHMARKS)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_fused_experts_script(tmp_path):
    import fused_experts

    out = tmp_path / "fused.json"
    fused_experts.main(["--smoke", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"ragged_dot", "fused"}
    assert all(r["rel_diff"] < 2e-2 for r in rows)


def test_moe_layer_script(tmp_path):
    import moe_layer
    from conftest import mesh_or_skip

    mesh_or_skip(2)  # the run below asks for an expert axis of 2

    out = tmp_path / "layer.json"
    moe_layer.main(["--shapes", "tiny", "--tokens", "32", "--devices", "2", "--iters", "1",
                    "--transports", "dense,ragged", "--expert-matmul", "ragged_dot,fused",
                    "--out", str(out)])
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2 * 2  # modes × transports × expert matmuls
    assert all(r["max_diff"] < 5e-2 for r in rows)  # bfloat16 compute, one input


def test_row_maps_script(tmp_path):
    import row_maps

    out = tmp_path / "rows.json"
    row_maps.main(["--smoke", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {(r["map"], r["pass"]) for r in rows} == {
        (m, p) for m in ("dispatch", "items")
        for p in ("expand", "reduce", "expand bwd", "reduce bwd")}
    assert all(r["max_diff"] < 1e-2 for r in rows)  # XLA gathers and kernels agree


def test_expert_matmul_group_sizes_and_row_work():
    import expert_matmul
    import numpy as np

    skewed = expert_matmul.group_sizes(16384, 64)
    assert skewed.sum() == 16384 and skewed.min() >= 0 and skewed.max() > 2 * 16384 // 64
    equal = expert_matmul.group_sizes(16384, 64, kind="equal")
    np.testing.assert_array_equal(equal, np.full(64, 256))
    # Row work counts each group's tiles from its first row: equal 256-row groups fill 128-row
    # tiles exactly; a group of s rows needs ceil(s / 128) tiles when it starts on the grid.
    assert expert_matmul.row_work(equal, 128) == 1.0
    assert expert_matmul.row_work(np.array([100, 28]), 128) == 2.0
    assert expert_matmul.row_work(skewed, 128) > expert_matmul.row_work(skewed, 64) > 1.0
    with pytest.raises(ValueError, match="divisible"):
        expert_matmul.group_sizes(100, 64, kind="equal")


@pytest.mark.parametrize("sweep", ["none", "small", "pipeline", "schedule", "rows", "wgsplit",
                                   "tall"])
def test_expert_matmul_sweeps_list_the_default_first_and_only_fitting_tiles(sweep):
    """Every sweep starts with the default tiling and lists only tilings whose tiles divide
    the product (a GPU run would otherwise spend its time on configs that cannot run)."""
    import expert_matmul

    from kernels import grouped_matmul as gm
    from kernels.gmm_mgpu import check_tiles

    for k, n in [(2048, 1024), (2048, 1408), (2048, 2048)]:
        for pass_ in ("fwd", "dx", "dw"):
            tilings = expert_matmul.our_tilings(gm, pass_, k, n, sweep)
            if pass_ == "dw":
                assert tilings[0] == gm.tgmm_tiling(k, n)
                assert all(k % t.block_k == 0 and n % t.block_n == 0 for t in tilings)
                continue
            contraction, width = (n, k) if pass_ == "dx" else (k, n)
            assert tilings[0] == gm.default_gmm_tiling(contraction, width)
            for t in tilings:  # what the kernels check before they trace
                check_tiles(contraction, width, t, None, interpret=False)


def test_benchmark_variants_patch_the_defaults_and_restore_them():
    """``@gmmcols`` puts the column split back, ``@widedw`` widens tgmm's tiles; suffixes
    combine, and the library's defaults are back after the variant."""
    import previous_paths

    from kernels import grouped_matmul as gm
    from kernels import occult_matmul as om

    before = gm.gmm_tiling(2048, 2048), gm.tgmm_tiling(2048, 2048)
    odd_width = gm.tgmm_tiling(2048, 1408)
    assert before[0].split_rows
    with previous_paths.previous_schedules("pallas@gmmcols@widedw"):
        assert not gm.gmm_tiling(2048, 2048).split_rows
        assert not om.gather_gmm_tiling(2048, 2048).split_rows
        wide = gm.tgmm_tiling(2048, 2048)
        assert (wide.block_k, wide.block_n) == (128, 256)
        gathered = om.gather_tgmm_tiling(2048, 2048)
        assert (gathered.split_k, gathered.tile_k, gathered.tile_n) == (True, 64, 256)
        assert gm.tgmm_tiling(2048, 1408) == odd_width  # 256-wide tiles do not fit there
    assert (gm.gmm_tiling(2048, 2048), gm.tgmm_tiling(2048, 2048)) == before


def test_perlaunch_variant_launches_a_kernel_per_message_and_restores():
    """``pallas@perlaunch`` (moe_layer.py) traces the layer anew with a kernel per message: its
    forward lowers to three Mosaic kernels (rows, metadata, combine), the default's to two —
    even when the default was traced first, into the layer's per-config cache."""
    import re

    import jax
    import jax.numpy as jnp
    import previous_paths
    from conftest import cuda_module_text, mesh_or_skip
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import occult_jax as oj
    from occult_jax import transport
    from occult_jax.dispatch import ExpertWeights, Layout

    mesh = mesh_or_skip(2)
    cfg = oj.MoEConfig(num_experts=4, top_k=2, d_model=256, d_ff=64, transport="pallas",
                       expert_matmul="ragged_dot")
    layout = Layout(axis_name="expert", all_axes=tuple(mesh.axis_names), num_devices=2,
                    capacity=32, backend="ragged_dot", platform="gpu")
    e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff

    def spec(shape, dtype, *axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*axes)))

    weights = ExpertWeights(spec((d, e), jnp.float32), spec((e, d, f), jnp.float32, "expert"),
                            spec((e, d, f), jnp.float32, "expert"),
                            spec((e, f, d), jnp.float32, "expert"), spec((e, e), jnp.float32))
    args = [spec((64, d), jnp.float32, tuple(mesh.axis_names)), weights, spec((e,), jnp.int32)]

    def kernels():
        fn = oj.moe.expert_parallel_fn(cfg, layout, mesh)
        text = cuda_module_text(fn, args, ["mosaic_gpu", "mosaic_gpu_v2"])
        return len(re.findall(r"custom_call @mosaic_gpu\w*\(", text))

    move = transport._move
    assert kernels() == 2
    with previous_paths.previous_transport("pallas@perlaunch"):
        assert kernels() == 3
    assert transport._move is move
    assert kernels() == 2
    for name in ("pallas@perlanch", "dense@perlaunch"):
        with pytest.raises(ValueError, match="pallas@perlaunch"):
            with previous_paths.previous_transport(name):
                pass


def test_exchange_script(tmp_path, monkeypatch):
    """The bandwidth benchmark on the CPU mesh: dense and (emulated) ragged agree with each
    other, and the device-time path runs (no GPU kernels here, so its GB/s is nan)."""
    import math

    import exchange

    for name in ("XLA_FLAGS", "NCCL_NVLS_ENABLE"):  # the script sets them; put them back after
        monkeypatch.setenv(name, os.environ.get(name, ""))

    out = tmp_path / "exchange.json"
    exchange.main(["--rows", "64", "--width", "64", "--fill", "1,0.5", "--transports",
                   "dense,ragged", "--steps", "2", "--iters", "1", "--device-time",
                   "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 and all(r["correct"] for r in rows)
    assert all(math.isnan(r["device_GBps"]) for r in rows)
