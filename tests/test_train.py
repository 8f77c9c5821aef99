"""The training program: resume is bit-exact, config front ends agree, bad values fail early."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import mesh_or_skip

from occult_jax import frontends, job, metrics, run_config, train_lib
from occult_jax.config import MoEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def tiny_config(workdir, **changes):
    config = frontends.load_config(os.path.join(CONFIGS, "default.py"))
    config.update(steps=6, batch_size=8, seq_len=16, log_every=1, eval_every=0,
                  checkpoint_every=0, workdir=str(workdir))
    config.model.update(num_layers=1, d_model=32, num_heads=2, vocab_size=256)
    config.moe.update(d_ff=16)
    config.data.max_bytes = 200_000
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def losses(workdir):
    records = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in records}


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    mesh_or_skip(expert=4, data=2)
    straight = tmp_path / "straight"
    train_lib.train_and_evaluate(tiny_config(straight), progress=False)
    resumed = tmp_path / "resumed"
    config = tiny_config(resumed, checkpoint_every=2, keep_checkpoints=2)
    out = train_lib.train_and_evaluate(config, stop_after=3, progress=False)  # "preempted"
    assert out["step"] == 3
    assert os.path.isdir(resumed / "checkpoints" / "3")
    train_lib.train_and_evaluate(config, progress=False)  # resumes from step 3
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(1, 7))
    assert a[1] > a[6]
    for step in range(1, 7):
        assert a[step] == b[step], (step, a[step], b[step])  # bit for bit
    assert sorted(os.listdir(resumed / "checkpoints")) == ["4", "6"]  # the last K kept
    # config.json stays the first run's; the resumed run's config lies beside it
    assert (resumed / "config.resumed_at_3.json").is_file()
    first = (resumed / "config.json").read_text()
    # A finished run: nothing to train, nothing loaded, compiled or overwritten.
    tiny = tiny_config(resumed, checkpoint_every=2, keep_checkpoints=2, seed=1)

    def no_setup(*args):
        raise AssertionError("a finished run built its model")

    monkeypatch.setattr(train_lib, "setup", no_setup)
    assert train_lib.train_and_evaluate(tiny, progress=False) == {"step": 6}
    assert (resumed / "config.json").read_text() == first
    assert sorted(b) == sorted(losses(resumed))


def test_resume_notes_a_changed_data_order(tmp_path):
    mesh_or_skip(expert=4, data=2)
    train_lib.train_and_evaluate(tiny_config(tmp_path, steps=1), progress=False)
    for changes, said in (({}, None), ({"seed": 3}, "seed=3 (was 0)"),
                          ({"batch_size": 16}, "batch_size=16 (was 8)")):
        run = train_lib.setup(tiny_config(tmp_path, steps=2, **changes), str(tmp_path))
        run.checkpointer.close()
        notes = [n for n in run.notes if "differ from an uninterrupted run" in n]
        assert len(notes) == (said is not None) and all(said in n for n in notes)


def test_low_precision_expert_params_are_noted(tmp_path):
    mesh_or_skip(expert=4, data=2)
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(tmp_path / dtype, **{"moe.param_dtype": dtype})
        run = train_lib.setup(config, config.workdir)
        run.checkpointer.close()
        notes = [n for n in run.notes if "no float32 master copy" in n]
        assert len(notes) == (dtype != "float32")


def test_resume_with_another_model_is_a_one_line_error(tmp_path):
    mesh_or_skip(expert=4, data=2)
    train_lib.train_and_evaluate(tiny_config(tmp_path, steps=1), progress=False)
    wider = tiny_config(tmp_path, steps=2, **{"moe.d_ff": 32})
    with pytest.raises(run_config.ConfigError, match=r"step 1 holds another model .*"
                       r"resume with the config it was trained with") as info:
        train_lib.setup(wider, wider.workdir)
    assert "\n" not in str(info.value)


def test_init_from_loads_params_only(tmp_path):
    mesh_or_skip(expert=4, data=2)
    source = tmp_path / "source"
    train_lib.train_and_evaluate(tiny_config(source, steps=2), progress=False)
    tuned = tmp_path / "tuned"
    config = tiny_config(tuned, steps=1, init_from=str(source))
    train_lib.train_and_evaluate(config, progress=False)
    first_fresh = losses(source)[1]
    first_tuned = losses(tuned)[1]
    assert first_tuned < first_fresh  # started from trained params, optimizer fresh
    # a step folder, also when copied under a name of its own
    step_folder = tmp_path / "best"
    shutil.copytree(source / "checkpoints" / "2", step_folder)
    for folder in (source / "checkpoints" / "2", step_folder):
        run = train_lib.setup(tiny_config(tmp_path / "from_step", init_from=str(folder)),
                              str(tmp_path / "from_step"))
        run.checkpointer.close()
        assert run.start == 0 and any(str(folder) in note for note in run.notes)
        trained = train_lib.setup(tiny_config(source), str(source))
        trained.checkpointer.close()
        for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(trained.params),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wider = tiny_config(tmp_path / "wider", steps=1, init_from=str(source))
    wider.moe.d_ff = 32
    with pytest.raises(run_config.ConfigError, match="does not fit this model") as info:
        train_lib.setup(wider, wider.workdir)
    assert "\n" not in str(info.value)


def test_stop_signal_turns_sigterm_into_a_flag():
    import signal

    with job.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def _flag_config(argv):
    """Parses `--config=...` style flags the way train.py does (ml_collections config_flags)."""
    from absl import flags
    from ml_collections import config_flags

    values, argv = flags.FlagValues(), ["train.py", *argv]
    config_flags.DEFINE_config_file("config", os.path.join(CONFIGS, "default.py"),
                                    flag_values=values, lock_config=False, sys_argv=argv)
    values(argv)
    return values.config


def test_gin_and_config_flags_agree():
    default = frontends.load_config(os.path.join(CONFIGS, "default.py"))
    # default.gin is the default config: applied over a different config, it restores it
    small = frontends.load_config(os.path.join(CONFIGS, "olmoe_1b7b.py") + ":small")
    assert small.to_dict() != default.to_dict()
    restored = frontends.apply_gin(small, [os.path.join(CONFIGS, "default.gin")])
    assert restored.to_dict() == default.to_dict()
    # the same overrides through both syntaxes
    by_flags = _flag_config(["--config.moe.top_k=4", "--config.steps=7",
                             "--config.moe.dispatch=standard", "--config.optim.lr=0.01"])
    by_gin = frontends.apply_gin(default, [os.path.join(CONFIGS, "default.gin")],
                                 ["moe.top_k=4", "config.steps=7", "moe.dispatch='standard'",
                                  "optim.lr=0.01"])
    assert by_gin.to_dict() == by_flags.to_dict()
    assert by_gin.moe.top_k == 4 and default.moe.top_k == 2  # the base is not modified
    by_flags = _flag_config([f"--config={os.path.join(CONFIGS, 'olmoe_1b7b.py')}:small"])
    assert by_flags.to_dict() == small.to_dict()


def test_logged_moe_stats_cover_every_step_of_the_window():
    rng = np.random.default_rng()
    layers, experts = 2, 8
    window = [{"loss": rng.random(), "total_loss": rng.random(), "grad_norm": rng.random(),
               "moe": {"expert_load": rng.integers(1, 100, (layers, experts)),
                       "dropped": rng.integers(0, 50, layers),
                       **{k: rng.random(layers) for k in ("ct", "wire_bytes", "aux_loss",
                                                          "z_loss")}}}
              for _ in range(5)]
    window[-1]["moe"]["dropped"] = np.zeros(layers, np.int64)  # overflow earlier in the window
    got = train_lib._scalar_metrics(window)
    stats = [w["moe"] for w in window]
    np.testing.assert_allclose(got["dropped"], sum(s["dropped"] for s in stats))
    assert min(got["dropped"]) > 0
    np.testing.assert_allclose(got["ct"], np.mean([s["ct"] for s in stats], axis=0))
    load = np.array([s["expert_load"] for s in stats], np.float64)
    np.testing.assert_allclose(got["imbalance"],
                               (load.max(-1) / load.mean(-1)).mean(axis=0))
    assert got["loss"] == window[-1]["loss"]
    assert got["loss_avg"] == pytest.approx(np.mean([w["loss"] for w in window]))


def test_default_config_covers_every_option():
    import dataclasses

    default = frontends.load_config(os.path.join(CONFIGS, "default.py"))
    # every MoEConfig field but those train.py fills in (d_model, dtype from `model`; its mesh
    # names the expert axis) can be set from the command line
    fields = {f.name for f in dataclasses.fields(MoEConfig)}
    assert set(default.moe.keys()) == fields - {"d_model", "dtype", "expert_axis"}
    # default.gin binds every field of the default config, with the default's values
    with open(os.path.join(CONFIGS, "default.gin")) as f:
        text = f.read()
    assert text[text.index("\nconfig.") + 1:] == frontends.to_gin(default)
    # the README's pruning fine-tune flags reach the layer's config
    flagged = _flag_config(["--config.moe.max_devices_per_token=1",
                            "--config.moe.prune_rule=similarity",
                            "--config.moe.routed_scaling_factor=2.5"])
    moe = run_config.moe_config(flagged)
    assert (moe.max_devices_per_token, moe.prune_rule, moe.routed_scaling_factor) == (
        1, "similarity", 2.5)
    assert run_config.moe_config(default).max_devices_per_token is None


@pytest.mark.parametrize("binding,match", [
    ("moe.topk=4", "no field 'moe.topk'"),
    ("nothing.x=1", "No configurable matching 'nothing'"),
    ("moe.top_k='x'", "moe.top_k='x'"),
    ("config.moe=1", "is a section"),
])
def test_gin_errors_are_one_line(binding, match):
    default = frontends.load_config(os.path.join(CONFIGS, "default.py"))
    with pytest.raises(ValueError, match=match) as info:
        frontends.apply_gin(default, [], [binding])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("changes,match", [
    ({"steps": 0}, "steps=0 must be a positive integer"),
    ({"batch_size": 12}, "batch_size=12 is not divisible by the 8 devices"),
    ({"data.path": "/no/such/file.txt"}, "does not exist"),
    ({"mesh.expert": 3}, "mesh.expert=3 does not divide the 8 devices"),
    ({"mesh.expert": 4, "moe.num_experts": 6, "moe.top_k": 2},
     "num_experts=6 is not divisible by mesh.expert"),
    ({"mesh.expert": -2}, "mesh.expert=-2 must be"),
    ({"mesh.data": 3}, "mesh.data=3 does not divide the 8 devices"),
    ({"moe.dispatch": "fast"}, "dispatch='fast' is unknown"),
    ({"moe.top_k": 9}, "top_k=9 exceeds num_experts"),
    ({"model.num_heads": 3}, "not divisible by model.num_heads=3"),
    ({"model.vocab_size": 100}, "raise model.vocab_size"),
    ({"seq_len": 10**7}, "fewer than seq_len"),
    ({"optim.lr": -1.0}, "optim.lr=-1.0 must be > 0"),
    ({"data.val_fraction": 1.0}, "val_fraction=1.0 must be in"),
    ({"init_from": "/no/such/run"}, "init_from="),
    ({"eval_every": 2, "eval_batches": 0}, "eval_batches=0 evaluates nothing"),
    # the MoE layer's mesh checks, before the layer is built
    ({"moe.transport": "pallas"}, "runs on GPU meshes only"),
    ({"moe.max_devices_per_token": 1, "moe.top_k": 4}, "max_devices_per_token=1 devices hold"),
    ({"moe.expert_axis": "ep"}, "names its expert axis 'expert'"),
    # values that used to pass and fail at trace time, or train to NaN
    ({"model.head_dim": -4}, "head_dim=-4 must be >= 0"),
    ({"model.rope_theta": -1.0}, "rope_theta=-1.0 must be a finite number > 0"),
    ({"model.norm_eps": -1.0}, "norm_eps=-1.0 must be a finite number > 0"),
    ({"model.first_dense_layers": 5}, "leave no MoE layer among num_layers=1"),
    ({"seed": -1}, r"seed=-1 must be an integer in \[0, 2\*\*32\)"),
    ({"seed": 2**32}, "seed=4294967296 must be an integer in"),
    ({"optim.b1": 1.5}, r"optim.b1=1.5 must be in \[0, 1\)"),
    ({"optim.eps": -1.0}, "optim.eps=-1.0 must be > 0"),
    ({"optim.weight_decay": -1.0}, "optim.weight_decay=-1.0 must be >= 0"),
    ({"moe.aux_loss_weight": -1.0}, "aux_loss_weight=-1.0 must be a finite number >= 0"),
])
def test_bad_config_values_fail_before_compiling(tmp_path, changes, match):
    mesh_or_skip(expert=4, data=2)
    config = tiny_config(tmp_path, **changes)
    with pytest.raises(run_config.ConfigError, match=match) as info:
        train_lib.setup(config, str(tmp_path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("devices,experts,data,want", [
    (8, 8, -1, (4, 2)),  # the CPU default: two experts per device, the rest data-parallel
    (1, 8, -1, (1, 1)),  # one GPU
    (2, 8, -1, (2, 1)),
    (8, 64, -1, (8, 1)),
    (8, 60, -1, (4, 2)),  # 60 experts do not split over 8
    (6, 60, -1, (6, 1)),
    (8, 64, 4, (2, 4)),  # a fixed data axis leaves 2 devices
    (8, 0, -1, (1, 8)),  # no MoE layers
    (8, 2, -1, (1, 8)),  # two experts: one device keeps both
])
def test_auto_expert_axis_keeps_two_experts_per_device(devices, experts, data, want):
    """mesh.expert=0 (the default): as many expert devices as divide the devices the data axis
    leaves and the experts, each keeping at least two experts."""
    config = frontends.load_config(os.path.join(CONFIGS, "default.py"))
    assert config.mesh.expert == 0
    config.mesh.data = data
    assert run_config.mesh_shape(config, devices, experts) == want


def test_mesh_facts_reach_the_config_checks_before_compiling(tmp_path, monkeypatch):
    """setup checks the MoE config against the built mesh (processes per expert-axis group,
    which validate cannot know): transport="pallas" across hosts is a one-line ConfigError.
    The facts are faked (a 2-host GPU mesh), and validate's platform check let through."""
    mesh_or_skip(expert=4, data=2)
    gpu_facts = {"platform": "gpu", "expert_axis_hosts": 2, "gpu_capability": "9.0"}
    monkeypatch.setattr(run_config, "mesh_facts", lambda axis, mesh: gpu_facts)
    validate = run_config.validate
    monkeypatch.setattr(run_config, "validate",
                        lambda config, n, *a: validate(config, n, "gpu", "9.0"))
    config = tiny_config(tmp_path, **{"moe.transport": "pallas"})
    with pytest.raises(run_config.ConfigError, match="spans 2 processes") as info:
        train_lib.setup(config, str(tmp_path))
    assert "\n" not in str(info.value)


def test_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    config = tiny_config(path)
    with pytest.raises(run_config.ConfigError, match="is a file; give a folder"):
        train_lib.setup(config, str(path))


@pytest.mark.parametrize("value", ["abc", "0"])
def test_cli_refuses_bad_host_devices(value):
    result = subprocess.run(  # exits before JAX is imported
        [sys.executable, os.path.join(ROOT, "train.py"), f"--host_devices={value}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --host_devices={value} must be a positive integer."]


def test_cli_reports_config_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--config.steps=0",
         f"--config.workdir={tmp_path}"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: steps=0 must be a positive integer.")


@pytest.mark.parametrize("env,kwargs", [
    ({}, None),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, None),  # a batch script, no srun: one process
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}, {}),  # srun's tasks
    ({"SLURM_STEP_NUM_TASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "a"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}),
])
def test_distributed_start_up_follows_the_environment(monkeypatch, env, kwargs):
    import jax

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
                 "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert job.maybe_initialize_distributed() == (kwargs is not None)
    assert calls == ([] if kwargs is None else [kwargs])
